"""Alloc-L sensitivity protocols over an abstract evaluator (no vLLM here): the configurations each
protocol runs and the sensitivity matrix S it measures from them.

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

Which of the DPs' allocations ships is the guard's choice on the held-out split (`profiler.guard`); the
run that does both for every budget is `profiler.runner.profile`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from vllm_alloc.budget.alloc_l import uniform

__all__ = [
    "PROTOCOLS",
    "Evaluate",
    "check_shape",
    "finite_metric",
    "isolating_configs",
    "isolating_sensitivity",
    "operating_point_configs",
    "operating_point_sensitivity",
]

Evaluate = Callable[[Sequence[int], str], float]
PROTOCOLS: tuple[str, ...] = ("isolating", "operating-point")
PROFILE_SPLIT = "profile"


def check_shape(L: int, K: int, k_base: int) -> None:
    if L < 1 or K < 1:
        raise ValueError(f"L = {L}, K = {K}: both must be ≥ 1")
    if not 1 <= k_base <= K:
        raise ValueError(f"k_base = {k_base} is outside the valid range [1, K = {K}]")


def finite_metric(value: float, ks: Sequence[int], split: str) -> float:
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
    check_shape(L, K, k_base)
    runs = [(L - 1, K, [K] * L)]
    for l in range(L - 1, -1, -1):
        for k in range(K - 1, k_base - 1, -1):
            runs.append((l, k, [K] * l + [k] + [k_base] * (L - l - 1)))
    return runs


def isolating_sensitivity(evaluate: Evaluate, L: int, K: int, k_base: int = 1) -> list[list[float]]:
    """S[l][k-1] under the isolating protocol; calls `evaluate` exactly L·(K − K_base) + 1 times."""
    S = [[math.nan] * K for _ in range(L)]
    for l, k, ks in isolating_configs(L, K, k_base):
        S[l][k - 1] = finite_metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
    for l in range(L - 1):
        S[l][K - 1] = S[l + 1][k_base - 1]  # the shared configuration (see isolating_configs)
    return _fill_below_base(S, k_base)


def operating_point_configs(L: int, K: int, B: int, k_base: int = 1) -> list[tuple[int, int, list[int]]]:
    """(l, k, vector) for the operating-point sweep at B: uniform(B) first, then each layer l at every
    other k with the rest at uniform(B)."""
    check_shape(L, K, k_base)
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
        value = finite_metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
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
