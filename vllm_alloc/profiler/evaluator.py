"""Measurements through the served model: `VllmEvaluator` (the protocols' evaluate on either split and
the guard's held-out runs in each regime) and `CapEvaluator` (the distinct-expert cap's runs, in an engine
serving the budget file being capped), each sending calibration sequences with a budget b whose
floor(b·A) is the B it measures (`request_budget`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from vllm_alloc.budget import BudgetFile, ModelFingerprint
from vllm_alloc.profiler.calibration import CalibrationData, nll_sum
from vllm_alloc.profiler.carry_defaults import CARRY_OFFSET
from vllm_alloc.profiler.engine import decode_order
from vllm_alloc.profiler.errors import ProfileError

# The scope each guard regime is served under: prefill steps pool a budget's tokens; a lone decode
# stream's groups are one token each.
REGIME_SCOPES = {"prefill": "budget", "decode": "token"}


class VllmEvaluator:
    """evaluate(K, split) -> perplexity, measured by the served model with K as the live row of Σ K_l
    (scope `request`); `validate(K, alloc_t, regime)` -> the mean NLL of each held-out sequence in a
    regime the guard validates (`profiler.guard`): prefill under scope `budget`, the decode of a lone
    stream under scope `token`."""

    def __init__(
        self,
        llm: Any,
        calib: CalibrationData,
        model: ModelFingerprint,
        k_base: int = 1,
        carry_offset: float = CARRY_OFFSET,
    ) -> None:
        from vllm_alloc.budget import uniform_budget_file

        self.llm, self.calib, self.model = llm, calib, model
        self.carry_offset = carry_offset
        self._thresholds: dict[tuple[int, ...], list[float | None]] = {}
        self._budgets = uniform_budget_file(model, k_base=k_base)  # only for absolute_budget()

    def request_budget(self, B: int) -> float:
        return request_budget(self._budgets, B)

    def __call__(self, ks: Sequence[int], split: str) -> float:
        nll = self._run(ks, True, "request", split)
        return math.exp(sum(nll) / sum(len(ids) - 1 for ids in self.calib.split_sequences(split)))

    def validate(self, ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> list[float]:
        # A lone stream that carries its balance runs in decode order (`decode_order`): one token per
        # sequence per pass, each its own group, exactly the steps a decoding request takes.
        in_order = carry and regime == "decode"
        with decode_order(self.llm, in_order):
            nll = self._run(ks, alloc_t, REGIME_SCOPES[regime], "heldout", carry)
        return [v / (len(ids) - 1) for v, ids in zip(nll, self.calib.heldout, strict=True)]

    def calibrate_carry(self) -> None:
        """Record the router scores of the full model on the profile split, for `thresholds`."""
        self.llm.collective_rpc("vllm_alloc_record_scores", args=(True,))
        try:
            self._run([self.model.top_k] * self.model.num_moe_layers, True, "request", "profile")
        finally:
            self.llm.collective_rpc("vllm_alloc_record_scores", args=(False,))

    def thresholds(self, ks: Sequence[int]) -> list[float | None]:
        """θ per layer of the carried balance at K = ks (`carry.threshold_for`, K_l − K_base − offset
        extras per token); None where it is +inf (the budget file's JSON has no infinity)."""
        key = tuple(int(k) for k in ks)
        if key not in self._thresholds:
            B = sum(key)
            got = self.llm.collective_rpc(
                "vllm_alloc_carry_thresholds", args=({B: list(key)}, self.carry_offset)
            )
            self._thresholds[key] = [None if v == math.inf else float(v) for v in got[0][B]]
        return self._thresholds[key]

    def _run(
        self, ks: Sequence[int], alloc_t: bool, scope: str, split: str, carry: bool = False
    ) -> list[float]:
        """NLL sum of each sequence of `split` with K = ks as the live row of B = Σ ks."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        B = sum(ks)
        self.llm.collective_rpc("vllm_alloc_set_allocation", args=({B: list(ks)}, {B: bool(alloc_t)}))
        theta = [math.inf if v is None else v for v in self.thresholds(ks)] if carry else None
        self.llm.collective_rpc("vllm_alloc_set_carry", args=({B: theta},))
        self.llm.collective_rpc("vllm_alloc_set_scope", args=(scope,))
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, extra_args={"activation_budget": self.request_budget(B)}
        )
        sequences = self.calib.split_sequences(split)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, sequences, strict=True)]


def request_budget(budget_file: BudgetFile, B: int) -> float:
    """A b with floor(b·A) == B: the middle of B's interval, so float rounding cannot slip a step."""
    A = budget_file.model.full_activations
    b = 1.0 if B == A else (B + 0.5) / A
    if budget_file.absolute_budget(b) != B:
        raise RuntimeError(f"b = {b} maps to B = {budget_file.absolute_budget(b)}, not {B}")
    return b


class CapEvaluator:
    """The distinct-expert cap's measurements (`guard.choose_cap`), in an engine serving the
    budget file being capped: `self(B, share, N)` -> the mean NLL of each held-out sequence, the file's
    configuration at B (its K(B), Alloc-T, carried balance) with N streams decoding together as served.
    Where B carries and N <= carry_group, N sequences per call run in decode order under scope `budget`
    (each pass: one token of each of the N streams, one Alloc-T and cap group); elsewhere N sequences
    per call prefill in one pass under scope `position` (a group: the N streams' tokens at one
    position, equal to N decode streams: tests/e2e). The held-out sequences are cut into calls of equal
    size, at most N each (360 sequences at N = 64: 6 calls of 60). `baseline(B)`: uniform K_l without
    Alloc-T. `runs` counts the measurements."""

    def __init__(self, llm: Any, calib: CalibrationData, budget_file: BudgetFile) -> None:
        self.llm, self.calib, self.bf = llm, calib, budget_file
        self.L = budget_file.model.num_moe_layers
        self.runs = 0

    def baseline(self, B: int) -> list[float]:
        from vllm_alloc.budget.alloc_l import uniform

        ks = uniform(self.L, self.bf.model.top_k, B, k_min=self.bf.k_base)
        self.llm.collective_rpc("vllm_alloc_set_allocation", args=({B: ks}, {B: False}))
        self.llm.collective_rpc("vllm_alloc_set_carry", args=({B: None},))
        self.llm.collective_rpc("vllm_alloc_set_cap", args=({B: None},))
        try:
            return self._run(B, "token", len(self.calib.heldout), in_order=False)
        finally:
            self.llm.collective_rpc("vllm_alloc_reset_allocation")

    def __call__(self, B: int, share: float | None, streams: int) -> list[float]:
        self.llm.collective_rpc("vllm_alloc_reset_allocation")
        self.llm.collective_rpc(
            "vllm_alloc_set_cap", args=({B: None if share is None else [share] * self.L},)
        )
        in_order = self.bf.carrying()[B] and streams <= self.bf.carry_group
        try:
            return self._run(B, "budget" if in_order else "position", streams, in_order)
        finally:
            self.llm.collective_rpc("vllm_alloc_reset_allocation")

    def _run(self, B: int, scope: str, streams: int, in_order: bool) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.collective_rpc("vllm_alloc_set_scope", args=(scope,))
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, extra_args={"activation_budget": request_budget(self.bf, B)}
        )
        seqs = self.calib.heldout
        if len(seqs) < streams:
            raise ProfileError(
                f"--cap-streams {streams}: only {len(seqs)} held-out sequences; N must be at most that"
            )
        calls = -(-len(seqs) // streams)
        bounds = [len(seqs) * i // calls for i in range(calls + 1)]  # equal calls of at most N
        nll: list[float] = []
        with decode_order(self.llm, in_order):
            for lo, hi in itertools.pairwise(bounds):
                call = [TokensPrompt(prompt_token_ids=ids) for ids in seqs[lo:hi]]
                outputs = self.llm.generate(call, params, use_tqdm=False)
                nll += [nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, seqs[lo:hi], strict=True)]
        self.runs += 1
        return [v / (len(ids) - 1) for v, ids in zip(nll, seqs, strict=True)]
