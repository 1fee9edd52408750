"""Reading a request's activation budget, in one place for every entry point.

The server middleware (header and body), the SamplingParams check (offline `LLM` and the OpenAI
server's own request validation), the worker (`BudgetFile.absolute_budget`), the settings
(`vllm_alloc.integration.config`, `vllm_alloc.envs`) and the CLIs all parse budgets here, so they agree
on what is valid and say it the same way.
"""

from __future__ import annotations

import math
from hashlib import sha256
from typing import Any

BUDGET_KEY = "activation_budget"
"""Key in `SamplingParams.extra_args` / the request body's `vllm_xargs`."""

MAX_BUDGET_TEXT = 32
"""Longest budget text accepted (a header is small; anything longer is an attack or a mistake)."""

MIN_BUDGET_SLACK = 1e-12
"""A b this far below the model's minimum still counts as the minimum: k_base/K is a float, and a
caller that passes `min_budget` itself (or its 6-decimal print) must not be refused for rounding."""

CAP_SCALE = 1000
"""The distinct-expert cap's share ρ is held in thousandths (`vllm_alloc.routing.cap`); 1/CAP_SCALE is the
smallest share, and the settings and budget files read a share as a budget in [1/CAP_SCALE, 1]."""


class BudgetError(ValueError):
    """An invalid activation budget; the message names the value and the valid range."""


def range_text(min_budget: float | None) -> str:
    """`[0.25, 1]` for a model whose minimum is 0.25, `(0, 1]` when the model is unknown."""
    if min_budget is None:
        return "(0, 1]"
    # The smallest 6-decimal b that is itself valid (1/3 -> 0.333334, but 0.3 -> 0.3 although
    # 0.3·1e6 is 300000.00000000006 in floats: the 1e-6 absorbs that, MIN_BUDGET_SLACK admits it).
    low = math.ceil(min_budget * 1e6 - 1e-6) / 1e6
    return f"[{f'{low:.6f}'.rstrip('0').rstrip('.')}, 1]"


def valid_range(min_budget: float | None) -> str:
    return f"a number in {range_text(min_budget)}"


def shown(raw: Any) -> str:
    """`raw` for an error message: its repr escaped to ASCII, at most 40 characters."""
    if isinstance(raw, int) and raw.bit_length() > 128:  # repr of a 5000-digit int raises, and says nothing
        return f"<an integer of about {int(raw.bit_length() * math.log10(2)) + 1} digits>"
    text = ascii(raw)
    return text if len(text) <= 40 else text[:39] + "…"


def parse_budget(raw: Any, *, min_budget: float | None = None, source: str = "activation_budget") -> float:
    """Parse a budget b from a header (bytes or text), a JSON number or a Python float; BudgetError if
    invalid.

    `min_budget` is the model's smallest valid b (L·K_base / A); below it a budget would ask for fewer
    experts than the per-token floor K_base allows.
    """
    expected = valid_range(min_budget)
    if isinstance(raw, bool):  # bool is an int in Python; `true` is never a budget
        raise BudgetError(f"{source}={raw!r} is not a number; expected {expected}")
    if isinstance(raw, bytes | str):
        text = raw.strip()
        if len(text) > MAX_BUDGET_TEXT:
            raise BudgetError(
                f"{source} is {len(text)} characters long; expected {expected} "
                f"of at most {MAX_BUDGET_TEXT} characters"
            )
        # A number is ASCII. Refusing anything else here keeps header bytes from being shown decoded
        # with the wrong charset (mojibake), and float() from reading other scripts' digits ("٠.٥").
        if not text.isascii():
            raise BudgetError(
                f"{source}={shown(text)} is not a number (non-ASCII characters); expected {expected}"
            )
        try:
            value = float(text)
        except ValueError:
            ascii_text = text.decode("ascii") if isinstance(text, bytes) else text
            raise BudgetError(f"{source}={shown(ascii_text)} is not a number; expected {expected}") from None
    elif isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:  # a JSON integer of 309+ digits: no float holds it, and no budget is one
            raise BudgetError(f"{source}={shown(raw)} is out of range; expected {expected}") from None
    else:
        raise BudgetError(f"{source}={shown(raw)} has type {type(raw).__name__}; expected {expected}")
    if not math.isfinite(value):
        raise BudgetError(f"{source}={value} is not finite; expected {expected}")
    if value <= 0.0 or value > 1.0:
        raise BudgetError(f"{source}={value:g} is out of range; expected {expected}")
    if min_budget is not None and value < min_budget - MIN_BUDGET_SLACK:
        raise BudgetError(
            f"{source}={value:g} is below this model's minimum (every token keeps at "
            f"least K_base experts per layer); expected {expected}"
        )
    return value


def share_units(share: float) -> int:
    """A cap share ρ as the cap tables hold it: q = round(ρ · CAP_SCALE) thousandths (CAP_SCALE = no
    cap, so a share that rounds to it caps nothing)."""
    return round(float(share) * CAP_SCALE)


def caps(share: float) -> bool:
    """Whether a share ρ is a cap: in [1/CAP_SCALE, 1) and still below CAP_SCALE once held in thousandths
    (0.9996 rounds to no cap)."""
    return 1 / CAP_SCALE <= share < 1 and share_units(share) < CAP_SCALE


def parse_cap_share(raw: Any, *, source: str = "expert_cap") -> float:
    """A distinct-expert cap's share ρ (`vllm_alloc.routing.cap`), read as a number in [1/CAP_SCALE, 1] (1: no
    cap; ρ is held in thousandths, so a share that rounds to 1 is no cap too); BudgetError if invalid."""
    expected = f"a share of experts in [{1 / CAP_SCALE:g}, 1] (1: no cap)"
    try:
        value = parse_budget(raw, source=source)
    except BudgetError as exc:
        raise BudgetError(str(exc).split("; expected ")[0] + f"; expected {expected}") from None
    if share_units(value) < 1:
        raise BudgetError(f"{source}={value:g} is out of range; expected {expected}")
    return value


def budget_from_extra_args(extra_args: dict[str, Any] | None) -> Any:
    """The raw budget a request carries, or None when it names none."""
    if not extra_args:
        return None
    return extra_args.get(BUDGET_KEY)


# vLLM refuses cache salts longer than this (validate_cache_salt).
_MAX_CACHE_SALT = 128
_SALT_PREFIX = "activation_budget="


def format_budget(b: float) -> str:
    """b as echoed and salted: the shortest text that parses back to the same float."""
    return repr(float(b))


def cache_salt(client_salt: Any, budget: float) -> Any:
    """The request's cache_salt under budget b: prefix-cache KV computed at one budget must never serve
    another (the experts that produced it differ). b = 1.0 keeps the client's salt (or none), so
    full-budget requests share the stock namespace. A malformed client salt is returned unchanged for
    vLLM to refuse with its own message. Idempotent: a salt this already made for b comes back as it is
    (the middleware salts first, then the engine's front end salts every request, whatever its route)."""
    if budget == 1.0 or (client_salt is not None and not (isinstance(client_salt, str) and client_salt)):
        return client_salt
    ours = f"{_SALT_PREFIX}{format_budget(budget)}"
    if client_salt is None:
        return ours
    if f"{client_salt};".startswith(f"{ours};"):
        return client_salt
    combined = f"{ours};{client_salt}"
    if len(combined) > _MAX_CACHE_SALT and len(client_salt) <= _MAX_CACHE_SALT:
        # Still one namespace per (client salt, budget), within vLLM's length limit.
        combined = f"{ours};{sha256(client_salt.encode()).hexdigest()}"
    return combined
