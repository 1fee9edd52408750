"""Triton kernels for budget-aware fused MoE (shipped as `vllm_alloc.kernels`).

`fused_moe` is the entry point (the `vllm_alloc::fused_moe` custom op); the pieces are exported for
tests and benchmarks: `align_pairs` → `gate_up` → `down` → `combine`, launch configs from `pick_config`.
Imports torch and Triton only, never vLLM.
"""

from .align import AlignedPairs, align_pairs
from .combine import combine
from .config import default_config, pick_config
from .down import down
from .fused_moe import fused_moe_eager
from .gate_up import gate_up
from .op import fused_moe

__all__ = [
    "AlignedPairs",
    "align_pairs",
    "combine",
    "default_config",
    "down",
    "fused_moe",
    "fused_moe_eager",
    "gate_up",
    "pick_config",
]
