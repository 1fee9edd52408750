"""Alloc-L profiling protocols and the held-out guard, over an abstract evaluator (no vLLM here).

Everything measures through one callable, `evaluate(K_vector, split) -> metric` (lower is better;
`vllm-alloc profile` passes calibration perplexity measured through the served model, tests pass a
fake). `split` is "profile" (sensitivities) or "heldout" (validation of candidates).

Protocols (DESIGN.md §2), both giving a matrix S[l][k-1] for `alloc_l.solve`:
  * isolating (the paper's): S[l][k] = metric with layers < l at K, layer l at k, layers > l at K_base
    (top-1 by default), measured deep to shallow. S[l][K] is the configuration of S[l+1][K_base], so it
    is reused, not re-run: L·(K − K_base) + 1 distinct evaluations, and one matrix serves every B.
  * operating-point at budget B: the same one-layer sweep with the other layers at uniform(B); the
    configuration k = uniform(B)[l] is shared by every row, so also L·(K − K_base) + 1 evaluations, per B.
Columns k < K_base cannot be run (the integration refuses K_l < K_base); they copy the K_base column,
which the DP never reads (k_min = K_base).

Selection rule (the guard), per absolute budget B from L·K_base to A:
  1. Candidates: "uniform" (alloc_l.uniform), "isolating" (its DP at B) and, at requested budgets only,
     "operating-point" (the DP of the sweep at that B). Candidates are measured on the held-out split;
     equal vectors share one measurement.
  2. The lowest measured metric wins; ties go to uniform (then to the earlier candidate), so a
     non-uniform allocation ships only when it measured strictly better than uniform.
  3. Candidates are measured only at the *validated* budgets: the requested ones, plus every B when
     there are at most `all_budgets_up_to` budgets in the range, else every multiple of L (b = k/K).
     Every other B keeps uniform, with no candidates recorded: an allocation nobody measured is never
     shipped. B = A is always all K (the stock model), and no candidate is measured there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_alloc.alloc_l import solve, uniform

__all__ = [
    "PROTOCOLS",
    "Evaluate",
    "Memo",
    "ProfileResult",
    "isolating_configs",
    "isolating_sensitivity",
    "operating_point_configs",
    "operating_point_sensitivity",
    "profile",
    "select",
    "validated_budgets",
]

Evaluate = Callable[[Sequence[int], str], float]
PROTOCOLS: tuple[str, ...] = ("isolating", "operating-point")
UNIFORM = "uniform"
PROFILE_SPLIT, HELDOUT_SPLIT = "profile", "heldout"


def _check_shape(L: int, K: int, k_base: int) -> None:
    if L < 1 or K < 1:
        raise ValueError(f"L = {L}, K = {K}: both must be ≥ 1")
    if not 1 <= k_base <= K:
        raise ValueError(f"k_base = {k_base} is outside the valid range [1, K = {K}]")


def _metric(value: float, ks: Sequence[int], split: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise RuntimeError(
            f"evaluation of K = {list(ks)} on the {split} split gave {v}; need a finite metric"
        )
    return v


def isolating_configs(L: int, K: int, k_base: int = 1) -> list[tuple[int, int, list[int]]]:
    """(l, k, vector) for every distinct run of the isolating protocol, in run order (deep to shallow).

    The first run is all K (= S[L-1][K]); then for l = L-1..0, k = K-1..K_base. S[l][K] for l < L-1 is
    the run of (l+1, K_base), which already happened: layers ≤ l at K, layers > l at K_base."""
    _check_shape(L, K, k_base)
    runs = [(L - 1, K, [K] * L)]
    for l in range(L - 1, -1, -1):
        for k in range(K - 1, k_base - 1, -1):
            runs.append((l, k, [K] * l + [k] + [k_base] * (L - l - 1)))
    return runs


def isolating_sensitivity(evaluate: Evaluate, L: int, K: int, k_base: int = 1) -> list[list[float]]:
    """S[l][k-1] under the isolating protocol; calls `evaluate` exactly L·(K − K_base) + 1 times."""
    S = [[math.nan] * K for _ in range(L)]
    for l, k, ks in isolating_configs(L, K, k_base):
        S[l][k - 1] = _metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
    for l in range(L - 1):
        S[l][K - 1] = S[l + 1][k_base - 1]  # the shared configuration (see isolating_configs)
    return _fill_below_base(S, k_base)


def operating_point_configs(L: int, K: int, B: int, k_base: int = 1) -> list[tuple[int, int, list[int]]]:
    """(l, k, vector) for the operating-point sweep at B: uniform(B) first, then each layer l at every
    other k with the rest at uniform(B)."""
    _check_shape(L, K, k_base)
    base = uniform(L, K, B, k_min=k_base)
    runs = [(-1, 0, list(base))]  # (-1, 0): the shared centre, S[l][base[l]] for every l
    for l in range(L):
        for k in range(k_base, K + 1):
            if k != base[l]:
                runs.append((l, k, [*base[:l], k, *base[l + 1 :]]))
    return runs


def operating_point_sensitivity(
    evaluate: Evaluate, L: int, K: int, B: int, k_base: int = 1
) -> list[list[float]]:
    """S[l][k-1] with the other layers at uniform(B); calls `evaluate` L·(K − K_base) + 1 times."""
    base = uniform(L, K, B, k_min=k_base)
    S = [[math.nan] * K for _ in range(L)]
    for l, k, ks in operating_point_configs(L, K, B, k_base):
        value = _metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
        if l < 0:
            for row, k_l in zip(S, base, strict=True):
                row[k_l - 1] = value
        else:
            S[l][k - 1] = value
    return _fill_below_base(S, k_base)


def _fill_below_base(S: list[list[float]], k_base: int) -> list[list[float]]:
    # k < K_base is not runnable; copy the K_base column so the matrix is complete and finite for the
    # budget-file schema. solve(k_min=K_base) never reads these entries.
    for row in S:
        for k in range(1, k_base):
            row[k - 1] = row[k_base - 1]
    return S


def validated_budgets(
    L: int, K: int, requested: Iterable[int], k_base: int = 1, all_budgets_up_to: int = 32
) -> list[int]:
    """The budgets B whose candidates are measured on held-out data (rule 3 of the module docstring)."""
    _check_shape(L, K, k_base)
    lo, A = L * k_base, L * K
    chosen = set(requested)
    bad = sorted(B for B in chosen if not lo <= B <= A)
    if bad:
        raise ValueError(
            f"requested budgets B = {bad} are outside the valid range [L·K_base = {lo}, A = {A}]"
        )
    if A - lo + 1 <= all_budgets_up_to:
        chosen.update(range(lo, A + 1))
    else:
        chosen.update(B for B in range(lo, A + 1) if B % L == 0)
    chosen.discard(A)  # the stock model, by definition
    return sorted(chosen)


def select(
    candidates: Sequence[tuple[str, Sequence[int]]], measure: Callable[[Sequence[int]], float]
) -> dict[str, Any]:
    """Measure each candidate and pick the winner (rule 2): an `Allocation` dict for the budget file.

    `candidates` must start with ("uniform", ...); later candidates with the same vector as an earlier
    one reuse its number."""
    if not candidates or candidates[0][0] != UNIFORM:
        raise ValueError(f"the first candidate must be {UNIFORM!r}, got {[n for n, _ in candidates]}")
    measured: dict[tuple[int, ...], float] = {}
    rows: list[dict[str, Any]] = []
    for name, ks in candidates:
        key = tuple(int(k) for k in ks)
        if key not in measured:
            measured[key] = _metric(measure(list(key)), key, HELDOUT_SPLIT)
        rows.append({"name": name, "allocation": list(key), "measured": measured[key]})
    best = rows[0]
    for row in rows[1:]:
        # Strict: ties keep uniform (or the earlier candidate).
        if float(row["measured"]) < float(best["measured"]):
            best = row
    return {
        "budget": sum(candidates[0][1]),
        "k": best["allocation"],
        "chosen": best["name"],
        "candidates": rows,
    }


@dataclass
class ProfileResult:
    """What `profile` measured and decided; `vllm_alloc.profile` turns it into a BudgetFile."""

    L: int
    K: int
    k_base: int
    isolating: list[list[float]] | None = None  # S under the isolating protocol
    operating_point: dict[int, list[list[float]]] = field(default_factory=dict)  # B -> S
    allocations: list[dict[str, Any]] = field(default_factory=list)  # one per B, Allocation schema
    validated: list[int] = field(default_factory=list)  # the B whose candidates were measured


class Memo:
    """Wraps an evaluator: each distinct (vector, split) runs once; `runs` counts real evaluations.

    Across protocols configurations repeat (all-K, the operating-point centre at B = L·K_base, ...);
    the memo keeps the model from running any of them twice."""

    def __init__(self, evaluate: Evaluate, on_run: Callable[[], None] | None = None) -> None:
        self._evaluate = evaluate
        self._on_run = on_run
        self.cache: dict[tuple[tuple[int, ...], str], float] = {}

    @property
    def runs(self) -> int:
        return len(self.cache)

    def __call__(self, ks: Sequence[int], split: str) -> float:
        key = (tuple(int(k) for k in ks), split)
        if key not in self.cache:
            self.cache[key] = _metric(self._evaluate(list(key[0]), split), key[0], split)
            if self._on_run is not None:
                self._on_run()
        return self.cache[key]


def planned_profile_runs(
    L: int, K: int, budgets: Iterable[int], protocols: Sequence[str], k_base: int = 1
) -> int:
    """Distinct profile-split evaluations `profile` will run (for a progress bar's total)."""
    configs: set[tuple[int, ...]] = set()
    if "isolating" in protocols:
        configs.update(tuple(ks) for _, _, ks in isolating_configs(L, K, k_base))
    if "operating-point" in protocols:
        for B in budgets:
            configs.update(tuple(ks) for _, _, ks in operating_point_configs(L, K, B, k_base))
    return len(configs)


def profile(
    evaluate: Evaluate,
    L: int,
    K: int,
    budgets: Sequence[int],
    protocols: Sequence[str] = PROTOCOLS,
    k_base: int = 1,
    all_budgets_up_to: int = 32,
    on_plan: Callable[[int], None] | None = None,
) -> ProfileResult:
    """Run the protocols, then choose K(B) for every B by the guard (module docstring).

    `budgets` are the requested absolute budgets B (operating-point sweeps run at each, A excluded:
    there is nothing to allocate at the full budget). `on_plan(n)` is told the number of held-out
    evaluations still to come once the sensitivities are known (progress bars)."""
    _check_shape(L, K, k_base)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols {list(protocols)} are not valid; choose one or more of {PROTOCOLS}")
    lo, A = L * k_base, L * K
    validated = validated_budgets(L, K, budgets, k_base, all_budgets_up_to)
    requested = sorted(set(budgets) - {A})
    result = ProfileResult(L=L, K=K, k_base=k_base, validated=validated)

    solved_iso: dict[int, list[int]] = {}
    if "isolating" in protocols:
        result.isolating = isolating_sensitivity(evaluate, L, K, k_base)
        solved_iso = solve(result.isolating, k_min=k_base)
    solved_op: dict[int, list[int]] = {}
    if "operating-point" in protocols:
        for B in requested:
            S = operating_point_sensitivity(evaluate, L, K, B, k_base)
            result.operating_point[B] = S
            solved_op[B] = solve(S, k_min=k_base)[B]

    def candidates(B: int) -> list[tuple[str, list[int]]]:
        out = [(UNIFORM, uniform(L, K, B, k_min=k_base))]
        if B in solved_iso:
            out.append(("isolating", solved_iso[B]))
        if B in solved_op:
            out.append(("operating-point", solved_op[B]))
        return out

    if on_plan is not None:
        on_plan(len({tuple(ks) for B in validated if len(candidates(B)) > 1 for _, ks in candidates(B)}))

    for B in range(lo, A + 1):
        if B in validated and len(candidates(B)) > 1:
            result.allocations.append(select(candidates(B), lambda ks: evaluate(ks, HELDOUT_SPLIT)))
        else:
            result.allocations.append({"budget": B, "k": uniform(L, K, B, k_min=k_base), "chosen": UNIFORM})
    return result
