"""Launch configs of the fused MoE kernels: tuned JSON tables, a documented default, a debugging pin.

Serving never autotunes (STYLE.md rule 8). `benchmarks/tune_kernel.py` writes one table per layer shape
and device into `kernels/configs/`, named by `table_name(E, H, I, dtype, device)`; its content maps a T
bucket ("1", "16", "256", ...) to a config, and non-numeric keys (e.g. "meta") are ignored. `pick_config`
takes, in order: the config pinned by `VLLM_ALLOC_KERNEL_CONFIG` (JSON, for debugging), the nearest T
bucket of the matching table, or `device_default`: `default_config(T)` fitted to the device's shared memory.

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
# Split-K of the down GEMM (kernels/align.py): the largest split factor allowed, and the largest T it
# is allowed at (`default_split`). Both estimates until a GPU times them (research notes §3.3).
SPLIT_MAX = 8
SPLIT_TOKENS = 8


def default_config(T: int) -> KernelConfig:
    """The untuned default: vLLM 0.32's own default for unquantized weights (`get_default_config`, its
    general branch, at M = T tokens), so that b = 1.0 against vLLM's stock kernel compares like with like
    (the same numbers as a table: kernels/configs/README.md). `pick_config` fits its pipeline to the
    device (`fit_shared_memory`).

    Small T is weight-bandwidth bound: a 16-row tile wastes the least padding, and tall K tiles in a deep
    pipeline keep more weight bytes in flight per program (the older 16×32×64, 3-stage default held about
    8 KB of weights per stage, which the research notes' estimate blames for b = 0.5 streaming slower than
    b = 1.0 at T = 1: gpu-perf-notes §3.1–3.2). Large T trades that for wider output tiles. vLLM's
    GROUP_SIZE_M (16 only past 128 tokens per expert) has no counterpart here: the grid runs one block's
    N-tiles back to back (`align.block_tile`), which is vLLM's order at GROUP_SIZE_M = 1.
    """
    return {
        "BLOCK_M": 16 if T <= 32 else 32 if T <= 96 else 64 if T <= 512 else 128,
        "BLOCK_N": 64 if T <= 64 else 128,
        "BLOCK_K": 128 if T <= 64 else 64,
        "num_warps": 4 if T <= 128 else 8,
        "num_stages": 4 if T <= 32 else 3,
    }


def default_split(T: int) -> int:
    """How far the down GEMM may split its reduction over I at T tokens (1 = never; the device picks S up
    to it from the used blocks, align.py).

    Why decode only: up to about T = 8 the grid has a slot per pair (max_blocks = T·K for E ≥ T·K), so a
    budget that prunes half the pairs leaves half the programs idle and each working one with too few bytes
    in flight (research notes §3.1); the split hands the idle slots part of a used block's reduction.
    SPLIT_MAX = 8 covers T = 1 at K = 8 down to one used block. Larger T fills the grid with used blocks
    anyway, while the split's fp32 parts ([SPLIT, T·K, H], allocated whether or not S > 1) grow with T.
    """
    return SPLIT_MAX if T <= SPLIT_TOKENS else 1


def stage_bytes(config: KernelConfig, dtype: torch.dtype) -> int:
    """Shared memory one pipeline stage of the gate/up kernel holds (the larger of the two GEMMs): the
    [BLOCK_M, BLOCK_K] tile of x and two [BLOCK_K, BLOCK_N] weight tiles, gate and up (vLLM's kernel one)."""
    return (config["BLOCK_M"] + 2 * config["BLOCK_N"]) * config["BLOCK_K"] * dtype.itemsize


def fit_shared_memory(config: KernelConfig, dtype: torch.dtype, limit: int | None) -> KernelConfig:
    """`config` with num_stages cut to what `limit` bytes of shared memory per program hold (None: as is).

    Why: with two weight tiles per stage, vLLM's tiles need about twice the shared memory here that they
    need in vLLM's kernel. Compiled for an H100 (sm_90, Triton 3.9), the bf16 decode default takes 108 KB
    (3 buffered stages of 36 KB): within an H100's 227 KB and an A100's 163 KB, over the 99 KB of sm_86 and
    sm_89 GPUs; float32 at the same tiles takes 216 KB. Every stage is counted as a buffer: what Triton
    allocates where it uses Hopper's wgmma (BLOCK_M ≥ 64), one more than it allocates elsewhere
    (tests/kernels/test_expert_kernel_aot.py holds the count against the compiler's).
    """
    if limit is None:
        return config
    return {**config, "num_stages": max(1, min(config["num_stages"], limit // stage_bytes(config, dtype)))}


@functools.cache
def _shared_memory_limit(index: int) -> int | None:
    props = torch.cuda.get_device_properties(index)
    # What a program may opt into (what Triton checks a launch against); older torch lacks the field.
    limit = getattr(props, "shared_memory_per_block_optin", None)
    return int(limit) if limit else None


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on `device`; None off CUDA (the interpreter has none)."""
    if device.type != "cuda":
        return None
    return _shared_memory_limit(device.index if device.index is not None else torch.cuda.current_device())


def device_default(T: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """`default_config(T)` with its pipeline fitted to `device`'s shared memory: what runs without a table."""
    return fit_shared_memory(default_config(T), dtype, shared_memory_limit(device))


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
    """The launch config for one call: env pin, else the nearest T bucket of a tuned table, else the default
    fitted to the device's shared memory (a table is tuned on its device, a pin is the user's word). K does
    not enter the default (vLLM's ignores top-k as well)."""
    raw = envs.VLLM_ALLOC_KERNEL_CONFIG
    if raw:
        return dict(_pinned(raw))
    table = _load_table(CONFIG_DIR / table_name(E, H, I, dtype, device_name(device)))
    if table:
        # Nearest bucket by |T − bucket|, ties to the smaller bucket (smaller BLOCK_M pads less).
        return dict(table[min(table, key=lambda bucket: (abs(bucket - T), bucket))])
    return device_default(T, dtype, device)
