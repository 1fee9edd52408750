"""Launch configs of the fused MoE kernels: tuned JSON tables, a documented default, a debugging pin.

Serving never autotunes (STYLE.md rule 8). `benchmarks/tune_kernel.py` writes one table per layer shape
and device into `kernels/configs/`, named by `table_name(E, H, I, dtype, device)`; its content maps a T
bucket ("1", "16", "256", ...) to a config, and non-numeric keys (e.g. "meta") are ignored. `pick_config`
takes, in order: the config pinned by `VLLM_ALLOC_KERNEL_CONFIG` (JSON, for debugging), the nearest T
bucket of the matching table, or `default_config(T, K, E)`.

One config holds BLOCK_M (pairs per block: the alignment pads each expert's pairs to it), BLOCK_N,
BLOCK_K (GEMM tile), num_warps and num_stages; both grouped GEMMs use it, because both walk the same
aligned blocks.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from vllm_alloc import envs

CONFIG_DIR = Path(__file__).parent / "configs"
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
KernelConfig = dict[str, int]


def default_config(T: int, K: int, E: int) -> KernelConfig:
    """The untuned default: vLLM's own untuned fused-MoE default, so b = 1.0 compares like with like.

    While T ≤ E an expert averages at most K pairs (decode): BLOCK_M = 16 (the smallest tile tl.dot takes)
    wastes the least padding and BLOCK_N = 32 spreads each expert's weights over more programs (the step
    is weight-bandwidth bound). Past that, 64×64×32 tiles reuse each weight tile across more pairs.
    """
    if T <= E:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}


def validate_config(config: dict[str, Any], source: str) -> KernelConfig:
    """Check a config's keys and values; missing keys are not allowed (a table or pin states all five)."""
    unknown = set(config) - set(KEYS)
    missing = set(KEYS) - set(config)
    if unknown or missing:
        raise ValueError(
            f"{source}: kernel config {config} has unknown keys {sorted(unknown)} / missing keys "
            f"{sorted(missing)}; expected exactly {list(KEYS)}"
        )
    out: KernelConfig = {}
    for key in KEYS:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{source}: {key}={value!r} must be an integer")
        out[key] = value
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = out[key]
        # tl.dot needs every tile dimension to be a power of two and at least 16.
        if v < 16 or v & (v - 1):
            raise ValueError(f"{source}: {key}={v} must be a power of two >= 16")
    if out["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"{source}: num_warps={out['num_warps']} must be one of 1, 2, 4, 8, 16")
    if out["num_stages"] < 1:
        raise ValueError(f"{source}: num_stages={out['num_stages']} must be >= 1")
    return out


def device_name(device: torch.device) -> str:
    """Name of the device in table file names: the CUDA device name with spaces as '_', else the type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def table_name(E: int, H: int, I: int, dtype: torch.dtype, device: str) -> str:
    return f"E={E},H={H},I={I},dtype={str(dtype).removeprefix('torch.')},device={device}.json"


@functools.cache
def _load_table(path: Path) -> dict[int, KernelConfig] | None:
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(t): validate_config(c, f"{path}[{t!r}]") for t, c in raw.items() if t.isdigit()}


@functools.cache
def _pinned(raw: str) -> KernelConfig:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"VLLM_ALLOC_KERNEL_CONFIG={raw!r} is not JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"VLLM_ALLOC_KERNEL_CONFIG={raw!r} must be a JSON object with keys {list(KEYS)}")
    return validate_config(parsed, "VLLM_ALLOC_KERNEL_CONFIG")


def pick_config(
    T: int, K: int, E: int, H: int, I: int, dtype: torch.dtype, device: torch.device
) -> KernelConfig:
    """The launch config for one call: env pin, else the nearest T bucket of a tuned table, else default."""
    raw = envs.VLLM_ALLOC_KERNEL_CONFIG
    if raw:
        return dict(_pinned(raw))
    table = _load_table(CONFIG_DIR / table_name(E, H, I, dtype, device_name(device)))
    if table:
        # Nearest bucket by |T − bucket|, ties to the smaller bucket (smaller BLOCK_M pads less).
        return dict(table[min(table, key=lambda bucket: (abs(bucket - T), bucket))])
    return default_config(T, K, E)
