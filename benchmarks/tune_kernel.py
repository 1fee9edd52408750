"""Tune the launch configs of vllm_alloc.kernels.fused_moe for one layer shape on this GPU (GPU only).

For each T bucket it sweeps BLOCK_M / BLOCK_N / BLOCK_K / num_warps / num_stages, with the untuned default
(`default_config`: vLLM 0.32's default tiles) among them, checks every candidate against
`vllm_alloc.routing.reference.moe_forward` first (a wrong or failing config is dropped, never timed), times
the survivors with CUDA events (median) and writes the fastest per bucket to
`kernels/configs/E=..,H=..,I=..,dtype=..,device=...json`, the table `pick_config` reads at run time.
Serving never runs this: it only reads the tables.

Routing is tuned at one budget (`--budget`, default 1.0: the most pairs, where tiles matter most); the
table is keyed by T, and a pruned batch at the same T has fewer pairs per expert.

    python benchmarks/tune_kernel.py --model qwen3-30b-a3b
    python benchmarks/tune_kernel.py --E 64 --K 8 --H 2048 --I 1024 --T 1 16 256 --quick
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import triton

# bench_kernel.py sits next to this file and puts the checkout on sys.path.
from bench_kernel import DTYPES, MODELS, LayerShape, check, make_layer, make_routing, time_cuda
from vllm_alloc.kernels import config as config_mod
from vllm_alloc.kernels.op import fused_moe

T_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]


def candidates(T: int, shape: LayerShape, quick: bool) -> list[dict[str, int]]:
    """The sweep for one T. BLOCK_M above twice the mean pairs per expert only pads, so it is skipped."""
    mean_pairs = T * shape.K / shape.E
    block_m = [m for m in (16, 32, 64, 128) if m == 16 or m <= 2 * mean_pairs]
    space = {
        "BLOCK_M": block_m,
        "BLOCK_N": [32, 64, 128] if quick else [32, 64, 128, 256],
        "BLOCK_K": [64, 128] if quick else [32, 64, 128, 256],
        "num_warps": [4, 8],
        "num_stages": [3, 4] if quick else [2, 3, 4, 5],
    }
    return [dict(zip(space, values, strict=True)) for values in itertools.product(*space.values())]


def tune_bucket(
    T: int, shape: LayerShape, w13: torch.Tensor, w2: torch.Tensor, args: argparse.Namespace
) -> tuple[dict[str, int], float]:
    x = torch.randn(T, shape.H, device="cuda", dtype=w13.dtype)
    ids, weights = make_routing(T, shape, args.budget, "ceil")
    best: tuple[dict[str, int], float] | None = None
    # The untuned default always competes, so a written bucket is never slower than running without one.
    default = config_mod.device_default(T, w13.dtype, w13.device)
    sweep = candidates(T, shape, args.quick)
    for cfg in [default, *(c for c in sweep if c != default)]:
        run = functools.partial(fused_moe, x, w13, w2, ids, weights, config=cfg)
        try:
            error = check(run(), x, w13, w2, ids, weights)
        except Exception as err:  # out of shared memory, compile error: that candidate only, not the sweep
            error = f"{type(err).__name__}: {err}"
        if error:
            print(f"  T={T} {cfg}: dropped ({error})", file=sys.stderr)
            continue
        ms = time_cuda(run, args.warmup, args.iters)
        if cfg is default:
            print(f"  T={T} default {cfg}: {ms * 1e3:.1f} µs", file=sys.stderr)
        if best is None or ms < best[1]:
            best = (cfg, ms)
    if best is None:
        raise RuntimeError(f"T={T}: no candidate config passed the correctness check")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", choices=sorted(MODELS), help="a benchmark layer shape (else --E/--K/--H/--I)"
    )
    for letter in ("E", "K", "H", "I"):
        parser.add_argument(f"--{letter}", type=int)
    parser.add_argument("--T", nargs="+", type=int, default=T_BUCKETS, help="T buckets to tune")
    parser.add_argument("--budget", type=float, default=1.0, help="b of the routing tuned on, in (0, 1]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="a smaller sweep")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out-dir", type=Path, default=config_mod.CONFIG_DIR)
    args = parser.parse_args(argv)
    if args.model:
        shape = MODELS[args.model]
    elif None in (args.E, args.K, args.H, args.I):
        parser.error("give --model or all of --E --K --H --I")
    else:
        shape = LayerShape(f"E={args.E},K={args.K}", args.E, args.K, args.H, args.I)
    if not 0.0 < args.budget <= 1.0:
        parser.error(f"--budget {args.budget} is outside (0, 1]")
    if not torch.cuda.is_available():
        print("tune_kernel.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing tuned.")
        return 2

    dtype = DTYPES[args.dtype]
    w13, w2 = make_layer(shape, dtype)
    device = config_mod.device_name(torch.device("cuda"))
    table: dict[str, object] = {
        "meta": {
            "layer": shape.name,
            "K": shape.K,
            "budget": args.budget,
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "date": datetime.date.today().isoformat(),
            "sweep": "quick" if args.quick else "full",
        }
    }
    for T in sorted(args.T):
        cfg, ms = tune_bucket(T, shape, w13, w2, args)
        print(f"T={T}: {cfg} {ms * 1e3:.1f} µs", flush=True)
        table[str(T)] = cfg
    path = args.out_dir / config_mod.table_name(shape.E, shape.H, shape.I, dtype, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
