"""Alignment invariants: exact per-expert counts, every valid pair once, no pruned pair, right blocks."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_alloc.kernels import align_pairs
from vllm_alloc.kernels.align import block_tile

from tests.kernels.moe_cases import DEVICE, routing


@triton.jit
def _block_tile_probe(m_ptr, n_ptr, N, BLOCK_N: tl.constexpr):
    """Grid as the grouped GEMMs' (max_blocks·cdiv(N, BLOCK_N),): writes each program's (block, N-tile)."""
    pid = tl.program_id(0)
    m, n = block_tile(pid, N, BLOCK_N)
    tl.store(m_ptr + pid, m)
    tl.store(n_ptr + pid, n)


def check_alignment(ids: torch.Tensor, E: int, block_m: int) -> None:
    a = align_pairs(ids.to(DEVICE), E, block_m)
    T, K = ids.shape
    num_pairs = T * K
    flat = ids.flatten().long().cpu()
    valid = flat != -1
    counts = torch.bincount(flat[valid], minlength=E)
    blocks = [math.ceil(int(c) / block_m) for c in counts]
    max_blocks = min(num_pairs, math.ceil(num_pairs / block_m) + E)

    sorted_ids = a.sorted_pair_ids.cpu().long()
    block_expert = a.block_expert_ids.cpu().long()
    num_blocks = int(a.num_blocks.item())
    # Fixed shapes: sized by the static bound only, whatever the routing.
    assert sorted_ids.shape == (max_blocks * block_m,)
    assert block_expert.shape == (max_blocks,)
    assert torch.equal(a.expert_counts.cpu().long(), counts)
    assert num_blocks == sum(blocks)

    # Used blocks: expert by expert in order, ceil(count / BLOCK_M) blocks each, none for an unused expert.
    expected_owner = [e for e in range(E) for _ in range(blocks[e])]
    assert block_expert[:num_blocks].tolist() == expected_owner
    # Surplus blocks are flagged −1 and hold only the sentinel.
    assert (block_expert[num_blocks:] == -1).all()
    assert (sorted_ids[num_blocks * block_m :] == num_pairs).all()

    seen = []
    for b in range(num_blocks):
        slots = sorted_ids[b * block_m : (b + 1) * block_m]
        real = slots[slots != num_pairs]
        # Valid pairs first, then padding; every pair of the block routed to the block's expert.
        assert torch.equal(slots[: real.numel()], real)
        assert (flat[real] == block_expert[b]).all()
        seen += real.tolist()
    # Every valid pair exactly once (deterministic order: by expert, then pair index); pruned never.
    expected = sorted(torch.nonzero(valid).flatten().tolist(), key=lambda p: (int(flat[p]), p))
    assert seen == expected


@pytest.mark.parametrize(
    "T, K, E, pattern, block_m",
    [
        (1, 1, 1, "none", 16),  # T = 1, one expert, one pair
        (1, 8, 64, "random", 16),  # decode: T·K ≪ E, the bound is T·K, not E
        (5, 2, 8, "random", 16),  # T < BLOCK_M: mostly padding
        (9, 3, 7, "random", 16),  # prime E = 7
        (6, 4, 13, "budget", 32),  # prime E = 13, Alloc-T-like prefix pruning, BLOCK_M 32
        (6, 5, 5, "random", 16),  # K = E
        (8, 4, 8, "token", 16),  # all pairs of one token pruned
        (8, 4, 8, "all", 16),  # all pairs pruned everywhere: no used block
        (40, 4, 8, "one_expert", 16),  # all tokens to one expert: several blocks of one expert
        (33, 8, 16, "random", 16),  # T·K = 264 > CHUNK (128 for E ≤ 64): counts carried across chunks
        (200, 8, 5, "none", 64),  # 1600 pairs, 13 chunks, many blocks per expert, fill loops > 1 pass
        (40, 8, 600, "random", 16),  # E_PAD 1024: CHUNK 16 (20 chunks), ROWS 4: multi-tile scan + ids
    ],
)
def test_alignment(T, K, E, pattern, block_m):
    ids, _ = routing(T, K, E, pattern)
    check_alignment(ids, E, block_m)


def test_int64_ids_and_out_of_range_dropped():
    ids = torch.tensor([[0, 3, -1], [3, -1, 1], [-1, -1, -1], [3, 3, 0]])
    check_alignment(ids, 5, 16)
    # An id >= E is dropped like a pruned one (no host-side check in the kernel path).
    a = align_pairs(torch.tensor([[0, 9]], dtype=torch.int32, device=DEVICE), 4, 16)
    assert a.expert_counts.tolist() == [1, 0, 0, 0]
    assert a.sorted_pair_ids.tolist()[:2] == [0, 2]


@settings(max_examples=12, deadline=None)
@given(
    T=st.integers(1, 24),
    K=st.integers(1, 6),
    E=st.integers(1, 12),
    prune=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_alignment_random(T, K, E, prune, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    ids[torch.rand(T, K, generator=g) < prune] = -1
    check_alignment(ids, E, 16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(topk_ids=torch.zeros(4, dtype=torch.int32)), r"topk_ids must be \[T, K\]"),
        (dict(topk_ids=torch.zeros(2, 2)), r"dtype torch.float32 must be torch.int32 or torch.int64"),
        (dict(E=0), r"E=0 must be >= 1"),
        (dict(block_m=24), r"block_m=24 must be a power of two >= 16"),
        (dict(block_m=8), r"block_m=8 must be a power of two >= 16"),
    ],
)
def test_errors(kwargs, match):
    args = dict(topk_ids=torch.zeros(2, 2, dtype=torch.int32), E=4, block_m=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        align_pairs(args["topk_ids"], args["E"], args["block_m"])


@pytest.mark.parametrize(
    "T, K, E, pattern, seed, N, block_n",
    [
        (1, 6, 64, "budget", 2, 1408, 64),  # decode at b = 0.33: 2 of 6 blocks used, 22 N-tiles each
        (9, 3, 7, "random", 0, 40, 16),  # N not a multiple of BLOCK_N: the last tile is partial
        (8, 4, 8, "all", 0, 64, 32),  # nothing kept: every program exits
    ],
)
def test_grid_runs_used_blocks_first(T, K, E, pattern, seed, N, block_n):
    """`block_tile` (the grouped GEMMs' program → (block, N-tile)) covers every pair once, a block's
    N-tiles are consecutive programs, and so the programs of used blocks are the grid's prefix."""
    ids, _ = routing(T, K, E, pattern, seed)
    a = align_pairs(ids.to(DEVICE), E, 16)
    tiles = triton.cdiv(N, block_n)
    grid = a.block_expert_ids.numel() * tiles
    m = torch.full((grid,), -1, dtype=torch.int32, device=DEVICE)
    n = torch.full((grid,), -1, dtype=torch.int32, device=DEVICE)
    _block_tile_probe[(grid,)](m, n, N, BLOCK_N=block_n)
    m, n = m.cpu().long(), n.cpu().long()
    assert sorted((m * tiles + n).tolist()) == list(range(grid))  # every (block, tile) exactly once
    assert (n == torch.arange(grid) % tiles).all()  # the N-tile runs fastest
    works = a.block_expert_ids.cpu()[m] != -1
    used = int(a.num_blocks.item()) * tiles
    assert works[:used].all() and not works[used:].any()
