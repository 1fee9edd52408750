"""Per-process plugin state: the writer (runner hook) and the readers (MoE layers) meet here.

Data flow of one forward pass (DESIGN.md §3): the runner hook turns each scheduled request's budget b
into its absolute budget B = floor(b·A) and a reallocation group, writes them per token into persistent
buffers (`token_budget`, `token_group`, updated in place so graph capture and compile see one address),
and sets `budgeted` when any token is below b = 1.0. Each MoE layer then gathers K_l(B_t) from the
allocation table and runs Alloc-T. A pass where every token is at b = 1.0 leaves `budgeted` False and
the layers take vLLM's stock path untouched. Replayed CUDA graphs cannot read `budgeted`: they read the
device flag `all_full` instead, written with it and set back to True after each pass, so graph replays
outside real passes (warm-up, dummy runs) take the stock path and count nothing.

`AllocState` assembles the state from one module per concern: `plan` (`LayerInfo`, `Plan`: the
buffers), `passes` (filling them every pass), `controls` (runtime changes between passes), `recording`
(router scores for the carry calibration) and `counters` (to Prometheus). This module owns the fields,
the start-up (layers registered as vLLM builds them, the fingerprint, `finalize` → `Plan`) and `STATE`,
the process's one instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_alloc.budget import ModelFingerprint
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.controls import RuntimeControls
from vllm_alloc.integration.counters import COUNTERS, CounterFlush
from vllm_alloc.integration.passes import PassFilling
from vllm_alloc.integration.plan import LayerInfo, Plan
from vllm_alloc.integration.recording import ScoreRecording
from vllm_alloc.routing.cap import capped_budgets


@dataclass
class AllocState(PassFilling, RuntimeControls, ScoreRecording, CounterFlush):
    """The per-process state: its fields and start-up here, each concern's methods in its mixin."""

    layers: dict[str, LayerInfo] = field(default_factory=dict)
    config: PluginConfig | None = None
    architecture: str = ""
    plan: Plan | None = None
    budgeted: bool = False  # True while a pass with some token below b = 1.0 runs
    # True while every reallocation group of the pass holds one token (a lone request in decode, scope
    # `request` in decode): Alloc-T then reduces to a per-token top-K_l prefix
    # (`alloc_t.reallocate(singleton_groups=True)`).
    singleton_groups: bool = False
    counting: bool = False  # True only inside real forward passes (never warm-up / dummy runs)
    steps: int = 0
    flushed: dict[str, np.ndarray] | None = None  # the counters as last copied to Prometheus
    seen_requests: set[str] = field(default_factory=set)
    carried: bool = False  # True while some token of the pass carries its request's balance
    capped: bool = False  # True while some token of the pass is under the distinct-expert cap
    # Request slots of the carried balance: req id -> [slot, position of its next token, last step seen].
    _slots: dict[str, list[int]] = field(default_factory=dict)
    _free_slots: list[int] = field(default_factory=list)
    # Router scores recorded for the carry calibration, per MoE layer column; `recording` while they are.
    recorded: list[list[np.ndarray]] | None = None
    recording: bool = False
    _absolute: dict[Any, int] = field(default_factory=dict)

    # -- start-up -------------------------------------------------------------------------------------
    def register_layer(self, info: LayerInfo, config: PluginConfig, architecture: str) -> None:
        if info.name in self.layers:
            raise RuntimeError(f"MoE layer {info.name} registered twice")
        self.layers[info.name] = info
        self.config = config
        self.architecture = architecture

    def fingerprint(self) -> ModelFingerprint:
        infos = sorted(self.layers.values(), key=lambda i: i.layer_id)
        first = infos[0]
        for info in infos[1:]:
            for attr in ("num_experts", "top_k", "hidden_size", "intermediate_size"):
                if getattr(info, attr) != getattr(first, attr):
                    raise RuntimeError(
                        f"MoE layers differ in {attr} ({first.name}: {getattr(first, attr)}, "
                        f"{info.name}: {getattr(info, attr)}); vllm-alloc supports one MoE shape per model"
                    )
        return ModelFingerprint(
            architecture=self.architecture,
            moe_layers=[i.layer_id for i in infos],
            num_experts=first.num_experts,
            top_k=first.top_k,
            hidden_size=first.hidden_size,
            intermediate_size=first.intermediate_size,
        )

    def finalize(self, max_tokens: int, device: torch.device, max_requests: int = 256) -> Plan | None:
        """Resolve the settings (`integration.config`: additional-config > VLLM_ALLOC_* > budget file),
        validating the budget file against the built model; allocate buffers. Idempotent.
        max_requests: requests in one pass at most (the carried balance keeps twice as many slots, so a
        request that skips a step keeps its balance)."""
        if self.plan is not None or not self.layers:
            return self.plan
        model = self.fingerprint()
        settings = (self.config or PluginConfig()).resolve(model=model)
        budget_file = settings.budget_file
        assert budget_file is not None  # resolve(model=...) builds the uniform file when none is configured
        for column, info in enumerate(sorted(self.layers.values(), key=lambda i: i.layer_id)):
            info.column = column
        L, A = model.num_moe_layers, model.full_activations
        cap_table = budget_file.cap_table(settings.expert_cap)  # as reset_allocation restores it
        self.plan = Plan(
            budget_file=budget_file,
            source=settings.source,
            scope=settings.scope,
            weights=settings.weights,
            default_budget=settings.default_budget,
            table=budget_file.allocation_table().to(device),
            token_budget=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            token_group=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            used=torch.zeros(L, A + 1, dtype=torch.float64, device=device),
            full=torch.zeros(L, A + 1, dtype=torch.float64, device=device),
            all_full=torch.ones((), dtype=torch.bool, device=device),
            not_full=torch.zeros((), dtype=torch.bool, device=device),
            reallocating=np.asarray(budget_file.reallocating(), dtype=bool),
            carry_theta=budget_file.carry_table().to(device),
            carrying=np.asarray(budget_file.carrying(), dtype=bool),
            carry_alpha=budget_file.carry_alpha,
            carry_pool=budget_file.carry_pool,
            carry_group=budget_file.carry_group,
            balance=torch.zeros(2 * max_requests + 1, L, dtype=torch.int64, device=device),
            token_slot=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            cap_table=cap_table.to(device),
            capping=capped_budgets(cap_table).numpy(),
            token_cap=torch.zeros(max_tokens, dtype=torch.int64, device=device),
            cap_dropped=torch.zeros(L, A + 1, dtype=torch.float64, device=device),
            distinct=torch.zeros(L, model.num_experts + 1, dtype=torch.float64, device=device),
        )
        self._free_slots = list(range(2 * max_requests, 0, -1))
        self._check_scope(self.plan.scope)
        self.flushed = {name: np.zeros(tuple(getattr(self.plan, name).shape)) for name in COUNTERS}
        if self.plan.host is not None:  # compile the host Alloc-T now, not in the first request
            from vllm_alloc.routing import alloc_t_host

            alloc_t_host.warm_up(self.plan.host["table"], self.plan.host["used"])
        return self.plan

    def _need_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("vllm-alloc: no MoE model loaded in this worker")
        return self.plan


STATE = AllocState()
