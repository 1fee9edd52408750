"""One-launch stand-ins for the two CUDA helper ops vLLM 0.32's stock MoE calls (`vllm_ref.py`).

The lent GPU machine has no vLLM build (its `_C`/`_moe_C` extensions do not load there), so these replace
`ops.moe_align_block_size` and `silu_and_mul`, each kept to one launch as the op it stands for, so a
CUDA-graph timing of the stock path counts the same number of kernels. Our own code: only the output
*layout* is vLLM's. Two kernels and two launchers in one file (STYLE.md rule 2 says one): they are one
benchmark-only unit, and neither is used anywhere else.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements of the [CHUNK, next_pow2(E)] one-hot tile the align program walks per step.
TILE = 8192
SILU_BLOCK = 1024


@triton.jit
def _align_kernel(
    topk_ids_ptr,  # [T*K] int32/int64 (flattened [T, K])
    sorted_ids_ptr,  # [max_slots] int32, out: pair p = t*K + k at its slot; padding = T*K
    expert_ids_ptr,  # [max_blocks] int32, out: expert of each block, -1 past the used ones
    num_post_pad_ptr,  # [1] int32, out: used blocks * BLOCK_M
    num_pairs,  # T*K, also the padding value
    E,
    max_blocks,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,  # next power of two >= E
):
    """Grid (1,); the one program owns every output. Three passes over the pairs in CHUNK steps.

    Each expert's pairs fill ceil(count / BLOCK_M) blocks, experts in id order, pairs in index order.
    Only the slots of used blocks are written: the scattered pairs, then each expert's padded tail. The
    GEMM never reads past num_post_pad, so the rest of sorted_ids may hold anything; the two sets of
    written slots are disjoint, so no barrier is needed inside the program.
    """
    experts = tl.arange(0, E_PAD)
    e_mask = experts < E
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        counts += tl.sum(((ids[:, None] == experts[None, :]) & e_mask[None, :]).to(tl.int32), axis=0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = tl.cumsum(blocks, axis=0)
    block_start = block_end - blocks
    total = tl.sum(blocks, axis=0)
    tl.store(num_post_pad_ptr, total * BLOCK_M)
    # Block b belongs to the number of experts whose blocks end at or before b (empty experts included).
    for b0 in range(0, max_blocks, CHUNK):
        offs_b = b0 + tl.arange(0, CHUNK)
        owner = tl.sum(((block_end[None, :] <= offs_b[:, None]) & e_mask[None, :]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + offs_b, tl.where(offs_b < total, owner, -1), mask=offs_b < max_blocks)
    # Padded tail of each expert: slots [start·BM + count, end·BM), fewer than BLOCK_M per expert.
    pads = tl.arange(0, BLOCK_M)
    tail = (block_start * BLOCK_M + counts)[:, None] + pads[None, :]
    tail_mask = e_mask[:, None] & (tail < (block_end * BLOCK_M)[:, None])
    tl.store(sorted_ids_ptr + tail, tl.full([E_PAD, BLOCK_M], 0, tl.int32) + num_pairs, mask=tail_mask)
    # Scatter: a pair's slot is its expert's first slot + earlier pairs of that expert (earlier chunks
    # in `seen`, this chunk by a column-wise prefix sum of the one-hot tile).
    seen = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, num_pairs, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
        onehot = (ids[:, None] == experts[None, :]) & e_mask[None, :]
        onehot_i = onehot.to(tl.int32)
        rank = tl.cumsum(onehot_i, axis=0) - 1 + (block_start * BLOCK_M + seen)[None, :]
        slot = tl.sum(tl.where(onehot, rank, 0), axis=1)
        tl.store(sorted_ids_ptr + slot, offs, mask=tl.sum(onehot_i, axis=1) > 0)
        seen += tl.sum(onehot_i, axis=0)


class Aligned(NamedTuple):
    """What vLLM 0.32's `moe_align_block_size` returns, in its layout."""

    sorted_ids: torch.Tensor  # [max_slots] int32, padding = T*K
    expert_ids: torch.Tensor  # [max_blocks] int32
    num_post_pad: torch.Tensor  # [1] int32


def align_stand_in(topk_ids: torch.Tensor, E: int, block_m: int) -> Aligned:
    """One launch in place of `ops.moe_align_block_size(topk_ids, E, block_m, ...)`, buffers sized as vLLM
    0.32's `moe_align_block_size` sizes them (T·K + E·(BM − 1) slots, at most T·K·BM when T·K < E)."""
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K]; got shape {tuple(topk_ids.shape)}")
    ids = topk_ids.contiguous()
    num_pairs = ids.numel()
    max_slots = num_pairs + E * (block_m - 1)
    if num_pairs < E:
        max_slots = min(num_pairs * block_m, max_slots)
    max_blocks = triton.cdiv(max_slots, block_m)
    sorted_ids = torch.empty(max_slots, dtype=torch.int32, device=ids.device)
    expert_ids = torch.empty(max_blocks, dtype=torch.int32, device=ids.device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=ids.device)
    e_pad = triton.next_power_of_2(E)
    chunk = max(16, TILE // e_pad)
    _align_kernel[(1,)](
        ids, sorted_ids, expert_ids, num_post_pad, num_pairs, E, max_blocks,
        BLOCK_M=block_m, CHUNK=chunk, E_PAD=e_pad,
    )  # fmt: skip
    return Aligned(sorted_ids, expert_ids, num_post_pad)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [R, 2I] gate (columns 0..I-1) then up
    out_ptr,  # [R, I] out, dtype of x
    I,
    stride_x,
    stride_out,
    BLOCK: tl.constexpr,
):
    """Grid (R, cdiv(I, BLOCK)); program (r, j) owns out[r, j·BLOCK : (j+1)·BLOCK], computed in fp32."""
    r = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + r * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + r * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + r * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_stand_in(out: torch.Tensor, x: torch.Tensor) -> None:
    """One launch in place of vLLM's `silu_and_mul(out [R, I], x [R, 2I])`."""
    R, I = out.shape
    if tuple(x.shape) != (R, 2 * I) or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"need out [R, I] and x [R, 2I] row-major; got {tuple(out.shape)}, {tuple(x.shape)}")
    block = min(SILU_BLOCK, triton.next_power_of_2(I))
    _silu_and_mul_kernel[(R, triton.cdiv(I, block))](x, out, I, x.stride(0), out.stride(0), BLOCK=block)
