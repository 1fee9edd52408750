"""The budget-aware MoE layer: vLLM's `MoERunner` with routing and expert compute under budgets.

`BudgetMoERunner` replaces every `MoERunner` that `FusedMoEFactory` builds (PluggableLayer OOT swap).
It keeps the stock router and runs it unchanged; only the call that computes routed experts goes
through `moe_apply` below, which:
  * in a pass where every token is at b = 1.0, calls the stock expert kernel with the stock routing
    (outputs bit-identical to vLLM without the plugin);
  * otherwise ranks each token's K candidates by the stock router's own selection score, runs Alloc-T
    (`alloc_t.reallocate`) with the per-token K_l(B_t) of this layer, counts activations, and computes
    only the kept (token, expert) pairs.

The budget path has two siblings: `integration.cpu` (Alloc-T on the host, kept pairs compacted through
vLLM's CPU kernel) and `integration.cuda` (Alloc-T on the device, vLLM-alloc's Triton kernel). Under
CUDA-graph capture the host cannot know the pass, so both the stock call and the budget path are recorded
behind conditional nodes on a device flag (`cuda.captured_experts`).

On CPU, `moe_apply` is an opaque custom op: Dynamo traces the model's MoE code on CPU, and the branch
and the data-dependent compute must run eagerly, every step. On CUDA the whole MoE layer already runs
inside vLLM's opaque `moe_forward` op.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_alloc import envs
from vllm_alloc.integration import compat, cpu, cuda
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.plan import LayerInfo
from vllm_alloc.integration.state import STATE
from vllm_alloc.routing.device_budget import conditional_nodes_available

_RUNNERS: dict[str, Any] = {}  # layer name -> BudgetMoERunner, for the custom op's lookup


def rank_keys(
    router: Any, router_logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The stock router's ranking score of each token's K selected experts ([T, K] float32).

    Without a score-correction bias the returned weights are a monotone function of the score the
    router selected by (softmax, renormalised softmax, sigmoid, grouped top-k scores, routed scaling),
    so they rank exactly as the router did. With a bias (DeepSeek-V3 "noaux_tc") the router selects
    by score + bias but returns the unbiased score, so the key is rebuilt from the logits.
    """
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is None:
        return topk_weights.float()
    ids = topk_ids.long().clamp_min(0)
    return _scores(router, router_logits).gather(1, ids) + bias.float()[ids]


def raw_weights(router: Any, router_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """Router probabilities of the selected experts, not renormalised (weights mode `raw`)."""
    ids = topk_ids.long().clamp_min(0)
    scale = float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)
    return _scores(router, router_logits).gather(1, ids) * scale


def _scores(router: Any, router_logits: torch.Tensor) -> torch.Tensor:
    scoring = getattr(router, "scoring_func", "softmax")
    logits = router_logits.float()
    if scoring == "softmax":
        return logits.softmax(dim=-1)
    if scoring == "sigmoid":
        return logits.sigmoid()
    if scoring == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    raise RuntimeError(f"vllm-alloc: routing score function {scoring!r} is not supported")


# Registered through torch.library.Library rather than @torch.library.custom_op: the latter's Python
# wrappers cost ~12 µs per call more (16 µs against 4 µs here), paid by every MoE layer of every step.
_LIB = torch.library.Library("vllm_alloc", "FRAGMENT")
_LIB.define(
    "moe_apply(Tensor x, Tensor router_logits, Tensor topk_weights, Tensor topk_ids, "
    "Tensor? shared_experts_input, str layer_name) -> Tensor"
)


def moe_apply(
    x: torch.Tensor,  # [T, H] hidden states entering the routed experts
    router_logits: torch.Tensor,  # [T, E]
    topk_weights: torch.Tensor,  # [T, K] stock routing weights
    topk_ids: torch.Tensor,  # [T, K] stock routing ids
    shared_experts_input: torch.Tensor | None,
    layer_name: str,
) -> torch.Tensor:
    runner = _RUNNERS[layer_name]
    if STATE.recording and STATE.counting:  # calibration of the carried balance (eager only)
        STATE.record(
            runner._alloc_info.column, rank_keys(runner.router, router_logits, topk_weights, topk_ids)
        )
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return cuda.captured_experts(runner, x, router_logits, topk_weights, topk_ids, shared_experts_input)
    if not STATE.budgeted:  # every token of the pass at b = 1.0 (eager): vLLM's own expert call
        return runner.stock_experts(x, topk_weights, topk_ids, shared_experts_input)
    return _budget_path(runner, x, router_logits, topk_weights, topk_ids)


def _budget_path(
    runner: Any,
    x: torch.Tensor,
    router_logits: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """A layer call in a pass with pruned pairs (eager): ranking keys, then the device's sibling module."""
    keys, weights_in, topk_ids = runner.budget_inputs(router_logits, topk_weights, topk_ids)
    if runner._alloc_device_path:
        return cuda.budget_experts(
            runner, x, keys, weights_in, topk_ids, singleton_groups=STATE.singleton_groups
        )
    return cpu.budget_experts(runner, x, keys, weights_in, topk_ids)


def _moe_apply_fake(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_experts_input: torch.Tensor | None,
    layer_name: str,
) -> torch.Tensor:
    return torch.empty_like(x)


for _key in ("CPU", "CUDA"):
    _LIB.impl("moe_apply", moe_apply, _key)
torch.library.register_fake("vllm_alloc::moe_apply", _moe_apply_fake, lib=_LIB)


def make_runner_cls() -> type:
    """Build `BudgetMoERunner` on top of the installed vLLM's `MoERunner` (imported lazily)."""
    MoERunner = compat.moe_runner_cls()

    class BudgetMoERunner(MoERunner):  # type: ignore[misc, valid-type]
        """MoERunner whose routed experts honour activation budgets (see module docstring)."""

        def __init__(
            self,
            layer_name: str,
            moe_config: Any,
            router: Any,
            routed_experts: Any,
            *args: Any,
            **kwargs: Any,
        ) -> None:
            super().__init__(layer_name, moe_config, router, routed_experts, *args, **kwargs)
            vllm_config = compat.current_vllm_config()
            config = PluginConfig.from_additional_config(vllm_config.additional_config)
            _refuse_unsupported(layer_name, vllm_config, moe_config, routed_experts, self)
            if config.weights == "raw":
                _scores(router, torch.zeros(1, 1))  # fail at start-up, not in the first request
            hf_config = vllm_config.model_config.hf_config
            architecture = (getattr(hf_config, "architectures", None) or [type(hf_config).__name__])[0]
            STATE.register_layer(
                LayerInfo(
                    name=layer_name,
                    layer_id=compat.extract_layer_index(layer_name),
                    num_experts=int(moe_config.num_experts),
                    top_k=int(moe_config.experts_per_token),
                    hidden_size=int(moe_config.hidden_dim_unpadded or moe_config.hidden_dim),
                    intermediate_size=int(moe_config.intermediate_size),
                ),
                config,
                architecture,
            )
            self._alloc_info = STATE.layers[layer_name]
            self._alloc_cpu_kernel: Any = _UNRESOLVED
            self._alloc_device_path = device_path()
            _RUNNERS[layer_name] = self

        def _apply_quant_method(
            self,
            hidden_states: torch.Tensor,
            router_logits: torch.Tensor,
            shared_experts_input: torch.Tensor | None,
            input_ids: torch.Tensor | None = None,
            shared_experts_overlapping: bool = False,
        ) -> Any:
            # Same steps as the stock method, except that the routed-expert call goes through moe_apply.
            self._maybe_apply_shared_experts(shared_experts_input, compat.shared_experts_no_overlap())
            topk_weights, topk_ids = self.router.select_experts(
                hidden_states=hidden_states,
                router_logits=router_logits,
                topk_indices_dtype=self._quant_method.topk_indices_dtype,
                input_ids=input_ids,
            )
            if STATE.plan is None:  # profile run before the plan exists: stock path
                fused_out = self.stock_experts(hidden_states, topk_weights, topk_ids, shared_experts_input)
            else:
                fused_out = torch.ops.vllm_alloc.moe_apply(
                    hidden_states,
                    router_logits,
                    topk_weights,
                    topk_ids,
                    shared_experts_input,
                    self.layer_name,
                )
            if shared_experts_overlapping:
                assert self._shared_experts is not None
                self._shared_experts.wait()
            return (self._shared_experts.output if self._shared_experts is not None else None, fused_out)

        # -- the two paths ----------------------------------------------------------------------------
        def stock_experts(
            self,
            x: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            shared_in: torch.Tensor | None = None,
            with_shared: bool = True,
        ) -> torch.Tensor:
            """The stock routed-expert call: vLLM's CPU kernel bound to this layer where it is the plain
            case (`compat.cpu_expert_kernel`, resolved at the first call, once vLLM has prepacked the
            weights), else the layer's modular kernel, given the shared experts as stock vLLM gives them
            (`with_shared=False` for calls on a subset of rows)."""
            if self._alloc_cpu_kernel is _UNRESOLVED:
                on_cpu = self.routed_experts.w13_weight.device.type == "cpu"
                self._alloc_cpu_kernel = compat.cpu_expert_kernel(self.routed_experts) if on_cpu else None
            if self._alloc_cpu_kernel is not None:
                return self._alloc_cpu_kernel(x, topk_weights, topk_ids)
            return self.routed_experts.forward_modular(
                x=x,
                topk_weights=topk_weights,
                topk_ids=topk_ids,
                shared_experts=self._shared_experts if with_shared else None,
                shared_experts_input=shared_in if with_shared else None,
            )

        def budget_inputs(
            self, router_logits: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """(ranking keys, weights Alloc-T keeps, ids) of one layer call, on the input's device."""
            plan = STATE.plan
            assert plan is not None
            weights_in = topk_weights
            if plan.weights == "raw":
                weights_in = raw_weights(self.router, router_logits, topk_ids)
            return rank_keys(self.router, router_logits, topk_weights, topk_ids), weights_in, topk_ids

    return BudgetMoERunner


_UNRESOLVED = object()


def device_path() -> bool:
    """Budget passes go through `integration.cuda`: on CUDA, and on CPU only under the test setting."""
    return not compat.is_cpu_platform() or envs.VLLM_ALLOC_TEST_DEVICE_PATH


def _refuse_unsupported(
    layer_name: str, vllm_config: Any, moe_config: Any, routed_experts: Any, runner: Any
) -> None:
    """Stop start-up, with the reason and a way out, on settings the plugin does not support yet."""
    problems = []
    parallel = vllm_config.parallel_config
    if getattr(moe_config.moe_parallel_config, "use_ep", False) or getattr(
        parallel, "enable_expert_parallel", False
    ):
        problems.append("expert parallelism (--enable-expert-parallel)")
    if getattr(parallel, "data_parallel_size", 1) > 1:
        problems.append(f"data parallelism (--data-parallel-size {parallel.data_parallel_size})")
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding (--speculative-config)")
    if getattr(parallel, "enable_dbo", False):
        problems.append("dual-batch overlap (--enable-dbo)")
    elif getattr(parallel, "ubatch_size", 0) > 1:
        # Micro-batches split one pass into several forwards; the per-token budget buffers cover the pass.
        problems.append(f"micro-batching (--ubatch-size {parallel.ubatch_size})")
    if getattr(parallel, "enable_eplb", False):
        problems.append("expert load balancing (--enable-eplb)")
    if getattr(vllm_config, "lora_config", None) is not None:
        problems.append("LoRA adapters (--enable-lora)")
    method: Any = routed_experts.quant_method
    if not isinstance(method, compat.unquantized_method_cls()):
        problems.append(f"quantised MoE weights ({type(method).__name__})")
    elif getattr(method, "is_monolithic", False):
        problems.append("a monolithic MoE backend (start with --moe-backend triton)")
    if (
        not compat.is_cpu_platform()
        and compat.uses_cuda_graphs(vllm_config)
        and not conditional_nodes_available()
    ):
        # Budget-aware capture records both paths behind conditional nodes (integration.cuda).
        problems.append(
            f"CUDA graphs with torch {torch.__version__}, which lacks CUDA-graph conditional nodes "
            "(start with --enforce-eager, or use the torch that vLLM pins)"
        )
    if device_path() and cuda.kernel_activation(routed_experts) is None:
        from vllm_alloc.kernels.gate_up import ACTIVATION_CODES

        activation = getattr(routed_experts.activation, "value", routed_experts.activation)
        kernels = ", ".join(ACTIVATION_CODES)
        problems.append(f"MoE activation {activation!r} (the budget-aware kernel implements {kernels})")
    if runner.routed_input_transform is not None or runner.routed_output_transform is not None:
        problems.append("latent MoE (routed input/output transforms)")
    if problems:
        raise RuntimeError(
            f"vllm-alloc cannot serve MoE layer {layer_name} with: {'; '.join(problems)}. "
            "Turn these off, or set VLLM_ALLOC_DISABLE=1 to run vLLM without activation budgets."
        )
