"""vLLM 0.32's stock Triton MoE kernel, run without vLLM, as the baseline of the GPU benchmarks.

The lent GPU machine cannot import vLLM (its extensions are built for another torch), but the kernel
itself is self-contained (gpu-perf-notes.md §6). Given a copy of vLLM's `fused_moe/fused_moe.py` and its
`configs/` (`benchmarks/copy_vllm_ref.py` makes one), `load_vllm_ref`:

1. takes the two `@triton.jit` functions `fused_moe_kernel` and `write_zeros_to_output` out of the file
   with `ast`, checks they need nothing but `triton`, `tl`, each other and builtins, and
2. writes them to a real file in a cache folder (Triton's JIT reads the source with `inspect`), then
   imports it. The extracted code is never committed; it lives only in that folder.

`vllm_stock_moe` then launches them as vLLM 0.32's `fused_experts_impl` does for unquantized
bf16/fp16/fp32 (no expert map, router weight applied in the down GEMM): config lookup, expert assignment,
gate/up GEMM, silu_and_mul, down GEMM, sum over K. vLLM's CUDA helper ops are replaced by one-launch
stand-ins (`vllm_stand_ins.py`); the final sum is `torch.sum(..., dim=1)`.

    ref = load_vllm_ref(Path("vllm-ref"))
    y = vllm_stock_moe(x, w13, w2, topk_weights, topk_ids, ref=ref)
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_stand_ins import align_stand_in, silu_and_mul_stand_in

KERNEL_FILE = Path("fused_moe.py")
CONFIG_DIR = Path("configs")
FUNCTIONS = ("write_zeros_to_output", "fused_moe_kernel")  # in the order they must be defined
# Names the extracted functions may use besides their own arguments, locals and Python builtins.
ALLOWED_GLOBALS = {"triton", "tl", *FUNCTIONS}
HEADER = (
    "# Extracted by benchmarks/vllm_ref.py from {source} (vLLM, Apache-2.0).\n"
    "# Generated: do not edit or commit.\n"
    "import triton\n"
    "import triton.language as tl\n"
)
COMPUTE_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
# vLLM's naive path (`_prepare_expert_assignment`): no align when T·K·SPARSITY ≤ E.
SPARSITY = 4


def _free_names(fn: ast.FunctionDef) -> set[str]:
    """Names fn reads that it neither takes as an argument nor assigns (loop targets included)."""
    bound = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    loaded = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return loaded - bound - set(dir(builtins))


def extract_kernels(source: Path) -> str:
    """The source of FUNCTIONS (decorators included) from a vLLM fused_moe.py, as one module's text.

    Raises ValueError naming the file and the function if one is missing, is not `@triton.jit`, or reads a
    module-level name the extracted module would not have (a vLLM change this code must then follow).
    """
    text = source.read_text()
    lines = text.splitlines(keepends=True)
    defs = {n.name: n for n in ast.parse(text, filename=str(source)).body if isinstance(n, ast.FunctionDef)}
    parts = []
    for name in FUNCTIONS:
        fn = defs.get(name)
        if fn is None:
            raise ValueError(
                f"{source}: no top-level function {name!r}; expected vLLM 0.32's fused_moe.py "
                f"(make a fresh copy with benchmarks/copy_vllm_ref.py)"
            )
        if [ast.unparse(d) for d in fn.decorator_list] != ["triton.jit"]:
            raise ValueError(f"{source}: {name!r} is not decorated with exactly @triton.jit")
        extra = _free_names(fn) - ALLOWED_GLOBALS
        if extra:
            raise ValueError(
                f"{source}: {name!r} needs module-level names {sorted(extra)} that the extraction does not "
                f"carry; only {sorted(ALLOWED_GLOBALS)} are available"
            )
        first = min(d.lineno for d in fn.decorator_list)
        assert fn.end_lineno is not None  # set by ast.parse
        parts.append("".join(lines[first - 1 : fn.end_lineno]))
    return HEADER.format(source=source.name) + "\n\n" + "\n\n".join(parts)


def _import_file(path: Path) -> ModuleType:
    name = path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import the extracted kernels from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton's JIT looks its function's module up while compiling
    spec.loader.exec_module(module)
    return module


@dataclass
class VllmRef:
    """A loaded copy: the extracted kernels and the folder of vLLM's tuned config tables."""

    path: Path
    kernels: ModuleType
    _tables: dict[str, dict[int, dict[str, Any]] | None] = field(default_factory=dict)

    def tuned_table(
        self, E: int, N: int, dtype: torch.dtype, device_name: str
    ) -> dict[int, dict[str, Any]] | None:
        """vLLM's tuned table for (E, N = I, dtype) on this device, as `get_moe_configs` names and reads it
        (`get_config_file_name`): `E=..,N=..,device_name=..[,dtype=float32].json`; None when absent."""
        file = self.path / CONFIG_DIR / config_file_name(E, N, dtype, device_name)
        if file.name not in self._tables:
            table = None
            if file.exists():
                raw = json.loads(file.read_text())
                raw.pop("triton_version", None)
                table = {int(m): cfg for m, cfg in raw.items()}
            self._tables[file.name] = table
        return self._tables[file.name]


def load_vllm_ref(path: Path, cache_dir: Path | None = None) -> VllmRef:
    """Extract the kernels from path/fused_moe.py into cache_dir (default: path/extracted, beside the
    copy, so it is git-ignored and travels with it) and import them. The file is named by a hash of its
    text, so extractions from two vLLM versions coexist."""
    source = Path(path) / KERNEL_FILE
    if not source.is_file():
        raise FileNotFoundError(
            f"--vllm-ref {path}: no {KERNEL_FILE} there; make the copy with "
            f"`python benchmarks/copy_vllm_ref.py` (needs vllm installed)"
        )
    code = extract_kernels(source)
    cache = Path(cache_dir) if cache_dir is not None else Path(path) / "extracted"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"vllm_fused_moe_{hashlib.sha256(code.encode()).hexdigest()[:16]}.py"
    if not target.exists() or target.read_text() != code:
        target.write_text(code)
    return VllmRef(Path(path), _import_file(target))


def config_file_name(E: int, N: int, dtype: torch.dtype, device_name: str) -> str:
    """vLLM 0.32's `get_config_file_name` for unquantized weights: spaces and slashes of the device name
    become `_`, any H200 variant reads the `NVIDIA_H200` table, and only fp32 adds a dtype field
    (`_get_config_dtype_str`: None for bf16/fp16)."""
    device = re.sub(r"[\s/]+", "_", device_name)
    if "H200" in device.split("_"):
        device = "NVIDIA_H200"
    dtype_field = ",dtype=float32" if dtype == torch.float32 else ""
    return f"E={E},N={N},device_name={device}{dtype_field}.json"


def default_config(M: int, E: int) -> dict[str, int]:
    """vLLM 0.32's `get_default_config` for bf16/fp16/fp32 and fp8 per-tensor on CUDA (its last branch),
    restated: taller K tiles and deeper pipelines for small (memory-bound) M."""
    block_m = 16 if M <= 32 else 32 if M <= 96 else 64 if M <= 512 else 128
    return {
        "BLOCK_SIZE_M": block_m,
        "BLOCK_SIZE_N": 64 if M <= 64 else 128,
        "BLOCK_SIZE_K": 128 if M <= 64 else 64,
        "GROUP_SIZE_M": 16 if M // max(E, 1) > 128 else 1,
        "num_warps": 4 if M <= 128 else 8,
        "num_stages": 4 if M <= 32 else 3,
    }


def stock_config(
    ref: VllmRef, M: int, E: int, I: int, dtype: torch.dtype, device_name: str
) -> tuple[dict, str]:
    """(config, "tuned" | "default") as vLLM 0.32's `try_get_optimal_moe_config` picks it with no override:
    the tuned table's entry nearest M when a table exists, else `default_config`."""
    table = ref.tuned_table(E, I, dtype, device_name)
    if table:
        return dict(table[min(table, key=lambda m: abs(m - M))]), "tuned"
    return default_config(M, E), "default"


def uses_naive_assignment(T: int, K: int, E: int) -> bool:
    """vLLM 0.32's `_prepare_expert_assignment` skips the align (one block per pair) at T·K·4 ≤ E."""
    return T * K * SPARSITY <= E


def _gemm(
    ref: VllmRef,
    A: torch.Tensor,  # [M, Hin] (or [M*K, Hin] for the down GEMM, then top_k = 1)
    B: torch.Tensor,  # [E, N, Hin]
    C: torch.Tensor,  # [M, top_k, N] out
    topk_weights: torch.Tensor,
    assign: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor],
    mul_routed_weight: bool,
    top_k: int,
    config: dict[str, Any],
) -> None:
    """One launch of the extracted `fused_moe_kernel`, arguments as `invoke_fused_moe_triton_kernel`
    passes them for unquantized weights without bias (tensor descriptors off: VLLM_TRITON_USE_TD's
    default)."""
    sorted_ids, expert_ids, num_post_pad = assign
    M, num_pairs = A.size(0), A.size(0) * top_k
    block_m = config["BLOCK_SIZE_M"]
    if sorted_ids is None:
        EM = num_pairs * block_m
    else:
        EM = sorted_ids.size(0)
        if block_m > M:  # vLLM: at most T·K blocks are used when T < BLOCK_M
            EM = min(EM, M * top_k * block_m)
    meta = {k: v for k, v in config.items() if k != "BLOCK_SIZE_K"}
    meta["SPLIT_K"] = 1
    grid = (triton.cdiv(EM, block_m) * triton.cdiv(B.size(1), config["BLOCK_SIZE_N"]),)
    ref.kernels.fused_moe_kernel[grid](
        A, B, C, None, None, None, topk_weights, sorted_ids, expert_ids, num_post_pad,
        B.size(1), B.size(2), EM, num_pairs,
        A.stride(0), A.stride(1), B.stride(0), B.stride(2), B.stride(1), C.stride(1), C.stride(2),
        0, 0, 0, 0, 0, 0, 0,  # scale and bias strides
        0, 0,  # group_n, group_k
        MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k, compute_type=COMPUTE_TYPES[A.dtype],
        use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False, per_channel_quant=False,
        naive_block_assignment=sorted_ids is None, HAS_BIAS=False, BLOCK_SIZE_K=config["BLOCK_SIZE_K"],
        SWAP_AB=False, USE_TD=False, **meta,
    )  # fmt: skip


def stock_assignment(
    topk_ids: torch.Tensor, E: int, block_m: int
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(sorted_ids | None, expert_ids, num_tokens_post_padded), one launch: vLLM's naive path where it
    takes it (one `torch.full`, as stock), else the align stand-in."""
    T, K = topk_ids.shape
    if uses_naive_assignment(T, K, E):
        return (
            None,
            topk_ids.view(-1),
            torch.full((1,), T * K * block_m, dtype=torch.int32, device=topk_ids.device),
        )
    aligned = align_stand_in(topk_ids, E, block_m)
    return aligned.sorted_ids, aligned.expert_ids, aligned.num_post_pad


def vllm_stock_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    ref: VllmRef,
    config: dict[str, Any] | None = None,
) -> torch.Tensor:
    """vLLM 0.32's `fused_experts_impl` for x [T, H] (bf16/fp16/fp32), w13 [E, 2I, H], w2 [E, H, I],
    topk_weights [T, K] (fp32, contiguous), topk_ids [T, K]; returns [T, H] in x's dtype. Every expert id
    must lie in [0, E): stock has no pruning. config: pins the launch config (tests pass small tiles);
    default: `stock_config` for this device."""
    if x.dtype not in COMPUTE_TYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of {list(COMPUTE_TYPES)}")
    T, H = x.shape
    E, N, _ = w13.shape  # N = 2I
    K = topk_ids.size(1)
    if config is None:
        name = torch.cuda.get_device_name(x.device) if x.is_cuda else "cpu"
        config, _ = stock_config(ref, T, E, w2.size(2), x.dtype, name)
    assign = stock_assignment(topk_ids, E, config["BLOCK_SIZE_M"])
    # As vLLM: cache1 and cache3 share memory (cache1 is dead when the down GEMM writes cache3).
    cache13 = torch.empty(T * K * max(N, H), device=x.device, dtype=x.dtype)
    cache1 = cache13[: T * K * N].view(T, K, N)
    cache3 = cache13[: T * K * H].view(T, K, H)
    cache2 = torch.empty(T * K, N // 2, device=x.device, dtype=x.dtype)
    _gemm(ref, x, w13, cache1, topk_weights, assign, False, K, config)
    silu_and_mul_stand_in(cache2, cache1.view(-1, N))
    _gemm(ref, cache2, w2, cache3, topk_weights, assign, True, 1, config)
    # In place of vLLM's `ops.moe_sum`, which for the K = 6 and 8 benchmarked is `at::sum_out(out, cache3,
    # 1)` (gpu-perf-notes.md §6): the same reduction kernel.
    return torch.sum(cache3, dim=1)
