"""Combine: y[t] = Σ over token t's kept pairs of pair_out[t·K + k], in k order (deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_H = 256


@triton.jit
def _combine_kernel(
    pair_out_ptr,  # [T*K, H] dtype of x: weighted expert output per pair (pruned rows hold garbage)
    topk_ids_ptr,  # [T, K] int32/int64, -1 = pruned
    y_ptr,  # [T, H] dtype of x, out
    K,
    E,
    H,
    stride_pt,
    stride_yt,
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
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in range(0, K):
        p = t * K + k
        e = tl.load(topk_ids_ptr + p)
        # Compare as a vector: the interpreter rejects a scalar boolean inside a load mask.
        e_vec = tl.full([BLOCK_H], 0, tl.int64) + e
        mask = h_mask & (e_vec >= 0) & (e_vec < E)
        v = tl.load(pair_out_ptr + p.to(tl.int64) * stride_pt + offs_h, mask=mask, other=0.0)
        acc += v.to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * stride_yt + offs_h, acc.to(y_ptr.dtype.element_ty), mask=h_mask)


def combine_pairs(
    pair_out: torch.Tensor, topk_ids: torch.Tensor, E: int, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum each token's kept rows of pair_out [T·K, H] → y [T, H] in pair_out's dtype."""
    T, K = topk_ids.shape
    H = pair_out.shape[1]
    if pair_out.shape[0] != T * K or pair_out.stride(1) != 1:
        raise ValueError(f"pair_out must be a row-major [T*K, H] tensor with T*K = {T * K}")
    if out is None:
        out = torch.empty((T, H), dtype=pair_out.dtype, device=pair_out.device)
    if tuple(out.shape) != (T, H) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [T, H] = {(T, H)} tensor; got {tuple(out.shape)}")
    if T == 0:
        return out
    ids = topk_ids.contiguous()
    _combine_kernel[(T, triton.cdiv(H, BLOCK_H))](
        pair_out, ids, out, K, E, H, pair_out.stride(0), out.stride(0), BLOCK_H=BLOCK_H
    )
    return out
