"""benchmarks/vllm_ref.py on CPU (Triton interpreter): vLLM 0.32's own `fused_moe_kernel`, extracted from
the installed vllm's source and launched by our code with our stand-ins, against the fp32 oracle.

fp32 and fp16 only: the interpreter computes bf16 wrongly without an error. Small tiles (an explicit
config) keep it fast; the GPU benchmark runs vLLM's configs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from copy_vllm_ref import copy_vllm_ref
from vllm_ref import (
    VllmRef,
    default_config,
    extract_kernels,
    load_vllm_ref,
    stock_config,
    uses_naive_assignment,
    vllm_stock_moe,
)
from vllm_stand_ins import align_stand_in

from vllm_alloc.routing.reference import moe_forward

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed: the test extracts the kernel from the installed vllm's fused_moe.py",
)

E, K, H, I = 8, 2, 32, 32
SMALL = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1, "num_warps": 4}
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-2)}  # (rtol, atol), outputs O(1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> VllmRef:
    tmp = tmp_path_factory.mktemp("vllm-ref")
    return load_vllm_ref(copy_vllm_ref(tmp / "copy"), cache_dir=tmp / "cache")


@needs_vllm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "T",
    [
        1,  # T·K·4 ≤ E: vLLM's naive path, one block per pair, no align
        5,  # the align path; T < BLOCK_M, so EM is clamped to T·K·BLOCK_M
        23,  # T > BLOCK_M: EM is the whole sorted_ids, experts span several blocks
    ],
)
def test_stock_moe_matches_oracle(ref: VllmRef, dtype: torch.dtype, T: int) -> None:
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, H, I, generator=g) * I**-0.5).to(dtype)
    weights, ids = torch.randn(T, E, generator=g).softmax(dim=-1).topk(K, dim=-1)
    assert uses_naive_assignment(T, K, E) == (T == 1)
    y = vllm_stock_moe(x, w13, w2, weights, ids.int(), ref=ref, config=SMALL)
    assert y.dtype == dtype and y.shape == (T, H)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(y.float(), moe_forward(x, w13, w2, weights, ids), rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("T", "k", "e", "block_m"),
    [
        (4, 3, 5, 16),  # vLLM's docstring example (ids below): one block per expert, expert 0 empty
        (9, 4, 7, 16),  # prime E, T·K > BLOCK_M: experts with several blocks
        (16, 4, 512, 16),  # E > T·K, and chunks of 16 pairs: the scatter walks 4 chunks
        (3, 2, 4, 32),  # every pair of all tokens on few experts, BLOCK_M 32
    ],
)
def test_align_stand_in_has_vllm_layout(T: int, k: int, e: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(T * e)
    if (T, k, e) == (4, 3, 5):
        ids = torch.tensor([[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]], dtype=torch.int32)
    else:
        ids = torch.rand(T, e, generator=g).topk(k, dim=-1).indices.int()
    out = align_stand_in(ids, e, block_m)
    flat = ids.flatten().tolist()
    counts = torch.bincount(ids.flatten().long(), minlength=e)
    blocks = ((counts + block_m - 1) // block_m).tolist()
    assert out.num_post_pad.item() == sum(blocks) * block_m
    slots = T * k + e * (block_m - 1)  # vLLM's buffer size, capped when fewer pairs than experts
    assert out.sorted_ids.numel() == (min(slots, T * k * block_m) if T * k < e else slots)
    used = out.sorted_ids[: sum(blocks) * block_m].view(-1, block_m)
    expected_owner = [x for x, n in enumerate(blocks) for _ in range(n)]
    assert out.expert_ids[: len(expected_owner)].tolist() == expected_owner
    assert (out.expert_ids[len(expected_owner) :] == -1).all()
    for block, owner in zip(used.tolist(), expected_owner, strict=True):
        pairs = [p for p in block if p != T * k]  # T·K is vLLM's padding value
        assert all(flat[p] == owner for p in pairs)
        assert block == pairs + [T * k] * (block_m - len(pairs))  # pairs first, then padding
    real = sorted(p for p in used.flatten().tolist() if p != T * k)
    assert real == list(range(T * k))  # every pair exactly once


def test_default_config_restates_vllm_small_m() -> None:
    # vLLM 0.32's get_default_config for bf16 at decode sizes (checked once against vLLM itself).
    small = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 1}
    assert default_config(1, 64) == {**small, "num_warps": 4, "num_stages": 4}
    assert default_config(64, 128) == {**small, "BLOCK_SIZE_M": 32, "num_warps": 4, "num_stages": 3}
    assert default_config(40_000, 64)["GROUP_SIZE_M"] == 16  # > 128 tokens per expert


# Every boundary of vLLM 0.32's default table (M ≤ 32, 64, 96, 128, 512) and one past it.
BOUNDARY_T = [1, 2, 16, 32, 33, 64, 65, 96, 97, 128, 129, 512, 513, 4096]


@pytest.mark.parametrize("T", BOUNDARY_T)
def test_kernel_default_is_vllms_default(T: int) -> None:
    """`vllm_alloc.kernels.default_config` is vLLM 0.32's default (as restated here), GROUP_SIZE_M aside
    (the kernels have no grouping)."""
    from vllm_alloc.kernels import default_config as kernel_default

    vllm = default_config(T, 64)
    want = {
        "BLOCK_M": vllm["BLOCK_SIZE_M"],
        "BLOCK_N": vllm["BLOCK_SIZE_N"],
        "BLOCK_K": vllm["BLOCK_SIZE_K"],
        "num_warps": vllm["num_warps"],
        "num_stages": vllm["num_stages"],
    }
    assert kernel_default(T) == want


@needs_vllm
def test_tuned_table_wins_where_vllm_has_one(ref: VllmRef) -> None:
    # Qwen3-30B-A3B (E=128, I=768) has an H200 table in vLLM 0.32; any H200 variant reads it.
    cfg, source = stock_config(ref, 1, 128, 768, torch.bfloat16, "NVIDIA H200 NVL")
    assert source == "tuned" and cfg["BLOCK_SIZE_K"] == 64 and cfg["num_stages"] == 5
    cfg, source = stock_config(ref, 1, 64, 1408, torch.bfloat16, "NVIDIA H100 80GB HBM3")
    assert (cfg, source) == (default_config(1, 64), "default")


def test_extraction_names_the_missing_function(tmp_path: Path) -> None:
    source = tmp_path / "fused_moe.py"
    source.write_text("import triton\n\n\n@triton.jit\ndef write_zeros_to_output(c_ptr):\n    pass\n")
    with pytest.raises(ValueError, match="no top-level function 'fused_moe_kernel'"):
        extract_kernels(source)
    with pytest.raises(FileNotFoundError, match=r"copy_vllm_ref\.py"):
        load_vllm_ref(tmp_path / "nowhere")


def test_extraction_rejects_a_kernel_that_needs_more_than_tl(tmp_path: Path) -> None:
    source = tmp_path / "fused_moe.py"
    body = "@triton.jit\ndef {name}(c_ptr):\n    tl.store(c_ptr, {value})\n\n\n"
    source.write_text(
        "import triton\nSCALE = 2\n\n\n"
        + body.format(name="write_zeros_to_output", value=0)
        + body.format(name="fused_moe_kernel", value="SCALE")
    )
    with pytest.raises(ValueError, match=r"'fused_moe_kernel' needs module-level names \['SCALE'\]"):
        extract_kernels(source)


@needs_vllm
def test_bench_graph_vllm_layers_match_the_oracle_layer_by_layer(ref: VllmRef) -> None:
    """What bench_graph's `vLLM stock` row replays, run eagerly: LAYERS layers on the residual stream."""
    import bench_graph

    T, L = 5, bench_graph.LAYERS
    g = torch.Generator().manual_seed(1)
    weights, ids = torch.randn(L, T, E, generator=g).softmax(dim=-1).topk(K, dim=-1)
    empty = torch.zeros(0)
    p = bench_graph.Pass(torch.randn(T, H, generator=g), weights, ids.int(), empty, empty, empty, empty)
    layers = [(torch.randn(E, 2 * I, H, generator=g) * H**-0.5, torch.randn(E, H, I, generator=g) * I**-0.5)]
    layers *= L  # the same weights in every layer: enough to check the residual wiring
    y = bench_graph.vllm_layers(p, layers, ref, SMALL)
    want = p.x
    for layer, (w13, w2) in enumerate(layers):
        want = want + moe_forward(want, w13, w2, weights[layer], ids[layer])
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    shape = bench_graph.LayerShape("tiny", E=E, K=K, H=H, I=I)
    assert bench_graph.row(shape, T, "g", 16.0, 8.0, None).endswith("| 2.0 | 2.00 | — |")
    assert bench_graph.row(shape, T, "g", 16.0, 8.0, 32.0).endswith("| 2.0 | 2.00 | 0.50 |")
