"""Budget files: the versioned JSON that maps every absolute budget B to the per-layer vector K(B).

Written by `vllm-alloc profile`, shipped under the top-level `configs/`, read once at start-up. The schema
is pydantic, strict (no coercion: `"4"`, `4.0` or `true` is not the integer 4, `"0.5"` is not a number),
with `extra="forbid"` (a typo is an error, not a silently ignored key) and finite floats only.
Every problem a user can cause surfaces as `BudgetFileError` naming the file, the field and the fix;
raw pydantic errors never reach the user from `load_budget_file` / `parse_budget_file`.

This module owns the whole file: `ModelFingerprint` (what it was profiled for), `BudgetFile` with the
checks that need the model (every B once, every K vector in range, the sensitivity matrices' shape, the
cap tests), b -> B (`absolute_budget`), the device tables the integration gathers from, and writing it
(`dump`). Schema, validation and error translation are one contract; they were one module so it could
be read in one place. Split by concern, the contract still holds: every check raises through
`errors._fail`, and every way in for a person's file goes through `load.parse_budget_file`, which rewords
pydantic's own errors. The rows and measurements are in `records`, finding and reading files in `load`.
What a valid request budget b is lives in `vllm_alloc.values` (`absolute_budget` asks it).

No vLLM import here: the CLI (`show`, `profile`) and the tests use this on machines without vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from vllm_alloc.budget.alloc_l import uniform
from vllm_alloc.budget.errors import FIX_PROFILE, BudgetFileError, _fail, _Schema
from vllm_alloc.budget.records import CAP_MIN, Allocation, Guard, Sensitivity, _check_against_uniform
from vllm_alloc.values import CAP_SCALE, BudgetError, parse_budget, range_text, share_units, shown

# floor(b·A) must not lose a whole activation to float error: 0.5·156 is exact, but e.g. (1/6)·156 is
# 25.999999999999996. Budgets are user-given decimals, far coarser than this.
_EPS = 1e-9


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
    sensitivities: list[Sensitivity] = Field(default=[])
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
                confirms = self.guard is not None and self.guard.confirms
                _check_against_uniform(i, a, uniform(L, K, a.budget, k_min=self.k_base), confirms)
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

    def unconfirmed(self) -> list[int]:
        """The B that ship a challenger (not a uniform baseline) in a file profiled before the guard's
        confirmation split: chosen and certified on the same held-out sequences."""
        if self.guard is None or self.guard.confirms:
            return []
        L, K = self.model.num_moe_layers, self.model.top_k
        return [
            a.budget
            for a in self.allocations
            if a.candidates and (a.k != uniform(L, K, a.budget, k_min=self.k_base) or a.carry is not None)
        ]

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
        split = "confirmation" if guard.confirms else "selection"  # before the split: the one search
        tests = {t.streams: t for t in a.cap_tests if t.share == share and t.split == split}
        failed = [n for n in guard.cap_streams if n not in tests or not tests[n].passes(guard.cap_keep)]
        if failed:
            what = f"ρ = {share:g} did not pass its cap {split} at N = {failed} streams"
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
