"""Split-K of the down GEMM at decode (kernels/align.py `split_factor` / `split_slot`, kernels/down.py,
kernels/combine.py): the device's choice of S, the parts each program slot owns, the result against the
oracle, and the same bits at every run."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from vllm_alloc.kernels import align_pairs, combine_pairs, fused_moe, grouped_down, grouped_gate_up
from vllm_alloc.kernels.align import split_bound, split_factor, split_slot
from vllm_alloc.kernels.config import SPLIT_MAX, SPLIT_TOKENS, default_split

from tests.kernels.moe_cases import DEVICE, DTYPES, SMALL_CONFIG, TOLERANCES, make_problem
from vllm_alloc.routing.reference import moe_forward

FIELDS = 6  # what the probe writes per program slot: S, works, block, part, first step, end step


@triton.jit
def _split_probe(out_ptr, num_blocks_ptr, max_blocks, steps, SPLIT: tl.constexpr):
    """Grid (max_blocks,): slot m' writes S, whether it works (m' < num_blocks·S), its block, part, steps."""
    slot = tl.program_id(0)
    used = tl.load(num_blocks_ptr)
    S = split_factor(used, max_blocks, SPLIT)
    m, s, lo, hi = split_slot(slot, tl.maximum(used, 1), S, steps)
    row = out_ptr + slot * 6
    tl.store(row, S)
    tl.store(row + 1, (slot < used * S).to(tl.int32))
    tl.store(row + 2, m)
    tl.store(row + 3, s)
    tl.store(row + 4, lo)
    tl.store(row + 5, hi)


@pytest.mark.parametrize(
    "max_blocks, used, split, steps, S",
    [
        (6, 3, 8, 11, 2),  # DeepSeek-V2-Lite at T = 1, b = 0.5: 3 of 6 blocks, I = 1408 is 11 steps of 128
        (6, 6, 8, 11, 1),  # b = 1.0: every slot holds a used block, nothing to split
        (6, 4, 8, 11, 1),  # ⌊6 / 4⌋ = 1: a split of 2 would need 8 slots
        (6, 2, 8, 16, 3),  # S = 3 does not divide 16 steps: parts of 5, 5 and 6
        (8, 2, 8, 5, 4),  # S = 4 over 5 steps: parts of 1, 1, 1 and 2
        (8, 1, 8, 6, 6),  # Qwen3-30B-A3B at T = 1, one block: S bound by I's 6 steps (no empty part)
        (48, 5, 8, 11, 8),  # ⌊48 / 5⌋ = 9: clamped to SPLIT_MAX
        (6, 3, 1, 11, 1),  # split off (T above SPLIT_TOKENS)
        (88, 65, 8, 11, 1),  # T = 64-like: the used blocks fill the grid
        (6, 0, 8, 11, None),  # every pair pruned: no block, no slot works
    ],
)
def test_split_factor_and_slots(max_blocks, used, split, steps, S):
    """S = clamp(⌊max_blocks / num_blocks⌋, 1, SPLIT) from the device's num_blocks; the working slots are
    a prefix of num_blocks·S and cover every (used block, reduction step) exactly once, in parts that
    differ by at most one step and are never empty."""
    bound = split_bound(split, steps, max_blocks)
    out = torch.full((max_blocks, FIELDS), -7, dtype=torch.int32, device=DEVICE)
    num_blocks = torch.tensor([used], dtype=torch.int32, device=DEVICE)
    _split_probe[(max_blocks,)](out, num_blocks, max_blocks, steps, SPLIT=bound)
    got_S, works, m, part, lo, hi = out.cpu().long().unbind(dim=1)
    assert (got_S == got_S[0]).all(), "every program must agree on S"
    if S is None:
        assert not works.any()
        return
    assert int(got_S[0]) == S and 1 <= S <= bound and used * S <= max_blocks
    assert bound == S or used * (S + 1) > max_blocks, "S is the largest split the grid holds"
    n = used * S
    assert works.tolist() == [1] * n + [0] * (max_blocks - n)
    # Slot m' = s·num_blocks + m: the first num_blocks slots hold part 0 of every block, and so on.
    assert torch.equal(part[:n] * used + m[:n], torch.arange(n))
    covered = sorted((int(b), k) for b, a, z in zip(m[:n], lo[:n], hi[:n], strict=True) for k in range(a, z))
    assert covered == [(b, k) for b in range(used) for k in range(steps)]
    sizes = (hi - lo)[:n]
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1


def keep_first(ids: torch.Tensor, n: int) -> torch.Tensor:
    """ids with each token's candidates past the first n pruned (a prefix, as Alloc-T keeps)."""
    ids = ids.clone()
    ids[:, n:] = -1
    return ids


CASES = [
    # T, K, E, H, I, kept per token (None: the pattern's), pattern; SMALL_CONFIG's BLOCK_K = 32
    (1, 8, 8, 40, 160, 8, "none"),  # b = 1.0: S = 1, fp32 parts all the same
    (1, 8, 8, 40, 160, 4, "none"),  # S = 2 over I's 5 steps: parts of 2 and 3
    (1, 6, 8, 40, 150, 2, "none"),  # S = 3; I = 150: the last step is a masked tail
    (1, 8, 8, 40, 160, 2, "none"),  # S = 4 over 5 steps
    (1, 8, 8, 40, 256, 1, "none"),  # S = 8 = SPLIT_MAX, one step each
    (1, 8, 8, 40, 160, 1, "none"),  # S bound by the 5 steps: no empty part
    (4, 4, 16, 40, 96, None, "random"),  # T > 1: blocks of several experts, pruned pairs between
    (2, 4, 16, 40, 96, None, "token"),  # token 1 all pruned: exact zeros; token 0's 4 blocks, S = 2
    (8, 4, 8, 32, 96, None, "all"),  # nothing kept: no block, no part written, y = 0
]


def expected_split(ids: torch.Tensor, E: int, I: int) -> tuple[int, int]:
    """(SPLIT, S) the down kernel should use for these kept ids at SMALL_CONFIG, from the host."""
    a = align_pairs(ids.to(DEVICE), E, SMALL_CONFIG["BLOCK_M"])
    max_blocks, used = a.block_expert_ids.numel(), int(a.num_blocks.item())
    bound = split_bound(SPLIT_MAX, triton.cdiv(I, SMALL_CONFIG["BLOCK_K"]), max_blocks)
    return bound, max(1, min(max_blocks // max(used, 1), bound))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, K, E, H, I, kept, pattern", CASES)
def test_split_down_matches_reference(T, K, E, H, I, kept, pattern, dtype):
    """The pieces on NaN buffers: exactly parts s < S of each kept pair are written (the others and pruned
    rows stay NaN, never read), y is the oracle's within the dtype's tolerance, `fused_moe` takes this path
    by itself at decode T, and two runs give the same bits."""
    p = make_problem(T, K, E, H, I, pattern, dtype)
    ids = p["topk_ids"] if kept is None else keep_first(p["topk_ids"], kept)
    bound, S = expected_split(ids, E, I)
    aligned = align_pairs(ids, E, SMALL_CONFIG["BLOCK_M"])
    inter = grouped_gate_up(p["x"], p["w13"], aligned, K, activation="silu", config=SMALL_CONFIG)
    parts = torch.full((bound, T * K, H), float("nan"), device=DEVICE)
    y = torch.full_like(p["x"], float("nan"))
    grouped_down(inter, p["w2"], p["topk_weights"], aligned, config=SMALL_CONFIG, split=SPLIT_MAX, out=parts)
    combine_pairs(parts, ids, E, aligned=aligned, out=y)

    valid = (ids != -1).flatten().cpu()
    written = torch.isfinite(parts).all(dim=2).cpu()  # [SPLIT, T·K]
    assert torch.equal(written, valid[None, :] & (torch.arange(bound)[:, None] < S))
    assert torch.isnan(parts.cpu()[~written]).all()
    ref = moe_forward(p["x"], p["w13"], p["w2"], p["topk_weights"], ids)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(y.float().cpu(), ref.cpu(), rtol=rtol, atol=atol)
    assert (y[(ids == -1).all(dim=1)] == 0).all(), "a token with every pair pruned gives exact zeros"

    assert default_split(T) == SPLIT_MAX
    args = (p["x"], p["w13"], p["w2"], ids, p["topk_weights"])
    first, second = (fused_moe(*args, config=SMALL_CONFIG) for _ in range(2))
    assert torch.equal(first, y), "fused_moe at decode T runs the split path"
    assert torch.equal(first, second), "the split's fixed-order sum gives the same bits at every run"


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_agrees_with_unsplit(dtype):
    """The split path against the same kernels unsplit: only the rounding differs (fp32 parts summed once
    in the combine, where the unsplit path rounds each pair's row to x's dtype first)."""
    p = make_problem(1, 8, 8, 40, 160, "none", dtype)
    args = (p["x"], p["w13"], p["w2"], keep_first(p["topk_ids"], 2), p["topk_weights"])
    split, unsplit = (fused_moe(*args, config=SMALL_CONFIG, split=s) for s in (SPLIT_MAX, 1))
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(split.float(), unsplit.float(), rtol=rtol, atol=atol)
    if dtype == torch.float32:
        assert not torch.equal(split, unsplit), "S = 4 sums another order: the paths must differ"


def test_default_split_is_decode_only():
    assert default_split(1) == default_split(SPLIT_TOKENS) == SPLIT_MAX
    assert default_split(SPLIT_TOKENS + 1) == 1
    # Above SPLIT_TOKENS fused_moe runs the unsplit kernels: the same bits as split=1.
    p = make_problem(SPLIT_TOKENS + 1, 2, 8, 32, 96, "random", torch.float32)
    args = (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])
    assert torch.equal(fused_moe(*args, config=SMALL_CONFIG), fused_moe(*args, config=SMALL_CONFIG, split=1))


def test_split_errors():
    p = make_problem(1, 2, 4, 32, 64, "none", torch.float32)
    aligned = align_pairs(p["topk_ids"], 4, 16)
    inter = grouped_gate_up(p["x"], p["w13"], aligned, 2, activation="silu", config=SMALL_CONFIG)
    with pytest.raises(ValueError, match=r"split=0 must be an int >= 1"):
        fused_moe(p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"], config=SMALL_CONFIG, split=0)
    with pytest.raises(ValueError, match=r"out must be a row-major \[2, 2, 32\] torch.float32 tensor"):
        bad = torch.empty(2, 32, device=DEVICE)
        grouped_down(inter, p["w2"], p["topk_weights"], aligned, config=SMALL_CONFIG, split=8, out=bad)
    parts = grouped_down(inter, p["w2"], p["topk_weights"], aligned, config=SMALL_CONFIG, split=8)
    with pytest.raises(ValueError, match=r"need aligned= \(for S\) and out="):
        combine_pairs(parts, p["topk_ids"], 4)
