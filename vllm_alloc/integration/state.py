"""Per-process plugin state: the writer (runner hook) and the readers (MoE layers) meet here.

Data flow of one forward pass (DESIGN.md §3): the runner hook turns each scheduled request's budget b
into its absolute budget B = floor(b·A) and a reallocation group, writes them per token into persistent
buffers (`token_budget`, `token_group`, updated in place so graph capture and compile see one address),
and sets `budgeted` when any token is below b = 1.0. Each MoE layer then gathers K_l(B_t) from the
allocation table and runs Alloc-T. A pass where every token is at b = 1.0 leaves `budgeted` False and
the layers take vLLM's stock path untouched. Replayed CUDA graphs cannot read `budgeted`: they read the
device flag `all_full` instead, written with it and set back to True after each pass, so graph replays
outside real passes (warm-up, dummy runs) take the stock path and count nothing.

Counters live on the device (`used`, `full`: [L, A + 1], activations performed and the full-budget
count, per layer and per absolute budget) and are copied to Prometheus outside the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_alloc import envs
from vllm_alloc.budget import BudgetFile, ModelFingerprint
from vllm_alloc.integration import compat
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.requests import BudgetError, parse_budget


@dataclass
class LayerInfo:
    """What the state needs to know of one MoE layer; filled as vLLM builds the model."""

    name: str
    layer_id: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    column: int = -1  # position among the MoE layers (column of the allocation table)


@dataclass
class Plan:
    """Everything fixed at start-up once the model is loaded: the budget file and device buffers."""

    budget_file: BudgetFile
    source: str  # where the allocation came from, for logs ("configs/x.json" or "uniform")
    scope: str
    weights: str
    default_budget: float
    table: torch.Tensor  # [A + 1, L] int32: row B = K(B); rows below L·K_base are 0 (padding)
    token_budget: torch.Tensor  # [N] int64: absolute budget B of each token, 0 = padding
    token_group: torch.Tensor  # [N] int64 in [0, N): reallocation group of each token
    used: torch.Tensor  # [L, A + 1] float64: routed activations performed
    full: torch.Tensor  # [L, A + 1] float64: activations the full model would have performed
    all_full: torch.Tensor  # [] bool: every token of the pass at b = 1.0 (read by captured graphs)
    # [A + 1] bool, host: False where the budget file turns Alloc-T off at B (each token of a request at
    # that B is then its own group, so it keeps exactly its top-K_l).
    reallocating: np.ndarray
    # On CPU, numpy views of the buffers the host Alloc-T path reads or counts into (same memory); None on
    # devices. `full` has none: AllocState.fill counts it once per pass for every layer, in torch.
    host: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.table.device.type == "cpu":
            names = ("table", "token_budget", "token_group", "used")
            self.host = {name: getattr(self, name).numpy() for name in names}

    @property
    def alloc_t_weights(self) -> str:
        """`alloc_t.reallocate`'s weights mode: `raw` keeps the raw weights it is given, as `topk` does."""
        return "kept" if self.weights == "kept" else "topk"

    @property
    def A(self) -> int:
        return self.budget_file.model.full_activations

    @property
    def K(self) -> int:
        return self.budget_file.model.top_k

    @property
    def k_base(self) -> int:
        return self.budget_file.k_base


@dataclass
class AllocState:
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
    flushed: tuple[np.ndarray, np.ndarray] | None = None
    seen_requests: set[str] = field(default_factory=set)
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

    def finalize(self, max_tokens: int, device: torch.device) -> Plan | None:
        """Resolve the settings (`integration.config`: additional-config > VLLM_ALLOC_* > budget file),
        validating the budget file against the built model; allocate buffers. Idempotent."""
        if self.plan is not None or not self.layers:
            return self.plan
        model = self.fingerprint()
        settings = (self.config or PluginConfig()).resolve(model=model)
        budget_file = settings.budget_file
        assert budget_file is not None  # resolve(model=...) builds the uniform file when none is configured
        for column, info in enumerate(sorted(self.layers.values(), key=lambda i: i.layer_id)):
            info.column = column
        L, A = model.num_moe_layers, model.full_activations
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
            reallocating=np.asarray(budget_file.reallocating(), dtype=bool),
        )
        self.flushed = (np.zeros((L, A + 1)), np.zeros((L, A + 1)))
        if self.plan.host is not None:  # compile the host Alloc-T now, not in the first request
            from vllm_alloc import alloc_t_host

            alloc_t_host.warm_up(self.plan.host["table"], self.plan.host["used"])
        return self.plan

    # -- every forward pass -----------------------------------------------------------------------------
    def absolute_budget(self, raw: Any) -> int:
        """B for a request's raw budget value (None = the default). Invalid values were refused where the
        request entered (SamplingParams check / HTTP 400); one that slips through runs at the model's
        minimum when it is in (0, 1] but below that minimum, else at the default."""
        plan = self.plan
        assert plan is not None
        # repr for a bool: True == 1 as a dict key, and must not share 1's cached B.
        plain = raw is None or (isinstance(raw, int | float | str) and not isinstance(raw, bool))
        key = raw if plain else repr(raw)
        cached = self._absolute.get(key)
        if cached is not None:
            return cached
        budget_file = plan.budget_file
        try:
            B = budget_file.absolute_budget(plan.default_budget if raw is None else raw)
        except BudgetError as e:
            try:
                parse_budget(raw)  # valid in (0, 1], so refused only for being below the minimum
                B = budget_file.absolute_budget(budget_file.min_budget)
            except BudgetError:
                B = budget_file.absolute_budget(plan.default_budget)
            compat.logger("vllm_alloc").warning(
                "vllm-alloc: %s; running the request at B=%d of A=%d", e, B, plan.A
            )
        if len(self._absolute) < 4096:  # budgets repeat; bound the cache against adversarial variety
            self._absolute[key] = B
        return B

    def fill(
        self,
        req_ids: list[str],
        raw_budgets: list[Any],
        query_start_loc: np.ndarray,
        starts: np.ndarray | None = None,
    ) -> None:
        """Write per-token budgets and groups for the scheduled batch; set `budgeted`. `starts`: the
        position of each request's first scheduled token (its computed tokens); scope `position` needs it."""
        plan = self.plan
        if plan is None:
            self.budgeted = False
            return
        budgets = np.fromiter(
            (self.absolute_budget(r) for r in raw_budgets), dtype=np.int64, count=len(req_ids)
        )
        counts = np.diff(query_start_loc).astype(np.int64)
        num_tokens = int(counts.sum())
        self.counting = True
        self._observe_new_requests(req_ids, budgets)
        if budgets.size == 0 or bool((budgets == plan.A).all()):
            self.budgeted = False  # all_full is already True (end_pass)
            # The stock path runs: every MoE layer routes each real token to K experts.
            plan.used[:, plan.A] += num_tokens * plan.K
            plan.full[:, plan.A] += num_tokens * plan.K
            return
        token_budget = np.repeat(budgets, counts)
        # A group's id is the index of its first token (so ids stay below T and never collide).
        firsts = np.asarray(query_start_loc[:-1], dtype=np.int64)
        if plan.scope == "token":  # every token is its own group: plain top-K_l per token, no reallocation
            token_group = np.arange(num_tokens, dtype=np.int64)
        elif plan.scope == "request":
            token_group = np.repeat(firsts, counts)
        elif plan.scope == "position":
            token_group = position_groups(token_budget, query_start_loc, counts, starts)
        else:  # one group per distinct B, named by the first token of the first request that has it
            _, first, inverse = np.unique(budgets, return_index=True, return_inverse=True)
            token_group = np.repeat(firsts[first][inverse], counts)
        solo = ~plan.reallocating[budgets]  # per request: its B runs without Alloc-T
        if solo.any():  # each token of such a request is its own group
            alone = np.arange(num_tokens, dtype=np.int64)
            token_group = np.where(np.repeat(solo, counts), alone, token_group)
        n = token_budget.shape[0]
        if n > plan.token_budget.shape[0]:
            raise RuntimeError(
                f"vllm-alloc: {n} tokens in one forward pass exceed the budget buffer "
                f"({plan.token_budget.shape[0]}); raise it with max_num_batched_tokens"
            )
        # Padding rows (graph padding beyond the real tokens) keep B = 0: no expert runs for them.
        plan.token_budget.zero_()
        plan.token_budget[:n].copy_(torch.from_numpy(token_budget))
        plan.token_group.zero_()
        plan.token_group[:n].copy_(torch.from_numpy(token_group))
        # Activations the full model would perform, for every layer at once (routing does not change it).
        tokens_per_budget = np.bincount(budgets, weights=counts, minlength=plan.A + 1)
        plan.full.add_(torch.from_numpy(tokens_per_budget * plan.K).to(plan.full.device))
        # Every group one token (scope `token`, or decode with distinct groups): Alloc-T's closed form.
        self.singleton_groups = plan.scope == "token" or np.unique(token_group).size == n
        self.budgeted = True
        plan.all_full.fill_(False)

    def end_pass(self) -> None:
        if self.budgeted and self.plan is not None:
            self.plan.all_full.fill_(True)
        self.budgeted = False
        self.singleton_groups = False
        self.counting = False
        self.steps += 1
        if self.steps % envs.VLLM_ALLOC_METRICS_FLUSH_STEPS == 0:
            self.flush()

    def _observe_new_requests(self, req_ids: list[str], budgets: np.ndarray) -> None:
        from vllm_alloc import metrics

        plan = self.plan
        assert plan is not None
        current = set(req_ids)
        if compat.tp_rank() != 0:
            self.seen_requests = current
            return
        for req_id, B in zip(req_ids, budgets.tolist(), strict=True):
            if req_id not in self.seen_requests:
                metrics.observe_request_budget(B / plan.A)
        self.seen_requests = current | (self.seen_requests if len(self.seen_requests) < 65536 else set())

    # -- profiling ------------------------------------------------------------------------------------------
    def set_allocation(self, rows: dict[int, list[int]], alloc_t: dict[int, bool] | None = None) -> None:
        """Overwrite rows K(B) of the live allocation table, and where `alloc_t` names B whether Alloc-T
        reallocates there (the profiler measures arbitrary configurations through the serving path this
        way). Rows are validated like a budget file's."""
        plan = self.plan
        if plan is None:
            raise RuntimeError("vllm-alloc: no MoE model loaded in this worker")
        model = plan.budget_file.model
        for B, ks in rows.items():
            B = int(B)
            if not plan.budget_file.model.num_moe_layers * plan.k_base <= B <= plan.A:
                raise ValueError(
                    f"B={B} is out of range; expected [{model.num_moe_layers * plan.k_base}, {plan.A}]"
                )
            if (
                len(ks) != model.num_moe_layers
                or any(not plan.k_base <= k <= plan.K for k in ks)
                or sum(ks) > B
            ):
                raise ValueError(
                    f"allocation {ks} for B={B} is invalid; expected {model.num_moe_layers} integers in "
                    f"[{plan.k_base}, {plan.K}] summing to at most {B}"
                )
            plan.table[B].copy_(torch.tensor(ks, dtype=plan.table.dtype))
        for B, on in (alloc_t or {}).items():
            if not isinstance(on, bool) or not 0 <= int(B) <= plan.A:
                raise ValueError(f"alloc_t[{B}] = {on!r} is invalid; expected B in [0, {plan.A}] -> a bool")
            plan.reallocating[int(B)] = on

    def reset_allocation(self) -> None:
        """Restore the allocation table and the Alloc-T flags from the budget file."""
        if self.plan is not None:
            self.plan.table.copy_(self.plan.budget_file.allocation_table())
            self.plan.reallocating[:] = self.plan.budget_file.reallocating()

    def set_scope(self, scope: str) -> None:
        """Change the reallocation scope between passes (the profiler validates prefill under `budget`
        and a lone decode stream under `token` in one engine)."""
        from vllm_alloc.integration.config import SCOPES

        if self.plan is None:
            raise RuntimeError("vllm-alloc: no MoE model loaded in this worker")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not valid; expected one of {SCOPES}")
        self.plan.scope = scope

    # -- counters -----------------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Cumulative counters by model layer index and absolute budget (tests, `collective_rpc`)."""
        plan = self.plan
        if plan is None:
            return {"layers": [], "A": 0, "used": [], "full": []}
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        return {
            "layers": [i.layer_id for i in infos],
            "A": plan.A,
            "K": plan.K,
            "used": plan.used.cpu().tolist(),
            "full": plan.full.cpu().tolist(),
        }

    def flush(self) -> None:
        """Copy counter deltas to Prometheus (TP rank 0 only, so ranks do not double-count)."""
        from vllm_alloc import metrics

        plan = self.plan
        if plan is None or self.flushed is None or compat.tp_rank() != 0:
            return
        used = plan.used.cpu().numpy()  # the one host sync, outside the forward pass
        full = plan.full.cpu().numpy()
        d_used, d_full = used - self.flushed[0], full - self.flushed[1]
        self.flushed = (used.copy(), full.copy())
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        for column, B in zip(*np.nonzero(d_full), strict=True):
            metrics.add_activations(
                layer=infos[column].layer_id,
                budget=B / plan.A,
                used=float(d_used[column, B]),
                full=float(d_full[column, B]),
            )


STATE = AllocState()


def position_groups(
    token_budget: np.ndarray, query_start_loc: np.ndarray, counts: np.ndarray, starts: np.ndarray | None
) -> np.ndarray:
    """Scope `position` (evaluation only): one group per (B, position in the request). Teacher-forcing N
    same-budget sequences in one pass then gives Alloc-T exactly the groups N decode streams started
    together give: at every step, the N tokens at one position. Group ids are each group's first token."""
    if starts is None:
        raise ValueError("vllm-alloc: scope 'position' needs each request's first position (starts)")
    offsets = np.arange(token_budget.shape[0], dtype=np.int64) - np.repeat(query_start_loc[:-1], counts)
    positions = np.repeat(np.asarray(starts, dtype=np.int64), counts) + offsets
    keys = token_budget * (int(positions.max(initial=0)) + 1) + positions
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse].astype(np.int64)
