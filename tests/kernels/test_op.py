"""The custom op (real and fake impls) and the launch-config loader."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from vllm_alloc.kernels import config as config_mod
from vllm_alloc.kernels import default_config, fused_moe, pick_config
from vllm_alloc.kernels.config import device_default, fit_shared_memory, stage_bytes

from tests.kernels.moe_cases import DEVICE, SMALL_CONFIG, make_problem

H100, SM89 = 227 * 1024, 99 * 1024  # shared memory a program may opt into (bytes)


def _args(p: dict[str, torch.Tensor]) -> tuple:
    return (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])


def test_opcheck():
    """torch.library.opcheck: schema, fake impl vs real impl, and dispatch through aot_autograd."""
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float32)
    packed = [SMALL_CONFIG[k] for k in config_mod.KEYS]
    torch.library.opcheck(torch.ops.vllm_alloc.fused_moe.default, (*_args(p), "silu", packed, []))


def test_opcheck_out():
    """The same for `vllm_alloc::fused_moe_out`, which writes y into its `out` argument."""
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float16)
    packed = [SMALL_CONFIG[k] for k in config_mod.KEYS]
    out = torch.empty_like(p["x"])
    torch.library.opcheck(torch.ops.vllm_alloc.fused_moe_out.default, (*_args(p), "silu", packed, [], out))


def test_fake_impl_shapes():
    p = make_problem(7, 3, 5, 32, 24, "random", torch.float16)
    outs = (torch.empty_like(p["x"]), torch.empty(7, 32, dtype=torch.float32, device=DEVICE))
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in _args(p)]
        y = fused_moe(*fake)
        assert y.shape == (7, 32) and y.dtype == torch.float16 and y.device == p["x"].device
        out, wrong = (mode.from_tensor(t) for t in outs)
        assert fused_moe(*fake, out=out) is out
        with pytest.raises(ValueError, match=r"out must be a row-major \(7, 32\) torch.float16"):
            fused_moe(*fake, out=wrong)


def test_compiled_graph_keeps_op_opaque():
    """torch.compile (eager backend: no codegen) traces through the op without looking inside."""
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float32)
    fn = torch.compile(lambda *a: fused_moe(*a, config=SMALL_CONFIG) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(*_args(p)), 2 * fused_moe(*_args(p), config=SMALL_CONFIG))


def test_default_config_when_no_table(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_ALLOC_KERNEL_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "CONFIG_DIR", tmp_path)
    got = pick_config(4, 8, 64, 2048, 1408, torch.bfloat16, DEVICE)
    assert got == device_default(4, torch.bfloat16, DEVICE)
    # Decode (T ≤ 32): vLLM 0.32's default, tall K tiles in a 4-stage pipeline (36 KB a stage in bf16:
    # all 4 fit every GPU the kernels serve on, H100 and H200 at 227 KB, A100 at 163 KB).
    assert default_config(4) == {
        "BLOCK_M": 16,
        "BLOCK_N": 64,
        "BLOCK_K": 128,
        "num_warps": 4,
        "num_stages": 4,
    }
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    assert default_config(4096) == big
    if DEVICE.type == "cpu":  # the interpreter has no shared-memory limit: the default as it is
        assert got == default_config(4)
        assert pick_config(4096, 8, 64, 2048, 1408, torch.float32, DEVICE) == big


@pytest.mark.parametrize(
    "T, dtype, limit, stages",
    [
        (4, torch.bfloat16, H100, 4),  # 4 × 36 KB: the whole pipeline fits
        (4, torch.float32, H100, 3),  # 4 × 72 KB > 227 KB: one stage less
        (40, torch.float32, H100, 2),  # 3 × 80 KB > 227 KB
        (4, torch.bfloat16, SM89, 2),  # 99 KB: two stages of 36 KB
        (4096, torch.float32, 64 * 1024, 1),  # not even one 96 KB stage: 1, the least there is
        (4, torch.bfloat16, None, 4),  # no limit (CPU): as it is
    ],
)
def test_default_pipeline_fits_shared_memory(T, dtype, limit, stages):
    cfg = default_config(T)
    fitted = fit_shared_memory(cfg, dtype, limit)
    assert fitted == {**cfg, "num_stages": stages}
    assert limit is None or stages == 1 or stages * stage_bytes(cfg, dtype) <= limit


def test_table_nearest_bucket(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_ALLOC_KERNEL_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "CONFIG_DIR", tmp_path)
    small = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    name = config_mod.table_name(8, 32, 16, torch.float32, config_mod.device_name(DEVICE))
    (tmp_path / name).write_text(json.dumps({"meta": {"note": "ignored"}, "1": small, "1024": big}))
    assert pick_config(3, 2, 8, 32, 16, torch.float32, DEVICE) == small
    assert pick_config(900, 2, 8, 32, 16, torch.float32, DEVICE) == big
    # Another shape or dtype has no table: the default.
    assert pick_config(3, 2, 8, 32, 16, torch.float16, DEVICE) == device_default(3, torch.float16, DEVICE)


def test_env_pin(monkeypatch):
    pinned = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1}
    monkeypatch.setenv("VLLM_ALLOC_KERNEL_CONFIG", json.dumps(pinned))
    assert pick_config(3, 2, 8, 32, 16, torch.float32, DEVICE) == pinned
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float32)
    ref = fused_moe(*_args(p), config=SMALL_CONFIG)
    torch.testing.assert_close(fused_moe(*_args(p)), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "raw, match",
    [
        ("{not json", r"VLLM_ALLOC_KERNEL_CONFIG='\{not json' is not JSON"),
        ("[16]", r"must be a JSON object"),
        ('{"BLOCK_M": 16}', r"missing keys \['BLOCK_K', 'BLOCK_N', 'num_stages', 'num_warps'\]"),
        (json.dumps({**SMALL_CONFIG, "BLOCK_M": 8}), r"BLOCK_M=8 must be a power of two >= 16"),
        (json.dumps({**SMALL_CONFIG, "num_warps": 3}), r"num_warps=3 must be one of 1, 2, 4, 8, 16"),
        (json.dumps({**SMALL_CONFIG, "num_stages": 0}), r"num_stages=0 must be >= 1"),
        (json.dumps({**SMALL_CONFIG, "BLOCK_K": "32"}), r"BLOCK_K='32' must be an integer"),
    ],
)
def test_env_pin_errors(monkeypatch, raw, match):
    monkeypatch.setenv("VLLM_ALLOC_KERNEL_CONFIG", raw)
    with pytest.raises(ValueError, match=match):
        pick_config(3, 2, 8, 32, 16, torch.float32, DEVICE)
