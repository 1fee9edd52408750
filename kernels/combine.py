"""Combine: y[t] = Σ over token t's kept pairs of pair_out[t·K + k], in k order (deterministic).

Where the down kernel split I (kernels/down.py), pair_out holds fp32 parts [SPLIT, T·K, H] and a pair's
term is the sum of its S parts in order s = 0 … S−1, S read on the device as the down kernel read it
(`align.split_factor` of `num_blocks`): the split costs no launch of its own, and the sum's order is fixed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedPairs, split_factor

BLOCK_H = 256


@triton.jit
def _combine_kernel(
    pair_out_ptr,  # SPLIT = 1: [T*K, H] dtype of x; SPLIT > 1: [SPLIT, T*K, H] fp32 parts (s >= S unwritten).
    # Weighted expert output per pair; pruned rows hold garbage.
    topk_ids_ptr,  # [T, K] int32/int64, -1 = pruned
    y_ptr,  # [T, H] dtype of x, out
    num_blocks_ptr,  # [1] int32: blocks in use, whence S (read only where SPLIT > 1)
    K,
    E,
    H,
    max_blocks,
    stride_ps,  # between parts (SPLIT > 1)
    stride_pt,
    stride_yt,
    SPLIT: tl.constexpr,  # the down kernel's static split bound; 1 = not split
    BLOCK_H: tl.constexpr,
):
    """Grid (T, cdiv(H, BLOCK_H)); program (t, h) owns y[t, h·BLOCK_H : (h+1)·BLOCK_H] and sums it in fp32.

    A pruned pair's row is masked out of the load, never read: its memory was never written, and an
    all-pruned token gets exact zeros. The validity test [0, E) matches the alignment's, so an id the
    alignment dropped is dropped here too.
    """
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    if SPLIT > 1:
        S = split_factor(tl.load(num_blocks_ptr), max_blocks, SPLIT)
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, K):
        p = t * K + k
        e = tl.load(topk_ids_ptr + p)
        # Compare as a vector: the interpreter rejects a scalar boolean inside a load mask.
        e_vec = tl.full([BLOCK_H], 0, tl.int64) + e
        mask = h_mask & (e_vec >= 0) & (e_vec < E)
        ptrs = pair_out_ptr + p.to(tl.int64) * stride_pt + offs_h
        if SPLIT > 1:
            for s in range(0, S):
                acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
        else:
            acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + offs_h, acc.to(y_ptr.dtype.element_ty), mask=h_mask)


def combine_pairs(
    pair_out: torch.Tensor,
    topk_ids: torch.Tensor,
    E: int,
    *,
    aligned: AlignedPairs | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum each token's kept rows of pair_out [T·K, H] → y [T, H] in pair_out's dtype.

    pair_out may instead be the down kernel's fp32 parts [SPLIT, T·K, H] (`grouped_down(split=...)`); then
    `aligned` (the pairs both GEMMs walked) gives S, and out must be given (y's dtype is x's, not fp32).
    """
    T, K = topk_ids.shape
    H = pair_out.shape[-1]
    split = pair_out.shape[0] if pair_out.dim() == 3 else 1
    if pair_out.dim() not in (2, 3) or pair_out.shape[-2] != T * K or pair_out.stride(-1) != 1:
        raise ValueError(
            f"pair_out must be a row-major [T*K, H] or [SPLIT, T*K, H] tensor with T*K = {T * K}; got "
            f"{tuple(pair_out.shape)}"
        )
    if pair_out.dim() == 3 and (aligned is None or out is None or pair_out.dtype != torch.float32):
        raise ValueError("float32 parts [SPLIT, T*K, H] of pair_out need aligned= (for S) and out= (for y)")
    if out is None:
        out = torch.empty((T, H), dtype=pair_out.dtype, device=pair_out.device)
    if tuple(out.shape) != (T, H) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [T, H] = {(T, H)} tensor; got {tuple(out.shape)}")
    if T == 0:
        return out
    ids = topk_ids.contiguous()
    num_blocks = aligned.num_blocks if aligned is not None else ids  # never read where split = 1
    max_blocks = aligned.block_expert_ids.shape[0] if aligned is not None else 1
    _combine_kernel[(T, triton.cdiv(H, BLOCK_H))](
        pair_out,
        ids,
        out,
        num_blocks,
        K,
        E,
        H,
        max_blocks,
        pair_out.stride(0) if split > 1 else 0,
        pair_out.stride(-2),
        out.stride(0),
        SPLIT=split,
        BLOCK_H=BLOCK_H,
    )
    return out
