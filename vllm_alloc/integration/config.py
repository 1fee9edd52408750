"""Plugin settings: `--additional-config '{"vllm_alloc": {...}}'`, then VLLM_ALLOC_* variables.

Keys of the `vllm_alloc` object:
  budget_file     path of a budget file, or the name of one shipped in configs/ (default: uniform)
  default_budget  b for requests that name none (default: the budget file's, normally 1.0)
  scope           Alloc-T reallocation scope: "budget" (default), "request", or "token" (no
                  reallocation: every token keeps exactly its top-K_l; for ablations)
  weights         weights of kept experts: "topk" (default), "kept" or "raw"
The budget file supplies the defaults for the last three; these settings override it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_alloc import envs

CONFIG_KEY = "vllm_alloc"
SCOPES = ("budget", "request", "token")
WEIGHTS = ("topk", "kept", "raw")
_KEYS = ("budget_file", "default_budget", "scope", "weights")


@dataclass(frozen=True)
class PluginConfig:
    budget_file: str | None = None
    default_budget: float | None = None
    scope: str | None = None
    weights: str | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> PluginConfig:
        section: Any = {}
        if isinstance(additional_config, dict):
            section = additional_config.get(CONFIG_KEY) or {}
        if not isinstance(section, dict):
            raise ValueError(
                f'--additional-config "{CONFIG_KEY}" must be a JSON object with keys {", ".join(_KEYS)}; '
                f"got {section!r}"
            )
        unknown = sorted(set(section) - set(_KEYS))
        if unknown:
            raise ValueError(
                f'--additional-config "{CONFIG_KEY}" has unknown key(s) {unknown}; valid keys: '
                f"{', '.join(_KEYS)}"
            )
        config = cls(
            budget_file=section.get("budget_file", envs.VLLM_ALLOC_BUDGET_FILE),
            default_budget=_as_float(section.get("default_budget", envs.VLLM_ALLOC_DEFAULT_BUDGET)),
            scope=section.get("scope", envs.VLLM_ALLOC_SCOPE),
            weights=section.get("weights", envs.VLLM_ALLOC_WEIGHTS),
        )
        config.check()
        return config

    def check(self) -> None:
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"vllm_alloc scope={self.scope!r} is not valid; expected one of {SCOPES}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"vllm_alloc weights={self.weights!r} is not valid; expected one of {WEIGHTS}")
        if self.default_budget is not None and not 0.0 < self.default_budget <= 1.0:
            raise ValueError(
                f"vllm_alloc default_budget={self.default_budget} is out of range; "
                "expected a number in (0, 1]"
            )


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"vllm_alloc default_budget={value!r} is not a number; expected a number in (0, 1]"
        ) from None
