"""Routed-expert compute on CUDA for passes with pruned pairs: Alloc-T on the device from the persistent
budget buffers (`device_budget.layer_routing`), then the budget-aware Triton kernel (`vllm_alloc.kernels`),
which drops pruned pairs (id −1) before any GEMM.

Under CUDA-graph capture the layer records both its paths behind conditional nodes on the device flag
`Plan.all_full` (`device_budget.stock_or_budget`): a replayed pass whose tokens are all at b = 1.0 runs
vLLM's own expert call on the stock routing, any other pass the budget path.

Why our kernel and not vLLM's stock Triton experts with −1 sentinels: in vLLM 0.32, `TritonExperts`
aligns with −1 pairs dropped but then sums every [T, K] slot with the plain `moe_sum`, so a real token
with some slots at −1 would add rows nothing wrote (docs/design.md, "Which kernel computes pruned pairs").

The kernel reads the weights in vLLM's Triton layout (w13 [E, 2I, H], w2 [E, H, I]). Sibling of
`integration.cpu`; on CPU this module runs only under the test setting VLLM_ALLOC_TEST_DEVICE_PATH, with
the kernels in Triton's interpreter.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_alloc.integration import compat
from vllm_alloc.integration.state import STATE
from vllm_alloc.routing.device_budget import layer_routing_aligned, stock_or_budget


def kernel_activation(routed_experts: Any) -> str | None:
    """The kernel's name for the layer's activation, or None where the kernel has none."""
    from vllm_alloc.kernels.gate_up import ACTIVATION_CODES

    activation = str(getattr(routed_experts.activation, "value", routed_experts.activation)).lower()
    return activation if activation in ACTIVATION_CODES else None


def budget_experts(
    runner: Any,
    x: torch.Tensor,
    keys: torch.Tensor,
    weights_in: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    singleton_groups: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Alloc-T on the device for this layer call (counting into `Plan.used`), then the kept pairs.

    Where the fused routing kernel runs (CUDA, `device_budget.fused_fits`) it also aligns the kept pairs for
    the expert kernel's config, so the layer is 4 launches: routing, gate_up, down, combine. out: where the
    combine writes the result (`kernels.fused_moe(out=...)`), else a new tensor."""
    from vllm_alloc.kernels import fused_moe, pick_config

    plan = STATE.plan
    assert plan is not None
    experts = runner.routed_experts
    activation = kernel_activation(experts)
    assert activation is not None  # refused at start-up (layer._refuse_unsupported)
    # On CUDA the layer's own weights; on CPU (test setting) the plain copies kept before vLLM's prepack.
    w13, w2 = getattr(experts, compat.PLAIN_WEIGHTS, (experts.w13_weight, experts.w2_weight))
    T, K = topk_ids.shape
    E, I = w13.shape[0], w13.shape[1] // 2
    # Picked on concrete shapes only (a symbolic T must not reach the config tables, kernels/op.py): else
    # the expert kernel picks it inside its op and aligns there.
    concrete = isinstance(T, int) and T > 0
    config = dict(pick_config(T, K, E, x.shape[1], I, x.dtype, x.device)) if concrete else None
    weights, ids, aligned = layer_routing_aligned(
        keys,
        weights_in,
        topk_ids,
        table=plan.table,
        token_budget=plan.token_budget,
        token_group=plan.token_group,
        used=plan.used,
        column=runner._alloc_info.column,
        k_base=plan.k_base,
        weights=plan.alloc_t_weights,
        singleton_groups=singleton_groups,
        carry=plan.device_carry(),
        cap=plan.device_cap(),
        num_experts=E,
        block_m=config["BLOCK_M"] if config is not None else 0,
    )
    return fused_moe(x, w13, w2, ids, weights, activation=activation, config=config, aligned=aligned, out=out)


def captured_experts(
    runner: Any,
    x: torch.Tensor,
    router_logits: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    shared_in: torch.Tensor | None,
) -> torch.Tensor:
    """Both paths of one layer call, recorded into the CUDA graph being captured (see module docstring).
    Nothing here may read per-pass host state: which body runs is decided on the device at replay. The
    budget body's combine writes straight into the stock body's output where that is a row-major [T, H]
    tensor of x's dtype (else its result is copied there)."""
    plan = STATE.plan
    assert plan is not None

    def budget(out: torch.Tensor) -> torch.Tensor:
        fits = (
            out.shape == x.shape and out.dtype == x.dtype and out.device == x.device and out.stride(-1) == 1
        )
        inputs = runner.budget_inputs(router_logits, topk_weights, topk_ids)
        return budget_experts(runner, x, *inputs, out=out if fits else None)

    return stock_or_budget(
        plan.all_full,
        lambda: runner.stock_experts(x, topk_weights, topk_ids, shared_in),
        budget,
        not_full=plan.not_full,
        into_stock=True,
    )
