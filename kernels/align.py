"""Pair alignment: topk_ids [T, K] (−1 = pruned) → each expert's valid pairs, padded to BLOCK_M.

A *pair* is one slot (t, k) of topk_ids, named by its flat index p = t·K + k. The grouped GEMMs walk
*blocks* of BLOCK_M consecutive entries of `sorted_pair_ids`; every block belongs to one expert
(`block_expert_ids`), so one program loads one expert's weight tile once for up to BLOCK_M pairs.

Why this shape of algorithm:
- No host sync and fixed shapes, so it can be captured in a CUDA graph: every buffer is sized by an upper
  bound that depends only on T·K, E and BLOCK_M. A used block holds ≥ 1 valid pair and each expert wastes
  less than one block on padding, so used blocks ≤ min(T·K, ceil(T·K / BLOCK_M) + E) = max_blocks.
  Blocks past the used ones get expert −1 and the GEMM programs that own them return at once.
- Pruned pairs (id −1) are dropped here, before any GEMM: they occupy no slot, no block, and no expert
  whose every pair was pruned gets a block, so its weights are never read.
- Deterministic: within an expert, pairs appear in increasing p (token order), with no atomics.
- The used blocks are a prefix of the max_blocks (`num_blocks` of them). The grouped GEMMs map their
  1-D grid onto (block, N-tile) with the N-tile fastest (`block_tile`), so the programs that do work
  are a prefix of the grid too: dispatched first and spread evenly over the SMs, as vLLM's grid is.
- Split-K (decode): the grid is sized by max_blocks whatever the routing, so where pruning leaves few
  used blocks, most of it would exit. `split_factor` turns the surplus into a split of the reduction:
  S = clamp(⌊max_blocks / num_blocks⌋, 1, SPLIT), read on the device from `num_blocks`, and program slot
  m' < num_blocks·S computes block m' mod num_blocks over the S-th part ⌊m' / num_blocks⌋ of the reduction
  (`split_slot`). The grid stays what it was at capture; a different pruning only changes S.

Three launches over the pairs cut into chunks of CHUNK (NC = ceil(T·K / CHUNK) chunks; CHUNK = 128 for
E ≤ 64, smaller for larger E, see TILE):
  1. count:   per chunk c, counts[c, e] = valid pairs of expert e in chunk c           grid (NC,)
  2. scan:    counts[c, e] := Σ_{c' < c} counts[c', e] (exclusive, over chunks); per-expert totals →
              blocks per expert → first block of each expert → block_expert_ids; sentinel fill  grid (1,)
  3. scatter: pair p of expert e in chunk c goes to
              block_start[e]·BLOCK_M + counts[c, e] + (rank of p among chunk c's pairs of e)   grid (NC,)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements of the [CHUNK, next_pow2(E)] one-hot tile one count/scatter program builds (~64 per thread at
# 4 warps): CHUNK = TILE / next_pow2(E), clamped to [16, 128], so a large E gets shorter chunks instead
# of spilling registers.
TILE = 8192
# Elements of the [ROWS, next_pow2(E)] tiles the scan program walks (chunk rows, then block ids): the
# scan is one program, so it reads whole tiles of rows rather than one dependent row at a time.
SCAN_TILE = 4096
# Sentinel slots written per iteration of the scan program's fill loop.
FILL = 1024


@triton.jit
def block_tile(pid, N, BLOCK_N: tl.constexpr):
    """(aligned block, N-tile) of program pid of a grouped GEMM's grid (max_blocks·cdiv(N, BLOCK_N),):
    a block's N-tiles are consecutive programs, so the used blocks' programs are the grid's prefix."""
    tiles = tl.cdiv(N, BLOCK_N)
    return pid // tiles, pid % tiles


@triton.jit
def split_factor(num_blocks, max_blocks, SPLIT: tl.constexpr):
    """S, the split of a grouped GEMM's reduction: ⌊max_blocks / num_blocks⌋ clamped to [1, SPLIT], so that
    num_blocks·S ≤ max_blocks program slots work. Every program of the GEMM, and the combine that sums the
    parts, computes it from the same `num_blocks` (what the alignment or the routing kernel wrote), so
    they agree; SPLIT is the launch's static bound (the leading dimension of its parts, `split_bound`)."""
    return tl.maximum(tl.minimum(max_blocks // tl.maximum(num_blocks, 1), SPLIT), 1)


@triton.jit
def split_slot(slot, num_blocks, S, steps):
    """(block m, part s, first step, end step) of program slot `slot` < num_blocks·S: part s of the
    reduction's `steps` BLOCK_K-steps is [⌊s·steps / S⌋, ⌊(s+1)·steps / S⌋), so the parts differ by at
    most one step where S does not divide steps, and none is empty (S ≤ steps, `split_bound`)."""
    m = slot % num_blocks
    s = slot // num_blocks
    return m, s, s * steps // S, (s + 1) * steps // S


@triton.jit
def _count_kernel(
    topk_ids_ptr,  # [T*K] int32/int64 (flattened [T, K]), -1 = pruned
    counts_ptr,  # [NC, E] int32, out: valid pairs of expert e in chunk c
    num_pairs,  # T*K
    E,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,  # next power of two >= E
):
    """Grid (NC,); program c owns pairs [c·CHUNK, (c+1)·CHUNK) and row c of counts."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    experts = tl.arange(0, E_PAD)
    # −1 (pruned) and the masked tail match no column; an id >= E (invalid) only matches a padding column
    # >= E, which is never stored, so out-of-range ids are dropped like pruned ones instead of corrupting.
    onehot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(counts_ptr + c * E + experts, tl.sum(onehot, axis=0), mask=experts < E)


@triton.jit
def _scan_kernel(
    counts_ptr,  # [NC, E] int32, in: per-chunk counts; out: exclusive prefix over chunks, per expert
    expert_counts_ptr,  # [E] int32, out: valid pairs per expert
    block_start_ptr,  # [E] int32, out: first block of expert e (its blocks are contiguous)
    block_expert_ids_ptr,  # [max_blocks] int32, out: owning expert of each block, -1 = unused
    num_blocks_ptr,  # [1] int32, out: blocks in use
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, out: every slot set to the sentinel T*K
    num_pairs,  # T*K, also the sentinel
    E,
    NC,
    max_blocks,
    BLOCK_M: tl.constexpr,
    E_PAD: tl.constexpr,
    ROWS: tl.constexpr,  # tile rows of the scan and block-id loops, ROWS·E_PAD = SCAN_TILE
    FILL: tl.constexpr,
):
    """Grid (1,); the single program owns every expert's totals and all of block_expert_ids."""
    experts = tl.arange(0, E_PAD)
    e_mask = experts < E
    # Exclusive running sum over chunks: where chunk c's pairs of expert e start within e's segment.
    # ROWS chunk rows at a time: an inclusive cumsum down the tile, minus the row itself, plus the
    # total of all earlier tiles.
    running = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, NC, ROWS):
        offs_c = c0 + tl.arange(0, ROWS)
        tile_mask = (offs_c[:, None] < NC) & e_mask[None, :]
        ptrs = counts_ptr + offs_c[:, None] * E + experts[None, :]
        cnt = tl.load(ptrs, mask=tile_mask, other=0)
        tl.store(ptrs, tl.cumsum(cnt, axis=0) - cnt + running[None, :], mask=tile_mask)
        running += tl.sum(cnt, axis=0)
    blocks = (running + BLOCK_M - 1) // BLOCK_M  # 0 for an expert with no valid pair: no block at all
    block_end = tl.cumsum(
        blocks, axis=0
    )  # inclusive: expert e owns blocks [block_end[e] − blocks[e], block_end[e])
    total = tl.sum(blocks, axis=0)
    tl.store(expert_counts_ptr + experts, running, mask=e_mask)
    tl.store(block_start_ptr + experts, block_end - blocks, mask=e_mask)
    tl.store(num_blocks_ptr, total)
    # Block b belongs to the first expert whose blocks end after b = the number of experts ending at or
    # before b (experts with zero blocks end where their predecessor ends, so they are skipped correctly).
    for b0 in range(0, max_blocks, ROWS):
        offs_b = b0 + tl.arange(0, ROWS)
        ended = (block_end[None, :] <= offs_b[:, None]) & e_mask[None, :]
        owner = tl.sum(ended.to(tl.int32), axis=1)
        owner = tl.where(offs_b < total, owner, -1)
        tl.store(block_expert_ids_ptr + offs_b, owner, mask=offs_b < max_blocks)
    # Padding slots keep the sentinel; the scatter launch (stream-ordered after this) overwrites the rest.
    for s0 in range(0, max_blocks * BLOCK_M, FILL):
        offs_s = s0 + tl.arange(0, FILL)
        tl.store(
            sorted_pair_ids_ptr + offs_s,
            tl.full([FILL], 0, tl.int32) + num_pairs,
            mask=offs_s < max_blocks * BLOCK_M,
        )


@triton.jit
def _scatter_kernel(
    topk_ids_ptr,  # [T*K] int32/int64 (flattened [T, K]), -1 = pruned
    counts_ptr,  # [NC, E] int32: exclusive prefix over chunks (from the scan)
    block_start_ptr,  # [E] int32: first block of each expert
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, out: pair index p = t*K + k at its aligned slot
    num_pairs,  # T*K
    E,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    E_PAD: tl.constexpr,
):
    """Grid (NC,); program c owns pairs [c·CHUNK, (c+1)·CHUNK) and writes each valid one to its slot."""
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1)
    experts = tl.arange(0, E_PAD)
    e_mask = experts < E
    onehot = (ids[:, None] == experts[None, :]) & e_mask[None, :]  # [CHUNK, E_PAD], ≤ one 1 per row
    onehot_i = onehot.to(tl.int32)
    # Rank of pair i among the earlier pairs of its own expert in this chunk: a column-wise inclusive
    # prefix sum of the one-hot matrix, read at the pair's own column, minus one.
    rank = tl.sum(tl.where(onehot, tl.cumsum(onehot_i, axis=0) - 1, 0), axis=1)
    seg = tl.load(block_start_ptr + experts, mask=e_mask, other=0) * BLOCK_M
    seg += tl.load(counts_ptr + c * E + experts, mask=e_mask, other=0)
    base = tl.sum(tl.where(onehot, seg[None, :], 0), axis=1)
    valid = tl.sum(onehot_i, axis=1) > 0  # pruned (−1), out-of-range and tail pairs write nothing
    tl.store(sorted_pair_ids_ptr + base + rank, offs, mask=valid)


def split_bound(split: int, steps: int, max_blocks: int) -> int:
    """The static bound SPLIT of one grouped GEMM's split factor (host side, from shapes only): at most
    `split` (what the caller allows), `steps` (BLOCK_K-steps of its reduction: no part is empty) and
    max_blocks (S·num_blocks ≤ max_blocks with num_blocks ≥ 1). 1 = not split."""
    return max(1, min(split, steps, max_blocks))


class AlignedPairs(NamedTuple):
    """Output of `align_pairs`; all on the device of topk_ids, all of fixed shape."""

    sorted_pair_ids: torch.Tensor  # [max_blocks*BLOCK_M] int32: p = t*K + k, sentinel T*K = padding
    block_expert_ids: torch.Tensor  # [max_blocks] int32: expert of each block, -1 = unused (exit at once)
    num_blocks: torch.Tensor  # [1] int32: blocks in use (a prefix of the max_blocks)
    expert_counts: torch.Tensor  # [E] int32: valid pairs per expert
    block_m: int


def align_pairs(topk_ids: torch.Tensor, E: int, block_m: int) -> AlignedPairs:
    """Group the valid pairs of topk_ids [T, K] (−1 = pruned) by expert, each padded to block_m slots.

    Ids outside [−1, E) are dropped like pruned ones (checking them would need a host sync; the oracle
    `vllm_alloc.routing.reference.moe_forward` rejects them).
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K]; got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids dtype {topk_ids.dtype} must be torch.int32 or torch.int64")
    if E < 1:
        raise ValueError(f"E={E} must be >= 1")
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= 16")
    ids = topk_ids.contiguous()
    num_pairs = ids.numel()
    n_blocks = min(num_pairs, triton.cdiv(num_pairs, block_m) + E)  # static bound, see module docstring
    e_pad = triton.next_power_of_2(E)
    chunk = min(128, max(16, TILE // e_pad))
    rows = max(1, SCAN_TILE // e_pad)
    nc = triton.cdiv(num_pairs, chunk)
    dev = ids.device
    counts = torch.empty((nc, E), dtype=torch.int32, device=dev)
    expert_counts = torch.empty(E, dtype=torch.int32, device=dev)
    block_start = torch.empty(E, dtype=torch.int32, device=dev)
    block_expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    num_blocks = torch.empty(1, dtype=torch.int32, device=dev)
    sorted_pair_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)
    if nc > 0:
        _count_kernel[(nc,)](ids, counts, num_pairs, E, CHUNK=chunk, E_PAD=e_pad)
    _scan_kernel[(1,)](
        counts,
        expert_counts,
        block_start,
        block_expert_ids,
        num_blocks,
        sorted_pair_ids,
        num_pairs,
        E,
        nc,
        n_blocks,
        BLOCK_M=block_m,
        E_PAD=e_pad,
        ROWS=rows,
        FILL=FILL,
    )
    if nc > 0:
        _scatter_kernel[(nc,)](
            ids, counts, block_start, sorted_pair_ids, num_pairs, E, BLOCK_M=block_m, CHUNK=chunk, E_PAD=e_pad
        )
    return AlignedPairs(sorted_pair_ids, block_expert_ids, num_blocks, expert_counts, block_m)
