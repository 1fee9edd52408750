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

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vllm_alloc import envs
from vllm_alloc.budget import BudgetFile, ModelFingerprint
from vllm_alloc.integration import compat
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.routing import device_budget
from vllm_alloc.routing.cap import SCALE, capped_budgets, share_units
from vllm_alloc.routing.carry import CARRY_POOLS
from vllm_alloc.values import BudgetError, parse_budget


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
    # The carried balance (`vllm_alloc.routing.carry`): θ_l(B), where each B carries (host), α, the balance of
    # each request slot ([S + 1, L], row 0 scratch) and each token's slot (0 = not carried).
    carry_theta: torch.Tensor  # [A + 1, L] float64
    carrying: np.ndarray  # [A + 1] bool, host
    carry_alpha: float
    carry_pool: str  # "layer": a balance per (request, layer); "request": column 0 for all its layers
    carry_group: int  # decode tokens carry where at most this many share a group
    balance: torch.Tensor  # [S + 1, L] int64
    token_slot: torch.Tensor  # [N] int64
    # The distinct-expert cap (`vllm_alloc.routing.cap`): the share ρ_l(B) in thousandths (SCALE where B is
    # not
    # capped), which B are capped (host), each token's cap group + 1 (0 = not capped), and its counters:
    # pairs dropped [L, A + 1] and layer calls by distinct experts touched [L, E + 1].
    cap_table: torch.Tensor  # [A + 1, L] int64
    capping: np.ndarray  # [A + 1] bool, host
    token_cap: torch.Tensor  # [N] int64
    cap_dropped: torch.Tensor  # [L, A + 1] float64
    distinct: torch.Tensor  # [L, E + 1] float64
    # On CPU, numpy views of the buffers the host Alloc-T path reads or counts into (same memory); None on
    # devices. `full` has none: AllocState.fill counts it once per pass for every layer, in torch.
    host: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.table.device.type == "cpu":
            names: tuple[str, ...] = ("table", "token_budget", "token_group", "used", "carry_theta")
            names += ("balance", "token_slot", "cap_table", "token_cap", "cap_dropped", "distinct")
            self.host = {name: getattr(self, name).numpy() for name in names}

    @property
    def alloc_t_weights(self) -> str:
        """`alloc_t.reallocate`'s weights mode: `raw` keeps the raw weights it is given, as `topk` does."""
        return "kept" if self.weights == "kept" else "topk"

    def device_carry(self) -> device_budget.Carry | None:
        """The carried balance's buffers for the device path, or None where no budget carries."""
        if not self.carrying.any():
            return None
        return device_budget.Carry(
            self.token_slot, self.balance, self.carry_theta, self.carry_alpha, self.one_bank
        )

    def device_cap(self) -> device_budget.Cap:
        """The cap's buffers and counters for the device path (the cap itself only where some B is)."""
        return device_budget.Cap(
            self.token_cap, self.cap_table, self.E, self.cap_dropped, self.distinct, bool(self.capping.any())
        )

    @property
    def E(self) -> int:
        return self.budget_file.model.num_experts

    @property
    def one_bank(self) -> bool:
        """Whether a request has one balance for all its layers (column 0 of its row)."""
        return self.carry_pool == "request"

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
        self.flushed = {name: np.zeros(tuple(getattr(self.plan, name).shape)) for name in _COUNTERS}
        if self.plan.host is not None:  # compile the host Alloc-T now, not in the first request
            from vllm_alloc.routing import alloc_t_host

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
        if plan.scope in ("token", "stream"):  # every token its own group: no reallocation among tokens
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
        token_slot = self._carry_slots(req_ids, budgets, counts, query_start_loc, starts, token_group)
        if token_slot is not None:  # carried tokens leave their groups: each is a group of its own
            key = np.where(token_slot > 0, n + np.arange(n, dtype=np.int64), token_group)
            _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
            token_group = first[inverse].astype(np.int64)  # still each group's first token
        # Padding rows (graph padding beyond the real tokens) keep B = 0: no expert runs for them.
        plan.token_budget.zero_()
        plan.token_budget[:n].copy_(torch.from_numpy(token_budget))
        plan.token_group.zero_()
        plan.token_group[:n].copy_(torch.from_numpy(token_group))
        # Activations the full model would perform, for every layer at once (routing does not change it).
        tokens_per_budget = np.bincount(budgets, weights=counts, minlength=plan.A + 1)
        plan.full.add_(torch.from_numpy(tokens_per_budget * plan.K).to(plan.full.device))
        # Every group one token (scope `token`, or decode with distinct groups): Alloc-T's closed form.
        self.singleton_groups = plan.scope in ("token", "stream") or np.unique(token_group).size == n
        self.carried = token_slot is not None
        if plan.carrying.any():  # the device path reads every row's slot (0 = not carried)
            plan.token_slot.zero_()
            if token_slot is not None:
                plan.token_slot[:n].copy_(torch.from_numpy(token_slot))
        token_cap = self._cap_groups(budgets, counts, token_budget, token_group)
        self.capped = token_cap is not None
        if plan.capping.any():  # the device path reads every row's cap group (0 = not capped)
            plan.token_cap.zero_()
            if token_cap is not None:
                plan.token_cap[:n].copy_(torch.from_numpy(token_cap))
        self.budgeted = True
        plan.all_full.fill_(False)

    def _carry_slots(
        self,
        req_ids: list[str],
        budgets: np.ndarray,
        counts: np.ndarray,
        query_start_loc: np.ndarray,
        starts: np.ndarray | None,
        token_group: np.ndarray,
    ) -> np.ndarray | None:
        """Each token's balance slot ([T] int64, 0 = not carried), or None where no token carries.

        A token carries where its B carries, it is its request's only token in the pass (a decode step),
        and at most `carry_group` such tokens share its group: elsewhere Alloc-T has a group to work with
        (the caller takes carried tokens out of their groups). Under scope `stream`
        (evaluation, host path only) every token of a request carries, in position order, which is what
        its decode steps would do. A request keeps its slot while its positions continue; a request
        that comes back at another position (preempted and recomputed) starts again from β = 0."""
        plan = self.plan
        assert plan is not None
        if not plan.carrying.any():
            return None
        firsts = np.asarray(query_start_loc[:-1], dtype=np.int64)
        on = plan.carrying[budgets]
        if plan.scope != "stream":
            decode = counts == 1
            group = token_group[np.minimum(firsts, token_group.shape[0] - 1)]
            decoding = np.bincount(group[decode], minlength=token_group.shape[0])
            on &= decode & (decoding[group] <= plan.carry_group)
        token_slot = np.zeros(token_group.shape[0], dtype=np.int64)
        batch = set(req_ids)
        for i, req_id in enumerate(req_ids):
            entry = self._slots.get(req_id)
            start = None if starts is None else int(starts[i])
            if entry is not None and start is not None and start != entry[1]:
                self._zero_balance(entry[0])  # not the continuation of what it carried
            if on[i]:
                if entry is None:
                    entry = self._slots[req_id] = [self._new_slot(batch), 0, 0]
                token_slot[firsts[i] : firsts[i] + counts[i]] = entry[0]
            if entry is not None:
                entry[1] = (entry[1] if start is None else start) + int(counts[i])
                entry[2] = self.steps
        return token_slot if on.any() else None

    def _cap_groups(
        self, budgets: np.ndarray, counts: np.ndarray, token_budget: np.ndarray, token_group: np.ndarray
    ) -> np.ndarray | None:
        """Each token's cap group + 1 ([T] int64, 0 = not capped), or None where no token is capped.

        The cap (`vllm_alloc.routing.cap`) acts on decode tokens (their request's only token in the pass) at a
        capped B, and all of them at one B share the pass's experts: one group per B. Evaluation scopes
        teacher-force decode: under `position` a group is the tokens at one budget and position (the
        decode tokens of N streams at one step); under `stream` and `token` (no interaction among tokens,
        and the quality benchmark's lone streams in decode order) every token is alone, and a group of
        one token is never capped."""
        plan = self.plan
        assert plan is not None
        if not plan.capping.any() or plan.scope in ("stream", "token"):
            return None
        on = plan.capping[budgets]
        if plan.scope != "position":
            on &= counts == 1
        tok_on = np.repeat(on, counts)
        if not tok_on.any():
            return None
        if plan.scope == "position":
            groups = token_group
        else:  # named by the first capped decode token at its B (ids stay below T)
            _, first, inverse = np.unique(
                np.where(tok_on, token_budget, -1), return_index=True, return_inverse=True
            )
            groups = first[inverse].astype(np.int64)
        return np.where(tok_on, groups + 1, 0).astype(np.int64)

    def _new_slot(self, batch: set[str]) -> int:
        """A zeroed balance slot: a free one, else that of the request seen longest ago outside the batch
        (requests that finished are never announced to the V1 runner's model code)."""
        if not self._free_slots:
            old = min((r for r in self._slots if r not in batch), key=lambda r: self._slots[r][2])
            self._free_slots.append(self._slots.pop(old)[0])
        slot = self._free_slots.pop()
        self._zero_balance(slot)
        return slot

    def _zero_balance(self, slot: int) -> None:
        assert self.plan is not None
        self.plan.balance[slot].zero_()

    def end_pass(self) -> None:
        if self.budgeted and self.plan is not None:
            self.plan.all_full.fill_(True)
        self.budgeted = False
        self.carried = False
        self.capped = False
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
        plan = self._need_plan()
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
        """Restore the allocation table, Alloc-T flags, carried balance's θ and the distinct-expert caps
        (the expert_cap setting over the file's) from the budget file."""
        if self.plan is not None:
            bf = self.plan.budget_file
            cap_table = bf.cap_table((self.config or PluginConfig()).expert_cap)
            self.plan.cap_table.copy_(cap_table)
            self.plan.capping[:] = capped_budgets(cap_table).numpy()
            self.plan.table.copy_(bf.allocation_table())
            self.plan.reallocating[:] = bf.reallocating()
            self.plan.carry_theta.copy_(bf.carry_table())
            self.plan.carrying[:] = bf.carrying()
            self.plan.carry_alpha = bf.carry_alpha
            self._set_pool(bf.carry_pool)
            self.plan.carry_group = bf.carry_group

    def set_carry(
        self,
        theta: dict[int, list[float] | None],
        alpha: float | None = None,
        pool: str | None = None,
        group: int | None = None,
    ) -> None:
        """Where `theta` names B, carry the balance there with these θ_l (None: stop carrying at B);
        `alpha` replaces α, `pool` the balance's pool ("layer" or "request") and `group` the most
        decode tokens of a group that carry (the profiler and the quality benchmark measure the lever
        this way, eager). CUDA graphs captured while no B carried do not compute it, nor do graphs
        captured with the other pool (docs/design.md, GPU path)."""
        from vllm_alloc.routing.carry import check_alpha

        plan = self._need_plan()
        if alpha is not None:
            check_alpha(alpha)
        if pool is not None and pool not in CARRY_POOLS:
            raise ValueError(f"pool={pool!r} is not valid; expected one of {CARRY_POOLS}")
        if pool is not None:
            self._check_scope(plan.scope, pool)
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise ValueError(f"group={group!r} is not valid; expected an integer >= 1")
        L = plan.budget_file.model.num_moe_layers
        for B, row in theta.items():
            if not 0 < int(B) <= plan.A:
                raise ValueError(f"B={B} is out of range; expected [1, {plan.A}]")
            if row is not None and (len(row) != L or any(math.isnan(float(v)) for v in row)):
                raise ValueError(f"θ {row} for B={B} is invalid; expected {L} numbers (inf allowed)")
        if alpha is not None:
            plan.carry_alpha = float(alpha)
        if pool is not None:
            self._set_pool(pool)
        if group is not None:
            plan.carry_group = group
        for B, row in theta.items():
            plan.carrying[int(B)] = row is not None
            if row is not None:
                plan.carry_theta[int(B)].copy_(torch.tensor(row, dtype=plan.carry_theta.dtype))

    def set_cap(self, shares: dict[int, list[float] | None]) -> None:
        """Where `shares` names B, cap the distinct experts of its decode tokens at these shares ρ_l (None:
        no cap at B), as a budget file's `cap` would (the profiler measures caps this way, eager). CUDA
        graphs captured while no B was capped do not compute it (docs/design.md, GPU path)."""
        plan = self._need_plan()
        L = plan.budget_file.model.num_moe_layers
        for B, row in shares.items():
            if not 0 < int(B) < plan.A:
                raise ValueError(f"B={B} is out of range; expected [1, {plan.A - 1}] (B = A is never capped)")
            if row is not None and (len(row) != L or any(not 1 / SCALE <= float(v) <= 1 for v in row)):
                raise ValueError(f"cap {row} for B={B} is invalid; expected {L} shares in [{1 / SCALE}, 1]")
        for B, row in shares.items():
            q = [SCALE] * L if row is None else [share_units(v) for v in row]
            plan.cap_table[int(B)].copy_(torch.tensor(q, dtype=plan.cap_table.dtype))
            plan.capping[int(B)] = min(q) < SCALE

    def _set_pool(self, pool: str) -> None:
        """Take the balance's pool; a change zeroes every balance (a per-layer balance is not a bank)."""
        assert self.plan is not None
        if pool != self.plan.carry_pool:
            self.plan.balance.zero_()
            self.plan.carry_pool = pool

    def record_scores(self, on: bool) -> None:
        """Start (clearing what was recorded before) or stop recording each layer's router scores below
        the floor, in every real pass (the calibration of the carried balance's θ)."""
        plan = self._need_plan()
        if on:
            self.recorded = [[] for _ in range(plan.budget_file.model.num_moe_layers)]
        self.recording = on

    def record(self, column: int, keys: torch.Tensor) -> None:
        """Record one layer call's ranking keys [T, K]: each token's candidates below its top-K_base."""
        assert self.recorded is not None and self.plan is not None
        ranked = torch.sort(keys.float(), dim=1, descending=True).values[:, self.plan.k_base :]
        self.recorded[column].append(ranked.cpu().numpy())

    def carry_thresholds(self, rows: dict[int, list[int]], offset: float) -> dict[int, list[float]]:
        """θ_l(B) for the allocation rows given ({B: K(B)}) from the recorded scores: per layer the bar
        at which the recorded tokens keep K_l − K_base − offset extras on average (`carry.threshold_for`)."""
        from vllm_alloc.routing.carry import threshold_for

        plan = self._need_plan()
        if not self.recorded or not all(self.recorded):
            raise RuntimeError("vllm-alloc: no router scores recorded (vllm_alloc_record_scores(True) first)")
        extras = [np.concatenate(r) for r in self.recorded]
        return {
            int(B): [threshold_for(extras[l], k - plan.k_base - offset) for l, k in enumerate(ks)]
            for B, ks in rows.items()
        }

    # -- runtime control (the admin route) ---------------------------------------------------------------
    def reconfigure(self, change: dict[str, Any], apply: bool) -> dict[str, Any]:
        """Check, and with `apply` take, new settings between passes (`vllm_alloc.serving.admin`). `change`
        may hold
        `budget_file`, {"source": path or name, "text": its content} (None: the uniform allocation), and
        `default_budget`, a b. The file is validated against this model and the default against its
        minimum; ValueError names the file, field and value, and leaves everything as it was. Applied, the
        allocation table, Alloc-T flags and the carried balance's θ are overwritten in place (captured
        CUDA graphs read the same buffers)."""
        plan = self._need_plan()
        config, loaded = (self.config or PluginConfig()).changed(plan.budget_file, change)
        settings = config.resolve(model=self.fingerprint(), loaded=loaded)
        new = settings.budget_file
        assert new is not None  # resolve(model=...) builds the uniform file when none is configured
        self._check_scope(settings.scope, new.carry_pool)
        if apply:
            log = compat.logger("vllm_alloc")
            if plan.table.device.type == "cuda" and any(new.carrying()):
                if not plan.carrying.any():
                    log.warning(
                        "vllm-alloc: %s carries a balance; CUDA graphs captured before do not (design.md)",
                        settings.source,
                    )
                elif new.carry_pool != plan.carry_pool:
                    log.warning(
                        "vllm-alloc: %s carries in pool %r; CUDA graphs captured before keep pool %r",
                        settings.source,
                        new.carry_pool,
                        plan.carry_pool,
                    )
            capping = capped_budgets(new.cap_table(settings.expert_cap)).any()
            if plan.table.device.type == "cuda" and capping and not plan.capping.any():
                log.warning(
                    "vllm-alloc: %s caps distinct experts; CUDA graphs captured before do not (design.md)",
                    settings.source,
                )
            self.config = config
            plan.budget_file, plan.source = new, settings.source
            plan.scope, plan.weights, plan.default_budget = (
                settings.scope,
                settings.weights,
                settings.default_budget,
            )
            self.reset_allocation()
            self._absolute.clear()
        return {
            "source": settings.source,
            "default_budget": settings.default_budget,
            "min_budget": settings.min_budget,
        }

    def _need_plan(self) -> Plan:
        if self.plan is None:
            raise RuntimeError("vllm-alloc: no MoE model loaded in this worker")
        return self.plan

    def set_scope(self, scope: str) -> None:
        """Change the reallocation scope between passes (the profiler validates prefill under `budget`
        and a lone decode stream under `token` in one engine)."""
        from vllm_alloc.integration.config import SCOPES

        plan = self._need_plan()
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is not valid; expected one of {SCOPES}")
        self._check_scope(scope)
        plan.scope = scope

    def _check_scope(self, scope: str, pool: str | None = None) -> None:
        """Refuse what `scope` cannot run here; `pool`: the balance's pool it would run with (default:
        the plan's)."""
        assert self.plan is not None
        if scope == "stream" and (self.plan.host is None or envs.VLLM_ALLOC_TEST_DEVICE_PATH):
            raise ValueError(
                "scope 'stream' (evaluation: a request's tokens carry its balance in order within one "
                "pass) runs on the CPU host path only; use 'token' or 'position' on devices"
            )
        if scope == "stream" and (pool or self.plan.carry_pool) == "request":
            raise ValueError(STREAM_ONE_BANK)

    # -- counters -----------------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """Cumulative counters by model layer index and absolute budget (tests, `collective_rpc`)."""
        plan = self.plan
        if plan is None:
            return {"layers": [], "A": 0, "used": [], "full": [], "cap_dropped": [], "distinct": []}
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        return {
            "layers": [i.layer_id for i in infos],
            "A": plan.A,
            "K": plan.K,
            "used": plan.used.cpu().tolist(),
            "full": plan.full.cpu().tolist(),
            "cap_dropped": plan.cap_dropped.cpu().tolist(),
            "distinct": plan.distinct.cpu().tolist(),
        }

    def flush(self) -> None:
        """Copy counter deltas to Prometheus (TP rank 0 only, so ranks do not double-count)."""
        from vllm_alloc import metrics

        plan = self.plan
        if plan is None or self.flushed is None or compat.tp_rank() != 0:
            return
        now = {name: getattr(plan, name).cpu().numpy() for name in _COUNTERS}  # outside the forward pass
        delta = {name: now[name] - self.flushed[name] for name in _COUNTERS}
        self.flushed = {name: now[name].copy() for name in _COUNTERS}
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        d_used, d_full = delta["used"], delta["full"]
        for column, B in zip(*np.nonzero(d_full), strict=True):
            metrics.add_activations(
                layer=infos[column].layer_id,
                budget=B / plan.A,
                used=float(d_used[column, B]),
                full=float(d_full[column, B]),
            )
        dropped, distinct = delta["cap_dropped"], delta["distinct"]
        for column, B in zip(*np.nonzero(dropped), strict=True):
            metrics.add_cap_dropped(infos[column].layer_id, B / plan.A, float(dropped[column, B]))
        for column, n in zip(*np.nonzero(distinct), strict=True):
            metrics.observe_distinct(infos[column].layer_id, int(n), int(distinct[column, n]), plan.E)


_COUNTERS = ("used", "full", "cap_dropped", "distinct")  # device counters flushed to Prometheus
STREAM_ONE_BANK = (
    "scope 'stream' teacher-forces the per-layer balance only (carry_pool 'layer'): a request's one bank "
    "needs its layers in decode order, one token per request per pass"
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
