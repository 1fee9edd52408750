"""Shared test material for the kernel tests: device, dtypes with their tolerances, routing patterns."""

from __future__ import annotations

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

# (rtol, atol) against the fp32 oracle. Outputs are O(1): weights are scaled by 1/sqrt(fan-in).
# fp32: only summation order differs. fp16/bf16: inputs are rounded, and so are the [pairs, I] and
# [pairs, H] intermediates (as in vLLM); bf16 keeps 8 mantissa bits to fp16's 11.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (4e-2, 4e-2),
}

# fp32 and fp16 run everywhere; bf16 only where it is computed right (CUDA).
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(not ON_CUDA, reason="bfloat16 is silently wrong under TRITON_INTERPRET=1"),
    ),
]

# Small tiles keep the interpreter fast and make the small test shapes span several tiles.
SMALL_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}

Problem = dict[str, torch.Tensor]


def routing(T: int, K: int, E: int, pattern: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int32, topk_weights fp32) [T, K] with K distinct experts per token, then pruned by pattern.

    none: nothing pruned; random: each pair pruned with probability 0.4; budget: each token keeps the
    prefix of its own ranking of length ceil(b·K) with b drawn from {1, 0.75, 0.5, 0.33} (what Alloc-T
    produces); token: token 1 has every pair pruned; all: every pair pruned; one_expert: every token keeps
    only expert E−1 (in a random slot).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K, generator=g)
    if pattern == "random":
        ids[torch.rand(T, K, generator=g) < 0.4] = -1
    elif pattern == "budget":
        budgets = torch.tensor([1.0, 0.75, 0.5, 0.33])[torch.randint(0, 4, (T,), generator=g)]
        kept = torch.ceil(budgets * K).int()
        ids[torch.arange(K)[None, :] >= kept[:, None]] = -1
    elif pattern == "token":
        ids[min(1, T - 1)] = -1
    elif pattern == "all":
        ids[:] = -1
    elif pattern == "one_expert":
        slot = torch.randint(0, K, (T,), generator=g)
        ids[:] = -1
        ids[torch.arange(T), slot] = E - 1
    elif pattern != "none":
        raise ValueError(f"unknown pruning pattern {pattern!r}")
    return ids, weights


def make_problem(
    T: int, K: int, E: int, H: int, I: int, pattern: str, dtype: torch.dtype, seed: int = 0
) -> Problem:
    """x, w13, w2 (dtype), topk_ids (int32), topk_weights (fp32) on DEVICE; routing as `routing`."""
    g = torch.Generator().manual_seed(seed + 1)
    ids, weights = routing(T, K, E, pattern, seed)
    tensors = {
        "x": torch.randn(T, H, generator=g).to(dtype),
        "w13": (torch.randn(E, 2 * I, H, generator=g) / H**0.5).to(dtype),
        "w2": (torch.randn(E, H, I, generator=g) / I**0.5).to(dtype),
        "topk_ids": ids,
        "topk_weights": weights,
    }
    return {name: t.to(DEVICE) for name, t in tensors.items()}
