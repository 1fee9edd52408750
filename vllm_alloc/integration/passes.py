"""Filling the per-pass buffers, the per-pass part of `AllocState`: each scheduled request's budget b
becomes its absolute budget B (`absolute_budget`), and `fill` writes B, the reallocation group, the
carried balance's slot (`_carry_slots`) and the cap group (`_cap_groups`) of every token into the plan's
persistent buffers, sets the pass flags the MoE layers read (`budgeted`, `singleton_groups`, `carried`,
`capped`, `counting`), and counts what the full model would perform; `end_pass` clears them after the
forward. `position_groups` forms scope `position`'s groups."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_alloc import envs
from vllm_alloc.integration import compat
from vllm_alloc.integration.plan import Plan
from vllm_alloc.values import BudgetError, parse_budget


class PassFilling:
    """Mixin of `AllocState` (`integration.state`, where these fields are defined and documented)."""

    plan: Plan | None
    budgeted: bool
    singleton_groups: bool
    counting: bool
    steps: int
    carried: bool
    capped: bool
    _slots: dict[str, list[int]]
    _free_slots: list[int]
    _absolute: dict[Any, int]

    if TYPE_CHECKING:  # from `integration.counters`

        def flush(self) -> None: ...

        def _observe_new_requests(self, req_ids: list[str], budgets: np.ndarray) -> None: ...

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
        plan.not_full.fill_(True)

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
            self.plan.not_full.fill_(False)
        self.budgeted = False
        self.carried = False
        self.capped = False
        self.singleton_groups = False
        self.counting = False
        self.steps += 1
        if self.steps % envs.VLLM_ALLOC_METRICS_FLUSH_STEPS == 0:
            self.flush()


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
