"""fused_moe and its pieces against the oracle vllm_alloc.routing.reference.moe_forward."""

from __future__ import annotations

import pytest
import torch
from vllm_alloc.kernels import align_pairs, combine_pairs, fused_moe, grouped_down, grouped_gate_up

from tests.kernels.moe_cases import DEVICE, DTYPES, ON_CUDA, SMALL_CONFIG, TOLERANCES, make_problem
from vllm_alloc.routing.reference import moe_forward

SHAPES = [
    # T, K, E, H, I, pruning pattern
    (1, 2, 4, 32, 32, "none"),  # T = 1 (decode), nothing pruned
    (1, 4, 8, 32, 32, "random"),  # T = 1 with pruned pairs
    (5, 2, 8, 32, 32, "random"),  # T < BLOCK_M: mostly padding
    (9, 3, 7, 32, 32, "random"),  # prime E = 7
    (6, 3, 13, 32, 32, "budget"),  # prime E = 13, per-token prefix pruning as Alloc-T makes it
    (6, 4, 4, 32, 32, "random"),  # K = E
    (8, 4, 8, 32, 32, "token"),  # all pairs of one token pruned: that row is exactly zero
    (8, 4, 8, 32, 32, "all"),  # all pairs pruned everywhere: output zeros, no GEMM block runs
    (20, 2, 8, 32, 32, "one_expert"),  # all tokens to one expert: 20 pairs span 2 blocks of it
    (7, 2, 4, 40, 24, "random"),  # H, I not multiples of BLOCK_N / BLOCK_K: masked tails
    (33, 4, 16, 64, 64, "random"),  # T·K = 132 > CHUNK: alignment across chunks; the largest case
]


def _check(y: torch.Tensor, p: dict[str, torch.Tensor], activation: str = "silu") -> None:
    ref = moe_forward(p["x"], p["w13"], p["w2"], p["topk_weights"], p["topk_ids"], activation=activation)
    assert y.dtype == p["x"].dtype and y.shape == p["x"].shape
    assert torch.isfinite(y).all(), "unwritten or NaN output"
    rtol, atol = TOLERANCES[y.dtype]
    torch.testing.assert_close(y.float().cpu(), ref.cpu(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, K, E, H, I, pattern", SHAPES)
def test_fused_moe_matches_reference(T, K, E, H, I, pattern, dtype):
    p = make_problem(T, K, E, H, I, pattern, dtype)
    y = fused_moe(p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"], config=SMALL_CONFIG)
    _check(y, p)
    pruned_tokens = (p["topk_ids"] == -1).all(dim=1)
    assert (y[pruned_tokens] == 0).all(), "a token with every pair pruned must give exact zeros"


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activations(activation):
    p = make_problem(9, 3, 7, 32, 32, "random", torch.float32)
    args = (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])
    y = fused_moe(*args, activation=activation, config=SMALL_CONFIG)
    _check(y, p, activation)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "T",
    [
        5,  # decode row of the default: 16×64×128, 4 stages; BLOCK_K > H = 64, one masked K step
        40,  # BLOCK_M 32: the padding per expert doubles
        100,  # BLOCK_M 64, BLOCK_N 128 > I: one masked N tile
        600,  # BLOCK_M 128, 8 warps: experts hold several blocks
    ],
)
def test_default_config_and_int64_ids(T, dtype, monkeypatch):
    # config=None and no pin: the default (no table matches these shapes), one case per row of it.
    monkeypatch.delenv("VLLM_ALLOC_KERNEL_CONFIG", raising=False)
    p = make_problem(T, 3, 8, 64, 48, "random", dtype)
    y = fused_moe(p["x"], p["w13"], p["w2"], p["topk_ids"].long(), p["topk_weights"])
    _check(y, p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_never_touch_pruned_rows(dtype):
    """Every buffer handed to a kernel starts as NaN: what the kernels must write is finite and right,
    and the rows of pruned pairs stay NaN (never written) without reaching y (never read)."""
    T, K, E, H, I = 12, 4, 8, 40, 24
    p = make_problem(T, K, E, H, I, "token", dtype)
    p["topk_ids"][3, 1:] = -1  # and some random extra pruning on top of the all-pruned token 1
    aligned = align_pairs(p["topk_ids"], E, SMALL_CONFIG["BLOCK_M"])
    nan = float("nan")
    inter = torch.full((T * K, I), nan, dtype=dtype, device=DEVICE)
    pair_out = torch.full((T * K, H), nan, dtype=dtype, device=DEVICE)
    y = torch.full((T, H), nan, dtype=dtype, device=DEVICE)
    grouped_gate_up(p["x"], p["w13"], aligned, K, activation="silu", config=SMALL_CONFIG, out=inter)
    grouped_down(inter, p["w2"], p["topk_weights"], aligned, config=SMALL_CONFIG, out=pair_out)
    combine_pairs(pair_out, p["topk_ids"], E, out=y)
    valid = (p["topk_ids"] != -1).flatten()
    assert torch.isfinite(inter[valid]).all() and torch.isfinite(pair_out[valid]).all()
    assert torch.isnan(inter[~valid]).all() and torch.isnan(pair_out[~valid]).all()
    _check(y, p)


@pytest.mark.skipif(not ON_CUDA, reason="default-config timings shapes only matter on CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_config_larger_shapes_cuda(dtype):
    # Shapes where the tuned/default tiles (T = 300: BLOCK_M 64, BLOCK_N 128, 8 warps) run in serving.
    p = make_problem(300, 8, 64, 256, 192, "budget", dtype)
    y = fused_moe(p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])
    _check(y, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, K, E, H, I, pattern", [SHAPES[2], SHAPES[6], SHAPES[7]])
def test_out_is_written_in_place(T, K, E, H, I, pattern, dtype):
    """fused_moe(out=...) writes y into out (the layer's output, no copy) and returns it: every row,
    all-pruned tokens included, the same bits as a new y."""
    p = make_problem(T, K, E, H, I, pattern, dtype)
    args = (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])
    out = torch.full_like(p["x"], float("nan"))
    y = fused_moe(*args, config=SMALL_CONFIG, out=out)
    assert y is out
    assert torch.equal(out, fused_moe(*args, config=SMALL_CONFIG))
    _check(out, p)


def test_out_is_checked():
    p = make_problem(3, 2, 4, 32, 32, "none", torch.float32)
    args = (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])
    for bad in (torch.empty(3, 16), torch.empty(3, 32, dtype=torch.float16), torch.empty(32, 3).t()):
        with pytest.raises(ValueError, match=r"out must be a row-major \(3, 32\) torch.float32 tensor"):
            fused_moe(*args, config=SMALL_CONFIG, out=bad.to(DEVICE))
    # K = 0 (nothing routed): out is zeroed, not left as it was.
    out = torch.full((3, 32), float("nan"), device=DEVICE)
    assert (
        fused_moe(p["x"], p["w13"], p["w2"], p["topk_ids"][:, :0], p["topk_weights"][:, :0], out=out) is out
    )
    assert (out == 0).all()


def test_empty_batch():
    p = make_problem(1, 2, 4, 32, 32, "none", torch.float32)
    y = fused_moe(p["x"][:0], p["w13"], p["w2"], p["topk_ids"][:0], p["topk_weights"][:0])
    assert y.shape == (0, 32)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 3, 32)), r"x must be \[T, H\]"),
        (dict(w2=torch.randn(4, 32, 16)), r"w2 must be \[E, H, I\] = \(4, 32, 32\)"),
        (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int32)), r"topk_ids must be \[T, K\] with T=1"),
        (dict(topk_ids=torch.zeros(1, 2)), r"topk_ids dtype torch.float32"),
        (dict(topk_weights=torch.rand(1, 3)), r"topk_weights shape \(1, 3\) must equal"),
        (dict(x=torch.randn(1, 32, dtype=torch.float64)), r"x dtype torch.float64 is not supported"),
        (dict(activation="relu"), r"activation='relu' is not supported"),
        (dict(config={"BLOCK_M": 16}), r"must have exactly the keys"),
        (dict(config={**SMALL_CONFIG, "BLOCK_N": 48}), r"BLOCK_N=48 must be a power of two >= 16"),
    ],
)
def test_errors(change, match):
    p = make_problem(1, 2, 4, 32, 32, "none", torch.float32)
    args = {**p, **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()}}
    opts = {k: args.pop(k) for k in ("activation", "config") if k in args}
    with pytest.raises(ValueError, match=match):
        fused_moe(args["x"], args["w13"], args["w2"], args["topk_ids"], args["topk_weights"], **opts)
