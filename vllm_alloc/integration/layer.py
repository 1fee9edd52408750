"""The budget-aware MoE layer: vLLM's `MoERunner` with routing and expert compute under budgets.

`BudgetMoERunner` replaces every `MoERunner` that `FusedMoEFactory` builds (PluggableLayer OOT swap).
It keeps the stock router and runs it unchanged; only the call that computes routed experts goes
through `moe_apply` below, which:
  * in a pass where every token is at b = 1.0, calls the stock expert kernel with the stock routing
    (outputs bit-identical to vLLM without the plugin);
  * otherwise ranks each token's K candidates by the stock router's own selection score, runs Alloc-T
    (`alloc_t.reallocate`) with the per-token K_l(B_t) of this layer, counts activations, and computes
    only the kept (token, expert) pairs.

On CPU, `moe_apply` is an opaque custom op: Dynamo traces the model's MoE code on CPU, and the branch
and the data-dependent compute must run eagerly, every step. On CUDA the whole MoE layer already runs
inside vLLM's opaque `moe_forward` op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vllm_alloc import alloc_t
from vllm_alloc.integration import compat
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.state import STATE, LayerInfo

if TYPE_CHECKING:
    # Imported where used, never at plugin registration: numba must not be loaded before vLLM's worker init
    # (see alloc_t_host).
    from vllm_alloc.alloc_t_host import KeptPairs

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
    if not STATE.budgeted:
        return runner._stock_experts(x, topk_weights, topk_ids, shared_experts_input)
    return runner._budget_experts(x, router_logits, topk_weights, topk_ids)


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
            from vllm.model_executor.layers.fused_moe.runner.shared_experts import SharedExpertsOrder

            self._maybe_apply_shared_experts(shared_experts_input, SharedExpertsOrder.NO_OVERLAP)
            topk_weights, topk_ids = self.router.select_experts(
                hidden_states=hidden_states,
                router_logits=router_logits,
                topk_indices_dtype=self._quant_method.topk_indices_dtype,
                input_ids=input_ids,
            )
            if STATE.plan is None:  # profile run before the plan exists: stock path
                fused_out = self._stock_experts(hidden_states, topk_weights, topk_ids, shared_experts_input)
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
        def _cpu_kernel(self) -> Any:
            """vLLM's CPU expert kernel bound to this layer (None on CUDA or a non-plain layer); resolved
            at the first call, once vLLM has set up the layer's kernel and prepacked its weights."""
            if self._alloc_cpu_kernel is _UNRESOLVED:
                on_cpu = self.routed_experts.w13_weight.device.type == "cpu"
                self._alloc_cpu_kernel = compat.cpu_expert_kernel(self.routed_experts) if on_cpu else None
            return self._alloc_cpu_kernel

        def _stock_experts(
            self,
            x: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
            shared_in: torch.Tensor | None,
        ) -> torch.Tensor:
            kernel = self._cpu_kernel()
            if kernel is not None:
                return kernel(x, topk_weights, topk_ids)
            return self.routed_experts.forward_modular(
                x=x,
                topk_weights=topk_weights,
                topk_ids=topk_ids,
                shared_experts=self._shared_experts,
                shared_experts_input=shared_in,
            )

        def _budget_experts(
            self,
            x: torch.Tensor,
            router_logits: torch.Tensor,
            topk_weights: torch.Tensor,
            topk_ids: torch.Tensor,
        ) -> torch.Tensor:
            plan = STATE.plan
            assert plan is not None
            weights_in = topk_weights
            if plan.weights == "raw":
                weights_in = raw_weights(self.router, router_logits, topk_ids)
            keys = rank_keys(self.router, router_logits, topk_weights, topk_ids)
            if x.device.type == "cpu":
                pairs = host_routing(self._alloc_info.column, keys, weights_in, topk_ids)
                return compacted_experts(self, x, pairs)
            T = x.shape[0]
            column = self._alloc_info.column
            token_budget = plan.token_budget[:T]
            weights, ids, kept = alloc_t.reallocate(
                keys,
                weights_in,
                topk_ids,
                plan.table[token_budget, column],
                plan.token_group[:T],
                k_base=plan.k_base,
                weights="kept" if plan.weights == "kept" else "topk",
                singleton_groups=STATE.singleton_groups,
            )
            if STATE.counting:  # `full` is counted once per pass, in AllocState.fill
                plan.used[column].index_add_(0, token_budget, kept.sum(dim=1).to(torch.float64))
            from vllm_alloc.integration.cuda import triton_experts

            return triton_experts(self, x, weights, ids)

    return BudgetMoERunner


_UNRESOLVED = object()


def host_routing(
    column: int, keys: torch.Tensor, weights_in: torch.Tensor, topk_ids: torch.Tensor
) -> KeptPairs:
    """Alloc-T of one CPU layer call on the host, and its activation count: the kept pairs."""
    from vllm_alloc import alloc_t_host

    plan = STATE.plan
    assert plan is not None and plan.host is not None
    T = keys.shape[0]
    rank = keys.numpy()
    return alloc_t_host.layer_call(
        rank,
        rank if weights_in is keys else weights_in.float().numpy(),
        topk_ids.numpy(),
        plan.host["token_budget"][:T],
        plan.host["table"],
        column,
        plan.host["token_group"][:T],
        plan.k_base,
        "kept" if plan.weights == "kept" else "topk",
        STATE.singleton_groups,
        plan.host["used"][column],
        STATE.counting,
    )


def compacted_experts(runner: Any, x: torch.Tensor, pairs: KeptPairs) -> torch.Tensor:
    """Kept pairs only, through vLLM's own expert kernel (CPU).

    The stock CPU kernel corrupts the heap on id −1, and computing pruned pairs at weight 0 would save
    nothing. Where every token keeps n pairs, the kernel runs the tokens routed top-n; otherwise the P kept
    pairs become P rows routed top-1 each ([P, H] inputs, [P, 1] ids/weights) and are summed back per
    token. Either way: same kernel, same prepacked weights; work and weight traffic scale with P and the
    distinct experts among them.
    """
    weights = torch.from_numpy(pairs.weights)
    ids = torch.from_numpy(pairs.ids)
    if pairs.tokens is None:
        return _expert_call(runner, x, weights, ids)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if pairs.tokens.size:
        tokens = torch.from_numpy(pairs.tokens)
        out.index_add_(0, tokens, _expert_call(runner, x.index_select(0, tokens), weights, ids).float())
    return out.to(x.dtype)


def _expert_call(runner: Any, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    kernel = runner._cpu_kernel()
    if kernel is not None:
        return kernel(x, weights, ids)
    return runner.routed_experts.forward_modular(
        x=x, topk_weights=weights, topk_ids=ids, shared_experts=None, shared_experts_input=None
    )


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
    if not compat.is_cpu_platform() and compat.uses_cuda_graphs(vllm_config):
        # A captured graph replays whatever path ran at capture time (the stock one), so budgets would
        # be silently ignored on every replayed step. Budget-aware capture is not implemented yet.
        problems.append("CUDA graphs (start with --enforce-eager; `vllm-alloc serve` adds it on CUDA)")
    if runner.routed_input_transform is not None or runner.routed_output_transform is not None:
        problems.append("latent MoE (routed input/output transforms)")
    if problems:
        raise RuntimeError(
            f"vllm-alloc cannot serve MoE layer {layer_name} with: {'; '.join(problems)}. "
            "Turn these off, or set VLLM_ALLOC_DISABLE=1 to run vLLM without activation budgets."
        )
