"""MoE-layer time of vllm_alloc.kernels.fused_moe under activation budgets (GPU only).

For the layer shapes of DeepSeek-V2-Lite, Qwen3-30B-A3B and OLMoE-1B-7B, at T tokens and budgets b, it
times the budget-aware kernel against itself at b = 1.0 and against vLLM's stock Triton `fused_experts`
(when `import vllm` works), side by side in one run. Achieved bandwidth is reported as a share of a
measured HBM roofline (one large device-to-device copy), counting the bytes a perfect kernel must move:
the weights of the *distinct* experts with at least one kept pair, plus x and y. Every configuration is
checked against `vllm_alloc.routing.reference.moe_forward` before it is timed; a wrong kernel gets no number.

Pruning as Alloc-T produces it: each token keeps a prefix of its own top-K ranking by (random) router
score, of length ceil(b·K) (`--keep ceil`, default) or floor(b·K) (`--keep floor`), at least 1. Kept
experts keep their full-model weights (DESIGN.md §2, option `topk`). With `--caps ρ ...`, every b < 1
also gets rows under the distinct-expert cap (`vllm_alloc.routing.cap`, all T tokens one cap group, K_base =
1):
the kernel then reads at most max(⌈ρ·D⌉, the tokens' top-1 experts) experts, D those the pruned
routing touches.

    python benchmarks/bench_kernel.py --out BENCH_KERNEL.md
    python benchmarks/bench_kernel.py --models qwen3-30b-a3b --T 1 16 --budgets 1.0 0.5
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

# A source checkout run (`python benchmarks/bench_kernel.py`) finds vllm_alloc without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_alloc.routing.reference import distinct_experts, moe_forward


@dataclass(frozen=True)
class LayerShape:
    name: str
    E: int
    K: int
    H: int
    I: int


MODELS = {
    "deepseek-v2-lite": LayerShape("DeepSeek-V2-Lite", E=64, K=6, H=2048, I=1408),
    "qwen3-30b-a3b": LayerShape("Qwen3-30B-A3B", E=128, K=8, H=2048, I=768),
    "olmoe-1b-7b": LayerShape("OLMoE-1B-7B", E=64, K=8, H=2048, I=1024),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# Rows checked against the fp32 oracle per configuration (the oracle loops over pairs in Python).
CHECK_ROWS = 64
# (rtol, atol) for the correctness gate; outputs are O(1) (weights scaled by 1/sqrt(fan-in)).
TOLERANCE = {torch.bfloat16: (4e-2, 4e-2), torch.float16: (1e-2, 1e-2)}


def make_layer(shape: LayerShape, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random w13 [E, 2I, H], w2 [E, H, I] on CUDA, scaled so that outputs are O(1)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    w13 = torch.randn(shape.E, 2 * shape.I, shape.H, device="cuda", generator=g, dtype=dtype)
    w2 = torch.randn(shape.E, shape.H, shape.I, device="cuda", generator=g, dtype=dtype)
    return w13.mul_(shape.H**-0.5), w2.mul_(shape.I**-0.5)


def make_routing(
    T: int, shape: LayerShape, b: float, keep: str, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """topk_ids int32 / topk_weights fp32 [T, K]: softmax top-K of random logits, each token's ranking
    pruned to its first ceil(b·K) (or floor) entries; pruned slots are id −1 with weight 0."""
    g = torch.Generator(device="cuda").manual_seed(seed + T)
    logits = torch.randn(T, shape.E, device="cuda", generator=g)
    weights, ids = torch.softmax(logits, dim=-1).topk(shape.K, dim=-1)  # sorted: a prefix is the top
    weights = weights / weights.sum(dim=-1, keepdim=True)
    kept = max(1, math.ceil(b * shape.K) if keep == "ceil" else math.floor(b * shape.K))
    pruned = torch.arange(shape.K, device="cuda")[None, :] >= kept
    ids = ids.int().masked_fill(pruned, -1)
    return ids, weights.masked_fill(pruned, 0.0)


def cap_routing(
    ids: torch.Tensor, weights: torch.Tensor, share: float, E: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`make_routing`'s pruned routing under the distinct-expert cap at share ρ = `share` (one cap group
    of all T tokens). Pruned slots must be a suffix of each row, as make_routing leaves them."""
    from vllm_alloc.routing.cap import cap_experts, share_units

    T = ids.shape[0]
    kept = ids >= 0
    keys = torch.where(kept, weights, -1.0)  # the ranking: pruned slots last
    group = torch.zeros(T, dtype=torch.int64, device=ids.device)
    capped = cap_experts(
        keys, ids.clamp(min=0), kept, group, torch.full_like(group, share_units(share)), E, 1
    ).kept
    return torch.where(capped, ids, -1), torch.where(capped, weights, 0.0)


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of fn over iters runs, each between its own pair of CUDA events."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def hbm_roofline_gbps(n_bytes: int = 1 << 30) -> float:
    """Bandwidth of one large device-to-device copy (read + write counted), in GB/s."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), warmup=3, iters=10)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def check(
    y: torch.Tensor,
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
) -> str | None:
    """None if y matches the oracle on up to CHECK_ROWS rows (tokens are independent), else why not."""
    T = x.shape[0]
    rows = torch.randperm(T, device=x.device)[:CHECK_ROWS] if T > CHECK_ROWS else torch.arange(T)
    rows = rows.to(x.device)
    ref = moe_forward(x[rows], w13, w2, weights[rows], ids[rows])
    got = y[rows].float()
    if not torch.isfinite(got).all():
        return "non-finite output"
    rtol, atol = TOLERANCE[x.dtype]
    try:
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    except AssertionError as err:
        return str(err).splitlines()[-1]
    return None


def stock_vllm() -> Callable[..., torch.Tensor] | None:
    """vLLM's stock Triton fused MoE, or None where vLLM is not importable."""
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as err:  # any import failure means: no comparison, said in the report
        print(f"# vLLM not importable ({type(err).__name__}: {err}); no stock-kernel column", file=sys.stderr)
        return None

    def run(x, w13, w2, ids, weights):  # type: ignore[no-untyped-def]
        return fused_experts(x, w13, w2, weights, ids, inplace=False)

    return run


def layer_bytes(shape: LayerShape, T: int, ids: torch.Tensor, elt: int) -> int:
    """Bytes a perfect kernel moves: weights of the distinct kept experts + x read + y written."""
    per_expert = (2 * shape.I * shape.H + shape.H * shape.I) * elt
    return distinct_experts(ids) * per_expert + 2 * T * shape.H * elt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--T", nargs="+", type=int, default=[1, 4, 16, 64, 256, 2048], help="tokens")
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=[1.0, 0.75, 0.5, 0.33], help="b in (0, 1]"
    )
    parser.add_argument("--keep", choices=["ceil", "floor"], default="ceil", help="kept: ceil/floor(b·K)")
    parser.add_argument(
        "--caps", nargs="*", type=float, default=[], help="distinct-expert cap shares ρ: rows at every b < 1"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--config", help="pin one launch config (JSON), as VLLM_ALLOC_KERNEL_CONFIG")
    parser.add_argument("--no-vllm", action="store_true", help="skip the stock vLLM kernel")
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    for b in args.budgets:
        if not 0.0 < b <= 1.0:
            parser.error(f"--budgets: b={b} is outside (0, 1]")
    for T in args.T:
        if T < 1:
            parser.error(f"--T: T={T} must be >= 1")
    for rho in args.caps:
        if not 0.001 <= rho < 1:
            parser.error(f"--caps: ρ={rho} is outside [0.001, 1) (1 is no cap)")
    return args


def bench_model(
    shape: LayerShape,
    args: argparse.Namespace,
    roofline: float,
    vllm_fn: Callable[..., torch.Tensor] | None,
) -> tuple[list[str], int]:
    """Markdown rows for one layer shape over T and b, and the number of configurations that failed."""
    from vllm_alloc.kernels import fused_moe

    dtype = DTYPES[args.dtype]
    config = json.loads(args.config) if args.config else None
    w13, w2 = make_layer(shape, dtype)
    rows: list[str] = []
    failures = 0
    for T in args.T:
        x = torch.randn(T, shape.H, device="cuda", dtype=dtype)
        full_ms: float | None = None
        runs = []
        for b in sorted(args.budgets, reverse=True):
            ids, weights = make_routing(T, shape, b, args.keep)
            runs.append((b, f"{b}", ids, weights))
            if b < 1.0:
                for rho in args.caps:
                    runs.append((b, f"{b} ρ={rho:g}", *cap_routing(ids, weights, rho, shape.E)))
        for b, label, ids, weights in runs:
            ours = functools.partial(fused_moe, x, w13, w2, ids, weights, config=config)
            error = check(ours(), x, w13, w2, ids, weights)
            if error:
                failures += 1
                rows.append(f"| {shape.name} | {T} | {label} | WRONG: {error} |")
                print(rows[-1], flush=True)
                continue
            ms = time_cuda(ours, args.warmup, args.iters)
            vs_full = "" if full_ms is None or b == 1.0 else f"{ms / full_ms:.2f}"
            vs_vllm = ""
            if b == 1.0:
                full_ms = ms
                if vllm_fn is not None:
                    stock = functools.partial(vllm_fn, x, w13, w2, ids, weights)
                    try:
                        stock_error = check(stock(), x, w13, w2, ids, weights)
                    except Exception as err:  # an API change in vLLM: report it, keep our numbers
                        stock_error = f"{type(err).__name__}: {err}"
                    if stock_error:
                        vs_vllm = f"vLLM wrong: {stock_error}"
                    else:
                        vs_vllm = f"{ms / time_cuda(stock, args.warmup, args.iters):.2f}"
            gbps = layer_bytes(shape, T, ids, x.element_size()) / (ms * 1e-3) / 1e9
            pairs = int((ids != -1).sum())
            rows.append(
                f"| {shape.name} | {T} | {label} | {pairs} | {distinct_experts(ids)} | {ms * 1e3:.1f} | "
                f"{vs_full} | {vs_vllm} | {gbps:.0f} | {100 * gbps / roofline:.0f}% |"
            )
            print(rows[-1], flush=True)
    return rows, failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 2
    vllm_fn = None if args.no_vllm else stock_vllm()
    roofline = hbm_roofline_gbps()
    header = [
        f"# fused_moe on {torch.cuda.get_device_name()}, {args.dtype}; "
        f"HBM roofline {roofline:.0f} GB/s (1 GiB D2D copy)",
        "",
        "bytes = weights of distinct kept experts + x + y; time = median of "
        f"{args.iters} runs (CUDA events, {args.warmup} warm-up); kept per token = {args.keep}(b·K) ≥ 1; "
        "×(b=1): time over the same kernel at b = 1.0; ×vLLM: ours over stock `fused_experts` at b = 1.0",
        "",
        "| model | T | b | pairs | experts | µs | ×(b=1) | ×vLLM | GB/s | % roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    failures = 0
    for key in args.models:
        model_rows, model_failures = bench_model(MODELS[key], args, roofline, vllm_fn)
        rows += model_rows
        failures += model_failures
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text("\n".join([*header, *rows]) + "\n")
        print(f"wrote {args.out}")
    if failures:
        print(f"{failures} configuration(s) failed the correctness check; their times are not reported.")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
