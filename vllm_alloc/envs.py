"""Every VLLM_ALLOC_* environment variable: typed, documented, and read nowhere else.

Values are read when accessed (`envs.VLLM_ALLOC_DEFAULT_BUDGET`), so a test or a launcher can set them
before the engine starts. Plugin settings from `--additional-config '{"vllm_alloc": {...}}'` take
precedence over these variables, and both over the budget file: `vllm_alloc.integration.config` resolves
that order for every process.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vllm_alloc.values import parse_budget, parse_cap_share


def _budget_or_none(name: str, parse: Callable[..., float] = parse_budget) -> Callable[[], float | None]:
    def read() -> float | None:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return None
        return parse(raw, source=name)  # the one budget (or share) validator; its error names the variable

    return read


def _str_or_none(name: str) -> Callable[[], str | None]:
    return lambda: os.environ.get(name) or None


def _int(name: str, default: int, lo: int) -> Callable[[], int]:
    def read() -> int:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer; expected an integer >= {lo}") from None
        if value < lo:
            raise ValueError(f"{name}={value} is out of range; expected an integer >= {lo}")
        return value

    return read


def _flag(name: str) -> Callable[[], bool]:
    return lambda: os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


_VARIABLES: dict[str, tuple[Callable[[], Any], str]] = {
    "VLLM_ALLOC_BUDGET_FILE": (
        _str_or_none("VLLM_ALLOC_BUDGET_FILE"),
        "Budget file path, or the name of a file shipped in configs/. Unset: a uniform allocation.",
    ),
    "VLLM_ALLOC_DEFAULT_BUDGET": (
        _budget_or_none("VLLM_ALLOC_DEFAULT_BUDGET"),
        "Budget b in (0, 1] for requests that name none. Unset: the budget file's default (1.0).",
    ),
    "VLLM_ALLOC_SCOPE": (
        _str_or_none("VLLM_ALLOC_SCOPE"),
        "Alloc-T reallocation scope, `budget`, `request`, `token` (no reallocation) or `position` "
        "(evaluation only: groups by budget and position). Unset: the file's.",
    ),
    "VLLM_ALLOC_WEIGHTS": (
        _str_or_none("VLLM_ALLOC_WEIGHTS"),
        "Weights of kept experts, `topk`, `kept` or `raw`. Unset: the budget file's choice.",
    ),
    "VLLM_ALLOC_EXPERT_CAP": (
        _budget_or_none("VLLM_ALLOC_EXPERT_CAP", parse_cap_share),
        "For experiments: ρ in [0.001, 1], the share of the experts they would touch that the decode "
        "tokens at one budget below 1.0 may use per pass in every MoE layer (1: no cap). Unset: the "
        "budget file's caps.",
    ),
    "VLLM_ALLOC_BUDGET_ALIASES": (
        _str_or_none("VLLM_ALLOC_BUDGET_ALIASES"),
        "Budgets served as model names, comma-separated: `0.75,0.5` serves NAME@0.75 and NAME@0.5.",
    ),
    "VLLM_ALLOC_ADMIN_KEY": (
        _str_or_none("VLLM_ALLOC_ADMIN_KEY"),
        "Key of the admin route (/vllm-alloc/admin, `Authorization: Bearer KEY`). Unset: the route is off.",
    ),
    "VLLM_ALLOC_DISABLE": (
        _flag("VLLM_ALLOC_DISABLE"),
        "1: register() installs nothing; vLLM runs stock even with the plugin installed.",
    ),
    "VLLM_ALLOC_METRICS_FLUSH_STEPS": (
        _int("VLLM_ALLOC_METRICS_FLUSH_STEPS", 1, 1),
        "Forward passes between copies of the device-side counters to Prometheus (a host sync on GPU).",
    ),
    "VLLM_ALLOC_KERNEL_CONFIG": (
        _str_or_none("VLLM_ALLOC_KERNEL_CONFIG"),
        'Pin one Triton launch config for debugging, as JSON: {"BLOCK_M": 16, "BLOCK_N": 64, ...}.',
    ),
    "VLLM_ALLOC_TEST_DEVICE_PATH": (
        _flag("VLLM_ALLOC_TEST_DEVICE_PATH"),
        "Tests only: on CPU, run budget passes through the CUDA path (Alloc-T on the device, the Triton "
        "kernel; set TRITON_INTERPRET=1 and dtype float32) instead of the host path.",
    ),
}


def describe() -> list[tuple[str, str]]:
    """(name, help) for every variable, for docs and `vllm-alloc --help`."""
    return [(name, help_) for name, (_, help_) in _VARIABLES.items()]


def __getattr__(name: str) -> Any:
    if name in _VARIABLES:
        return _VARIABLES[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_VARIABLES)
