"""Grouped GEMM 2: down projection of each valid pair, scaled by its routing weight.

pair_out[p] = w[t, k] · (inter[p] · w2[e]ᵀ) for every valid pair p = t·K + k of expert e. Each pair gets
its own row rather than an atomic add into y: the sum over a token's pairs then happens in `combine`
in a fixed order (deterministic, no zero-fill of y, no fp32 atomics), at the cost of writing T·K·H
activations — small beside the expert weights at decode, where the budget matters most.

Split-K over I (SPLIT > 1, decode; align.py): program slot m' computes part s of block m's I-reduction
(`align.split_slot`) and stores w · its fp32 partial to pair_out[s, p]; `combine` sums a pair's S parts in
order s = 0 … S−1 inside its k-ordered sum over the token's pairs. The split adds no launch, and no atomics:
the same inputs give the same bits at every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedPairs, block_tile, split_bound, split_factor, split_slot


@triton.jit
def _down_kernel(
    inter_ptr,  # [T*K, I] dtype of x: act(gate)*up per pair (rows of pruned pairs hold garbage, never read)
    w2_ptr,  # [E, H, I] dtype of x
    topk_weights_ptr,  # [T*K] fp32/fp16/bf16 (flattened [T, K]) routing weights
    pair_out_ptr,  # SPLIT = 1: [T*K, H] dtype of x, out: weighted expert output per pair. SPLIT > 1:
    # [SPLIT, T*K, H] fp32, out: part s of it. Rows of pruned pairs, and parts s >= S, are never written.
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, p = t*K + k; sentinel T*K = padding
    block_expert_ids_ptr,  # [max_blocks] int32, -1 = unused block
    num_blocks_ptr,  # [1] int32: blocks in use, whence S (read only where SPLIT > 1)
    num_pairs,  # T*K
    H,
    I,
    max_blocks,
    stride_it,
    stride_we,
    stride_wn,
    stride_wi,
    stride_os,  # between parts of pair_out (SPLIT > 1)
    stride_ot,
    FP32_IEEE: tl.constexpr,  # fp32 inputs: full-precision products, not TF32
    SPLIT: tl.constexpr,  # static bound of the split factor S over I (`align.split_bound`); 1 = not split
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (max_blocks·cdiv(H, BLOCK_N),); program (m', n) = `block_tile(pid)` owns hidden columns
    [n·BLOCK_N, (n+1)·BLOCK_N) of the BLOCK_M pairs of aligned block m = m' (SPLIT = 1), or of block
    m' mod num_blocks over part ⌊m' / num_blocks⌋ of I (SPLIT > 1: slots m' ≥ num_blocks·S return at once).
    The working programs come first. An unused block (expert −1) returns before any other load.
    """
    pid_m, pid_n = block_tile(tl.program_id(0), H, BLOCK_N)
    lo = 0
    hi = tl.cdiv(I, BLOCK_K)
    if SPLIT > 1:
        used = tl.load(num_blocks_ptr)
        S = split_factor(used, max_blocks, SPLIT)
        if pid_m >= used * S:
            return
        pid_m, part, lo, hi = split_slot(pid_m, used, S, hi)
    e = tl.load(block_expert_ids_ptr + pid_m)
    if e == -1:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    pair64 = pair.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < H
    offs_k = lo * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = inter_ptr + pair64[:, None] * stride_it + offs_k[None, :]
    w_ptrs = w2_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wi
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(lo, hi):
        k_mask = offs_k < I - (kb - lo) * BLOCK_K  # I need not be a multiple of BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if FP32_IEEE:  # noqa: SIM108 (a statement-level constexpr branch: Triton compiles one side only)
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wi
    # The routing weight multiplies the fp32 accumulator, before the one rounding to x's dtype (a split's
    # parts stay fp32: the combine rounds their sum once).
    weight = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    out_ptrs = pair_out_ptr + pair64[:, None] * stride_ot + offs_n[None, :]
    if SPLIT > 1:
        out_ptrs += part.to(tl.int64) * stride_os
    tl.store(out_ptrs, acc.to(pair_out_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def grouped_down(
    inter: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    aligned: AlignedPairs,
    *,
    config: dict[str, int],
    split: int = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """w · down(inter) for every valid pair → [T·K, H] in inter's dtype (rows of pruned pairs unwritten).

    split > 1 allows splitting I into up to SPLIT = `split_bound(split, cdiv(I, BLOCK_K), max_blocks)`
    parts, S of them used (S from `aligned.num_blocks` on the device); where SPLIT > 1 the result is instead
    the fp32 parts [SPLIT, T·K, H] (parts s ≥ S unwritten), for `combine_pairs(aligned=...)` to sum.
    """
    num_pairs, I = inter.shape
    H = w2.shape[1]
    weights = topk_weights.contiguous()
    if weights.numel() != num_pairs:
        raise ValueError(f"topk_weights has {weights.numel()} entries; expected T*K = {num_pairs}")
    if inter.stride(1) != 1:
        raise ValueError("inter must be row-major (stride 1 along I)")
    if isinstance(split, bool) or not isinstance(split, int) or split < 1:
        raise ValueError(f"split={split!r} must be an int >= 1")
    max_blocks = aligned.block_expert_ids.shape[0]
    bound = split_bound(split, triton.cdiv(I, config["BLOCK_K"]), max_blocks)
    shape = (bound, num_pairs, H) if bound > 1 else (num_pairs, H)
    dtype = torch.float32 if bound > 1 else inter.dtype
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=inter.device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(
            f"out must be a row-major {list(shape)} {dtype} tensor (split bound {bound}); got "
            f"{list(out.shape)} {out.dtype}"
        )
    grid = (max_blocks * triton.cdiv(H, config["BLOCK_N"]),)
    _down_kernel[grid](
        inter,
        w2,
        weights,
        out,
        aligned.sorted_pair_ids,
        aligned.block_expert_ids,
        aligned.num_blocks,
        num_pairs,
        H,
        I,
        max_blocks,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        out.stride(0) if bound > 1 else 0,
        out.stride(-2),
        FP32_IEEE=inter.dtype == torch.float32,
        SPLIT=bound,
        BLOCK_M=aligned.block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
