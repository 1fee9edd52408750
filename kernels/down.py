"""Grouped GEMM 2: down projection of each valid pair, scaled by its routing weight.

pair_out[p] = w[t, k] · (inter[p] · w2[e]ᵀ) for every valid pair p = t·K + k of expert e. Each pair gets
its own row rather than an atomic add into y: the sum over a token's pairs then happens in `combine`
in a fixed order (deterministic, no zero-fill of y, no fp32 atomics), at the cost of writing T·K·H
activations — small beside the expert weights at decode, where the budget matters most.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedPairs, block_tile


@triton.jit
def _down_kernel(
    inter_ptr,  # [T*K, I] dtype of x: act(gate)*up per pair (rows of pruned pairs hold garbage, never read)
    w2_ptr,  # [E, H, I] dtype of x
    topk_weights_ptr,  # [T*K] fp32/fp16/bf16 (flattened [T, K]) routing weights
    pair_out_ptr,  # [T*K, H] dtype of x, out: weighted expert output per pair; pruned rows never written
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, p = t*K + k; sentinel T*K = padding
    block_expert_ids_ptr,  # [max_blocks] int32, -1 = unused block
    num_pairs,  # T*K
    H,
    I,
    stride_it,
    stride_we,
    stride_wn,
    stride_wi,
    stride_ot,
    FP32_IEEE: tl.constexpr,  # fp32 inputs: full-precision products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (max_blocks·cdiv(H, BLOCK_N),); program (m, n) = `block_tile(pid)` owns the BLOCK_M pairs of
    aligned block m and hidden columns [n·BLOCK_N, (n+1)·BLOCK_N); the used blocks' programs come first.
    An unused block (expert −1) returns before any other load.
    """
    pid_m, pid_n = block_tile(tl.program_id(0), H, BLOCK_N)
    e = tl.load(block_expert_ids_ptr + pid_m)
    if e == -1:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pair64[:, None] * stride_it + offs_k[None, :]
    w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wi
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(I, BLOCK_K)):
        k_mask = offs_k < I - kb * BLOCK_K  # I need not be a multiple of BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP32_IEEE:  # noqa: SIM108 (a statement-level constexpr branch: Triton compiles one side only)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wi
    # The routing weight multiplies the fp32 accumulator, before the one rounding to x's dtype.
    weight = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_ptrs = pair_out_ptr + pair64[:, None] * stride_ot + offs_n[None, :]
    tl.store(out_ptrs, acc.to(pair_out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def grouped_down(
    inter: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    aligned: AlignedPairs,
    *,
    config: dict[str, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """w · down(inter) for every valid pair → [T·K, H] in inter's dtype (rows of pruned pairs unwritten)."""
    num_pairs, I = inter.shape
    H = w2.shape[1]
    weights = topk_weights.contiguous()
    if weights.numel() != num_pairs:
        raise ValueError(f"topk_weights has {weights.numel()} entries; expected T*K = {num_pairs}")
    if inter.stride(1) != 1:
        raise ValueError("inter must be row-major (stride 1 along I)")
    if out is None:
        out = torch.empty((num_pairs, H), dtype=inter.dtype, device=inter.device)
    if tuple(out.shape) != (num_pairs, H) or out.stride(1) != 1:
        raise ValueError(
            f"out must be a row-major [T*K, H] = {(num_pairs, H)} tensor; got {tuple(out.shape)}"
        )
    grid = (aligned.block_expert_ids.shape[0] * triton.cdiv(H, config["BLOCK_N"]),)
    _down_kernel[grid](
        inter,
        w2,
        weights,
        out,
        aligned.sorted_pair_ids,
        aligned.block_expert_ids,
        num_pairs,
        H,
        I,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        out.stride(0),
        FP32_IEEE=inter.dtype == torch.float32,
        BLOCK_M=aligned.block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
