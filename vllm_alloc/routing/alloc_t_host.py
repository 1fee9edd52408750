"""Alloc-T on the host: the same rule as `alloc_t.reallocate`, compiled with numba, for the CPU expert path.

On CPU the MoE layer's budget path runs eagerly inside an opaque op. There every small torch op costs
~4 µs of dispatch, and every numpy call ~4 µs once an expert kernel has flushed the caches; the ~30
ops of `reallocate` then cost 150-250 µs per layer call, against ~1 ms of expert compute for a lone
decode token. Here the whole rule is one compiled call of a few µs: rank each token's candidates,
give each group's pool to its best extras, and lay the kept pairs out for the expert kernel.

Results equal `reallocate`'s (the kept pairs and their weights exactly in mode "topk"; to float32
rounding in mode "kept", whose sums may associate differently): tests/routing/test_alloc_t_host.py checks
both on random inputs. `reallocate` stays the definition, and the path for devices (static shapes,
compile, CUDA graphs). Compiled on first use and cached next to this file (numba `cache=True`); the
CPU plan compiles it when the model loads (`warm_up`). numba keys the cache on this file alone: a change
to `cap_host` or `carry` alone leaves the old code in `_layer_call`'s cache until this file changes (or
its `__pycache__` is cleared). A fresh install writes new files, so only edits in place meet this.

Import this module (and so numba) only after vLLM's worker has initialised: vLLM 0.32's CPU platform
scans every loaded module's namespace at worker init (Triton kernel overrides) and crashes on
llvmlite's ffi wrappers (`'_lib_fn_wrapper' object has no attribute 'get'`). The integration imports it
when the model has loaded, never at plugin registration. numba ships with the `cpu` extra.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from vllm_alloc.routing import cap_host
from vllm_alloc.routing.alloc_t import check_options
from vllm_alloc.routing.carry import check_alpha

__all__ = ["Carry", "KeptPairs", "carry_counts", "kept_mask", "layer_call", "reallocate_pairs", "warm_up"]


class KeptPairs(NamedTuple):
    """The kept (token, expert) pairs of one layer call, as R rows of n pairs for the expert kernel.

    Where every token keeps the same n > 0 pairs, rows are the tokens (`tokens` is None, R = T, each
    row best first); otherwise each pair is its own row (n = 1, R = P), in token order, and `tokens`
    maps rows to tokens.
    """

    weights: np.ndarray  # [R, n] float32: the pair's routing weight
    ids: np.ndarray  # [R, n] int32: the pair's expert id
    tokens: np.ndarray | None  # [R] int64 token of each row, or None: row r is token r
    per_token: np.ndarray  # [T] int64: pairs kept per token (0 for padding rows)


@numba.njit(cache=True, nogil=True)
def _ranking(
    rank_keys: np.ndarray, k_tok: np.ndarray, group: np.ndarray, kb: int, singleton: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(order [T, K]: each token's columns best first, ties to the lower column; keep [T]: how many of
    them it keeps). The greedy rule of `reallocate`, as loops."""
    T, K = rank_keys.shape
    order = np.empty((T, K), np.int64)
    for t in range(T):  # stable insertion sort, descending: K is small (<= 16 in practice)
        for j in range(K):
            v = rank_keys[t, j]
            p = j
            while p > 0 and rank_keys[t, order[t, p - 1]] < v:
                order[t, p] = order[t, p - 1]
                p -= 1
            order[t, p] = j
    keep = np.zeros(T, np.int64)
    if singleton or kb == K:  # one-token groups: a prefix of clamp(k_tok, kb, K)
        for t in range(T):
            if k_tok[t] > 0:
                keep[t] = min(max(k_tok[t], kb), K)
        return order, keep
    # The floor for every valid token; each group's pool P - |G|·kb goes to its best extras in the order
    # (group asc, key desc, column rank asc, token asc), i.e. flat index m = j·T + t breaks key ties.
    pool = np.zeros(T + 1, np.int64)
    for t in range(T):
        if k_tok[t] > 0:
            keep[t] = kb
            pool[group[t]] += k_tok[t] - kb
    n_extra = K - kb
    neg_keys = np.empty(n_extra * T, rank_keys.dtype)
    grp = np.empty(n_extra * T, np.int64)
    for j in range(n_extra):
        for t in range(T):
            neg_keys[j * T + t] = -rank_keys[t, order[t, kb + j]]
            grp[j * T + t] = group[t] if k_tok[t] > 0 else T  # padding: sentinel group T, pool 0
    perm = np.argsort(neg_keys, kind="mergesort")  # stable: ties keep m order
    perm = perm[np.argsort(grp[perm], kind="mergesort")]
    taken = np.zeros(T + 1, np.int64)
    for m in perm:
        g = grp[m]
        if taken[g] < pool[g]:
            taken[g] += 1
            keep[m % T] += 1  # a token's extras come in its own rank order: what it keeps is a prefix
    return order, keep


@numba.njit(cache=True, nogil=True)
def _carried(keys: np.ndarray, k_l: int, balance: int, theta: float, kb: int, alpha: float) -> int:
    """One carried token (`carry.py`): how many of its candidates it keeps, given its request's balance."""
    bar = theta * np.exp(-alpha * np.float64(balance))  # float64, as carry.py (host and device agree)
    want = 0
    for j in range(keys.shape[0]):
        if np.float64(keys[j]) >= bar:
            want += 1
    return max(min(want, keys.shape[0], k_l + balance), kb)


@numba.njit(cache=True, nogil=True)
def _carry_counts(
    rank_keys: np.ndarray,
    k_tok: np.ndarray,
    balance: np.ndarray,
    threshold: np.ndarray,
    kb: int,
    alpha: float,
) -> tuple[np.ndarray, np.ndarray]:
    T = rank_keys.shape[0]
    n_keep = np.zeros(T, np.int64)
    after = balance.copy()
    for t in range(T):
        if k_tok[t] > 0:
            n_keep[t] = _carried(rank_keys[t], k_tok[t], balance[t], threshold[t], kb, alpha)
            after[t] = balance[t] + k_tok[t] - n_keep[t]
    return n_keep, after


def carry_counts(
    rank_keys: np.ndarray,
    k_tok: np.ndarray,
    balance: np.ndarray,
    threshold: np.ndarray,
    k_base: int = 1,
    alpha: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """`carry.carry_counts` on the host (same arguments, numpy): (n_keep [T], balance_after [T])."""
    check_alpha(alpha)
    K = rank_keys.shape[1]
    return _carry_counts(
        rank_keys, k_tok.astype(np.int64), balance.astype(np.int64), threshold.astype(np.float64),
        min(k_base, K), float(alpha),
    )  # fmt: skip


@numba.njit(cache=True, nogil=True)
def _pairs(
    order: np.ndarray, keep: np.ndarray, weights: np.ndarray, ids: np.ndarray, rescale: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Lay the kept pairs out (see KeptPairs): (weights [R, n], ids [R, n], tokens [R], uniform)."""
    T, K = order.shape
    w = np.empty((T, K), np.float32)
    for t in range(T):
        for j in range(K):
            w[t, j] = weights[t, j]
        if rescale and 0 < keep[t] < K:  # "kept": scale kept weights to the sum of all K inputs
            total = np.float32(0.0)
            kept_sum = np.float32(0.0)
            for j in range(K):
                total += w[t, j]
            for r in range(keep[t]):
                kept_sum += w[t, order[t, r]]
            scale = total / (kept_sum if kept_sum != 0 else np.float32(1.0))
            for j in range(K):
                w[t, j] = w[t, j] * scale
    n = keep[0] if T > 0 else 0
    uniform = n > 0
    for t in range(T):
        if keep[t] != n:
            uniform = False
    if uniform:
        out_w = np.empty((T, n), np.float32)
        out_ids = np.empty((T, n), np.int32)
        for t in range(T):
            for r in range(n):
                out_w[t, r] = w[t, order[t, r]]
                out_ids[t, r] = ids[t, order[t, r]]
        return out_w, out_ids, np.empty(0, np.int64), True
    P = 0
    for t in range(T):
        P += keep[t]
    out_w = np.empty((P, 1), np.float32)
    out_ids = np.empty((P, 1), np.int32)
    tokens = np.empty(P, np.int64)
    i = 0
    for t in range(T):
        for r in range(keep[t]):
            out_w[i, 0] = w[t, order[t, r]]
            out_ids[i, 0] = ids[t, order[t, r]]
            tokens[i] = t
            i += 1
    return out_w, out_ids, tokens, False


@numba.njit(cache=True, nogil=True)
def _layer_call(
    rank_keys: np.ndarray,
    weights: np.ndarray,
    ids: np.ndarray,
    token_budget: np.ndarray,
    table: np.ndarray,
    column: int,
    group: np.ndarray,
    kb: int,
    singleton: bool,
    rescale: bool,
    used: np.ndarray,
    count: bool,
    token_slot: np.ndarray,
    balance: np.ndarray,
    theta: np.ndarray,
    alpha: float,
    bank: int,
    token_cap: np.ndarray,
    cap_table: np.ndarray,
    E: int,
    cap_dropped: np.ndarray,
    distinct: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, np.ndarray]:
    """One MoE layer call of the CPU serving path in one compiled call: K_l(B_t) from the allocation
    table, Alloc-T, the carried balance of tokens with a slot (token_slot[t] > 0: their request's row of
    `balance` [S + 1, L], θ from `theta` [A + 1, L]), the activation count (used[B_t] += kept pairs) and
    the kernel layout. Carried tokens are alone in their groups, and are taken in token order, so a
    request's tokens in one pass (scope `stream`) spend and bank in position order, as decode steps do.
    bank: the balance column (this layer's, or 0 where a request has one bank for all its layers).
    token_cap .. distinct: the distinct-expert cap (`cap_host.Cap`; E = 0: none), after Alloc-T and the
    carried balance, so the count and the layout see what the cap left."""
    T = rank_keys.shape[0]
    k_tok = np.empty(T, np.int64)
    for t in range(T):
        k_tok[t] = table[token_budget[t], column]
    order, keep = _ranking(rank_keys, k_tok, group, kb, singleton)
    for t in range(token_slot.shape[0]):  # empty when nothing is carried
        slot = token_slot[t]
        if slot > 0 and k_tok[t] > 0:
            k = _carried(
                rank_keys[t], k_tok[t], balance[slot, bank], theta[token_budget[t], column], kb, alpha
            )
            balance[slot, bank] += k_tok[t] - k
            keep[t] = k
    if E > 0:
        dropped = np.zeros(cap_dropped.shape[0], np.int64)
        n_distinct = cap_host.apply(
            order, keep, rank_keys, ids, token_cap, token_budget, cap_table[:, column], E, kb, dropped
        )
        if count and n_distinct > 0:  # 0: only padding rows (nothing ran)
            distinct[n_distinct] += 1
            for B in range(dropped.shape[0]):
                cap_dropped[B] += dropped[B]
    if count:
        for t in range(T):
            used[token_budget[t]] += keep[t]
    out_w, out_ids, tokens, uniform = _pairs(order, keep, weights, ids, rescale)
    return out_w, out_ids, tokens, uniform, keep


def layer_call(
    rank_keys: np.ndarray,
    topk_weights: np.ndarray,
    topk_ids: np.ndarray,
    token_budget: np.ndarray,
    table: np.ndarray,
    column: int,
    group: np.ndarray,
    k_base: int,
    weights: str,
    singleton_groups: bool,
    used: np.ndarray,
    count: bool,
    carry: Carry | None = None,
    cap: cap_host.Cap = cap_host.NO_CAP,
) -> KeptPairs:
    """`reallocate_pairs` with k_tok = table[token_budget, column], counting the kept pairs into
    used[B] when `count`, and carrying the balance of the tokens `carry` gives a slot: what the CPU
    expert path runs per MoE layer call (each numpy or torch call costs µs there, so this is one
    compiled call). `cap`: the distinct-expert cap and its counters (`cap_host.Cap`), applied last."""
    check_options(k_base, weights)  # compiled code checks no bounds: group ids must lie in [0, T)
    kb = min(k_base, rank_keys.shape[1])
    c = carry or _NO_CARRY
    row = column if cap.num_experts else 0  # NO_CAP has one row of counters, never written
    out_w, out_ids, tokens, uniform, keep = _layer_call(
        rank_keys, topk_weights, topk_ids, token_budget, table, column, group, kb, singleton_groups,
        weights == "kept", used, count, c.token_slot, c.balance, c.theta, c.alpha,
        0 if c.one_bank else column, cap.token_cap, cap.table, cap.num_experts, cap.dropped[row],
        cap.distinct[row],
    )  # fmt: skip
    return KeptPairs(out_w, out_ids, None if uniform else tokens, keep)


class Carry(NamedTuple):
    """The carried balance's arrays for `layer_call` (see `carry.py`): token_slot [T] int64 (0 = not
    carried; an empty array when no token is), balance [S + 1, L] int64 (updated in place), theta
    [A + 1, L] float64, alpha, one_bank (a request's layers share column 0 of its balance row)."""

    token_slot: np.ndarray
    balance: np.ndarray
    theta: np.ndarray
    alpha: float
    one_bank: bool = False


_NO_CARRY = Carry(np.zeros(0, np.int64), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float64), 0.0)


def warm_up(table: np.ndarray, used: np.ndarray) -> None:
    """Compile (or load from the cache) what the CPU serving path calls, before the first request:
    float32 keys and weights, vLLM's int32 expert ids, the plan's table and counter dtypes."""
    keys = np.zeros((1, 2), np.float32)
    ids = np.zeros(keys.shape, np.int32)
    zero = np.zeros(1, np.int64)
    layer_call(keys, keys, ids, zero, table, 0, zero, 1, "topk", False, used[0], False)


def kept_mask(
    rank_keys: np.ndarray,
    k_tok: np.ndarray,
    group: np.ndarray,
    k_base: int,
    singleton_groups: bool = False,
) -> np.ndarray:
    """[T, K] bool: which candidates `alloc_t.reallocate` keeps (arguments as there, numpy on host).

    rank_keys must be finite (a router's scores are); NaN ranks differently here and in torch.
    """
    T, K = rank_keys.shape
    order, keep = _ranking(rank_keys, k_tok, group, min(k_base, K), singleton_groups)
    kept = np.zeros((T, K), dtype=bool)
    for t in range(T):
        kept[t, order[t, : keep[t]]] = True
    return kept


def reallocate_pairs(
    rank_keys: np.ndarray,
    topk_weights: np.ndarray,
    topk_ids: np.ndarray,
    k_tok: np.ndarray,
    group: np.ndarray,
    k_base: int = 1,
    weights: str = "topk",
    singleton_groups: bool = False,
) -> KeptPairs:
    """Alloc-T for one layer call, returning the kept pairs laid out for the kernel (`KeptPairs`).

    Arguments as `alloc_t.reallocate`: rank_keys [T, K] float (finite), topk_weights [T, K] float,
    topk_ids [T, K] int, k_tok [T] int (<= 0 marks a padding row), group [T] int in [0, T).
    `singleton_groups` is the caller's promise that every valid token is alone in its group.
    """
    check_options(k_base, weights)  # compiled code checks no bounds: group ids must lie in [0, T)
    K = rank_keys.shape[1]
    order, keep = _ranking(rank_keys, k_tok, group, min(k_base, K), singleton_groups)
    out_w, out_ids, tokens, uniform = _pairs(order, keep, topk_weights, topk_ids, weights == "kept")
    return KeptPairs(out_w, out_ids, None if uniform else tokens, keep)
