"""End-to-end serving benchmark on vLLM (CPU): stock vLLM vs uniform top-⌊K/2⌋ vs the plugin under budgets.

    python benchmarks/bench_serve.py [--model DIR] [--batch-sizes 1,8,32] [--budgets 1.0,0.75,0.5]
                                     [--rounds 3] [--out FILE.md] [--json FILE] [--quick]
                                     [--expert-cap ρ,... [--cap-budgets 0.5] [--profile-batch N]
                                      [--png FILE]]

Configurations (DESIGN.md §5):
  (a) vLLM without the plugin (VLLM_ALLOC_DISABLE=1);
  (b) vLLM without the plugin, `hf_overrides={"num_experts_per_tok": K // 2}`: the uniform baseline;
  (c) vLLM with the plugin, one engine serving every budget b per request (`extra_args`);
  (t) vLLM without the plugin at `num_experts_per_tok` = ⌊b·K⌋, one engine per budget b < 1 of --budgets
      (b = 0.5 at an even K is (b)'s engine): vLLM's own top-⌊b·K⌋, the reference for what the model
      allows at each budget;
  (d) (with --expert-cap ρ[,ρ...]) the plugin with the distinct-expert cap: the decode tokens at one budget
      below 1.0 share at most ⌈ρ·D⌉ of the D experts they would touch per MoE layer and pass
      (`vllm_alloc.routing.cap`), at the budgets --cap-budgets. One engine serves every ρ: it is set between
      measurements (`vllm_alloc_set_cap`), as the profiler does.
Each configuration is one engine in its own long-lived process (serve_lib.EngineWorker), all alive at
once (the benchmark model and its KV cache are sized so three fit in memory), and only one measures at a
time. Measurements are interleaved: in each round, for each batch size, every configuration (and every
budget of (c)) runs once, in an order rotated per round. The report holds medians over rounds.

One measurement: N requests of P random prompt tokens, submitted together, greedy, `ignore_eos`, M new
tokens each. Prefill tok/s = N·P / time to the last first token; decode tok/s = N·(M − 1) / the rest;
TTFT and ITL are medians over requests. Prefix caching is off and prompts differ per round.

Without --model, a random-weight Qwen3-MoE big enough that routed-expert weights dominate decode is built
once (vllm_alloc.tiny, cached): L = 4 MoE layers, E = 64, K = 8, H = 1024, I = 512, 8 attention heads,
vocab 1024 (~0.8 GB bf16 of expert weights).

Alloc-T's share of MoE-layer time is measured inside engine (c) after the rounds: one batch per N in
--share-batches at b = 0.5 and at b = 1.0, with the plugin's MoE-layer calls timed per call
(serve_lib._Engine.alloc_t_share); its prefill pass gives T = N·P, its decode passes T = N.

With (d), a cap profile follows (unless --no-share): one batch of --profile-batch requests per
configuration, (c) at b = 1.0 and 0.5 where measured and (d) at every --cap-budgets b and ρ, with the
MoE-layer calls timed and the distinct experts each decode call touches read from the plugin's counter:
where decode time goes, and what the cap takes out of it. --png plots it (the ρ curve at b = 0.5, against
(c) b = 1.0, which it needs).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_lib

# 8 attention heads of 32 (not H / 32 = 32): vLLM CPU's bf16 dense GEMMs are slow on AVX2 (no oneDNN), and
# with 32 heads the attention projections took half of a batch-32 decode step; with 8 the experts dominate.
BENCH_MODEL = dict(
    num_layers=4,
    hidden_size=1024,
    num_experts=64,
    top_k=8,
    moe_intermediate_size=512,
    num_attention_heads=8,
    num_key_value_heads=4,
)
QUICK_MODEL = dict(num_layers=2, hidden_size=256, num_experts=64, top_k=8, moe_intermediate_size=128)


def bench_model(quick: bool = False) -> Path:
    """The benchmark model (QUICK_MODEL's with quick), built once and cached (vllm_alloc.tiny); the HTTP
    benchmark and the long soak serve the same one."""
    from vllm_alloc import tiny

    return tiny.cached_model("qwen3_moe", vocab_size=1024, **(QUICK_MODEL if quick else BENCH_MODEL))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="MoE checkpoint folder (default: build the benchmark model)")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes N")
    p.add_argument("--budgets", default="1.0,0.75,0.5", help="comma-separated plugin budgets b")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds R")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens P per request")
    p.add_argument("--max-tokens", type=int, default=32, help="generated tokens M per request")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OpenMP threads per engine, unbound (0: vLLM's own binding); 1 suits a shared 2-core machine",
    )
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's torch.compile)")
    p.add_argument("--configs", default="a,b,c", help="which of the configurations a, b, c, t to run")
    p.add_argument(
        "--no-share", action="store_true", help="skip the Alloc-T share measurement and the cap profile"
    )
    p.add_argument(
        "--share-batches",
        default="1,2,4,8,16,32",
        help="batch sizes N of the Alloc-T share measurement: decode passes T = N, prefill T = N·P",
    )
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument(
        "--json",
        help="also write the results to this file: {machine, medians: {config: {N: {metric: value}}}, "
        "cap_profile: [row, ...]}",
    )
    p.add_argument(
        "--budget-file",
        help="budget file for the plugin's engine (c) (default: none, the uniform allocation)",
    )
    p.add_argument(
        "--expert-cap",
        help="add engine (d): the plugin with the distinct-expert cap, at each of these comma-separated "
        "shares ρ (the share of distinct experts kept)",
    )
    p.add_argument(
        "--profile-batch",
        type=int,
        help="batch size of the cap profile (default: 32 if measured, else the largest batch size)",
    )
    p.add_argument("--png", help="with (d): plot the cap profile to this file")
    p.add_argument("--cap-budgets", default="0.5", help="comma-separated budgets b measured on engine (d)")
    p.add_argument("--quick", action="store_true", help="smoke test: small model, 1 round, few tokens")
    args = p.parse_args(argv)
    if args.prompt_len < 2:  # the share rows tell prefill (T = N·P) from decode (T = N) by T
        p.error(f"--prompt-len {args.prompt_len}: must be at least 2")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: must be at least 1")
    if args.quick:
        args.batch_sizes, args.rounds, args.prompt_len, args.max_tokens = "1,4", 1, 16, 4
        args.share_batches = "1,4"
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    args.budgets = [float(x) for x in args.budgets.split(",")]
    args.configs = [c.strip() for c in args.configs.split(",")]
    args.cap_budgets = [float(x) for x in args.cap_budgets.split(",")]
    args.expert_caps = []
    if args.expert_cap is not None:
        try:
            args.expert_caps = [float(x) for x in args.expert_cap.split(",")]
        except ValueError:
            p.error(f"--expert-cap {args.expert_cap!r}: expected comma-separated shares in [0.001, 1)")
        from vllm_alloc.values import caps

        for cap in args.expert_caps:
            if not caps(cap):
                p.error(f"--expert-cap {cap:g}: must be in [0.001, 1) (1 is no cap)")
        if len(set(args.expert_caps)) < len(args.expert_caps):
            p.error(f"--expert-cap {args.expert_cap}: a share is listed twice")
        args.configs.append("d")
    if args.png and (not args.expert_caps or args.no_share or "c" not in args.configs):
        p.error("--png plots the cap profile: it needs --expert-cap, engine c (--configs) and no --no-share")
    if args.profile_batch is None:
        args.profile_batch = 32 if 32 in args.batch_sizes else max(args.batch_sizes)
    elif args.profile_batch not in args.batch_sizes:
        p.error(f"--profile-batch {args.profile_batch}: must be one of --batch-sizes {args.batch_sizes}")
    args.share_batches = [int(x) for x in args.share_batches.split(",")]
    return args


def model_shape(model: Path) -> dict[str, int]:
    cfg = json.loads((model / "config.json").read_text())
    E = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    return {
        "E": int(E),
        "K": int(cfg["num_experts_per_tok"]),
        "H": int(cfg["hidden_size"]),
        "I": int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]),
        "L": int(cfg["num_hidden_layers"]),
        "vocab": int(cfg["vocab_size"]),
    }


class Config(NamedTuple):
    """One measured configuration: its report label, the engine that runs it, the request budget b
    (None: no budget sent), and the cap's share ρ set on engine (d) before it runs."""

    label: str
    engine: str
    budget: float | None
    cap: float | None = None


def config_names(
    configs: list[str],
    budgets: list[float],
    K: int,
    caps: tuple[float, ...] = (),
    cap_budgets: tuple[float, ...] = (),
) -> list[Config]:
    """Every measured configuration, (a) first: ratios are against it."""
    out: list[Config] = []
    if "a" in configs:
        out.append(Config("(a) stock", "a", None))
    if "b" in configs:
        out.append(Config(f"(b) top-{K // 2}", "b", None))
    if "c" in configs:
        out += [Config(f"(c) b={b:g}", "c", b) for b in budgets]
    if "t" in configs:
        out += [Config(f"(t) top-{k} b={b:g}", f"t{k}", None) for b, k in topk_budgets(budgets, K)]
    if "d" in configs:
        out += [Config(f"(d) b={b:g} ρ={cap:g}", "d", b, cap) for cap in caps for b in cap_budgets]
    return out


def topk_budgets(budgets: list[float], K: int) -> list[tuple[float, int]]:
    """(b, ⌊b·K⌋) for each budget below 1.0 of `budgets` (the stock model is (a)); at least one expert."""
    return [(b, max(1, math.floor(b * K + 1e-9))) for b in budgets if b < 1.0]


def profile_configs(measured: list[Config]) -> list[Config]:
    """What the cap profile measures: the plugin uncapped at b = 1.0 and 0.5 (c), and every (d)."""
    return [m for m in measured if (m.engine == "c" and m.budget in (1.0, 0.5)) or m.engine == "d"]


def machine_info(model: Path, shape: dict[str, int]) -> str:
    """CPU, versions, the commit the engines start from (taken before they start), and the model."""
    import torch
    import vllm

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        commit += " + uncommitted changes" if commit and dirty else ""
    except OSError:
        commit = "?"
    import os

    return (
        f"CPU {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"vLLM {vllm.__version__}, commit {commit or '?'}; model {model.name}: "
        f"L={shape['L']} E={shape['E']} K={shape['K']} H={shape['H']} I={shape['I']} vocab={shape['vocab']}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = Path(args.model) if args.model else bench_model(args.quick)
    shape = model_shape(model)
    machine = machine_info(model, shape)  # before the engines start: the code they run
    K = shape["K"]
    measured = config_names(args.configs, args.budgets, K, tuple(args.expert_caps), tuple(args.cap_budgets))
    N_max = max(args.batch_sizes)
    spec = {
        "model": str(model),
        "eager": args.eager,
        "max_model_len": args.prompt_len + args.max_tokens + 16,
        "max_num_seqs": N_max,
        # One prefill step for the largest batch, so TTFT and prefill tok/s mean the same at every N.
        "max_num_batched_tokens": max(N_max * args.prompt_len, 256),
        "kv_cache_bytes": 256 * 2**20,
        "threads": args.threads,
    }
    engines = {
        "a": {**spec, "plugin": False},
        "b": {**spec, "plugin": False, "hf_overrides": {"num_experts_per_tok": K // 2}},
        "c": {**spec, "plugin": True, "budget_file": args.budget_file},
        "d": {
            **spec,
            "plugin": True,
            "budget_file": args.budget_file,
            "expert_cap": args.expert_caps[0] if args.expert_caps else None,
        },
    }
    for _, k in topk_budgets(args.budgets, K) if "t" in args.configs else ():
        engines[f"t{k}"] = {**spec, "plugin": False, "hf_overrides": {"num_experts_per_tok": k}}
    wanted = [e for e in ("a", "b", "c", "d") if e in args.configs]
    wanted += sorted({m.engine for m in measured if m.engine.startswith("t")}, reverse=True)
    print(f"model {model} ({shape}); engines {wanted}; rounds {args.rounds}", flush=True)

    workers: dict[str, serve_lib.EngineWorker] = {}
    share: list[dict[str, Any]] = []
    profiled: list[tuple[Config, serve_lib.Share]] = []
    cap_now = [engines["d"]["expert_cap"]]  # the share engine (d) serves now
    samples: list[tuple[tuple[str, int], dict[str, float]]] = []
    try:
        for e in wanted:  # one at a time: start-up compiles, and the two cores are shared
            t0 = time.perf_counter()
            workers[e] = serve_lib.EngineWorker(e, engines[e])
            workers[e].wait_ready(timeout=900)
            print(f"engine ({e}) ready in {time.perf_counter() - t0:.0f} s", flush=True)

        def request(
            bs: int, budget: float | None, seed: int, max_tokens: int = args.max_tokens
        ) -> dict[str, Any]:
            return {
                "batch": bs,
                "prompt_len": args.prompt_len,
                "max_tokens": max_tokens,
                "budget": budget,
                "seed": seed,
            }

        def worker(cfg: Config) -> serve_lib.EngineWorker:
            """cfg's engine, serving cfg's cap share where it is (d)."""
            if cfg.engine == "d" and cfg.cap != cap_now[0]:
                workers["d"].call("set_cap", cfg.cap)
                cap_now[0] = cfg.cap
            return workers[cfg.engine]

        # Warm-up: every engine, batch size and budget once (first-call costs, compiled shapes); a few
        # decode steps are enough, prefill is what costs on a CPU.
        for cfg in measured:
            for bs in args.batch_sizes:
                worker(cfg).measure(request(bs, cfg.budget, seed=10**6 + bs, max_tokens=3))
        print("warm-up done", flush=True)

        for r in range(args.rounds):
            for bs in args.batch_sizes:
                order = measured[r % len(measured) :] + measured[: r % len(measured)]  # rotate per round
                for cfg in order:
                    label = cfg.label
                    s = serve_lib.summarize(worker(cfg).measure(request(bs, cfg.budget, seed=1000 * r + bs)))
                    samples.append(((label, bs), s))
                    print(
                        f"round {r} N={bs:>3} {label:<12} "
                        + " ".join(f"{m}={s[m]:.2f}" for m in serve_lib.METRICS),
                        flush=True,
                    )
        if not args.no_share and "c" in workers:
            for bs in [n for n in args.share_batches if n <= N_max]:
                half = workers["c"].call("alloc_t_share", request(bs, 0.5, seed=7000 + bs))
                full = workers["c"].call("alloc_t_share", request(bs, 1.0, seed=8000 + bs))
                share += serve_lib.share_rows(half, full, bs, args.prompt_len)
            share.sort(key=lambda r: (r["T"], r["pass"]))
            print("Alloc-T share measured", flush=True)
        if not args.no_share and "d" in workers:
            for i, cfg in enumerate(profile_configs(measured)):
                req = request(args.profile_batch, cfg.budget, seed=9000 + i)
                profiled.append((cfg, worker(cfg).call("alloc_t_share", req)))
            print("cap profile measured", flush=True)
    finally:
        for w in workers.values():
            w.stop()

    medians = serve_lib.median_by_key(samples)
    labels = [m.label for m in measured]
    full = next((m.label for m in measured if m.engine == "c" and m.budget == 1.0), None)
    half = next((m.label for m in measured if m.engine == "c" and m.budget == 0.5), None)
    uniform = next((m.label for m in measured if m.engine == "b"), None)
    threads = f"{args.threads} OpenMP thread(s) per engine" if args.threads else "vLLM's thread binding"
    report = [
        "### Serving: medians over rounds",
        "",
        f"{machine}. N requests × P={args.prompt_len} prompt tokens, "
        f"M={args.max_tokens} generated, greedy; {args.rounds} interleaved round(s); "
        f"{'eager' if args.eager else 'torch.compile (vLLM default)'}; "
        f"{threads}. Ratios: times better than (a).",
        "",
        serve_lib.results_table(medians, labels, args.batch_sizes),
        "",
    ]
    if labels[0].startswith("(a)"):
        report += ["Targets (decode tok/s, DESIGN.md §5):", ""]
        report += serve_lib.target_lines(medians, args.batch_sizes, labels[0], full, half)
        for capped in (m.label for m in measured if m.engine == "d" and m.budget == 0.5):
            report += serve_lib.cap_lines(medians, args.batch_sizes, capped, full, uniform)
        report.append("")
    if share:
        report += [
            f"### Alloc-T share of MoE-layer time (plugin engine, b = 0.5; E={shape['E']}, K={K}, "
            f"H={shape['H']}, I={shape['I']})",
            "",
            "Timed inside engine (c) during a batch: Alloc-T = ranking keys + host reallocation + its "
            "activation count; MoE layer = the whole routed-expert call (Alloc-T, then the kernel on the "
            "kept pairs); b = 1.0 column: the same call at b = 1.0 (stock kernel). Medians over the "
            "MoE-layer calls of one batch per row.",
            "",
            serve_lib.share_table(share),
            "",
        ]
    profile = [
        row
        for cfg, layer in profiled
        if (
            row := serve_lib.profile_row(
                cfg.label,
                cfg.budget,
                cfg.cap,
                layer,
                args.profile_batch,
                medians[(cfg.label, args.profile_batch)]["decode_tps"],
            )
        )
    ]
    if profile:
        full_tps = None if full is None else medians[(full, args.profile_batch)]["decode_tps"]
        report += [
            f"### Cap profile: decode at batch {args.profile_batch} (E={shape['E']}, K={K})",
            "",
            f"One batch of {args.profile_batch} requests per configuration, MoE-layer calls timed inside the "
            "engine; distinct experts: those a decode call's kept pairs are on (the plugin's counter; on "
            "the stock path, the stock ids'). MoE layer µs: median over the decode calls (T = "
            f"{args.profile_batch}); decode tok/s and × b=1.0: medians over the rounds above.",
            "",
            serve_lib.cap_profile_table(profile, shape["E"], full_tps),
            "",
        ]
        if args.png and full_tps is not None:
            uniform_tps = None if uniform is None else medians[(uniform, args.profile_batch)]["decode_tps"]
            title = f"Cap profile, decode at batch {args.profile_batch}, b = 0.5 ({model.name})"
            target = 1.6 if args.profile_batch == 32 else None  # #17's target is set at batch 32
            serve_lib.cap_profile_png(profile, full_tps, uniform_tps, Path(args.png), title, target)
    text = "\n".join(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        by_config: dict[str, dict[int, dict[str, float]]] = {}
        for (label, bs), values in medians.items():
            by_config.setdefault(label, {})[bs] = values
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"machine": machine, "medians": by_config, "cap_profile": profile},
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
