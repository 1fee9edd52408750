"""Alloc-T on the host (numpy): the same rule as `alloc_t.reallocate`, for the eager CPU expert path.

On CPU the MoE layer's budget path runs eagerly inside an opaque op, where each small torch op costs
~4 µs of dispatch; `reallocate`'s ~30 ops then cost ~250 µs per layer call, against ~700 µs of expert
compute for a lone decode token. The same steps in numpy cost ~1 µs each. Results equal
`reallocate`'s (kept mask and ids exactly; weights exactly in mode "topk", to float32 rounding in
mode "kept", where sums may associate differently): tests/test_alloc_t_host.py checks both on random
inputs. `reallocate` stays the definition, and the path for devices (static shapes, compile, graphs).

The host path also returns the kept pairs already compacted (token, weight, expert id per pair),
which is what the CPU expert call consumes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["KeptPairs", "kept_mask", "reallocate_pairs", "top_n"]


class KeptPairs(NamedTuple):
    """The kept (token, expert) pairs of one layer call, as R rows of n pairs for the expert kernel.

    Where every token keeps the same n > 0 pairs, rows are the tokens (`tokens` is None, R = T);
    otherwise each pair is its own row (n = 1, R = P) and `tokens` maps rows to tokens. Pairs of one
    token may come in any order (their sum is the token's output).
    """

    weights: np.ndarray  # [R, n] float32: the pair's routing weight
    ids: np.ndarray  # [R, n] int32: the pair's expert id
    tokens: np.ndarray | None  # [R] int64 token of each row, or None: row r is token r
    per_token: np.ndarray  # [T] int: pairs kept per token (0 for padding rows)


def kept_mask(
    rank_keys: np.ndarray,
    k_tok: np.ndarray,
    group: np.ndarray,
    k_base: int,
    singleton_groups: bool = False,
) -> np.ndarray:
    """[T, K] bool: which candidates `alloc_t.reallocate` keeps (arguments as there, numpy on host).

    rank_keys must be finite (a router's scores are); NaN ranks differently in numpy and torch.
    """
    T, K = rank_keys.shape
    kb = min(k_base, K)
    # Stable descending order per row, ties to the lower column (as torch.sort(stable=True)), as flat
    # row-major indices. (Flat indexing: take/put_along_axis cost ~6 µs each in Python overhead.)
    order = np.argsort(-rank_keys, axis=1, kind="stable")
    order += (np.arange(T) * K)[:, None]
    valid = k_tok > 0
    n_extra = K - kb
    if n_extra == 0 or singleton_groups:
        # Floor only, or one-token groups: each valid token keeps a prefix of clamp(k_tok, kb, K).
        n_keep = np.minimum(np.maximum(k_tok, kb), K) * valid
        keep_sorted = np.arange(K) < n_keep[:, None]
    else:
        # Extras flattened column-major (m = j·T + t), as in `reallocate`.
        keys_flat = rank_keys.ravel()[order[:, kb:].T.ravel()]
        if bool(valid.all()) and bool((group == group[0]).all()):
            # One group holding every token (scope `budget` with one budget in the pass): its pool goes
            # to the best extras in (key desc, m asc) order, a single stable sort.
            take_flat = np.zeros(keys_flat.size, dtype=bool)
            take_flat[np.argsort(-keys_flat, kind="stable")[: max(int((k_tok - kb).sum()), 0)]] = True
        else:
            # Several groups: one stable lexsort orders the extras by (group asc, key desc, m asc), the
            # order `reallocate` builds with two stable sorts.
            grp = np.where(valid, group, T)  # padding rows: sentinel group T, pool 0
            grp_flat = np.broadcast_to(grp, (n_extra, T)).ravel()
            perm = np.lexsort((-keys_flat, grp_flat))
            grp_sorted = grp_flat[perm]
            count = np.bincount(grp_flat, minlength=T + 1)
            start = np.cumsum(count) - count
            rank = np.arange(grp_flat.size) - start[grp_sorted]
            pool = np.bincount(grp, weights=(k_tok - kb) * valid, minlength=T + 1)
            take_flat = np.empty(grp_flat.size, dtype=bool)
            take_flat[perm] = rank < pool[grp_sorted]
        keep_sorted = np.empty((T, K), dtype=bool)
        keep_sorted[:, :kb] = valid[:, None]  # the floor
        keep_sorted[:, kb:] = take_flat.reshape(n_extra, T).T
    kept = np.empty(T * K, dtype=bool)
    kept[order.ravel()] = keep_sorted.ravel()  # back from ranked columns to the caller's columns
    return kept.reshape(T, K)


def top_n(rank_keys: np.ndarray, weights: np.ndarray, topk_ids: np.ndarray, n: int) -> KeptPairs:
    """Every token keeps its n best candidates (ties to the lower column): Alloc-T when every group is one
    token and every token's clamp(K_l, K_base, K) is n. weights must be float32."""
    T = rank_keys.shape[0]
    top = np.argsort(-rank_keys, axis=1, kind="stable")[:, :n]
    if T == 1:  # a lone decode token: plain indexing, the fewest numpy calls
        w, ids = weights[0, top[0]][None], topk_ids[0, top[0]][None]
    else:
        rows = np.arange(T)[:, None]
        w, ids = weights[rows, top], topk_ids[rows, top]
    return KeptPairs(w, ids.astype(np.int32), None, np.full(T, n))


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

    Arguments as `alloc_t.reallocate`: rank_keys [T, K] float (finite), topk_weights [T, K] float32,
    topk_ids [T, K] int, k_tok [T] int (<= 0 marks a padding row), group [T] int in [0, T).
    """
    if weights not in ("topk", "kept"):
        raise ValueError(f"weights={weights!r}: must be one of ('topk', 'kept')")
    T, K = rank_keys.shape
    kb = min(k_base, K)
    w = topk_weights.astype(np.float32, copy=False)
    if (singleton_groups or kb == K) and weights == "topk" and T:
        # Each token keeps a prefix of its own ranking; when all keep the same n, pass its top n as is.
        n_keep = np.minimum(np.maximum(k_tok, kb), K) * (k_tok > 0)
        n = int(n_keep[0])
        if n > 0 and (T == 1 or bool((n_keep == n).all())):
            return top_n(rank_keys, w, topk_ids, n)
    kept = kept_mask(rank_keys, k_tok, group, k_base, singleton_groups)
    if weights == "kept":
        kept_sum = np.where(kept, w, np.float32(0)).sum(axis=1, keepdims=True)
        scale = w.sum(axis=1, keepdims=True) / np.where(kept_sum != 0, kept_sum, np.float32(1))
        # A token that keeps all K candidates keeps its input weights bit for bit (b = 1.0 = stock).
        w = np.where(kept.all(axis=1, keepdims=True), w, w * scale).astype(np.float32, copy=False)
    per_token = kept.sum(axis=1)
    n = int(per_token[0]) if T else 0
    if n > 0 and bool((per_token == n).all()):
        ids = topk_ids[kept].reshape(T, n).astype(np.int32)
        return KeptPairs(w[kept].reshape(T, n), ids, None, per_token)
    pairs = np.flatnonzero(kept)
    return KeptPairs(
        w.ravel()[pairs][:, None],
        topk_ids.ravel()[pairs][:, None].astype(np.int32),
        pairs // K,
        per_token,
    )
