"""Every private vLLM import of the plugin, pinned to vLLM 0.32.

A vLLM upgrade should touch this file (and at most the rest of `integration/`). Everything here is
imported lazily by `install()`, never by `import vllm_alloc`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

SUPPORTED_VLLM = "0.32"


def vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_version() -> None:
    version = vllm_version()
    if not version.startswith(SUPPORTED_VLLM + "."):
        raise RuntimeError(
            f"vllm-alloc supports vLLM {SUPPORTED_VLLM}.x, but vLLM {version} is installed. "
            f"Install a matching build (`pip install 'vllm-alloc[cuda]'` or `[cpu]`), "
            "or set VLLM_ALLOC_DISABLE=1 to run vLLM without the plugin."
        )


# -- the MoE layer ---------------------------------------------------------------------------------
def moe_runner_cls() -> type:
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    return MoERunner


def shared_experts_no_overlap() -> Any:
    """`SharedExpertsOrder.NO_OVERLAP`: shared experts run before the routed ones, on the same stream."""
    from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

    return SharedExpertsOrder.NO_OVERLAP


PLAIN_WEIGHTS = "_vllm_alloc_plain_weights"


def keep_plain_expert_weights() -> None:
    """Test setting VLLM_ALLOC_TEST_DEVICE_PATH on CPU: vLLM's CPU experts prepack w13/w2 in place into
    their grouped-GEMM layout (same shapes, other element order), which the Triton kernel cannot read. Keep
    a copy of each layer's weights in vLLM's plain Triton layout, as they are before the prepack."""
    method_cls: Any = unquantized_method_cls()
    original = method_cls._setup_kernel
    if getattr(original, PLAIN_WEIGHTS, False):
        return

    def _setup_kernel(self: Any, layer: Any, w13: torch.Tensor, w2: torch.Tensor) -> None:
        setattr(layer, PLAIN_WEIGHTS, (w13.detach().clone(), w2.detach().clone()))
        original(self, layer, w13, w2)

    setattr(_setup_kernel, PLAIN_WEIGHTS, True)
    method_cls._setup_kernel = _setup_kernel


def unquantized_method_cls() -> type:
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

    return UnquantizedFusedMoEMethod


def cpu_expert_kernel(routed_experts: Any) -> Callable[..., torch.Tensor] | None:
    """vLLM's CPU expert kernel bound to one layer's weights, `f(x, topk_weights, topk_ids) -> out`.

    It makes the call `forward_modular` ends in (`cpu_fused_moe`, same arguments, so the same bits),
    without the ~0.2 ms of modular-kernel Python around it per call that the stock path does not pay
    (Dynamo traces that Python away in the stock model). Returns None unless the layer is the plain
    case this reproduces exactly: unquantized CPU experts (not zentorch), no DP/EP prepare-finalize,
    no expert map, router weights applied on the output, no LoRA.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUUnquantizedExperts,
        cpu_fused_moe,
    )
    from vllm.model_executor.layers.fused_moe.modular_kernel import FusedMoEKernelModularImpl
    from vllm.model_executor.layers.fused_moe.prepare_finalize.no_dp_ep import (
        MoEPrepareAndFinalizeNoDPEPModular,
    )
    from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP

    impl = getattr(getattr(routed_experts.quant_method, "moe_kernel", None), "impl", None)
    if (
        type(impl) is not FusedMoEKernelModularImpl
        or type(impl.prepare_finalize) is not MoEPrepareAndFinalizeNoDPEPModular
        or impl.prepare_finalize.supports_async()
    ):
        return None
    experts = impl.fused_experts
    if (
        not isinstance(experts, CPUUnquantizedExperts)
        or type(experts).apply is not CPUUnquantizedExperts.apply
        or getattr(experts, "_use_zentorch", True)
        or getattr(experts, "_lora_context", None) is not None
        or getattr(experts.quant_config, "quant_dtype", None) is not None
        or not isinstance(experts.finalize_weight_and_reduce_impl(), TopKWeightAndReduceNoOP)
        or routed_experts.expert_map is not None
        or routed_experts.apply_router_weight_on_input
    ):
        return None
    layer = routed_experts

    def run(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        if x.shape[0]:
            cpu_fused_moe(
                out,
                x,
                layer.w13_weight,
                layer.w2_weight,
                experts.w1_bias,
                experts.w2_bias,
                topk_weights,
                topk_ids,
                layer.activation.value,
                experts.isa,
                False,
            )
        return out

    return run


def register_oot_layer(base: type, replacement: type) -> None:
    """`PluggableLayer.register_oot`, guarded: vLLM asserts on a duplicate name."""
    from vllm.model_executor.custom_op import op_registry_oot

    if base.__name__ not in op_registry_oot:
        base.register_oot(replacement)  # type: ignore[attr-defined]


def current_vllm_config() -> Any:
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config()


def extract_layer_index(layer_name: str) -> int:
    from vllm.model_executor.models.utils import extract_layer_index as _extract

    return int(_extract(layer_name))


def tp_rank() -> int:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, RuntimeError):  # process group not initialised (single-process tests)
        return 0


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def uses_cuda_graphs(vllm_config: Any) -> bool:
    from vllm.config.compilation import CUDAGraphMode

    mode = vllm_config.compilation_config.cudagraph_mode
    return mode is not None and mode != CUDAGraphMode.NONE


def logger(name: str) -> Any:
    from vllm.logger import init_logger

    return init_logger(name)


# -- the model runners ------------------------------------------------------------------------------
def v1_runner_cls() -> type:
    """The V1 runner (`GPUModelRunner`; the CPU runner subclasses it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    return GPUModelRunner


def cpu_runner_cls() -> type | None:
    """The CPU build's V1 runner; it overrides `load_model` without calling the base class."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except Exception:  # absent from CUDA builds
        return None
    return CPUModelRunner


def v2_runner_cls() -> type | None:
    """The V2 runner used on CUDA when Triton is present; None where it cannot be imported."""
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    except Exception:  # the V2 runner imports CUDA-only pieces; absent on some builds
        return None
    return GPUModelRunner


def v1_batch(runner: Any) -> tuple[list[str], Any, Any]:
    """(request ids in batch order, query_start_loc as numpy [num_reqs + 1], the position of each
    request's first scheduled token, numpy [num_reqs]) of the V1 runner's batch."""
    num_reqs = runner.input_batch.num_reqs
    return (
        list(runner.input_batch.req_ids[:num_reqs]),
        runner.query_start_loc.np[: num_reqs + 1],
        runner.input_batch.num_computed_tokens_cpu[:num_reqs],
    )


def v1_request_extra_args(runner: Any, req_id: str) -> dict[str, Any] | None:
    state = runner.requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None)


def v2_batch(input_batch: Any) -> tuple[list[str], Any, Any]:
    """(request ids, query_start_loc numpy, the position of each request's first scheduled token) of a
    V2 `InputBatch`."""
    num_reqs = input_batch.num_reqs
    return (
        list(input_batch.req_ids[:num_reqs]),
        input_batch.query_start_loc_np[: num_reqs + 1],
        input_batch.num_computed_tokens_np[:num_reqs],
    )


def v1_discarded_cpu_generators(runner: Any) -> dict[int, torch.Generator]:
    """Per-request seeded generators (batch row -> generator) on the CPU whose sample this step is
    discarded: requests whose prefill is split and not yet complete (`discard_request_mask`, set in
    `_prepare_inputs` before sampling).

    vLLM samples a token for them anyway and rewinds the generator in `_bookkeeping_sync` with
    `set_offset(get_offset() - 4)`, which exists only for Philox (CUDA) generators: a CPU generator raises
    "CPU Generator does not use offset" there and the engine dies (vLLM CPU 0.32, with or without the
    plugin).
    """
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    discard = runner.discard_request_mask.np[:num_reqs]
    return {
        i: g
        for i, g in batch.generators.items()
        if i < num_reqs and bool(discard[i]) and g.device.type == "cpu"
    }


def v1_generators(runner: Any) -> dict[int, torch.Generator]:
    """The V1 runner's per-request seeded generators, by batch row (mutable: vLLM's own dict)."""
    generators: dict[int, torch.Generator] = runner.input_batch.generators
    return generators


# -- requests -----------------------------------------------------------------------------------------
def sampling_params_cls() -> type:
    from vllm.sampling_params import SamplingParams

    return SamplingParams


def input_processor_cls() -> type:
    """The front-end class that turns a prompt and its SamplingParams into an `EngineCoreRequest`
    (`process_inputs`, in the process a request enters: offline `LLM` or the API server)."""
    from vllm.v1.engine.input_processor import InputProcessor

    return InputProcessor


def validation_error(message: str, parameter: str) -> Exception:
    """vLLM's request-validation error: the OpenAI server answers it with HTTP 400."""
    from vllm.exceptions import VLLMValidationError

    return VLLMValidationError(message, parameter=parameter)


def worker_base_cls() -> type:
    """Base class of every worker: `LLM.collective_rpc("name")` finds methods added here."""
    from vllm.v1.worker.worker_base import WorkerBase

    return WorkerBase
