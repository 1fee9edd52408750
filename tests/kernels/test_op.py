"""The custom op (real and fake impls) and the launch-config loader."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from vllm_alloc.kernels import config as config_mod
from vllm_alloc.kernels import default_config, fused_moe, pick_config

from tests.kernels.moe_cases import DEVICE, SMALL_CONFIG, make_problem


def _args(p: dict[str, torch.Tensor]) -> tuple:
    return (p["x"], p["w13"], p["w2"], p["topk_ids"], p["topk_weights"])


def test_opcheck():
    """torch.library.opcheck: schema, fake impl vs real impl, and dispatch through aot_autograd."""
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float32)
    packed = [SMALL_CONFIG[k] for k in config_mod.KEYS]
    torch.library.opcheck(torch.ops.vllm_alloc.fused_moe.default, (*_args(p), "silu", packed, []))


def test_fake_impl_shapes():
    p = make_problem(7, 3, 5, 32, 24, "random", torch.float16)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in _args(p)]
        y = fused_moe(*fake)
        assert y.shape == (7, 32) and y.dtype == torch.float16 and y.device == p["x"].device


def test_compiled_graph_keeps_op_opaque():
    """torch.compile (eager backend: no codegen) traces through the op without looking inside."""
    p = make_problem(5, 2, 4, 32, 32, "random", torch.float32)
    fn = torch.compile(lambda *a: fused_moe(*a, config=SMALL_CONFIG) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(*_args(p)), 2 * fused_moe(*_args(p), config=SMALL_CONFIG))


def test_default_config_when_no_table(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_ALLOC_KERNEL_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "CONFIG_DIR", tmp_path)
    got = pick_config(4, 8, 64, 2048, 1408, torch.bfloat16, DEVICE)
    assert got == default_config(4, 8, 64)
    assert got["BLOCK_M"] == 16  # decode: T ≤ E
    assert pick_config(4096, 8, 64, 2048, 1408, torch.bfloat16, DEVICE)["BLOCK_M"] == 64


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
    assert pick_config(3, 2, 8, 32, 16, torch.float16, DEVICE) == default_config(3, 2, 8)


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
