"""Budget files: the versioned JSON that maps every absolute budget B to the per-layer vector K(B).

Written by `vllm-alloc profile`, shipped under the top-level `configs/`, read once at start-up. The schema
is pydantic, strict (no coercion: `"4"`, `4.0` or `true` is not the integer 4, `"0.5"` is not a number),
with `extra="forbid"` (a typo is an error, not a silently ignored key) and finite floats only.
Every problem a user can cause surfaces as `BudgetFileError` naming the file, the field and the fix;
raw pydantic errors never reach the user from `load_budget_file` / `parse_budget_file`.

No vLLM import here: the CLI (`show`, `profile`) and the tests use this on machines without vLLM.
About 500 lines on purpose: schema, validation and error translation are one contract, read in one
place. What a valid request budget b is lives in `vllm_alloc.values` (`absolute_budget` asks it).
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_alloc.budget.alloc_l import solve, uniform
from vllm_alloc.values import CAP_SCALE, BudgetError, parse_budget, range_text, share_units, shown

# Where shipped budget files live (the repo's top-level configs/). Looked up at call time, so tests
# and deployments can point it elsewhere by assigning this module's CONFIGS_DIR.
# In a wheel the top-level configs/ folder ships as the package data folder vllm_alloc/configs.
_PACKAGE = Path(__file__).resolve().parent.parent  # vllm_alloc/
_PACKAGED_CONFIGS = _PACKAGE / "configs"
CONFIGS_DIR: Path = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else _PACKAGE.parent / "configs"

FIX_PROFILE = "re-run `vllm-alloc profile` for this model"
# floor(b·A) must not lose a whole activation to float error: 0.5·156 is exact, but e.g. (1/6)·156 is
# 25.999999999999996. Budgets are user-given decimals, far coarser than this.
_EPS = 1e-9
CAP_MIN = (
    1 / CAP_SCALE
)  # the smallest share of experts a distinct-expert cap may leave (`vllm_alloc.routing.cap`)
UNIFORM = "uniform"  # the name of the uniform allocation's candidate, and `chosen` of unmeasured budgets


class BudgetFileError(ValueError):
    """A budget file that cannot be used: carries `path`, `field` (e.g. `allocations[3].k`), `message`
    and `fix`. A ValueError, so pydantic validators may raise it and callers may catch either."""

    def __init__(self, path: str | Path | None, field: str | None, message: str, fix: str = FIX_PROFILE):
        # args mirror __init__ so the exception pickles across the processes vLLM spawns.
        super().__init__(path, field, message, fix)
        self.path = None if path is None else str(path)
        self.field = field
        self.message = message.rstrip(".")
        self.fix = fix

    def __str__(self) -> str:
        where = f"budget file {self.path}" if self.path else "budget file"
        field = f": field '{self.field}'" if self.field else ""
        return f"{where}{field}: {self.message}. Fix: {self.fix}"


def _fail(field: str, message: str, fix: str = FIX_PROFILE) -> typing.NoReturn:
    raise BudgetFileError(None, field, message, fix)


class _Schema(BaseModel):
    # Inherited by every schema class: unknown keys (typos), NaN/inf and values of the wrong JSON type are
    # errors, not silently kept or converted (a budget file is written by a program; a string where a
    # number belongs is a bug or a hand edit gone wrong). Strict still takes a JSON integer for a float.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class ModelFingerprint(_Schema):
    """What a budget file was profiled for; compared field by field with the loaded model."""

    architecture: str = Field(min_length=1)
    moe_layers: list[int] = Field(min_length=1)  # decoder indices of the MoE layers, sorted, unique
    num_experts: int = Field(ge=1)  # E
    top_k: int = Field(ge=1)  # K
    hidden_size: int = Field(ge=1)  # H
    intermediate_size: int = Field(ge=1)  # I (per expert)

    @field_validator("moe_layers")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        if v != sorted(set(v)) or v[0] < 0:
            raise ValueError("must be non-negative, sorted and unique decoder-layer indices")
        return v

    @model_validator(mode="after")
    def _k_within_e(self) -> ModelFingerprint:
        if self.top_k > self.num_experts:
            _fail("top_k", f"top_k (K) = {self.top_k} is outside the valid range [1, E = {self.num_experts}]")
        return self

    @property
    def num_moe_layers(self) -> int:
        """L."""
        return len(self.moe_layers)

    @property
    def full_activations(self) -> int:
        """A = L·K, the routed activations per token of the stock model."""
        return self.num_moe_layers * self.top_k


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
    tests: list[PairedTest] = []  # paired tests against the baselines (empty for the baseline itself)

    def passes(self) -> bool:
        """The guard's rule: against every baseline it was tested with, it differs in some regime (it is
        not that baseline's configuration), and is better with confidence in every regime where it
        differs."""
        by_baseline: dict[str, list[PairedTest]] = {}
        for t in self.tests:
            by_baseline.setdefault(t.baseline, []).append(t)
        return bool(by_baseline) and all(
            any(not t.same for t in tests) and all(t.better for t in tests if not t.same)
            for tests in by_baseline.values()
        )


class CapTest(_Schema):
    """One share ρ of the distinct-expert cap tried at a B by the profiler (`profile_protocols.choose_cap`):
    N streams decoding together, as served, on the held-out sequences. Against uniform without Alloc-T
    (the paired relative change of perplexity and its interval), and the share of the served (uncapped)
    configuration's gain over that baseline the capped run keeps (1 = all of it; 0 = none)."""

    share: float = Field(ge=CAP_MIN, lt=1.0)
    streams: int = Field(ge=2)  # a lone stream is never capped
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
    cap_tests: list[CapTest] = []  # the shares the profiler tried at this B (absent: none tried)
    candidates: list[Candidate] = []

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
    """How the profiler validated the candidates (`vllm_alloc.profiler.protocols`, the guard)."""

    confidence: float = Field(gt=0.0, lt=1.0)  # of every paired interval
    sequences: int = Field(ge=2)  # held-out sequences each test pairs
    seq_len: int = Field(ge=1)
    regimes: list[Literal["prefill", "decode"]] = Field(min_length=1)
    target: float = Field(gt=0.0)  # the relative difference the split was sized to resolve (0.002)
    resolution: float = Field(ge=0.0)  # median half-width of the intervals that compare different runs
    # The distinct-expert cap's rule (`profile_protocols.choose_cap`), where the profiler chose caps: the
    # decode streams each share was measured at, and the least share of the gain a shipped cap keeps.
    cap_streams: list[typing.Annotated[int, Field(ge=2)]] = []
    cap_keep: float | None = Field(default=None, ge=0.0, le=1.0)


def _check_against_uniform(i: int, a: Allocation, base: list[int]) -> None:
    """DESIGN.md §2: a file never serves an allocation that measured worse than uniform.

    Uniform is a vector, not a name: `base` = alloc_l.uniform(L, K, B, k_min=k_base), what the plugin
    serves without a budget file (with Alloc-T). So
    - a candidate called "uniform" with another vector, or without Alloc-T, is refused: it would be taken
      for the baseline (by `vllm-alloc show`, by a reader) while measuring something else;
    - a chosen candidate that is the baseline (`base`, Alloc-T on) passes whatever it measured;
    - a chosen candidate with paired tests (the guard's files) must pass them (`Candidate.passes`): better
      with confidence than every baseline in every regime where the two differ;
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
    if chosen.allocation == base and chosen.alloc_t and not chosen.carry:
        return
    if chosen.tests:
        if not chosen.passes():
            worst = max((t for t in chosen.tests if not t.same), key=lambda t: t.high, default=None)
            what = (
                f"against {worst.baseline!r} in the {worst.regime} regime its interval is "
                f"[{worst.low:+.4%}, {worst.high:+.4%}], not below zero"
                if worst is not None and not worst.better
                else "it runs the same configuration as a baseline in every regime"
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


def _check_k_base(k_base: int, K: int) -> None:
    # Also called before alloc_l runs, so a bad k_base reads as a budget-file field, not as k_min.
    if isinstance(k_base, bool) or not isinstance(k_base, int) or not 1 <= k_base <= K:
        _fail("k_base", f"k_base = {k_base} is outside the valid range [1, K = {K}]", "set k_base in [1, K]")


def _check_k(field: str, ks: list[int], B: int, K: int, k_base: int, L: int) -> None:
    if len(ks) != L:
        _fail(field, f"has {len(ks)} entries; the model has L = {L} MoE layers, so it needs exactly {L}")
    for l, k in enumerate(ks):
        if not k_base <= k <= K:
            _fail(field, f"K_{l} = {k} is outside the valid range [k_base = {k_base}, K = {K}]")
    if sum(ks) > B:
        _fail(field, f"Σ K_l = {sum(ks)} exceeds the budget B = {B}")


def _check_matrix(field: str, matrix: list[list[float]], L: int, K: int) -> None:
    if len(matrix) != L:
        _fail(field, f"has {len(matrix)} rows; the model has L = {L} MoE layers, so it needs exactly {L}")
    for l, row in enumerate(matrix):
        if len(row) != K:
            _fail(f"{field}[{l}]", f"has {len(row)} entries; it needs K = {K} (k = 1..K)")


class BudgetFile(_Schema):
    """A validated budget file (format_version 1). Build with `parse_budget_file`, `load_budget_file`,
    `uniform_budget_file` or `from_sensitivity`; direct construction raises pydantic errors instead."""

    format_version: int  # 1; checked by _supported_version (a Literal[1] would also take `true` and 1.0)
    model: ModelFingerprint
    k_base: int = 1  # K_base: Alloc-T's per-token floor, and the smallest K_l
    weights: Literal["topk", "kept", "raw"] = "topk"
    scope: Literal["budget", "request"] = "budget"
    default_budget: float = 1.0  # b for requests that name none
    carry_alpha: float = Field(default=0.05, ge=0.0)  # α of the carried balance, where a B carries
    # Where a request banks what its tokens save: one balance per MoE layer ("layer"), or one for all its
    # layers ("request": a layer's savings pay for another layer's uncertain token).
    carry_pool: Literal["layer", "request"] = "layer"
    # A decode token carries where at most this many decode tokens share its Alloc-T group (1: only a lone
    # one); carried tokens leave the group. Above it, Alloc-T works with the group.
    carry_group: int = Field(default=1, ge=1)
    sensitivities: list[Sensitivity] = []
    allocations: list[Allocation]  # one per integer B from L·k_base to A, sorted by B
    guard: Guard | None = None  # how the candidates were validated (profiler-written files)
    notes: str = ""

    _source: str | None = None  # private (leading underscore): the path it was loaded from, for errors

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != 1:
            raise ValueError("unsupported")  # reworded, naming the version, by _from_validation_error
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BudgetFile:
        L, K, A = self.model.num_moe_layers, self.model.top_k, self.model.full_activations
        _check_k_base(self.k_base, K)
        lo = L * self.k_base
        try:  # the same rule as a request's b, so the default is valid exactly when a request would be
            self.absolute_budget(self.default_budget)
        except BudgetError:
            _fail(
                "default_budget",
                f"default_budget = {self.default_budget} is outside the valid range {self._range_text()}",
                "set default_budget within that range (1.0 serves the stock model)",
            )
        for i, a in enumerate(self.allocations):
            if not lo <= a.budget <= A:
                _fail(f"allocations[{i}].budget", f"B = {a.budget} is outside the valid range [{lo}, {A}]")
            if a.budget != lo + i:  # all in range, so sorted + unique + complete <=> budget == lo + i
                if a.budget < lo + i:
                    what = f"B = {a.budget} appears twice (B = {lo + i} is expected here)"
                else:
                    what = f"B = {a.budget} comes where B = {lo + i} is expected (missing or out of order)"
                fix = f"list every B from L·k_base = {lo} to A = {A} once, in order ({FIX_PROFILE})"
                _fail(f"allocations[{i}].budget", what, fix)
            _check_k(f"allocations[{i}].k", a.k, a.budget, K, self.k_base, L)
            if a.carry is not None and len(a.carry) != L:
                _fail(
                    f"allocations[{i}].carry",
                    f"has {len(a.carry)} thresholds; it needs one per layer, L = {L}",
                )
            if a.carry is not None and a.budget == A:
                _fail(f"allocations[{i}].carry", "B = A (b = 1.0) is the stock model and never carries")
            if a.cap is not None:
                if len(a.cap) != L:
                    what = f"has {len(a.cap)} values; it needs one per layer, L = {L}"
                    _fail(f"allocations[{i}].cap", what)
                bad = [c for c in a.cap if not CAP_MIN <= c <= 1.0]
                if bad:
                    what = f"ρ = {bad[0]!r} is outside the valid range [{CAP_MIN}, 1] (a share of experts)"
                    _fail(f"allocations[{i}].cap", what)
                if a.budget == A:
                    _fail(f"allocations[{i}].cap", "B = A (b = 1.0) is the stock model and is never capped")
                if a.cap_tests:
                    self._check_cap_tests(i, a)
            for j, c in enumerate(a.candidates):
                field = f"allocations[{i}].candidates[{j}].allocation"
                _check_k(field, c.allocation, a.budget, K, self.k_base, L)
            if a.candidates:
                _check_against_uniform(i, a, uniform(L, K, a.budget, k_min=self.k_base))
        first = lo + len(self.allocations)
        if first <= A:  # every listed B is in place, so only the tail can be missing
            gone = f"B = {first}" if first == A else f"B = {first} to {A}"
            _fail("allocations", f"{gone} missing; need every B from L·k_base = {lo} to A = {A}")
        if self.allocations[-1].k != [K] * L:
            _fail(
                f"allocations[{len(self.allocations) - 1}].k",
                f"the full budget B = A = {A} must run K = {K} experts in every layer (b = 1.0 is the "
                f"stock model), got {self.allocations[-1].k}",
            )
        for j, s in enumerate(self.sensitivities):
            _check_matrix(f"sensitivities[{j}].matrix", s.matrix, L, K)
            if s.budget is not None and not lo <= s.budget <= A:
                _fail(f"sensitivities[{j}].budget", f"B = {s.budget} is outside the valid range [{lo}, {A}]")
        return self

    def __eq__(self, other: object) -> bool:
        # pydantic's __eq__ also compares private attributes: the same file loaded from two paths is equal.
        return isinstance(other, BudgetFile) and self.model_dump() == other.model_dump()

    @property
    def min_budget(self) -> float:
        """The smallest valid b: L·k_base / A = k_base / K (absolute_budget maps it to B = L·k_base)."""
        return self.k_base / self.model.top_k

    def _range_text(self) -> str:
        return (
            f"{range_text(self.min_budget)} (the minimum is k_base/K = {self.k_base}/{self.model.top_k}: "
            f"B = L·k_base = {self.model.num_moe_layers * self.k_base} of A = {self.model.full_activations})"
        )

    def absolute_budget(self, b: Any) -> int:
        """B = floor(b·A) for a request budget b in [min_budget, 1] (a number, or its text as a request
        carries it); BudgetError (a ValueError) naming this file's range otherwise. `requests.parse_budget`
        decides what is valid, as for every budget everywhere; this only says it with the file's numbers."""
        try:
            b = parse_budget(b, min_budget=self.min_budget)
        except BudgetError as e:
            raise BudgetError(
                f"activation budget b = {shown(b)} is outside the valid range {self._range_text()}"
            ) from e
        lo = self.model.num_moe_layers * self.k_base
        # parse_budget admits b a hair below min_budget (MIN_BUDGET_SLACK): that b is the minimum, B = lo.
        return max(math.floor(b * self.model.full_activations + _EPS), lo)

    def k_vector(self, b: float) -> list[int]:
        """K(floor(b·A)): the per-layer budgets a request with budget b runs at."""
        B = self.absolute_budget(b)
        return list(self.allocations[B - self.model.num_moe_layers * self.k_base].k)

    def allocation_table(self) -> torch.Tensor:
        """int32 [A+1, L]: row B is K(B); rows below L·k_base are zero (row 0 = padding, nothing runs).
        The integration gathers table[B_t, l] per token on device, so no host lookup per step."""
        L, A = self.model.num_moe_layers, self.model.full_activations
        table = torch.zeros(A + 1, L, dtype=torch.int32)
        table[L * self.k_base :] = torch.tensor([a.k for a in self.allocations], dtype=torch.int32)
        return table

    def reallocating(self) -> list[bool]:
        """Per B from 0 to A: whether Alloc-T reallocates among tokens at B (the allocation's alloc_t;
        True below L·k_base, where no request runs)."""
        flags = [True] * (self.model.full_activations + 1)
        for a in self.allocations:
            flags[a.budget] = a.alloc_t
        return flags

    def carrying(self) -> list[bool]:
        """Per B from 0 to A: whether a lone decode token at B carries its request's balance."""
        flags = [False] * (self.model.full_activations + 1)
        for a in self.allocations:
            flags[a.budget] = a.carry is not None
        return flags

    def carry_table(self) -> torch.Tensor:
        """float64 [A+1, L]: row B is θ(B) where B carries (null as +inf), +inf elsewhere."""
        L, A = self.model.num_moe_layers, self.model.full_activations
        table = torch.full((A + 1, L), math.inf, dtype=torch.float64)
        for a in self.allocations:
            if a.carry is not None:
                table[a.budget] = torch.tensor(
                    [math.inf if v is None else v for v in a.carry], dtype=torch.float64
                )
        return table

    def _check_cap_tests(self, i: int, a: Allocation) -> None:
        """A measured cap ships only as the profiler's rule passed it: its share at every stream count."""
        assert a.cap is not None
        guard = self.guard
        if guard is None or guard.cap_keep is None or not guard.cap_streams:
            _fail(f"allocations[{i}].cap_tests", "cap tests need the guard's cap_streams and cap_keep")
        assert guard is not None and guard.cap_keep is not None
        if len(set(a.cap)) != 1:
            _fail(f"allocations[{i}].cap", f"ρ = {a.cap}: the profiler tests one share for every layer")
        share = a.cap[0]
        tests = {t.streams: t for t in a.cap_tests if t.share == share}
        failed = [n for n in guard.cap_streams if n not in tests or not tests[n].passes(guard.cap_keep)]
        if failed:
            what = f"ρ = {share:g} did not pass its cap tests at N = {failed} streams"
            _fail(f"allocations[{i}].cap", what, FIX_PROFILE)

    def cap_table(self, override: float | None = None) -> torch.Tensor:
        """int64 [A+1, L]: row B is ρ_l(B) in thousandths (`values.CAP_SCALE`) where B is capped, CAP_SCALE
        (no cap)
        elsewhere. `override` (the expert_cap setting): ρ for every layer at every B below A instead (1:
        no cap anywhere)."""
        L, A = self.model.num_moe_layers, self.model.full_activations
        table = torch.full((A + 1, L), CAP_SCALE, dtype=torch.int64)
        if override is not None:
            table[:A] = share_units(override)
            return table
        for a in self.allocations:
            if a.cap is not None:
                table[a.budget] = torch.tensor([share_units(c) for c in a.cap], dtype=torch.int64)
        return table

    def validate_against(self, fp: ModelFingerprint, path: str | None = None) -> None:
        """BudgetFileError on the first fingerprint field where this file and the loaded model differ."""
        for name in ModelFingerprint.model_fields:
            ours, theirs = getattr(self.model, name), getattr(fp, name)
            if ours != theirs:
                raise BudgetFileError(
                    path or self._source,
                    f"model.{name}",
                    f"the file was profiled for {name} = {ours!r}, the loaded model has {theirs!r}",
                    f"{FIX_PROFILE}, or pass the budget file made for it",
                )

    def dump(self, path: str | Path) -> None:
        """Write pretty JSON (flat lists on one line, so a file stays readable at L = 60)."""
        Path(path).write_text(_pretty(self.model_dump(mode="json")) + "\n", encoding="utf-8")

    def fingerprint_hash(self) -> str:
        """16 hex digits of sha256 over the canonical JSON of the whole file (keys compile caches)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _pretty(obj: Any, depth: int = 0) -> str:
    flat = json.dumps(obj, ensure_ascii=False)
    if not isinstance(obj, dict | list) or len(flat) + 2 * depth <= 100:
        return flat
    pad, end = "  " * (depth + 1), "  " * depth
    if isinstance(obj, dict):
        items = [f"{pad}{json.dumps(k)}: {_pretty(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{end}}}"
    if all(not isinstance(v, dict | list) for v in obj):
        return flat  # a K vector or a matrix row: one line however long
    return "[\n" + ",\n".join(pad + _pretty(v, depth + 1) for v in obj) + f"\n{end}]"


def _loc_text(loc: tuple[int | str, ...]) -> str:
    """('allocations', 3, 'k') -> 'allocations[3].k'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema class of the object at `loc`, to list its valid keys for an unknown one."""
    cls: type[BaseModel] = BudgetFile
    for part in loc:
        if isinstance(part, int):
            continue
        info = cls.model_fields.get(part)
        if info is None:
            return None
        options = (info.annotation, *typing.get_args(info.annotation))  # Model, or list[Model]
        models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return None
        cls = models[0]
    return cls


_JSON_TYPES = {  # pydantic's strict type errors, in the words of the JSON a person edits
    "int_type": 'integer, e.g. 4 (not "4", 4.0 or true)',
    "float_type": 'number, e.g. 0.5 (not "0.5" or true)',
    "string_type": "string in double quotes",
    "list_type": "array [...]",
    "model_type": "object {...}",
    "dict_type": "object {...}",
}


def _from_validation_error(exc: ValidationError, path: str | Path | None) -> BudgetFileError:
    errors = exc.errors()
    err = errors[0]
    loc = _loc_text(err["loc"])
    cause = err.get("ctx", {}).get("error")
    fix = f"correct the value, or {FIX_PROFILE}"
    if isinstance(cause, BudgetFileError):
        field = ".".join(p for p in (loc, cause.field) if p) or None
        message, fix = cause.message, cause.fix
    elif err["type"] == "extra_forbidden":
        field, message = loc, "unknown key"
        schema = _schema_at(err["loc"][:-1])
        known = f" (valid keys: {', '.join(schema.model_fields)})" if schema else ""
        fix = f"remove the key or correct its spelling{known}"
    elif err["type"] == "missing":
        field, message, fix = loc, "required field is missing", f"add it, or {FIX_PROFILE}"
    elif loc == "format_version":
        field, message = loc, f"format_version {err.get('input')!r} is not supported; this vllm-alloc reads 1"
        fix = "re-create the file with this version's `vllm-alloc profile`"
    elif err["type"] in _JSON_TYPES:  # strict mode: the value has the wrong JSON type, nothing is converted
        got = json.dumps(err.get("input"), default=repr, ensure_ascii=False)
        got = got[:80] + "…" if len(got) > 80 else got
        field, message = loc or None, f"expected a JSON {_JSON_TYPES[err['type']]}, got {got}"
        fix = f"write the value with that JSON type (budget files are read strictly), or {FIX_PROFILE}"
    else:
        detail = str(cause) if cause is not None else err["msg"]
        got = repr(err.get("input"))
        field, message = loc or None, f"{detail} (got {got[:80] + '…' if len(got) > 80 else got})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s) after this one)"
    return BudgetFileError(path, field, message, fix)


def parse_budget_file(data: Any, path: str | Path | None = None) -> BudgetFile:
    """Validate already-decoded JSON; every problem becomes a BudgetFileError naming `path`."""
    if not isinstance(data, dict):
        raise BudgetFileError(path, None, f"top level is a {type(data).__name__}, not a JSON object")
    try:
        budget_file = BudgetFile.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, path) from None
    budget_file._source = None if path is None else str(path)
    return budget_file


def resolve_budget_file(path_or_name: str | Path) -> Path:
    """A path if one exists, else a shipped file `<name>` or `<name>.json` under CONFIGS_DIR."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if Path(name).name == name:  # a bare name, not a path: try the shipped configs
        for shipped in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.json"):
            if shipped.is_file():
                return shipped
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.json")) if CONFIGS_DIR.is_dir() else []
    raise BudgetFileError(
        path_or_name,
        None,
        f"no such file, and no shipped budget file of that name in {CONFIGS_DIR} "
        f"(shipped: {', '.join(names) or 'none'})",
        "pass the path of a budget file or a shipped name, or make one with `vllm-alloc profile`",
    )


def load_budget_file(path_or_name: str | Path) -> BudgetFile:
    """Load and validate a budget file by path, or by the name of a shipped one (`<name>[.json]` in
    CONFIGS_DIR; an existing path wins over a shipped name)."""
    path, text = read_budget_file(path_or_name)
    return parse_budget_text(text, path)


def read_budget_file(path_or_name: str | Path) -> tuple[Path, str]:
    """The path and text of a budget file (`load_budget_file` without the validation)."""
    path = resolve_budget_file(path_or_name)
    try:
        return path, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetFileError(
            path, None, f"cannot read it ({exc})", "check the path and its permissions"
        ) from None


def parse_budget_text(text: str, path: str | Path | None) -> BudgetFile:
    """Validate the text of a budget file; BudgetFileError names `path` and the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BudgetFileError(
            path,
            None,
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            f"repair the JSON, or {FIX_PROFILE}",
        ) from None
    return parse_budget_file(data, path)


def _build(data: dict[str, Any]) -> BudgetFile:
    return parse_budget_file({"format_version": 1, **data})


def uniform_budget_file(model: ModelFingerprint, k_base: int = 1, **settings: Any) -> BudgetFile:
    """The uniform budget file for `model`: K(B) = alloc_l.uniform for every B, no sensitivities.
    `settings` are further BudgetFile fields (weights, scope, default_budget, notes)."""
    L, K = model.num_moe_layers, model.top_k
    _check_k_base(k_base, K)
    allocations = [
        {"budget": B, "k": uniform(L, K, B, k_min=k_base), "chosen": UNIFORM}
        for B in range(L * k_base, L * K + 1)
    ]
    return _build({"model": model, "k_base": k_base, "allocations": allocations, **settings})


def from_sensitivity(
    model: ModelFingerprint, sensitivity: Sensitivity, k_base: int = 1, **settings: Any
) -> BudgetFile:
    """The budget file whose K(B) = alloc_l.solve(sensitivity.matrix) for every B (chosen = protocol).

    B = A is pinned to all K even where the DP would leave experts unused (a measured row that is not
    decreasing in k): b = 1.0 is defined as the stock model. No held-out candidates are recorded here;
    the profiler adds them.
    """
    L, K = model.num_moe_layers, model.top_k
    _check_k_base(k_base, K)
    _check_matrix("sensitivities[0].matrix", sensitivity.matrix, L, K)  # before solve() sees it
    solved = solve(sensitivity.matrix, k_min=k_base)
    solved[L * K] = [K] * L
    allocations = [{"budget": B, "k": ks, "chosen": sensitivity.protocol} for B, ks in solved.items()]
    data = {"model": model, "k_base": k_base, "sensitivities": [sensitivity], "allocations": allocations}
    return _build({**data, **settings})
