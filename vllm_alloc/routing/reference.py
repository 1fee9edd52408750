"""The oracle: an fp32 pure-torch MoE forward with a variable number of experts per token.

Every kernel test, the CPU expert path and the benchmarks compare against `moe_forward`. It is written to
be obviously right, not fast: one loop over tokens, one over each token's K slots, and a pruned slot
(id −1) is skipped before anything is read. Imports neither vLLM nor Triton (STYLE.md rule 1).

Weight layout is vLLM's: w13 [E, 2I, H] stacks the gate projection (w1, rows 0..I-1) on top of the up
projection (w3, rows I..2I-1); w2 [E, H, I] is the down projection. Letters as in DESIGN.md §1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(gate)
    if activation == "gelu":
        return F.gelu(gate)  # exact (erf) GELU, as vLLM's gelu_and_mul
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh")
    raise ValueError(f"activation={activation!r} is not supported; expected one of {ACTIVATIONS}")


def _gated_mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, activation: str) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for one expert in fp32; x [..., H], w13 [2I, H], w2 [H, I]."""
    I = w2.shape[1]
    h = x @ w13.T  # [..., 2I]
    return (_act(h[..., :I], activation) * h[..., I:]) @ w2.T


def _check(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_w13: torch.Tensor | None,
    shared_w2: torch.Tensor | None,
) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got shape {tuple(x.shape)}")
    T, H = x.shape
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E, 2I, H] with H={H}; got shape {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(f"w2 must be [E, H, I] = {(E, H, I)}; got shape {tuple(w2.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T, K] with T={T}; got shape {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal "
            f"topk_ids shape {tuple(topk_ids.shape)}"
        )
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool:
        raise ValueError(f"topk_ids must be an integer tensor; got dtype {topk_ids.dtype}")
    if topk_ids.numel() > 0:
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < -1 or hi >= E:
            bad = lo if lo < -1 else hi
            raise ValueError(f"topk_ids contains {bad}; expert ids must lie in [-1, {E}) (-1 = pruned)")
    if (shared_w13 is None) != (shared_w2 is None):
        raise ValueError("shared_w13 and shared_w2 must be given together (or neither)")
    if shared_w13 is not None and shared_w2 is not None:
        if shared_w13.dim() != 2 or shared_w13.shape[1] != H or shared_w13.shape[0] % 2 != 0:
            raise ValueError(f"shared_w13 must be [2Is, H] with H={H}; got shape {tuple(shared_w13.shape)}")
        Is = shared_w13.shape[0] // 2
        if tuple(shared_w2.shape) != (H, Is):
            raise ValueError(f"shared_w2 must be [H, Is] = {(H, Is)}; got shape {tuple(shared_w2.shape)}")


def moe_forward(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    activation: str = "silu",
    routed_scaling_factor: float = 1.0,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[t] = routed_scaling_factor · Σ_{k: id[t,k] ≠ −1} w[t,k] · expert_{id[t,k]}(x[t]) + shared(x[t]).

    x [T, H]; w13 [E, 2I, H]; w2 [E, H, I]; topk_weights, topk_ids [T, K] (id −1 = pruned, skipped
    entirely: its weight is never read). The shared expert, if given, is a dense gated MLP with the same
    activation (shared_w13 [2Is, H], shared_w2 [H, Is]) that every token runs, unscaled. Everything is
    computed in fp32 whatever the input dtype; returns fp32 [T, H].
    """
    _check(x, w13, w2, topk_weights, topk_ids, shared_w13, shared_w2)
    _act(torch.zeros(1), activation)  # reject an unknown activation even when every pair is pruned
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    ids = topk_ids.tolist()
    weights = topk_weights.float()
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t, row in enumerate(ids):
        for k, e in enumerate(row):
            if e == -1:
                continue
            y[t] += weights[t, k] * _gated_mlp(xf[t], w13f[e], w2f[e], activation)
    y *= routed_scaling_factor
    if shared_w13 is not None and shared_w2 is not None:
        y += _gated_mlp(xf, shared_w13.float(), shared_w2.float(), activation)
    return y


def count_pairs(topk_ids: torch.Tensor) -> int:
    """Valid (token, expert) pairs: entries of topk_ids that are not −1. (A host sync.)"""
    return int((topk_ids != -1).sum())


def distinct_experts(topk_ids: torch.Tensor) -> int:
    """Experts with at least one valid pair: whose weights a kernel must read. (A host sync.)"""
    return int(torch.unique(topk_ids[topk_ids != -1]).numel())
