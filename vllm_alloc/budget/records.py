"""The rows of a budget file and the measurements behind them: `Allocation` (K(B) at one B, its Alloc-T,
carry and cap settings, the candidates measured there), the measured records (`Calibration`,
`Sensitivity`, `PairedTest`, `Candidate`, `CapTest`) and `Guard` (how the profiler validated the
candidates), with the guard's rule that a file never serves an allocation measured worse than uniform
(`_check_against_uniform`; `file.BudgetFile` applies it to every row, since the uniform vector it compares
with comes from the model's L, K and k_base, which a row does not know).
"""

from __future__ import annotations

import typing
from typing import Literal

from pydantic import Field, model_validator

from vllm_alloc.budget.errors import _fail, _Schema
from vllm_alloc.values import CAP_SCALE

CAP_MIN = (
    1 / CAP_SCALE
)  # the smallest share of experts a distinct-expert cap may leave (`vllm_alloc.routing.cap`)
UNIFORM = "uniform"  # the name of the uniform allocation's candidate, and `chosen` of unmeasured budgets


class Calibration(_Schema):
    source: str = Field(min_length=1)  # file or dataset description
    tokens: int = Field(ge=1)
    seq_len: int = Field(ge=1)
    split: str | None = None  # e.g. "profile 0-80%, held-out 80-100%"


class Sensitivity(_Schema):
    """S[l][k-1] = metric of the model with MoE layer l at k experts, under `protocol` (DESIGN.md §2)."""

    protocol: Literal["isolating", "operating-point"]
    metric: str = Field(min_length=1)
    matrix: list[list[float]]  # L rows of K
    budget: int | None = None  # operating-point only: the B whose uniform allocation the others ran at
    calibration: Calibration

    @model_validator(mode="after")
    def _budget_matches_protocol(self) -> Sensitivity:
        if self.protocol == "operating-point" and self.budget is None:
            _fail("budget", "an operating-point sensitivity needs the budget B it was measured at")
        if self.protocol == "isolating" and self.budget is not None:
            _fail("budget", f"the isolating protocol measures no single budget, got {self.budget}; use null")
        return self


def _check_interval(delta: float, low: float, high: float) -> None:
    """A recorded test's interval must contain its estimate (PairedTest, CapTest)."""
    if not low <= delta <= high:
        _fail("delta", f"the interval [{low}, {high}] does not contain delta = {delta}")


class PairedTest(_Schema):
    """A candidate against a baseline on the same held-out sequences, in one regime: the relative change
    of perplexity (−0.01 = 1 % lower) and its confidence interval (`Guard.confidence`), from per-sequence
    differences of mean NLL. All three are 0 where the two run the same configuration in that regime."""

    regime: Literal["prefill", "decode"]
    baseline: str = Field(min_length=1)  # a candidate name
    delta: float
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> PairedTest:
        _check_interval(self.delta, self.low, self.high)
        return self

    @property
    def same(self) -> bool:
        """The two configurations are the same in this regime (every per-sequence difference was 0)."""
        return self.low == self.high == 0.0

    @property
    def better(self) -> bool:
        """Better with the stated confidence: the whole interval is below zero."""
        return self.high < 0.0


class Candidate(_Schema):
    name: str = Field(min_length=1)  # "uniform", "isolating", "operating-point", ...
    allocation: list[int]
    measured: float  # held-out metric, lower is better (the guard's: prefill regime)
    alloc_t: bool = True  # Alloc-T reallocates at this B (False: every token keeps its top-K_l)
    carry: bool = False  # lone decode tokens carry their request's balance (the allocation's `carry`)
    decode: float | None = None  # held-out metric in the decode regime (a lone stream), where measured
    # The paired tests against the baselines (empty for the baseline itself): on the selection half of
    # the held-out sequences (`Guard.selection_sequences`), at `Guard.confidence`; on every held-out
    # sequence in files from before the confirmation split.
    tests: list[PairedTest] = Field(default=[])
    # The confirmation's paired tests, on the held-out sequences the selection never saw, at
    # `Guard.confirmation_confidence`: the candidate the selection picked against both baselines, and
    # "uniform" against "uniform (no Alloc-T)" where nothing picked was confirmed (empty elsewhere).
    confirmation: list[PairedTest] = Field(default=[])

    def passes(self) -> bool:
        """The selection's rule on `tests` (`holds`)."""
        return holds(self.tests)

    def confirmed(self) -> bool:
        """The confirmation's rule on `confirmation` (`holds`)."""
        return holds(self.confirmation)


def holds(tests: list[PairedTest]) -> bool:
    """The guard's rule over paired tests: against every baseline tested, the candidate differs in some
    regime (it is not that baseline's configuration), and is better with the tests' confidence in every
    regime where it differs."""
    by_baseline: dict[str, list[PairedTest]] = {}
    for t in tests:
        by_baseline.setdefault(t.baseline, []).append(t)
    return bool(by_baseline) and all(
        any(not t.same for t in group) and all(t.better for t in group if not t.same)
        for group in by_baseline.values()
    )


class CapTest(_Schema):
    """One share ρ of the distinct-expert cap tried at a B by the profiler (`profiler.guard.choose_cap`):
    N streams decoding together, as served, on the held-out sequences. Against uniform without Alloc-T
    (the paired relative change of perplexity and its interval), and the share of the served (uncapped)
    configuration's gain over that baseline the capped run keeps (1 = all of it; 0 = none)."""

    share: float = Field(ge=CAP_MIN, lt=1.0)
    streams: int = Field(ge=2)  # a lone stream is never capped
    # Which held-out sequences the test ran on (`Guard.selection_sequences`): the selection's search over
    # the shares, or the confirmation of the share it chose (at `Guard.confirmation_confidence`).
    split: Literal["selection", "confirmation"] = "selection"
    delta: float
    low: float
    high: float
    kept: float

    @model_validator(mode="after")
    def _ordered(self) -> CapTest:
        _check_interval(self.delta, self.low, self.high)
        return self

    def passes(self, keep: float) -> bool:
        """Better than the baseline with confidence, keeping at least `keep` of the gain."""
        return self.high < 0.0 and self.kept >= keep


class Allocation(_Schema):
    budget: int  # B
    k: list[int]  # K(B), one entry per MoE layer
    chosen: str = Field(min_length=1)
    alloc_t: bool = True  # Alloc-T reallocates among tokens at this B; False: each keeps its top-K_l
    # The carried balance at this B (`vllm_alloc.routing.carry`): θ_l per MoE layer (null: +inf, the layer
    # keeps
    # K_base and banks the rest); absent: lone decode tokens keep their top-K_l.
    carry: list[float | None] | None = None
    # The distinct-expert cap at this B (`vllm_alloc.routing.cap`): ρ_l per MoE layer, the share of the
    # experts
    # they would touch that the pass's decode tokens at B may share (in [0.001, 1], 1: no cap at that
    # layer); absent: no cap.
    cap: list[float] | None = None
    cap_tests: list[CapTest] = Field(default=[])  # the shares the profiler tried at B (absent: none tried)
    candidates: list[Candidate] = Field(default=[])

    @model_validator(mode="after")
    def _chosen_is_a_candidate(self) -> Allocation:
        # "Never worse than uniform" needs L, K and k_base: BudgetFile checks it (_check_against_uniform).
        if not self.candidates:
            return self
        by_name: dict[str, Candidate] = {}
        for j, c in enumerate(self.candidates):
            if c.name in by_name:
                _fail(f"candidates[{j}].name", f"candidate name {c.name!r} appears twice")
            by_name[c.name] = c
        chosen = by_name.get(self.chosen)
        if chosen is None:
            _fail("chosen", f"{self.chosen!r} is not one of the candidates {sorted(by_name)}")
        if chosen.allocation != self.k:
            _fail("k", f"k = {self.k} differs from the chosen candidate's allocation {chosen.allocation}")
        if chosen.alloc_t != self.alloc_t:
            _fail("alloc_t", f"alloc_t = {self.alloc_t} differs from the chosen candidate's {chosen.alloc_t}")
        if chosen.carry != (self.carry is not None):
            what = "has no thresholds" if chosen.carry else "has thresholds"
            _fail(
                "carry",
                f"the chosen candidate {'carries' if chosen.carry else 'does not carry'}, but carry {what}",
            )
        return self


class Guard(_Schema):
    """How the profiler validated the candidates (`vllm_alloc.profiler.guard`)."""

    confidence: float = Field(gt=0.0, lt=1.0)  # of every paired interval
    sequences: int = Field(ge=2)  # held-out sequences each test pairs
    seq_len: int = Field(ge=1)
    regimes: list[Literal["prefill", "decode"]] = Field(min_length=1)
    target: float = Field(gt=0.0)  # the relative difference the split was sized to resolve (0.002)
    resolution: float = Field(ge=0.0)  # median half-width of the intervals that compare different runs
    # The distinct-expert cap's rule (`profiler.guard.choose_cap`), where the profiler chose caps: the
    # decode streams each share was measured at, and the least share of the gain a shipped cap keeps.
    cap_streams: list[typing.Annotated[int, Field(ge=2)]] = Field(default=[])
    cap_keep: float | None = Field(default=None, ge=0.0, le=1.0)
    # The confirmation split (absent in files from before it, whose winners were certified on the data
    # that chose them): the first `selection_sequences` held-out sequences choose, the rest confirm, at
    # `confirmation_confidence` = 1 − (1 − confidence) / `comparisons`, every paired comparison the
    # profiler makes (candidates × baselines × regimes × budgets, and the cap's shares × streams ×
    # budgets): `confidence` is then the file's, for all its claims together.
    selection_sequences: int | None = Field(default=None, ge=1)
    comparisons: int | None = Field(default=None, ge=1)
    confirmation_confidence: float | None = Field(default=None, gt=0.0, lt=1.0)
    # Calibration tokens (at this held-out fraction) that would bring `resolution` to `target`, where
    # the split does not resolve it.
    tokens_to_resolve: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _split_complete(self) -> Guard:
        fields = (self.selection_sequences, self.comparisons, self.confirmation_confidence)
        if any(f is not None for f in fields) and any(f is None for f in fields):
            _fail(
                "guard.selection_sequences",
                "selection_sequences, comparisons and confirmation_confidence come together",
            )
        if self.selection_sequences is not None and not self.selection_sequences < self.sequences:
            _fail(
                "guard.selection_sequences",
                f"{self.selection_sequences} is outside the valid range [1, sequences - 1 = "
                f"{self.sequences - 1}]: the confirmation needs sequences of its own",
            )
        return self

    @property
    def confirms(self) -> bool:
        """The file was profiled with the confirmation split."""
        return self.selection_sequences is not None

    @property
    def resolved(self) -> bool:
        """The held-out split resolves the target difference."""
        return self.resolution <= self.target


def _check_against_uniform(i: int, a: Allocation, base: list[int], confirms: bool = False) -> None:
    """DESIGN.md §2: a file never serves an allocation that measured worse than uniform.

    Uniform is a vector, not a name: `base` = alloc_l.uniform(L, K, B, k_min=k_base), what the plugin
    serves without a budget file (with Alloc-T). So
    - a candidate called "uniform" with another vector, or without Alloc-T, is refused: it would be taken
      for the baseline (by `vllm-alloc show`, by a reader) while measuring something else;
    - a chosen candidate that is the baseline (`base`, Alloc-T on) passes whatever it measured, and so,
      in files with the confirmation split (`confirms`), does `base` without Alloc-T (the guard's
      fallback where Alloc-T was not confirmed better);
    - with the confirmation split, any other chosen candidate must be confirmed (`Candidate.confirmed`):
      better with confidence than both baselines in every regime where they differ, on held-out
      sequences its selection never saw;
    - in files from before it, a chosen candidate with paired tests must pass them (`Candidate.passes`);
    - otherwise (files without tests) it must measure no worse than every measurement of the baseline
      (the profiler measures each configuration once and reuses the number, so they agree; where a
      hand-edited file has several, the best one binds);
    - with no measurement of the baseline there is nothing to compare: unmeasured budgets keep uniform.
    """
    for j, c in enumerate(a.candidates):
        if c.name == UNIFORM and c.allocation != base:
            _fail(
                f"allocations[{i}].candidates[{j}].allocation",
                f"the candidate named {UNIFORM!r} has allocation {c.allocation}, but the uniform allocation "
                f"for B = {a.budget} is {base}",
            )
        if c.name == UNIFORM and (not c.alloc_t or c.carry):
            _fail(
                f"allocations[{i}].candidates[{j}].alloc_t",
                f"the candidate named {UNIFORM!r} runs without Alloc-T or carries the balance, but the "
                "uniform baseline runs with Alloc-T and does not carry (the profiler names those "
                "'uniform (no Alloc-T)' and 'uniform + carry')",
            )
    chosen = next(c for c in a.candidates if c.name == a.chosen)  # there is one: Allocation checked it
    if chosen.allocation == base and not chosen.carry and (chosen.alloc_t or confirms):
        return
    if confirms or chosen.tests:
        tests, ok, what_ran = (
            (chosen.confirmation, chosen.confirmed(), "confirmation")
            if confirms
            else (chosen.tests, chosen.passes(), "paired tests")
        )
        if not ok:
            worst = max((t for t in tests if not t.same), key=lambda t: t.high, default=None)
            what = (
                f"against {worst.baseline!r} in the {worst.regime} regime its interval is "
                f"[{worst.low:+.4%}, {worst.high:+.4%}], not below zero"
                if worst is not None and not worst.better
                else f"its {what_ran} ran nothing that differs from a baseline"
            )
            _fail(
                f"allocations[{i}].chosen",
                f"{a.chosen!r} is not better than the baselines with the stated confidence: {what}; "
                "such a budget must run uniform",
            )
        return
    measured = [c.measured for c in a.candidates if c.allocation == base and c.alloc_t and not c.carry]
    if measured and chosen.measured > min(measured):
        _fail(
            f"allocations[{i}].chosen",
            f"{a.chosen!r} measured {chosen.measured} but the uniform allocation {base} measured "
            f"{min(measured)} (lower is better); an allocation worse than uniform must not be chosen",
        )
