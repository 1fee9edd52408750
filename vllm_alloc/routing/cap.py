"""The batch-level distinct-expert cap: the budgeted decode tokens of one pass share fewer experts.

Decode cost at large batch follows the distinct experts a MoE layer touches per pass (their weights are
streamed either way), not the pairs. After Alloc-T has chosen each token's kept pairs, the cap picks, per
cap group g (in serving: the pass's decode tokens at one absolute budget B), a set of allowed experts,
and cuts each capped token's pairs to that set. The group's cap is a *share* ρ of what it would touch:

  C_g = ⌈ρ · D_g⌉, D_g = the distinct experts the group's kept pairs are on (free experts not counted),

so one ρ cuts 8 streams' experts and 64 streams' in the same proportion (a fixed C would cut deep into
8 tokens' choices and lightly into 64's: BENCHMARKS.md, "Distinct-expert cap"). ρ is held in thousandths
(`SCALE`), so C_g is integer arithmetic on every path; ρ = 1 (SCALE) is no cap. A group of one token is
never capped: its distinct experts are its own pairs, which its budget already sets.

  * free experts: those that uncapped tokens of the pass (b = 1.0, prefill chunks, budgets without a cap)
    keep. Their weights are read anyway, so capped tokens use them without counting against C_g.
  * the floor: every capped token's top-K_base experts are allowed (a token never drops below K_base).
  * the rest of the group's C_g slots go to the experts its tokens want most: demand[g, e] = Σ of the ranking
    keys of the group's kept pairs on e (the batch's own routing scores); experts no kept pair of the
    group is on come last.

Then each capped token keeps as many pairs as Alloc-T gave it, n_t, taken in its own ranking order from
its top-K candidates whose expert is allowed (its floor first). So a token whose kept expert was cut
takes its next allowed candidate instead: the pairs stay within the pool Alloc-T spent, and the group's
distinct non-free experts are at most max(C_g, |its floor|). A token keeps fewer than n_t only where fewer
than n_t of its candidates are allowed; those are the pairs the cap drops. Tokens never use an expert
outside their own top-K.

What a capped token keeps is its floor plus allowed candidates in rank order, so not always a prefix of
its ranking (a cut expert leaves a hole). Uncapped tokens are untouched, bit for bit.

Pure torch, static shapes, no host sync: runs where `alloc_t.reallocate` runs (torch.compile, CUDA-graph
replay). `alloc_t_host` has the same rule compiled with numba for the CPU serving path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vllm_alloc.values import CAP_SCALE, share_units

__all__ = [
    "SCALE",
    "CapResult",
    "cap_experts",
    "capped_budgets",
    "distinct_experts",
    "group_cap",
    "share_units",
]

SCALE = CAP_SCALE  # ρ is held in thousandths: q = round(ρ · SCALE) in [1, SCALE]; SCALE = no cap


def capped_budgets(table: torch.Tensor) -> torch.Tensor:
    """[A + 1] bool: the budgets B that a cap table [A + 1, L] (thousandths) caps at some layer."""
    return (table < SCALE).any(dim=1)


def group_cap(q: int, wanted: int) -> int:
    """C_g = ⌈ρ · D_g⌉ with ρ = q / SCALE, in integers (what both paths compute)."""
    return (q * wanted + SCALE - 1) // SCALE


class CapResult(NamedTuple):
    kept: torch.Tensor  # [T, K] bool, in the input columns
    distinct: torch.Tensor  # [] int64: experts the kept pairs of all T tokens touch
    dropped: torch.Tensor  # [] int64: pairs Alloc-T kept that the cap removed (net of replacements)


def cap_experts(
    rank_keys: torch.Tensor,
    topk_ids: torch.Tensor,
    kept: torch.Tensor,
    cap_group: torch.Tensor,
    q_tok: torch.Tensor,
    num_experts: int,
    k_base: int = 1,
) -> CapResult:
    """Cut the capped tokens' kept pairs to each group's allowed experts (module docstring).

    Args:
        rank_keys: [T, K] float, the ranking score of each candidate (higher = better), as Alloc-T's.
        topk_ids: [T, K] int in [0, E), the candidates' expert ids.
        kept: [T, K] bool, the pairs Alloc-T kept: per token a prefix of its ranking, at least K_base long
            for a token with any pair (padding rows keep nothing).
        cap_group: [T] int in [0, T), the cap group of each token (as Alloc-T's groups: not checked on
            device, an id outside [0, T) is an index error).
        q_tok: [T] int, the share ρ of the token's budget in thousandths (a group's is the smallest of its
            tokens'); SCALE or more means the token is not capped.
        num_experts: E.
        k_base: the floor K_base (>= 1; values above K mean K).
    """
    if kept.shape != rank_keys.shape or topk_ids.shape != rank_keys.shape or rank_keys.dim() != 2:
        raise ValueError(
            f"rank_keys {tuple(rank_keys.shape)}, topk_ids {tuple(topk_ids.shape)} and kept "
            f"{tuple(kept.shape)} must share one [T, K] shape"
        )
    T, K = rank_keys.shape
    for name, t in (("cap_group", cap_group), ("q_tok", q_tok)):
        if t.shape != (T,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: must be 1-D [T] = {(T,)}")
    if isinstance(k_base, bool) or not isinstance(k_base, int) or k_base < 1:
        raise ValueError(f"k_base={k_base!r}: must be an int >= 1")
    E, kb, dev = num_experts, min(k_base, K), rank_keys.device
    G = T + 1  # groups [0, T) and a sentinel row T for uncapped tokens: static shapes
    ids = topk_ids.long()
    n_tok = kept.sum(dim=1)  # [T] what Alloc-T gave each token
    capped = (q_tok < SCALE) & (n_tok > 0)  # [T]
    group = torch.where(capped, cap_group.long(), T)
    members = torch.zeros(G, dtype=torch.int64, device=dev).scatter_add_(0, group, capped.long())
    capped = capped & (members[group] > 1)  # a group of one token is not capped
    group = torch.where(capped, group, T)
    share = torch.full((G,), SCALE, dtype=torch.int64, device=dev)
    share.scatter_reduce_(0, group, q_tok.long(), reduce="amin")

    # Free experts: kept by the pass's uncapped tokens.
    free = torch.zeros(E, dtype=torch.int64, device=dev)
    free.scatter_add_(0, ids.reshape(-1), (kept & ~capped[:, None]).reshape(-1).long())
    free_e = free > 0

    # Each token's candidates in its ranking order (stable: ties to the lower column, as Alloc-T).
    sorted_keys, order = torch.sort(rank_keys, dim=1, descending=True, stable=True)
    ids_sorted = ids.gather(1, order)
    kept_sorted = kept.gather(1, order)
    floor_pos = torch.arange(K, device=dev) < kb  # [K]
    cell = (group[:, None] * E + ids_sorted).reshape(-1)  # [T·K] flat index into [G, E]
    mine = (capped[:, None] & kept_sorted).reshape(-1)
    demand = torch.zeros(G * E, dtype=torch.float64, device=dev)
    demand.scatter_add_(0, cell, torch.where(mine, sorted_keys.reshape(-1).double(), 0.0))
    wants = torch.zeros(G * E, dtype=torch.int64, device=dev)  # kept pairs of the group on e
    wants.scatter_add_(0, cell, mine.long())
    floor = torch.zeros(G * E, dtype=torch.int64, device=dev)
    floor.scatter_add_(0, cell, (mine & floor_pos.repeat(T)).long())
    floor_e = (floor > 0).view(G, E) & ~free_e
    # Order each group's experts: its floor first, then the wanted ones by demand (keys may be 0 or
    # negative), then the unwanted, free experts last (never counted).
    lowest = torch.finfo(torch.float64).min
    key = torch.where(wants.view(G, E) > 0, demand.view(G, E), lowest)
    key = torch.where(floor_e, torch.inf, key)
    key = torch.where(free_e, -torch.inf, key)
    by_key = torch.sort(key, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(by_key).scatter_(1, by_key, torch.arange(E, device=dev).expand(G, E))
    wanted = ((wants.view(G, E) > 0) & ~free_e).sum(dim=1)  # D_g
    cap = torch.where(share < SCALE, (share * wanted + SCALE - 1) // SCALE, E)  # group_cap
    limit = torch.maximum(cap, floor_e.sum(dim=1))  # [G]
    allowed = (free_e | (rank < limit[:, None])).reshape(-1)  # [G·E]

    # Each capped token: its floor, then allowed candidates in rank order, up to n_t pairs.
    ok = allowed[cell].view(T, K) | floor_pos
    take = ok & (torch.cumsum(ok.long(), dim=1) <= n_tok[:, None])
    keep_sorted = torch.where(capped[:, None], take, kept_sorted)
    out = torch.zeros_like(kept).scatter(1, order, keep_sorted)

    return CapResult(out, distinct_experts(ids, out, E), n_tok.sum() - out.sum())


def distinct_experts(topk_ids: torch.Tensor, kept: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[] int64: the experts the kept pairs touch (what a pass reads the weights of)."""
    touched = torch.zeros(num_experts, dtype=torch.int64, device=kept.device)
    touched.scatter_add_(0, topk_ids.long().reshape(-1), kept.reshape(-1).long())
    return (touched > 0).sum()
