"""Plugin settings, resolved in one place for every process (DESIGN.md §3).

Precedence, highest first:
  1. `--additional-config '{"vllm_alloc": {...}}'`
  2. the VLLM_ALLOC_* environment variables (`vllm_alloc.envs`)
  3. the budget file (its scope, weights and default_budget), or without one the uniform allocation
The launcher (`vllm-alloc serve`, before vLLM starts), the API server's budget middleware and the worker
(`AllocState.finalize`) all call `resolve_settings` / `PluginConfig.resolve`, so they agree on the
default budget and the smallest valid one. Budget values are validated by `vllm_alloc.values`.

Keys of the `vllm_alloc` object:
  budget_file     path of a budget file, or the name of one shipped in configs/ (default: uniform)
  default_budget  b for requests that name none (default: the budget file's, normally 1.0)
  scope           Alloc-T reallocation scope: "budget" (default), "request", "token" (no
                  reallocation: every token keeps exactly its top-K_l; for ablations) or "position"
                  (evaluation only: a group is the tokens at one budget and one position of their
                  requests, so teacher-forcing N sequences in one pass measures N decode streams) or
                  "stream" (evaluation only, CPU: every token its own group, and where a budget carries
                  a balance, every token of a request carries it in position order, so teacher-forcing
                  a sequence measures one decode stream)
  weights         weights of kept experts: "topk" (default), "kept" or "raw"
  budget_aliases  budgets served as model names: [0.75, 0.5] serves NAME@0.75 and NAME@0.5 beside NAME
                  (NAME: the first served model name), each running at its budget
                  (`vllm_alloc.serving.middleware`)
  expert_cap      for experiments: ρ in [0.001, 1], the share of the experts they would touch that the
                  decode tokens at one budget below 1.0 may use per pass in every MoE layer
                  (`vllm_alloc.routing.cap`); 1: no cap. Default: the budget file's caps (where the profiler
                  chose them)

No vLLM import here (the launcher uses this before vLLM starts); the budget file module, which imports
torch, is imported only when settings are resolved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vllm_alloc import envs
from vllm_alloc.values import parse_budget, parse_cap_share

if TYPE_CHECKING:
    from vllm_alloc.budget import BudgetFile, ModelFingerprint

CONFIG_KEY = "vllm_alloc"
SCOPES = ("budget", "request", "token", "position", "stream")
WEIGHTS = ("topk", "kept", "raw")
_KEYS = ("budget_file", "default_budget", "scope", "weights", "budget_aliases", "expert_cap")
_ENV = {
    "budget_file": "VLLM_ALLOC_BUDGET_FILE",
    "default_budget": "VLLM_ALLOC_DEFAULT_BUDGET",
    "scope": "VLLM_ALLOC_SCOPE",
    "weights": "VLLM_ALLOC_WEIGHTS",
    "budget_aliases": "VLLM_ALLOC_BUDGET_ALIASES",
    "expert_cap": "VLLM_ALLOC_EXPERT_CAP",
}


@dataclass(frozen=True)
class Settings:
    """The settings a process acts on, after precedence (see `PluginConfig.resolve`)."""

    budget_file: BudgetFile | None  # None only without a file and without a model to build uniform for
    source: str  # the budget file as configured, or "uniform"
    scope: str
    weights: str
    default_budget: float  # b of requests that name none
    min_budget: float | None  # the smallest valid b (k_base / K); None: the model's K is unknown, (0, 1]
    aliases: tuple[float, ...] = ()  # budgets served as model names NAME@b (`alias_names`)
    expert_cap: float | None = None  # ρ for every layer and budget below 1.0 (1: none); None: the file's


def plugin_section(additional_config: Any) -> dict[str, Any]:
    """A copy of the `vllm_alloc` object of an additional config ({} when absent or null).

    ValueError naming the value when it is not a JSON object or has unknown keys."""
    section = additional_config.get(CONFIG_KEY) if isinstance(additional_config, dict) else None
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ValueError(
            f'--additional-config "{CONFIG_KEY}" is {json.dumps(section, default=repr)}; expected a JSON '
            f'object with keys {", ".join(_KEYS)}, e.g. {{"{CONFIG_KEY}": {{"default_budget": 0.5}}}}'
        )
    unknown = sorted(set(section) - set(_KEYS))
    if unknown:
        raise ValueError(
            f'--additional-config "{CONFIG_KEY}" has unknown key(s) {unknown}; valid keys: {", ".join(_KEYS)}'
        )
    return dict(section)


@dataclass(frozen=True)
class PluginConfig:
    """Levels 1 and 2 of the precedence: what the user set, None where they set nothing."""

    budget_file: str | None = None
    default_budget: float | None = None
    scope: str | None = None
    weights: str | None = None
    budget_aliases: tuple[float, ...] = ()
    expert_cap: float | None = None

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> PluginConfig:
        section = plugin_section(additional_config)

        def setting(key: str) -> Any:
            # A variable is read only when the section lacks the key: an overridden one may be invalid.
            return section[key] if key in section else getattr(envs, _ENV[key])

        default = setting("default_budget")
        cap, cap_key = setting("expert_cap"), f"{CONFIG_KEY} expert_cap"
        config = cls(
            budget_file=setting("budget_file"),
            default_budget=None
            if default is None
            else parse_budget(default, source=f"{CONFIG_KEY} default_budget"),
            scope=setting("scope"),
            weights=setting("weights"),
            budget_aliases=parse_aliases(setting("budget_aliases"), f"{CONFIG_KEY} budget_aliases"),
            expert_cap=None if cap is None else parse_cap_share(cap, source=cap_key),
        )
        config.check()
        return config

    def check(self) -> None:
        if self.budget_file is not None and not isinstance(self.budget_file, str):
            raise ValueError(
                f"{CONFIG_KEY} budget_file={self.budget_file!r} is not valid; expected the path of a "
                "budget file or the name of one shipped in configs/"
            )
        if self.scope is not None and self.scope not in SCOPES:
            raise ValueError(f"{CONFIG_KEY} scope={self.scope!r} is not valid; expected one of {SCOPES}")
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"{CONFIG_KEY} weights={self.weights!r} is not valid; expected one of {WEIGHTS}")
        if self.expert_cap is not None:
            parse_cap_share(self.expert_cap, source=f"{CONFIG_KEY} expert_cap")

    def changed(
        self, current: BudgetFile | None, change: dict[str, Any]
    ) -> tuple[PluginConfig, BudgetFile | None]:
        """This configuration after an admin change (`vllm_alloc.serving.admin`), and the budget file it
        names,
        parsed, for `resolve(loaded=...)`. `change["budget_file"]` is {"source": path, "text": its
        content}, or None for the uniform allocation; without it the file served now, `current`, stays as
        it was loaded. `change["default_budget"]` replaces the default. ValueError names the file, field
        or value."""
        from vllm_alloc.budget import parse_budget_text

        config, loaded = self, current if self.budget_file else None
        if "budget_file" in change:
            new_file = change["budget_file"]
            source = None if new_file is None else str(new_file["source"])
            loaded = None if new_file is None else parse_budget_text(new_file["text"], source)
            config = replace(config, budget_file=source)
        if "default_budget" in change:
            b = parse_budget(change["default_budget"], source=f"{CONFIG_KEY} default_budget")
            config = replace(config, default_budget=b)
        return config, loaded

    def resolve(
        self,
        *,
        model: ModelFingerprint | None = None,
        top_k: int | None = None,
        loaded: BudgetFile | None = None,
    ) -> Settings:
        """Level 3: the budget file (or the uniform allocation) under these settings.

        With `model` (the worker, once the model is built) the file is validated against it, and without
        a file the uniform budget file is built for it. Without `model` (the launcher, the API server) a
        file is loaded as it is, and without one the minimum is 1/`top_k`, that of the uniform allocation
        at K_base = 1 (unknown when `top_k` is None). ValueError (BudgetFileError, BudgetError) names the
        setting, its value and the fix. `loaded` is the file `budget_file` names, already read (the admin
        route reads it once in the API server and sends the same text to every worker).
        """
        from vllm_alloc.budget import BudgetFile, load_budget_file, uniform_budget_file

        budget_file: BudgetFile | None = None
        if self.budget_file:
            budget_file = loaded or load_budget_file(self.budget_file)
            if model is not None:
                budget_file.validate_against(model, self.budget_file)
        elif model is not None:
            budget_file = uniform_budget_file(model)
        if budget_file is not None:
            min_budget: float | None = budget_file.min_budget
        else:
            min_budget = 1.0 / top_k if top_k else None

        def from_file(name: str) -> Any:
            # Without a file, the defaults a uniform budget file would carry.
            return (
                getattr(budget_file, name)
                if budget_file is not None
                else BudgetFile.model_fields[name].default
            )

        default = self.default_budget if self.default_budget is not None else from_file("default_budget")
        return Settings(
            budget_file=budget_file,
            source=self.budget_file or "uniform",
            scope=self.scope or from_file("scope"),
            weights=self.weights or from_file("weights"),
            default_budget=parse_budget(
                default, min_budget=min_budget, source=f"{CONFIG_KEY} default_budget"
            ),
            min_budget=min_budget,
            aliases=tuple(
                parse_budget(b, min_budget=min_budget, source=f"{CONFIG_KEY} budget_aliases[{i}]")
                for i, b in enumerate(self.budget_aliases)
            ),
            expert_cap=self.expert_cap,
        )


def parse_aliases(raw: Any, source: str) -> tuple[float, ...]:
    """Budget aliases from a JSON list of budgets or a comma-separated text (`0.75,0.5`), in the order
    given; ValueError naming the value for a bad budget or one given twice. Checked against the model's
    minimum when settings are resolved."""
    if raw is None:
        return ()
    items = [part.strip() for part in raw.split(",")] if isinstance(raw, str) else raw
    if not isinstance(items, list | tuple):
        raise ValueError(
            f"{source}={raw!r} is not valid; expected a list of budgets in (0, 1], e.g. [0.75, 0.5]"
        )
    aliases: list[float] = []
    for i, item in enumerate(items):
        b = parse_budget(item, source=f"{source}[{i}]")
        if b in aliases:
            raise ValueError(f"{source} names {alias_suffix(b)} twice ({raw!r}); give each budget once")
        aliases.append(b)
    return tuple(aliases)


def alias_suffix(b: float) -> str:
    """`@0.5`: the budget as a model-name suffix, the text `X-Activation-Budget-Applied` echoes."""
    return f"@{float(b)!r}"


def alias_names(base: str, aliases: tuple[float, ...]) -> dict[str, float]:
    """{model name: b} of the aliases of served model `base`."""
    return {f"{base}{alias_suffix(b)}": b for b in aliases}


def resolve_settings(
    additional_config: Any, *, model: ModelFingerprint | None = None, top_k: int | None = None
) -> Settings:
    """All three levels: `--additional-config` > VLLM_ALLOC_* > the budget file (`PluginConfig.resolve`)."""
    return PluginConfig.from_additional_config(additional_config).resolve(model=model, top_k=top_k)


def settings_from_vllm_config(vllm_config: Any) -> Settings:
    """The budget settings the worker will use, resolved from the API server's VllmConfig by the same
    code (`vllm_alloc.integration.config`); without a budget file the minimum is 1/K, K the model's
    top-k (the uniform allocation at K_base = 1)."""
    config, top_k = config_from_vllm_config(vllm_config)
    return config.resolve(top_k=top_k)


def config_from_vllm_config(vllm_config: Any) -> tuple[PluginConfig, int | None]:
    """The plugin settings as configured (`--additional-config` > VLLM_ALLOC_*), and the model's top-k."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    config = PluginConfig.from_additional_config(getattr(vllm_config, "additional_config", None))
    return config, model_top_k(hf_config)


def model_top_k(hf_config: Any) -> int | None:
    """K of an HF config object or config.json dict; None when it names none (not an MoE we know)."""
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = hf_config.get(name) if isinstance(hf_config, dict) else getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None
