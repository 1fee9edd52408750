"""Triton kernels for budget-aware fused MoE (shipped as `vllm_alloc.kernels`).

`fused_moe` is the entry point (the `vllm_alloc::fused_moe` custom op, kernels/op.py); the pieces are
exported for tests and benchmarks: `align_pairs` → `grouped_gate_up` → `grouped_down` → `combine_pairs`
(one kernel file each), launch configs from `pick_config`. `budget_routing` (the
`vllm_alloc::budget_routing` op) is one layer's budget routing (K_l, carried balance, Alloc-T, cap, counters)
in one launch. Imports torch and Triton only, never vLLM.
"""

from .align import AlignedPairs, align_pairs
from .combine import combine_pairs
from .config import default_config, pick_config
from .down import grouped_down
from .gate_up import grouped_gate_up
from .moe import fused_moe_eager
from .op import fused_moe
from .routing import MAX_PAIRS, MAX_TILE, REGISTER_TILE, budget_routing, fused_routing_fits

__all__ = [
    "MAX_PAIRS",
    "MAX_TILE",
    "REGISTER_TILE",
    "AlignedPairs",
    "align_pairs",
    "budget_routing",
    "combine_pairs",
    "default_config",
    "fused_moe",
    "fused_moe_eager",
    "fused_routing_fits",
    "grouped_down",
    "grouped_gate_up",
    "pick_config",
]
