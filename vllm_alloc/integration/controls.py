"""The runtime changes of `AllocState`, made between passes through `collective_rpc` worker methods
(`integration/__init__.py`): live allocation rows and Alloc-T flags, the carried balance, the
distinct-expert cap and the scope (the profiler, the quality benchmark), and a new budget file or
default budget (`reconfigure`, the admin route). Tables are overwritten in place (captured CUDA graphs
read the same buffers); `_check_scope` refuses what a scope cannot run here."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from vllm_alloc import envs
from vllm_alloc.integration import compat
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.plan import Plan
from vllm_alloc.routing.cap import SCALE, capped_budgets, share_units
from vllm_alloc.routing.carry import CARRY_POOLS

if TYPE_CHECKING:
    from vllm_alloc.budget import ModelFingerprint

STREAM_ONE_BANK = (
    "scope 'stream' teacher-forces the per-layer balance only (carry_pool 'layer'): a request's one bank "
    "needs its layers in decode order, one token per request per pass"
)


class RuntimeControls:
    """Mixin of `AllocState` (`integration.state`, where these fields are defined and documented)."""

    config: PluginConfig | None
    plan: Plan | None
    _absolute: dict[Any, int]

    if TYPE_CHECKING:  # from `integration.state`

        def fingerprint(self) -> ModelFingerprint: ...

        def _need_plan(self) -> Plan: ...

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
