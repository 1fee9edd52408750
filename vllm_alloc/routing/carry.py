"""A request's budget carried across decode steps: the lever for tokens that are alone in their group.

Alloc-T moves a group's pool to its best candidates, so a lone decode token (a group of one) keeps
exactly its top-K_l and Alloc-T does nothing. Here the group is the request's tokens *over time*: each
(request, MoE layer) keeps a balance β of expert slots it saved, and every decode token decides with it

    want  = max(K_base, #{j : key_j ≥ θ · exp(−α·β)})        how many candidates clear the bar
    k_t   = max(K_base, min(want, K, K_l + β))              capped by what the request has saved
    β    ← β + K_l − k_t

θ (per layer and budget, calibrated offline, `threshold_for`) is where the token's candidates are worth
a slot: a confident token (one dominant expert) keeps fewer than K_l and banks the rest, an uncertain
one spends its bank. exp(−α·β) lowers the bar as the bank grows, so savings are spent rather than
hoarded (α = 0 is a fixed bar).

Bounds, for K_l ≥ K_base (the floor alone can push past them, as in Alloc-T):
  * β ≥ 0 after every step: nothing is borrowed, so the request's total over any prefix of its decode
    steps is Σ k_t = Σ K_l − β ≤ Σ K_l, its pool;
  * per-step excess k_t − K_l ≤ min(K − K_l, β before the step).
Like Alloc-T, what a token keeps is a prefix of its own ranking (the top-k_t of its keys).

Pure torch, static shapes, no host sync (the device path). `alloc_t_host.carry_counts` is the same rule
for the CPU path; tests/routing/test_carry.py checks both against each other and the bounds.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CARRY_POOLS", "carry_counts", "check_alpha", "threshold_for"]

# Where a request banks its savings: a balance per MoE layer, or one bank for all its layers.
CARRY_POOLS = ("layer", "request")


def check_alpha(alpha: float) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha < 0
    ):
        raise ValueError(f"alpha={alpha!r}: must be a finite number >= 0 (0 = a fixed bar)")


def carry_counts(
    rank_keys: torch.Tensor,
    k_tok: torch.Tensor,
    balance: torch.Tensor,
    threshold: torch.Tensor,
    k_base: int = 1,
    alpha: float = 0.05,
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many of its candidates each token keeps, and its request's balance after this step.

    Args:
        rank_keys: [T, K] float, the router's ranking score of each candidate (higher = better).
        k_tok: [T] int, K_l(B_t); <= 0 marks a padding row (keeps 0, balance unchanged).
        balance: [T] int >= 0, β of the token's (request, layer) before this step.
        threshold: [T] float, θ_l(B_t); +inf keeps K_base and banks the rest, −inf spends what it can.
        k_base: the floor K_base (>= 1); values above K mean K.
        alpha: how fast the bar falls as the balance grows (>= 0).

    Returns:
        (n_keep [T] int64: keep the token's top-n_keep candidates; balance_after [T] int64).
    """
    check_alpha(alpha)
    if rank_keys.dim() != 2:
        raise ValueError(f"rank_keys has shape {tuple(rank_keys.shape)}: must be 2-D [T, K]")
    T, K = rank_keys.shape
    for name, t in (("k_tok", k_tok), ("balance", balance), ("threshold", threshold)):
        if t.shape != (T,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}: must be 1-D [T] = {(T,)}")
    kb = min(k_base, K)
    k_tok = k_tok.to(torch.int64)
    balance = balance.to(torch.int64)
    # In float64, so that the host twin (libm's exp) and the device agree on which side of the bar a key
    # lies: they may differ in the last bit of exp, which float32 keys cannot resolve at float64 spacing.
    # An infinite θ stays infinite (exp(−αβ) > 0 for finite β).
    bar = threshold.to(torch.float64) * torch.exp(-float(alpha) * balance.to(torch.float64))
    want = (rank_keys.to(torch.float64) >= bar[:, None]).sum(dim=1).clamp(min=kb)
    cap = torch.clamp(k_tok + balance, max=K)
    n_keep = torch.maximum(torch.minimum(want, cap), torch.full_like(want, kb))
    valid = k_tok > 0
    n_keep = torch.where(valid, n_keep, 0)
    return n_keep, torch.where(valid, balance + k_tok - n_keep, balance)


def threshold_for(extras: np.ndarray, mean_extras: float) -> float:
    """θ for one layer and budget: the bar above which calibration tokens keep, on average,
    `mean_extras` candidates beyond their floor.

    extras: [N, K − K_base], each calibration token's candidates below its top-K_base (router scores);
    mean_extras: target extras per token, e.g. K_l − K_base − 0.4 (a bar set a little high, which the
    bank then lowers; see docs/design.md). <= 0 gives +inf (never above the floor); all of them gives
    −inf (keep every candidate).
    """
    extras = np.asarray(extras, dtype=np.float64)
    if extras.ndim != 2:
        raise ValueError(f"extras has shape {extras.shape}: must be 2-D [N tokens, K - K_base]")
    n = round(mean_extras * extras.shape[0])
    if n <= 0 or extras.size == 0:
        return math.inf
    if n >= extras.size:
        return -math.inf
    return float(np.sort(extras.ravel())[::-1][n - 1])
