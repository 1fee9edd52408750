"""Reading a request's activation budget, in one place for every entry point.

The server middleware (header and body), the SamplingParams check (offline `LLM` and the OpenAI
server's own request validation) and the worker all parse budgets here, so they agree on what is valid.
"""

from __future__ import annotations

import math
from typing import Any

BUDGET_KEY = "activation_budget"
"""Key in `SamplingParams.extra_args` / the request body's `vllm_xargs`."""

MAX_BUDGET_TEXT = 32
"""Longest budget text accepted (a header is small; anything longer is an attack or a mistake)."""


class BudgetError(ValueError):
    """An invalid activation budget; the message names the value and the valid range."""


def valid_range(min_budget: float | None) -> str:
    # Round the minimum up for display, so the printed bound is itself a valid budget (1/3 -> 0.333334).
    low = (
        f"{math.ceil(min_budget * 1e6) / 1e6:.6f}".rstrip("0").rstrip(".") if min_budget is not None else "0"
    )
    bracket = "[" if min_budget is not None else "("
    return f"a number in {bracket}{low}, 1]"


def parse_budget(raw: Any, *, min_budget: float | None = None, source: str = "activation_budget") -> float:
    """Parse a budget b from a header string, a JSON number or a Python float; BudgetError if invalid.

    `min_budget` is the model's smallest valid b (L·K_base / A); below it a budget would ask for fewer
    experts than the per-token floor K_base allows.
    """
    if isinstance(raw, bool):  # bool is an int in Python; `true` is never a budget
        raise BudgetError(f"{source}={raw!r} is not a number; expected {valid_range(min_budget)}")
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    if isinstance(raw, str):
        text = raw.strip()
        if len(text) > MAX_BUDGET_TEXT:
            raise BudgetError(
                f"{source} is {len(text)} characters long; expected {valid_range(min_budget)} "
                f"of at most {MAX_BUDGET_TEXT} characters"
            )
        try:
            value = float(text)
        except ValueError:
            raise BudgetError(
                f"{source}={text!r} is not a number; expected {valid_range(min_budget)}"
            ) from None
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        raise BudgetError(
            f"{source}={raw!r} has type {type(raw).__name__}; expected {valid_range(min_budget)}"
        )
    if not math.isfinite(value):
        raise BudgetError(f"{source}={value} is not finite; expected {valid_range(min_budget)}")
    if value <= 0.0 or value > 1.0:
        raise BudgetError(f"{source}={value:g} is out of range; expected {valid_range(min_budget)}")
    # The 1e-12 slack matches BudgetFile.absolute_budget, which floors b·A with a 1e-9 guard.
    if min_budget is not None and value < min_budget - 1e-12:
        raise BudgetError(
            f"{source}={value:g} is below this model's minimum (every token keeps at "
            f"least K_base experts per layer); expected {valid_range(min_budget)}"
        )
    return value


def budget_from_extra_args(extra_args: dict[str, Any] | None) -> Any:
    """The raw budget a request carries, or None when it names none."""
    if not extra_args:
        return None
    return extra_args.get(BUDGET_KEY)
