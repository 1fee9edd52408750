"""Routed-expert compute on CUDA for passes with pruned pairs.

Uses the budget-aware Triton kernel (`vllm_alloc.kernels.fused_moe`) on the weights in vLLM's Triton
layout (w13 [E, 2I, H], w2 [E, H, I]); the plugin requires `--moe-backend triton` so no backend
shuffles or prepacks them. Nothing here has been run inside vLLM-CUDA yet (no CUDA vLLM on the
development machines); the kernel itself is tested against the reference on GPU and CPU.
"""

from __future__ import annotations

from typing import Any

import torch

_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "swigluoai": "swigluoai"}


def triton_experts(runner: Any, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    from vllm_alloc.kernels import fused_moe

    experts = runner.routed_experts
    activation = str(getattr(experts.activation, "value", experts.activation)).lower()
    if activation not in _ACTIVATIONS:
        raise RuntimeError(f"vllm-alloc: MoE activation {activation!r} has no budget-aware kernel yet")
    return fused_moe(
        x, experts.w13_weight, experts.w2_weight, ids, weights, activation=_ACTIVATIONS[activation]
    )
