"""`vllm_alloc::fused_moe` as a torch custom op with a fake implementation (STYLE.md rule 9).

torch.compile and CUDA-graph capture then see one opaque op with a static output shape [T, H]; the launch
config is picked inside, on concrete shapes, so a symbolic T never reaches the config tables.
`vllm_alloc::fused_moe_out` is the same computation written into a given [T, H] tensor
(`fused_moe(out=...)`).
"""

from __future__ import annotations

from typing import Any

import torch

from .align import AlignedPairs
from .config import KEYS
from .moe import check_out, fused_moe_eager
from .routing import budget_routing


def _eager(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
    aligned: list[torch.Tensor],
    out: torch.Tensor | None,
    split: int | None,
) -> torch.Tensor:
    """Both ops' body: the packed arguments back into `fused_moe_eager`'s."""
    cfg = dict(zip(KEYS, config, strict=True)) if config is not None else None
    pairs = None
    if aligned:
        sorted_pair_ids, block_expert_ids, num_blocks, expert_counts = aligned
        block_m = sorted_pair_ids.numel() // max(block_expert_ids.numel(), 1)
        pairs = AlignedPairs(sorted_pair_ids, block_expert_ids, num_blocks, expert_counts, block_m)
    return fused_moe_eager(
        x,
        w13,
        w2,
        topk_ids,
        topk_weights,
        activation=activation,
        config=cfg,
        aligned=pairs,
        out=out,
        split=split,
    )


@torch.library.custom_op("vllm_alloc::fused_moe", mutates_args=())
def _fused_moe_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
    aligned: list[torch.Tensor],  # empty: align here; else AlignedPairs' four tensors
    split: int | None = None,  # None: `default_split(T)`
) -> torch.Tensor:
    return _eager(x, w13, w2, topk_ids, topk_weights, activation, config, aligned, None, split)


# A custom op may not return an alias of its input, so writing y into a given tensor is its own op, which
# mutates `out` and returns nothing.
@torch.library.custom_op("vllm_alloc::fused_moe_out", mutates_args=("out",))
def _fused_moe_out_op(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
    aligned: list[torch.Tensor],
    out: torch.Tensor,
    split: int | None = None,
) -> None:
    _eager(x, w13, w2, topk_ids, topk_weights, activation, config, aligned, out, split)


@_fused_moe_op.register_fake
def _(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    activation: str,
    config: list[int] | None,
    aligned: list[torch.Tensor],
    split: int | None = None,
) -> torch.Tensor:
    return x.new_empty(x.shape)


@_fused_moe_out_op.register_fake
def _(*args: object) -> None:
    """Nothing to make: the op only writes its `out` argument (the schema above names the arguments)."""
    return None


def fused_moe(
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
    """Budget-aware fused MoE: y [T, H] (dtype of x) = Σ_{k: topk_ids[t,k] ≠ −1} w[t,k] · expert(x[t]).

    x [T, H] fp16/bf16/fp32; w13 [E, 2I, H] (rows 0..I-1 gate, I..2I-1 up); w2 [E, H, I];
    topk_ids [T, K] int32/int64 (−1 = pruned: no compute, no weight traffic); topk_weights [T, K].
    activation: "silu", "gelu" or "gelu_tanh". config: pin a launch config {BLOCK_M, BLOCK_N, BLOCK_K,
    num_warps, num_stages}; None → VLLM_ALLOC_KERNEL_CONFIG, else the tuned table, else the default.
    aligned: the kept pairs already aligned for this config's BLOCK_M (`budget_routing(block_m=...)`),
    which skips the alignment's three launches. out: a row-major [T, H] tensor of x's dtype to write y
    into (the `vllm_alloc::fused_moe_out` op), returned; it saves copying y into the layer's output.
    split: the largest split factor of the down GEMM's reduction over I; the device picks S up to it from
    the used blocks (kernels/align.py; 1 = never split). None: `default_split(T)`, up to 8 at decode sizes.
    """
    packed = None if config is None else [int(config[key]) for key in KEYS if key in config]
    if config is not None and (packed is None or len(packed) != len(KEYS) or set(config) - set(KEYS)):
        raise ValueError(f"config {config} must have exactly the keys {list(KEYS)}")
    tensors = [] if aligned is None else list(aligned[:4])
    args = (x, w13, w2, topk_ids, topk_weights, activation, packed, tensors)
    if out is None:
        return torch.ops.vllm_alloc.fused_moe(*args, split)
    check_out(out, x)  # here too, so the fake op (which checks nothing) fails the same way
    torch.ops.vllm_alloc.fused_moe_out(*args, out, split)
    return out


@torch.library.custom_op(
    "vllm_alloc::budget_routing", mutates_args=("used", "balance", "dropped", "distinct")
)
def _budget_routing_op(
    keys: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    table: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    singleton_groups: bool,
    token_slot: torch.Tensor | None,
    balance: torch.Tensor | None,
    theta: torch.Tensor | None,
    alpha: float,
    one_bank: bool,
    num_experts: int,
    token_cap: torch.Tensor | None,
    cap_table: torch.Tensor | None,
    dropped: torch.Tensor | None,
    distinct: torch.Tensor | None,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """kernels/routing.py `budget_routing`; the alignment's four tensors are empty where block_m = 0."""
    kept_w, kept_ids, aligned = budget_routing(
        keys, weights, ids, token_budget, token_group, table, used, column, k_base, singleton_groups,
        token_slot, balance, theta, alpha, one_bank, num_experts, token_cap, cap_table, dropped, distinct,
        block_m,
    )  # fmt: skip
    if aligned is None:
        empty = torch.empty(0, dtype=torch.int32, device=keys.device)
        return kept_w, kept_ids, empty, empty.clone(), empty.clone(), empty.clone()
    return kept_w, kept_ids, *aligned[:4]


@_budget_routing_op.register_fake
def _(
    keys: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    table: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    singleton_groups: bool,
    token_slot: torch.Tensor | None,
    balance: torch.Tensor | None,
    theta: torch.Tensor | None,
    alpha: float,
    one_bank: bool,
    num_experts: int,
    token_cap: torch.Tensor | None,
    cap_table: torch.Tensor | None,
    dropped: torch.Tensor | None,
    distinct: torch.Tensor | None,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    pairs = ids.numel()
    n_blocks = min(pairs, -(-pairs // block_m) + num_experts) if block_m else 0
    sizes = (n_blocks * block_m, n_blocks, 1 if block_m else 0, num_experts if block_m else 0)
    aligned = (keys.new_empty(n, dtype=torch.int32) for n in sizes)
    return (torch.empty_like(weights), torch.empty_like(ids), *aligned)  # type: ignore[return-value]
