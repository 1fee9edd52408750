"""Alloc-L: per-layer expert budgets K_l for every absolute budget B (offline, pure Python).

Given a sensitivity matrix S (S[l][k-1] = measured cost, e.g. calibration perplexity, of running MoE
layer l with k routed experts per token), Alloc-L picks one k per layer:

    K(B) = argmin_{K_0..K_{L-1}}  Σ_l S[l][K_l - 1]   s.t.  Σ_l K_l ≤ B,  k_min ≤ K_l ≤ K.

This is a grouped (multiple-choice) knapsack: every layer is a group, option k weighs k and costs S[l][k].
`solve` answers it for every integer B in [L·k_min, L·K] from one O(L·B·K) DP table; `uniform` is the
baseline every profiled allocation is validated against (DESIGN.md §2).

No vLLM and no Triton here: the profiler, the CLI and the tests import this on machines without either.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

__all__ = ["allocation_cost", "solve", "uniform"]


def _as_matrix(S: Sequence[Sequence[float]]) -> list[list[float]]:
    """Copy S into plain floats, rejecting shapes and values the DP cannot use."""
    if len(S) == 0:
        raise ValueError("sensitivity matrix S is empty: need L ≥ 1 rows (one per MoE layer)")
    rows: list[list[float]] = []
    K = len(S[0])
    if K == 0:
        raise ValueError("sensitivity matrix S has empty rows: need K ≥ 1 columns (one per k = 1..K)")
    for l, row in enumerate(S):
        if len(row) != K:
            raise ValueError(
                f"sensitivity matrix S is ragged: row {l} has {len(row)} entries, row 0 has {K}; "
                f"every row must have exactly K = {K} entries (k = 1..K)"
            )
        out: list[float] = []
        for k, value in enumerate(row, start=1):
            try:
                v = float(value)
            except (TypeError, ValueError):
                raise ValueError(
                    f"S[{l}][{k - 1}] (layer {l}, k = {k}) = {value!r} is not a number"
                ) from None
            if not math.isfinite(v):
                raise ValueError(
                    f"S[{l}][{k - 1}] (layer {l}, k = {k}) = {v}: every entry must be a finite number"
                )
            out.append(v)
        rows.append(out)
    return rows


def _int(name: str, value: object) -> int:
    """An integer argument (numpy/torch integer scalars included, bools and floats refused)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} = {value!r} must be an integer, not a bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} = {value!r} must be an integer") from None


def _check_k_min(k_min: object, K: int) -> int:
    k = _int("k_min", k_min)
    if not 1 <= k <= K:
        raise ValueError(f"k_min = {k} is outside the valid range [1, K = {K}]")
    return k


def solve(S: Sequence[Sequence[float]], k_min: int = 1) -> dict[int, list[int]]:
    """Alloc-L for every budget: {B: K(B)} for each integer B from L·k_min to L·K.

    S is [L][K] with S[l][k-1] the cost of layer l at k experts (lower is better). Each K(B) has length
    L, k_min ≤ K_l ≤ K, Σ_l K_l ≤ B, and minimises Σ_l S[l][K_l-1]. The cost of K(B) never increases
    with B (the feasible set only grows).

    Tie-breaking (exact float ties of the DP sums, deterministic across runs and machines):
      1. among equal costs, the larger total Σ_l K_l wins: unused budget buys nothing, and more
         experts is never the worse guess when the measurement cannot tell them apart;
      2. among equal costs and totals, the lexicographically largest vector wins (K_0 as large as
         possible, then K_1, ...): shallow layers first, the paper's observation being that shallow
         layers are the more sensitive ones.
    Only one layer's choice depends on S's row, so any per-row additive offset (raw perplexity vs.
    perplexity minus the row's top-1 value) leaves the allocation unchanged; a per-row ratio does not.
    """
    rows = _as_matrix(S)
    L, K = len(rows), len(rows[0])
    k_min = _check_k_min(k_min, K)
    A = L * K
    inf = math.inf

    # Suffix DP, so that backtracking runs forward from layer 0 and can take the largest optimal K_0
    # first (tie rule 2). F[l][b] = min cost of layers l..L-1 using exactly b experts in total;
    # boundary: F[L][0] = 0 (no layers, no experts) and F[L][b > 0] = ∞, so every finite F[l][b]
    # has (L-l)·k_min ≤ b ≤ (L-l)·K. choice[l][b] = the largest k attaining F[l][b].
    F = [[inf] * (A + 1) for _ in range(L + 1)]
    choice = [[0] * (A + 1) for _ in range(L + 1)]
    F[L][0] = 0.0
    for l in range(L - 1, -1, -1):
        rest_lo, rest_hi = (L - l - 1) * k_min, (L - l - 1) * K  # feasible totals of layers l+1..L-1
        cost, nxt, pick = rows[l], F[l + 1], choice[l]
        row = F[l]
        for b in range(rest_lo + k_min, rest_hi + K + 1):
            best, best_k = inf, 0
            # k descending with a strict `<`: the first (largest) k reaching the minimum is kept.
            for k in range(min(K, b - rest_lo), k_min - 1, -1):
                if b - k > rest_hi:
                    break  # the remaining layers cannot absorb b - k experts; smaller k is worse still
                c = cost[k - 1] + nxt[b - k]
                if c < best:
                    best, best_k = c, k
            row[b], pick[b] = best, best_k

    # "Σ K_l ≤ B" rather than "= B": the answer for B is the best exact total b ≤ B. Sweep B upwards
    # keeping a running best; `<=` moves to the larger b on ties (tie rule 1).
    out: dict[int, list[int]] = {}
    best_b = -1
    for B in range(L * k_min, A + 1):
        if best_b < 0 or F[0][B] <= F[0][best_b]:
            best_b = B
        ks: list[int] = []
        b = best_b
        for l in range(L):  # backtrack: each layer takes its recorded choice for what remains
            k = choice[l][b]
            ks.append(k)
            b -= k
        out[B] = ks
    return out


def uniform(L: int, K: int, B: int, k_min: int = 1) -> list[int]:
    """The uniform allocation for budget B: every layer gets B // L, the remainder r = B % L adds one
    expert to r layers spread evenly from layer 0 (layers floor(i·L/r) for i = 0..r-1).

    Placement starts at layer 0 for the same reason `solve` breaks ties towards shallow layers. For
    B = L·K this is all K; for B = L·k_min all k_min. Σ K_l = B exactly.
    """
    L, K, B = _int("L", L), _int("K", K), _int("B", B)
    for name, value in (("L", L), ("K", K)):
        if value < 1:
            raise ValueError(f"{name} = {value} is outside the valid range [1, ∞)")
    k_min = _check_k_min(k_min, K)
    if not L * k_min <= B <= L * K:
        raise ValueError(f"budget B = {B} is outside the valid range [L·k_min = {L * k_min}, L·K = {L * K}]")
    base, r = divmod(B, L)
    ks = [base] * L
    for i in range(r):  # r < L, and i·L/r steps by ≥ 1, so the r layers are distinct
        ks[(i * L) // r] += 1
    return ks


def allocation_cost(S: Sequence[Sequence[float]], ks: Sequence[int]) -> float:
    """Σ_l S[l][K_l - 1]: the DP's objective for the per-layer vector ks."""
    rows = _as_matrix(S)
    L, K = len(rows), len(rows[0])
    if len(ks) != L:
        raise ValueError(f"allocation has {len(ks)} entries; S has L = {L} layers, so it needs exactly {L}")
    total = 0.0
    for l, k in enumerate(ks):
        k = _int(f"allocation[{l}]", k)
        if not 1 <= k <= K:
            raise ValueError(f"allocation[{l}] = {k} is outside the valid range [1, K = {K}]")
        total += rows[l][k - 1]
    return total
