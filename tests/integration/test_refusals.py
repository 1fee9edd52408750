"""Start-up refusals, checked with vLLM's own config objects (not stand-ins), so a renamed or moved vLLM
field makes this fail instead of silently letting an unsupported setting through.

Some settings cannot be *constructed* on the CPU build (vLLM validates EPLB against the platform, and
turns DBO off on CPU inside `VllmConfig`), so the flag is set on the real object after construction: the
object and its attribute names are still vLLM's.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.config import LoRAConfig, ParallelConfig, VllmConfig

from vllm_alloc.integration import compat
from vllm_alloc.integration.layer import _refuse_unsupported

LAYER = "model.layers.0.mlp.experts"


def plain_method(monolithic: bool = False) -> Any:
    """An instance of vLLM's unquantized MoE method class (built without a layer: only its type and
    `is_monolithic` are read)."""
    cls = compat.unquantized_method_cls()
    method = object.__new__(type("Method", (cls,), {"is_monolithic": monolithic}))
    return method


def refusal(vllm_config: Any, method: Any = None, activation: str = "silu") -> str | None:
    moe_config = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=False))
    experts = SimpleNamespace(
        quant_method=method if method is not None else plain_method(), activation=activation
    )
    runner = SimpleNamespace(routed_input_transform=None, routed_output_transform=None)
    try:
        _refuse_unsupported(LAYER, vllm_config, moe_config, experts, runner)
    except RuntimeError as e:
        return str(e)
    return None


def with_parallel(**fields: Any) -> Any:
    config = VllmConfig()
    parallel = config.parallel_config
    for name, value in fields.items():
        assert hasattr(parallel, name), f"vLLM's ParallelConfig has no field {name!r}"
        object.__setattr__(parallel, name, value)
    return config


def test_default_config_is_served() -> None:
    assert refusal(VllmConfig()) is None


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"enable_dbo": True}, "dual-batch overlap (--enable-dbo)"),
        ({"ubatch_size": 2}, "micro-batching (--ubatch-size 2)"),
        ({"enable_eplb": True}, "expert load balancing (--enable-eplb)"),
        ({"enable_expert_parallel": True}, "expert parallelism"),
        ({"data_parallel_size": 2}, "data parallelism (--data-parallel-size 2)"),
    ],
)
def test_parallel_settings_are_refused(fields: dict[str, Any], fragment: str) -> None:
    message = refusal(with_parallel(**fields))
    assert message is not None and fragment in message and "VLLM_ALLOC_DISABLE=1" in message
    assert LAYER in message


def test_ubatching_flags_are_vllms_own() -> None:
    # The refusal reads the same fields vLLM's own `use_ubatching` does.
    assert ParallelConfig(ubatch_size=2).use_ubatching
    assert ParallelConfig(enable_dbo=True).use_ubatching


def test_lora_is_refused() -> None:
    config = VllmConfig()
    object.__setattr__(config, "lora_config", LoRAConfig())
    message = refusal(config)
    assert message is not None and "LoRA adapters (--enable-lora)" in message


def test_monolithic_backend_is_refused() -> None:
    message = refusal(VllmConfig(), plain_method(monolithic=True))
    assert message is not None and "monolithic MoE backend (start with --moe-backend triton)" in message


def on_cuda(monkeypatch: pytest.MonkeyPatch, conditional_nodes: bool = True) -> Any:
    """A VllmConfig as on CUDA with vLLM's default graph mode (FULL_AND_PIECEWISE), the platform reported
    as CUDA, and torch with or without CUDA-graph conditional nodes."""
    from vllm.config.compilation import CUDAGraphMode

    from vllm_alloc.integration import layer

    monkeypatch.setattr(compat, "is_cpu_platform", lambda: False)
    monkeypatch.setattr(layer, "conditional_nodes_available", lambda: conditional_nodes)
    config = VllmConfig()
    object.__setattr__(config.compilation_config, "cudagraph_mode", CUDAGraphMode.FULL_AND_PIECEWISE)
    assert compat.uses_cuda_graphs(config)
    return config


def test_cuda_graphs_are_served(monkeypatch: pytest.MonkeyPatch) -> None:
    assert refusal(on_cuda(monkeypatch)) is None


def test_cuda_graphs_without_conditional_nodes_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    message = refusal(on_cuda(monkeypatch, conditional_nodes=False))
    assert message is not None and "lacks CUDA-graph conditional nodes" in message
    assert "--enforce-eager" in message


def test_activation_without_a_kernel_is_refused_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    assert refusal(VllmConfig(), activation="swigluoai") is None  # CPU: vLLM's own kernel computes it
    message = refusal(on_cuda(monkeypatch), activation="swigluoai")
    assert message is not None and "MoE activation 'swigluoai'" in message and "silu, gelu" in message
    assert refusal(on_cuda(monkeypatch), activation="gelu_tanh") is None
