"""`vllm_alloc::fused_moe` as a torch custom op with a fake implementation (STYLE.md rule 9).

torch.compile and CUDA-graph capture then see one opaque op with a static output shape [T, H]; the launch
config is picked inside, on concrete shapes, so a symbolic T never reaches the config tables.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import KEYS
from .moe import fused_moe_eager


@torch.library.custom_op("vllm_alloc::fused_moe", mutates_args=())
def _fused_moe_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
) -> torch.Tensor:
    cfg = dict(zip(KEYS, config, strict=True)) if config is not None else None
    return fused_moe_eager(x, w13, w2, topk_ids, topk_weights, activation=activation, config=cfg)


@_fused_moe_op.register_fake
def _(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
) -> torch.Tensor:
    return x.new_empty(x.shape)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str = "silu",
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Budget-aware fused MoE: y [T, H] (dtype of x) = Σ_{k: topk_ids[t,k] ≠ −1} w[t,k] · expert(x[t]).

    x [T, H] fp16/bf16/fp32; w13 [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up); w2 [E, H, I];
    topk_ids [T, K] int32/int64 (−1 = pruned: no compute, no weight traffic); topk_weights [T, K].
    activation: "silu", "gelu" or "gelu_tanh". config: pin a launch config {BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages}; None → VLLM_ALLOC_KERNEL_CONFIG, else the tuned table, else the default.
    """
    packed = None if config is None else [int(config[key]) for key in KEYS if key in config]
    if config is not None and (packed is None or len(packed) != len(KEYS) or set(config) - set(KEYS)):
        raise ValueError(f"config {config} must have exactly the keys {list(KEYS)}")
    return torch.ops.vllm_alloc.fused_moe(x, w13, w2, topk_ids, topk_weights, activation, packed)
