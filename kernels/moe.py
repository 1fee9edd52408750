"""Budget-aware fused MoE: align → gate/up (+activation) → down (× routing weight) → combine.

`fused_moe_eager` runs the four launches on concrete tensors; the public entry point is
`vllm_alloc.kernels.fused_moe` (kernels/op.py), the same computation behind a torch custom op.
Work and weight traffic scale with the valid pairs and the distinct experts they use: the alignment drops
pruned pairs (id −1) on device, and a GEMM block exists only for an expert with at least one valid pair.
At decode sizes the down GEMM may split its reduction over I across the programs that pruned blocks leave
idle (split-K, align.py), still in four launches: the combine sums the parts with the token's pairs.
"""

from __future__ import annotations

from typing import Any

import torch

from .align import AlignedPairs, align_pairs
from .combine import combine_pairs
from .config import default_split, pick_config, validate_config
from .down import grouped_down
from .gate_up import ACTIVATION_CODES, grouped_gate_up

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
) -> None:
    """Shapes, dtypes and devices (no value checks on topk_ids: that would need a host sync)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got shape {tuple(x.shape)}")
    T, H = x.shape
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not supported; expected one of {DTYPES}")
    if w13.dim() != 3 or w13.shape[2] != H or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E, 2I, H] with H={H}; got shape {tuple(w13.shape)}")
    E, I = w13.shape[0], w13.shape[1] // 2
    if tuple(w2.shape) != (E, H, I):
        raise ValueError(f"w2 must be [E, H, I] = {(E, H, I)}; got shape {tuple(w2.shape)}")
    if w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"w13 ({w13.dtype}) and w2 ({w2.dtype}) must have x's dtype {x.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_ids must be [T, K] with T={T}; got shape {tuple(topk_ids.shape)}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids dtype {topk_ids.dtype} must be torch.int32 or torch.int64")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights shape {tuple(topk_weights.shape)} must equal topk_ids shape {tuple(topk_ids.shape)}"
        )
    devices = {t.device for t in (x, w13, w2, topk_ids, topk_weights)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def check_out(out: torch.Tensor, x: torch.Tensor) -> None:
    """`out` can take y: x's shape, dtype and device, rows contiguous (the combine's store)."""
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(-1) != 1:
        raise ValueError(
            f"out must be a row-major {tuple(x.shape)} {x.dtype} tensor on {x.device} (x's); got "
            f"{tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}"
        )


def fused_moe_eager(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str = "silu",
    config: dict[str, Any] | None = None,
    aligned: AlignedPairs | None = None,
    out: torch.Tensor | None = None,
    split: int | None = None,
) -> torch.Tensor:
    """y [T, H] (dtype of x) = Σ over kept pairs of w · down(act(gate) · up); see module docstring.

    config: a launch config (kernels/config.py KEYS); None picks env pin → tuned table → default.
    aligned: `align_pairs(topk_ids, E, BLOCK_M)` computed already (the fused routing kernel emits it), so
    the three alignment launches are skipped; its block_m must be the config's BLOCK_M.
    out: a row-major [T, H] tensor of x's dtype and device that the combine writes y into (and returns),
    e.g. the layer's output, which saves copying y there; None: a new tensor.
    split: the largest split factor of the down GEMM's reduction (1 = not split); None: `default_split(T)`.
    """
    check_inputs(x, w13, w2, topk_ids, topk_weights)
    if out is not None:
        check_out(out, x)
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"activation={activation!r} is not supported; expected one of {list(ACTIVATION_CODES)}"
        )
    T, H = x.shape
    K = topk_ids.shape[1]
    E, I = w13.shape[0], w13.shape[1] // 2
    if T == 0 or K == 0:
        return out.zero_() if out is not None else torch.zeros((T, H), dtype=x.dtype, device=x.device)
    cfg = (
        validate_config(config, "fused_moe(config=...)")
        if config is not None
        else pick_config(T, K, E, H, I, x.dtype, x.device)
    )
    if aligned is None:
        aligned = align_pairs(topk_ids, E, cfg["BLOCK_M"])
    elif aligned.block_m != cfg["BLOCK_M"]:
        raise ValueError(
            f"aligned.block_m={aligned.block_m} differs from the config's BLOCK_M={cfg['BLOCK_M']}"
        )
    split = default_split(T) if split is None else split
    inter = grouped_gate_up(x, w13, aligned, K, activation=activation, config=cfg)
    pair_out = grouped_down(inter, w2, topk_weights, aligned, config=cfg, split=split)
    if out is None:
        out = torch.empty((T, H), dtype=x.dtype, device=x.device)
    return combine_pairs(pair_out, topk_ids, E, aligned=aligned, out=out)
