"""The distinct-expert cap on the host: `cap.cap_experts`'s rule, compiled with numba, for the CPU path.

It works on what the host Alloc-T (`alloc_t_host._layer_call`) has in hand: each token's ranking `order`
[T, K] and how many of its best candidates it keeps, `keep` [T]. A capped token's kept candidates are
moved to the front of its `order` row (in rank order, the rest after them, also in rank order) and
`keep` becomes their count, so the kernel layout (`alloc_t_host._pairs`) is unchanged. Results equal
`cap_experts`' (tests/routing/test_cap_host.py); `cap.py` holds the definition and the reasons.

Import only where `alloc_t_host` may be imported (after vLLM's worker has initialised).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from vllm_alloc.routing.cap import SCALE

__all__ = ["NO_CAP", "Cap", "apply"]


class Cap(NamedTuple):
    """The cap's arrays for host layer calls: token_cap [T] int64 (a capped token's cap group + 1, else
    0; an empty array when no token is), table [A + 1, L] int64 (the share ρ_l(B) in thousandths;
    `cap.SCALE` = no cap), E (0: no cap and no count, `NO_CAP`), and the counters added to when
    counting: dropped [L, A + 1] (pairs the cap dropped, per layer and B) and distinct [L, E + 1] (layer
    calls by the distinct experts their kept pairs touch)."""

    token_cap: np.ndarray
    table: np.ndarray
    num_experts: int
    dropped: np.ndarray
    distinct: np.ndarray


NO_CAP = Cap(np.zeros(0, np.int64), np.zeros((1, 1), np.int64), 0, np.zeros((1, 1)), np.zeros((1, 1)))


@numba.njit(cache=True, nogil=True)
def apply(
    order: np.ndarray,
    keep: np.ndarray,
    rank_keys: np.ndarray,
    ids: np.ndarray,
    token_cap: np.ndarray,
    token_budget: np.ndarray,
    cap: np.ndarray,
    E: int,
    kb: int,
    dropped: np.ndarray,
) -> int:
    """Cap the tokens with token_cap[t] > 0 (group token_cap[t] − 1, share q = cap[token_budget[t]] <
    SCALE, at least two such tokens in the group), in place in `order` and `keep`; add each token's
    dropped pairs to dropped[token_budget[t]]; return the distinct experts of all T tokens' kept pairs.
    cap: this layer's column of the cap table ([A + 1], thousandths)."""
    T, K = order.shape
    G = T + 1
    group = np.full(T, T, np.int64)  # sentinel T: not capped
    share = np.full(G, SCALE, np.int64)
    members = np.zeros(G, np.int64)
    for t in range(token_cap.shape[0]):
        if token_cap[t] > 0 and keep[t] > 0 and cap[token_budget[t]] < SCALE:
            group[t] = token_cap[t] - 1
            members[group[t]] += 1
    any_capped = False
    for t in range(token_cap.shape[0]):
        g = group[t]
        if g < T and members[g] < 2:
            group[t] = T  # a group of one token is not capped
        elif g < T:
            share[g] = min(share[g], cap[token_budget[t]])
            any_capped = True
    if any_capped:
        free = np.zeros(E, np.bool_)
        for t in range(T):
            if group[t] == T:
                for r in range(keep[t]):
                    free[ids[t, order[t, r]]] = True
        demand = np.zeros((G, E), np.float64)
        wants = np.zeros((G, E), np.bool_)
        floor = np.zeros((G, E), np.bool_)
        for t in range(T):
            g = group[t]
            if g < T:
                for r in range(keep[t]):
                    e = ids[t, order[t, r]]
                    demand[g, e] += np.float64(rank_keys[t, order[t, r]])
                    wants[g, e] = True
                    if r < kb:
                        floor[g, e] = True
        allowed = np.zeros((G, E), np.bool_)
        neg_key = np.empty(E, np.float64)
        lowest = np.finfo(np.float64).min
        for g in range(T):
            if share[g] >= SCALE:
                continue
            n_floor = 0
            wanted = 0
            for e in range(E):  # the key of cap.py, negated for an ascending stable sort
                if free[e]:
                    neg_key[e] = np.inf
                elif floor[g, e]:
                    neg_key[e] = -np.inf
                    n_floor += 1
                    wanted += 1
                elif wants[g, e]:
                    neg_key[e] = -demand[g, e]
                    wanted += 1
                else:
                    neg_key[e] = -lowest
            by_key = np.argsort(neg_key, kind="mergesort")
            for e in range(E):
                allowed[g, e] = free[e]
            limit = (share[g] * wanted + SCALE - 1) // SCALE  # cap.group_cap
            for r in range(min(max(limit, n_floor), E)):
                allowed[g, by_key[r]] = True
        row = np.empty(K, np.int64)
        placed = np.empty(K, np.bool_)
        for t in range(T):
            g = group[t]
            if g == T:
                continue
            n = keep[t]
            taken = 0
            placed[:] = False
            for r in range(K):  # the floor, then allowed candidates in rank order, up to n
                j = order[t, r]
                if taken < n and (r < kb or allowed[g, ids[t, j]]):
                    row[taken] = j
                    placed[r] = True
                    taken += 1
            rest = taken
            for r in range(K):  # the others after them, still in rank order
                if not placed[r]:
                    row[rest] = order[t, r]
                    rest += 1
            for r in range(K):
                order[t, r] = row[r]
            dropped[token_budget[t]] += n - taken
            keep[t] = taken
    touched = np.zeros(E, np.bool_)
    for t in range(T):
        for r in range(keep[t]):
            touched[ids[t, order[t, r]]] = True
    return int(touched.sum())
