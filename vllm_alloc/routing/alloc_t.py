"""Alloc-T: token-level reallocation of routed experts inside one MoE layer (DESIGN.md §2).

Pure torch, static shapes, no host sync: `reallocate` runs inside every MoE layer of every forward pass,
under torch.compile(fullgraph=True) and CUDA-graph replay. It costs three sorts (one over the [T, K]
candidates row by row, two over the T·(K − K_base) extra candidates) plus O(T·K) gathers and scatters.

Letters as in DESIGN.md §1: T tokens, K the model's own top-k, K_l the layer budget, K_base the floor.
"""

from __future__ import annotations

import torch

__all__ = ["WEIGHT_MODES", "check_options", "kept_routing", "reallocate"]

WEIGHT_MODES: tuple[str, ...] = ("topk", "kept")


def check_options(k_base: int, weights: str) -> None:
    """The non-tensor arguments of `reallocate` (also those of the host path, `alloc_t_host`)."""
    if isinstance(k_base, bool) or not isinstance(k_base, int) or k_base < 1:
        raise ValueError(f"k_base={k_base!r}: must be an int >= 1 (it is capped at K)")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: must be one of {WEIGHT_MODES}")


def _validate(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    k_tok: torch.Tensor,
    group: torch.Tensor,
    k_base: int,
    weights: str,
) -> None:
    """Shape/dtype/argument checks only: nothing here may read tensor values (no host sync)."""
    check_options(k_base, weights)
    if rank_keys.dim() != 2:
        raise ValueError(f"rank_keys has shape {tuple(rank_keys.shape)}: must be 2-D [T, K]")
    T, K = rank_keys.shape
    if K < 1:
        raise ValueError(f"rank_keys has shape {tuple(rank_keys.shape)}: K must be >= 1")
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.shape != rank_keys.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}: must equal rank_keys' shape [T, K] = {(T, K)}"
            )
    for name, t in (("k_tok", k_tok), ("group", group)):
        if t.shape != (T,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: must be 1-D [T] = {(T,)}")
    for name, t in (("rank_keys", rank_keys), ("topk_weights", topk_weights)):
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} has dtype {t.dtype}: must be a floating-point dtype")
    for name, t in (("topk_ids", topk_ids), ("k_tok", k_tok), ("group", group)):
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} has dtype {t.dtype}: must be an integer dtype")


def reallocate(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    k_tok: torch.Tensor,
    group: torch.Tensor,
    k_base: int = 1,
    weights: str = "topk",
    singleton_groups: bool = False,
    n_keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Redistribute each group's expert budget to its highest-ranked candidates (Alloc-T).

    Args:
        rank_keys: [T, K] float, the stock router's ranking score of each candidate (higher = better).
        topk_weights: [T, K] float, the weights the full model gives these candidates.
        topk_ids: [T, K] int, the stock router's expert ids; columns in any order.
        k_tok: [T] int, K_l(B_t) of this layer for token t's request budget; <= 0 marks a padding row.
        group: [T] int in [0, T), the reallocation group of each token (scope `budget` or `request`).
            Not checked on device: an id outside [0, T) is an index error (a device assert on GPU).
        k_base: the per-token floor K_base (>= 1); values above K mean K.
        weights: "topk" keeps each kept pair's input weight; "kept" rescales a token's kept weights to
            the sum of its input weights (what a smaller top-k does in a model that renormalises).
        singleton_groups: the caller's promise that every valid token is alone in its group (a lone
            request in decode, scope `token`). A one-token group's pool is its own k_tok, so the greedy
            rule keeps the token's top max(K_base, min(k_tok, K)) candidates: the group sorts below are
            skipped, with the same result bit for bit. A static flag (read at trace time).
        n_keep: [T] int or None. Where >= 0, the token keeps its top-n_keep candidates instead (the
            carried balance, `carry.carry_counts`); such a token must be alone in its group.

    Returns:
        (weights [T, K] float32, ids [T, K] int32 with -1 = pruned, kept [T, K] bool), all in the input
        column positions; pruned pairs have weight 0. Per group G the pool is P = Σ_{t∈G, k_tok>0} k_tok[t];
        every valid token keeps its top-min(K_base, K) candidates and the other P − |G|·K_base slots go
        to the group's highest-ranked remaining candidates, so each valid token keeps a prefix of its
        own ranking of length in [K_base, K]. Only the floor can push a group past P (when some
        k_tok < K_base); otherwise the group uses exactly min(P, its candidate count). The number of
        routed activations performed is `kept.sum()`.
    """
    _validate(rank_keys, topk_weights, topk_ids, k_tok, group, k_base, weights)
    T, K = rank_keys.shape
    kb = min(k_base, K)
    dev = rank_keys.device

    # Rank each token's own candidates. A stable descending sort breaks ties by lower input column, so the
    # ranking is deterministic; `order[t, j]` is the input column of token t's j-th best candidate.
    sorted_keys, order = torch.sort(rank_keys, dim=1, descending=True, stable=True)
    valid = k_tok > 0  # [T]
    # The floor in one broadcast: `[:, :kb] = valid[:, None]` fails Inductor's AVX-512 C++ build (torch 2.13).
    keep_sorted = (torch.arange(K, device=dev) < kb) & valid[:, None]  # [T, K]

    n_extra = K - kb  # static per call: the branches below are resolved at trace time
    if n_extra > 0 and singleton_groups:
        # Closed form of the greedy rule for one-token groups: a prefix of length clamp(k_tok, kb, K).
        n_prefix = torch.where(valid, k_tok.clamp(min=kb, max=K), 0)
        keep_sorted = torch.arange(K, device=dev) < n_prefix[:, None]
    elif n_extra > 0:
        # Flatten the extra candidates column-major (m = j·T + t), so the flat index already orders them
        # by (column rank asc, token asc). Two stable sorts on top then give the full order
        #     (group asc, key desc, column rank asc, token asc).
        # Why column rank before token in ties: tokens with identical routing (repeated text, a flat
        # router) then share the extras round-robin, which degenerates to uniform top-K_l, instead of the
        # first tokens taking all of them. Within one token, equal keys fall back to column rank, which is
        # the token's own ranking, so what a token keeps is always a prefix of its ranking.
        keys_flat = sorted_keys[:, kb:].t().reshape(-1)  # [M], M = T·(K − kb)
        tok_flat = torch.arange(T, device=dev).repeat(n_extra)  # token of each flat candidate
        # Padding tokens go to a sentinel group T whose pool is 0: they can never take a slot, and they
        # never sit between real candidates of a group, whatever their keys are.
        grp = torch.where(valid, group.to(torch.int64), T)  # [T] in [0, T]
        grp_flat = grp[tok_flat]

        perm = torch.sort(keys_flat, descending=True, stable=True).indices
        perm = perm[torch.sort(grp_flat[perm], stable=True).indices]  # (group, key desc, col, tok)
        grp_sorted = grp_flat[perm]

        # Rank within the group = position − start of the group's run in the sorted order; starts are the
        # exclusive cumsum of per-group candidate counts (size T + 1: no data-dependent shapes).
        count = torch.zeros(T + 1, dtype=torch.int64, device=dev)
        count.scatter_add_(0, grp_flat, torch.ones_like(grp_flat))
        start = torch.cumsum(count, 0) - count
        rank = torch.arange(grp_flat.numel(), device=dev) - start[grp_sorted]

        # Extra slots per group: P − |G|·kb, summed without per-token clamping so that a token below the
        # floor (k_tok < K_base) pays for its floor from the group's pool. A negative pool keeps no
        # extras (rank >= 0 > pool). Greedy in key order is the exact optimum of the paper's 0-1
        # programme (linear objective, one cardinality constraint per group).
        extra_tok = torch.where(valid, k_tok.to(torch.int64) - kb, 0)
        pool = torch.zeros(T + 1, dtype=torch.int64, device=dev)
        pool.scatter_add_(0, grp, extra_tok)
        take_sorted = rank < pool[grp_sorted]

        # Undo the permutation with a scatter (cheaper than argsort(perm)), then undo the flattening.
        take_flat = torch.zeros_like(take_sorted).scatter(0, perm, take_sorted)
        keep_sorted[:, kb:] = take_flat.view(n_extra, T).t()

    if n_keep is not None:
        ranks = torch.arange(K, device=dev)
        keep_sorted = torch.where(n_keep[:, None] >= 0, ranks < n_keep[:, None], keep_sorted)

    # Back from ranked columns to the caller's columns.
    kept = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return (*kept_routing(kept, topk_weights, topk_ids, weights), kept)


def kept_routing(
    kept: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, weights: str = "topk"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, ids [T, K] int32, -1 = pruned) of the kept pairs, as `reallocate`
    returns them (also after the distinct-expert cap, `cap.py`, has cut some)."""
    # torch.where, not multiplication by the mask: kept pairs then carry the input values bit for bit.
    w_in = topk_weights.to(torch.float32)
    out_w = torch.where(kept, w_in, 0.0)
    if weights == "kept":
        kept_sum = out_w.sum(dim=1, keepdim=True)
        scale = w_in.sum(dim=1, keepdim=True) / torch.where(kept_sum != 0, kept_sum, 1.0)
        # A token that keeps all K candidates returns its input weights unchanged, not s/s·w, which may
        # differ in the last bit: b = 1.0 must be bit-identical to stock routing.
        out_w = torch.where(kept.all(dim=1, keepdim=True), out_w, out_w * scale)
    out_ids = torch.where(kept, topk_ids.to(torch.int32), -1)
    return out_w, out_ids
