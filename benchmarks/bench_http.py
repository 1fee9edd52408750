"""Serving benchmark over HTTP with vLLM's own client (`vllm bench serve`): stock vLLM, vLLM's top-⌊K/2⌋ and
`vllm-alloc serve` at b = 1.0 and b = 0.5 (by header and by model-name alias), on bench_serve's model.

    python benchmarks/bench_http.py [--model DIR] [--concurrency 1,8,32] [--input-len 32] [--output-len 32]
                                    [--prompts-per-slot 4] [--min-prompts 16] [--rounds 1] [--max-minutes 60]
                                    [--threads 1] [--eager] [--out FILE.md] [--json FILE] [--quick]

Servers (one at a time, see "Why one at a time"), each on a free loopback port with its log in a temp file:
  (a) stock vLLM: `python -m vllm.entrypoints.openai.api_server` with VLLM_ALLOC_DISABLE=1 (the CPU wheel's
      `vllm` console command cannot start). Checked to be stock before it is measured: a request with
      `X-Activation-Budget: 0.5` gets no `X-Activation-Budget-Applied` header, and /metrics has no
      `vllm_alloc:` series;
  (b) the same with `--hf-overrides '{"num_experts_per_tok": K // 2}'`: vLLM's uniform top-⌊b·K⌋ at b = 0.5,
      checked to be stock the same way;
  (c) `vllm-alloc serve MODEL --budget-aliases 0.5`, measured three ways: b = 1.0 and b = 0.5 by header
      (`--header X-Activation-Budget=b`), and b = 0.5 by naming the alias MODEL@0.5 as the request's model
      (`--served-model-name MODEL@0.5`: vLLM's client sends that as "model" and still loads the tokenizer
      from `--model`). Before each measurement one probe request must come back with the applied header at
      b; after it, /metrics must show every request of the run (warm-ups included) in
      `vllm_alloc:request_budget` at b (the bucket le = b grew by the count, the bucket below it did not),
      and activations counted at b's label and no other. A run that fails its check is reported as such,
      not as a speed.

Every measurement is one `vllm bench serve` run (benchmarks/vllm_bench_serve.py, a subprocess) at
`--max-concurrency c` for c in --concurrency: the random dataset with fixed lengths (`--random-range-ratio 0`,
`--ignore-eos`), max(--prompts-per-slot · c, --min-prompts) prompts, greedy, c warm-up requests first, the
same seed for every configuration at one (round, c). Prefix caching is off on every server, so the header
and alias runs at b = 0.5 (which share cache entries) never reuse each other's prefill. Reported: TTFT, TPOT
and ITL p50/p99 (ms) and output tok/s, medians over rounds, with ratios ("times better": latency base/value,
throughput value/base) against stock (a) and against the plugin at b = 1.0.

Why one at a time: on a shared 2-core, 24 GiB machine other people's servers come and go, and three
engines alive at once would be three KV caches and compile caches and three sets of threads to contend
with. The cost is that (a), (b) and (c) run minutes apart; with --rounds > 1 the server order rotates per
round, and the variants of (c) rotate per (round, c), so drift does not always favour the same config.

--max-minutes bounds the whole run, server start-ups included: no server or run starts after it, a run in
flight is killed at it (reported as cut off), and the report holds what ran.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import bench_model, machine_info, model_shape
from lm_eval_bench import budgets_counted, model_name, settled_metrics
from serve_lib import median_by_key
from soak import ROOT, free_port, launch, parse_metrics, stop_server, wait_healthy

from vllm_alloc.metrics import BUDGET_BUCKETS, budget_label
from vllm_alloc.serving.middleware import APPLIED_HEADER, BUDGET_HEADER

WRAPPER = Path(__file__).resolve().parent / "vllm_bench_serve.py"
METRICS = ("ttft", "tpot", "itl")
PERCENTILES = (50, 99)
# (result key of vllm bench serve, column title, higher is better); the keys are those of
# vllm/benchmarks/serve.py's result dict with `--metric-percentiles 50,99`.
COLUMNS = [(f"p{p}_{m}_ms", f"{m.upper()} p{p}", False) for m in METRICS for p in PERCENTILES]
COLUMNS.append(("output_throughput", "out tok/s", True))
RATIO_KEYS = ("p50_ttft_ms", "p50_tpot_ms", "output_throughput")  # the ratio columns, against each base
KV_CACHE_BYTES = 256 * 2**20  # bench_serve's: the benchmark model at 32 × 80 tokens needs ~20 MiB


@dataclass(frozen=True)
class Variant:
    """One measured configuration: its label, the server (a, b or c) and how a budget b is asked for."""

    label: str
    server: str
    budget: float | None = None  # None: no budget sent (stock servers)
    by: str | None = None  # "header" or "alias"


def variants(K: int) -> list[Variant]:
    return [
        Variant("(a) stock", "a"),
        Variant(f"(b) top-{K // 2}", "b"),
        Variant("(c) b=1.0 header", "c", 1.0, "header"),
        Variant("(c) b=0.5 header", "c", 0.5, "header"),
        Variant("(c) b=0.5 alias", "c", 0.5, "alias"),
    ]


def num_prompts(c: int, per_slot: int, minimum: int) -> int:
    return max(per_slot * c, minimum)


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    return [*items[k % len(items) :], *items[: k % len(items)]] if items else []


# -- the servers and the client's command lines (tests/benchmarks/test_bench_http.py) -----------------------
def server_command(
    server: str, model: str, port: int, K: int, max_model_len: int, max_num_seqs: int, eager: bool
) -> tuple[list[str], dict[str, str]]:
    """argv and environment changes of server (a), (b) or (c)."""
    common = ["--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--seed", "0"]
    common += ["--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs)]
    common += ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--no-enable-prefix-caching"]
    common += ["--enforce-eager"] if eager else []
    if server == "c":
        argv = [sys.executable, "-m", "vllm_alloc.cli", "serve", model, "--budget-aliases", "0.5", *common]
        return argv, {"VLLM_ALLOC_DISABLE": "0"}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *common]
    if server == "b":
        argv += ["--hf-overrides", json.dumps({"num_experts_per_tok": K // 2})]
    elif server != "a":
        raise ValueError(f"server {server!r}: expected 'a', 'b' or 'c'")
    return argv, {"VLLM_ALLOC_DISABLE": "1"}


def client_args(
    v: Variant,
    model: str,
    port: int,
    c: int,
    n: int,
    input_len: int,
    output_len: int,
    seed: int,
    result: Path,
) -> list[str]:
    """The `vllm bench serve` arguments of one measurement; its result JSON lands at `result`."""
    argv = ["--backend", "openai", "--host", "127.0.0.1", "--port", str(port), "--model", model]
    argv += ["--dataset-name", "random", "--random-input-len", str(input_len)]
    argv += ["--random-output-len", str(output_len), "--random-range-ratio", "0", "--ignore-eos"]
    argv += ["--temperature", "0"]  # greedy, as bench_serve; vLLM 0.32's client leaves it to the server
    argv += ["--num-prompts", str(n), "--max-concurrency", str(c), "--num-warmups", str(c)]
    argv += ["--seed", str(seed), "--percentile-metrics", ",".join(METRICS)]
    argv += ["--metric-percentiles", ",".join(map(str, PERCENTILES)), "--disable-tqdm"]
    argv += ["--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    if v.by == "header":
        argv += ["--header", f"{BUDGET_HEADER}={v.budget!r}"]
    elif v.by == "alias":
        argv += ["--served-model-name", model_name(model, v.budget or 1.0)]
    return argv


# -- the checks ---------------------------------------------------------------------------------------------
def stock_problems(status: int, headers: dict[str, str], metrics_text: str) -> list[str]:
    """Why a server that should be stock vLLM is not: it answered a budgeted request with the applied
    header, or /metrics carries the plugin's series."""
    out = []
    if status != 200:
        out.append(f"the probe request got HTTP {status}, not 200")
    applied = {k.lower(): v for k, v in headers.items()}.get(APPLIED_HEADER.lower())
    if applied is not None:
        out.append(f"{BUDGET_HEADER}: 0.5 was applied ({APPLIED_HEADER}: {applied}): the plugin is on")
    series = sorted(set(re.findall(r"vllm_alloc:[A-Za-z0-9_:]+", metrics_text)))
    if series:
        out.append(f"/metrics has the plugin's series ({', '.join(series[:3])}): the plugin is on")
    return out


def applied_problems(status: int, headers: dict[str, str], b: float) -> list[str]:
    """Why a probe at budget b did not run at b, by its status and X-Activation-Budget-Applied."""
    applied = {k.lower(): v for k, v in headers.items()}.get(APPLIED_HEADER.lower())
    if status != 200:
        return [f"the probe at b = {b!r} got HTTP {status}, not 200"]
    if applied is None:
        return [f"the probe at b = {b!r} got no {APPLIED_HEADER} header"]
    if float(applied) != b:
        return [f"the probe at b = {b!r} was applied at {APPLIED_HEADER}: {applied}"]
    return []


def budget_histogram(metrics_text: str) -> tuple[float, dict[float, float]]:
    """(count, {le: cumulative count}) of vllm_alloc:request_budget on a /metrics page."""
    count, buckets = 0.0, {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if s.name == "vllm_alloc:request_budget_count":
                count += s.value
            elif s.name == "vllm_alloc:request_budget_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return count, buckets


def budget_problems(before: str, after: str, b: float, requests: int) -> list[str]:
    """Why the requests of a run, between two /metrics pages, were not all counted at budget b: the
    request_budget histogram must grow by `requests` (every request counted) in the bucket le = b and not
    in the bucket below it, and the activation counters must grow at b's label and no other."""
    (c0, b0), (c1, b1) = budget_histogram(before), budget_histogram(after)
    grown = c1 - c0
    out = []
    if grown != requests:
        out.append(f"vllm_alloc:request_budget_count grew by {grown:g}, want {requests} (the run's requests)")
    at = b1.get(b, 0.0) - b0.get(b, 0.0)
    if at != grown:
        out.append(f"vllm_alloc:request_budget bucket le={b!r} grew by {at:g}, want {grown:g}")
    below = [le for le in BUDGET_BUCKETS if le < b]
    if below and (lower := b1.get(below[-1], 0.0) - b0.get(below[-1], 0.0)) != 0:
        out.append(f"vllm_alloc:request_budget bucket le={below[-1]!r} grew by {lower:g}: requests below b")
    counted = budgets_counted(parse_metrics(before), parse_metrics(after))
    if counted != {budget_label(b)}:
        out.append(f"activations counted at budgets {sorted(counted)}, want [{budget_label(b)!r}] only")
    return out


def settled_text(url: str) -> str:
    """The /metrics page once the worker's counters have settled (lm_eval_bench.settled_metrics)."""
    settled_metrics(url)
    return httpx.get(f"{url}/metrics", timeout=10).text


# -- the report ---------------------------------------------------------------------------------------------
def summarize(result: dict[str, Any]) -> dict[str, float]:
    """The reported numbers of one `vllm bench serve` result dict, and its completed/failed counts."""
    missing = [key for key, _, _ in COLUMNS if key not in result]
    if missing:
        raise KeyError(
            f"vllm bench serve's result has no {missing}; run it with --percentile-metrics "
            f"{','.join(METRICS)} --metric-percentiles {','.join(map(str, PERCENTILES))}"
        )
    out = {key: float(result[key]) for key, _, _ in COLUMNS}
    out |= {"completed": float(result.get("completed", 0)), "failed": float(result.get("failed", 0))}
    return out


def medians(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, float]]:
    """Median of every number over the rounds, per (config, c), of the rows that passed their checks."""
    passed = (r for r in rows if not r["problems"] and r["metrics"] is not None)
    return median_by_key(((r["config"], r["concurrency"]), r["metrics"]) for r in passed)


def times_better(value: float, base: float, higher: bool) -> float:
    """> 1: better than the base (throughput value/base, latency base/value); NaN where either shows as
    0.0 in the table (e.g. TPOT when a short request's tokens all reach the client in one chunk)."""
    if round(value, 1) == 0 or round(base, 1) == 0:
        return float("nan")
    return value / base if higher else base / value


def results_table(
    med: dict[tuple[str, int], dict[str, float]],
    labels: Sequence[str],
    concurrency: Sequence[int],
    stock: str,
    full: str,
    status: dict[tuple[str, int], str] | None = None,
) -> str:
    """Markdown: per (c, config) the absolute numbers, then the RATIO_KEYS ratios against `stock` and
    against `full` (the plugin at b = 1.0) side by side. A (config, c) with no median shows its status."""
    titles = {key: (title, higher) for key, title, higher in COLUMNS}
    head = ["c", "config", *(t for _, t, _ in COLUMNS), "requests ok"]
    for name in ("stock", "b=1.0"):
        head += [f"× {name} {titles[k][0]}" for k in RATIO_KEYS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for c in concurrency:
        for label in labels:
            row = med.get((label, c))
            if row is None:
                why = (status or {}).get((label, c), "not run")
                lines.append(f"| {c} | {label} | " + " | ".join([why] + [""] * (len(head) - 3)) + " |")
                continue
            cells = [str(c), label, *(f"{row[k]:.1f}" for k, _, _ in COLUMNS)]
            cells.append(f"{row['completed']:g}/{row['completed'] + row['failed']:g}")
            for base in (stock, full):
                ref = med.get((base, c))
                ratios = [
                    math.nan if ref is None else times_better(row[k], ref[k], titles[k][1])
                    for k in RATIO_KEYS
                ]
                cells += ["—" if math.isnan(x) else f"{x:.2f}" for x in ratios]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- running ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="MoE checkpoint folder (default: build bench_serve's benchmark model)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated --max-concurrency values c")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request (random dataset)")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    p.add_argument(
        "--prompts-per-slot", type=int, default=4, help="prompts per run: max(this · c, --min-prompts)"
    )
    p.add_argument("--min-prompts", type=int, default=16, help="prompts per run at least")
    p.add_argument("--rounds", type=int, default=1, help="rounds R; the report holds medians over rounds")
    p.add_argument(
        "--max-minutes", type=float, default=60, help="stop cleanly after this, start-ups included"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OpenMP threads per server, unbound (0: vLLM's own binding); 1 suits a shared 2-core machine",
    )
    p.add_argument("--eager", action="store_true", help="--enforce-eager (default: vLLM's torch.compile)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="also write every run, the medians and the checks to this file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: small model, c = 1,2, 4 prompts of 16 → 8 tokens, eager",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.input_len, args.output_len = "1,2", 16, 8
        args.prompts_per_slot, args.min_prompts, args.eager = 2, 4, True
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency {args.concurrency!r}: expected comma-separated integers")
    if min(args.concurrency) < 1 or args.rounds < 1 or args.max_minutes <= 0:
        p.error("--concurrency values and --rounds must be at least 1, --max-minutes above 0")
    return args


def probe(url: str, model: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """One greedy 1-token completion; its status and response headers."""
    body = {"model": model, "prompt": "def main():", "max_tokens": 1, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    return r.status_code, dict(r.headers)


def start(argv: list[str], env: dict[str, str], threads: int, log: Path) -> subprocess.Popen[bytes]:
    """A server in its own session (stop_server ends its whole tree), output to `log`."""
    if threads:  # as bench_serve's engines: a fixed team, unbound, so a busy neighbour core stalls no barrier
        env = {**env, "OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    return launch(argv, log, env)


def schedule(
    rounds: int, concurrency: Sequence[int], all_variants: Sequence[Variant]
) -> list[tuple[int, str, list[tuple[int, Variant]]]]:
    """(round, server, [(c, variant), ...]) in run order: the server order rotates per round, a server's
    variants per (round, c), so no configuration always runs first."""
    out = []
    for r in range(rounds):
        for server in rotated("abc", r):
            mine = [v for v in all_variants if v.server == server]
            runs = [(c, v) for ci, c in enumerate(concurrency) for v in rotated(mine, r + ci)]
            out.append((r, server, runs))
    return out


@dataclass
class Bench:
    """What the runs share, and what they found: rows, problems, a status per (config, c) that has no row
    to show, and why the run stopped early ("" while it has not)."""

    model: str
    K: int
    args: argparse.Namespace
    tmp: Path
    deadline: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    status: dict[tuple[str, int], str] = field(default_factory=dict)
    cut_off: str = ""

    def serve(self, server: str, r: int, runs: list[tuple[int, Variant]], max_model_len: int) -> None:
        """Start `server`, check it is what it claims, measure `runs` on it, stop it."""
        args, port = self.args, free_port()
        log = self.tmp / f"server-{server}-round{r}.log"
        cmd, env = server_command(
            server, self.model, port, self.K, max_model_len, max(args.concurrency), args.eager
        )
        url = f"http://127.0.0.1:{port}"
        print(f"round {r}: starting server ({server}), log {log}", flush=True)
        t0 = time.monotonic()
        proc = start(cmd, env, args.threads, log)
        try:
            wait_healthy(proc, url, log, timeout_s=max(1.0, min(900.0, self.deadline - time.monotonic())))
            print(f"server ({server}) healthy in {time.monotonic() - t0:.0f} s", flush=True)
            if server in "ab":
                status, headers = probe(url, self.model, {BUDGET_HEADER: "0.5"})
                found = stock_problems(status, headers, httpx.get(f"{url}/metrics", timeout=10).text)
                if found:
                    self.problems += [f"server ({server}): {p}" for p in found]
                    self.status |= {(v.label, c): "not stock" for c, v in runs}
                    return
            for c, v in runs:
                where = f"{v.label} at c={c}, round {r}"
                if time.monotonic() > self.deadline:
                    self.cut_off = f"--max-minutes {args.max_minutes:g} reached before {where}"
                    return
                row = measure(
                    v,
                    self.model,
                    url,
                    c,
                    args,
                    seed=1000 * r + c,
                    round_=r,
                    tmp=self.tmp,
                    deadline=self.deadline,
                )
                self.rows.append(row)
                self.problems += [f"{where}: {p}" for p in row["problems"]]
                if row["cut_off"]:
                    self.cut_off = f"--max-minutes {args.max_minutes:g} reached during {where}"
                    return
        except RuntimeError as e:  # the server died or never came up: say so, go on with the next
            self.problems.append(f"server ({server}) round {r}: {e}")
        finally:
            stop_server(proc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    deadline = t0 + 60 * args.max_minutes
    model = Path(args.model).resolve() if args.model else bench_model(args.quick)
    shape = model_shape(model)
    machine = machine_info(model, shape)  # before the servers start: the code they run
    K = shape["K"]
    all_variants = variants(K)
    labels = [v.label for v in all_variants]
    max_model_len = args.input_len + args.output_len + 16
    tmp = Path(tempfile.mkdtemp(prefix="vllm-alloc-bench-http-"))
    print(f"model {model} ({shape}); logs and results under {tmp}", flush=True)

    bench = Bench(str(model), K, args, tmp, deadline)
    for r, server, runs in schedule(args.rounds, args.concurrency, all_variants):
        if time.monotonic() > deadline:
            bench.cut_off = (
                f"--max-minutes {args.max_minutes:g} reached before server ({server}) of round {r}"
            )
        if bench.cut_off:
            break
        bench.serve(server, r, runs, max_model_len)
    rows, status, problems, cut_off = bench.rows, bench.status, bench.problems, bench.cut_off
    for row in rows:
        if row["problems"]:
            status[(row["config"], row["concurrency"])] = "check failed"
        elif row["cut_off"]:
            status.setdefault((row["config"], row["concurrency"]), "cut off")

    med = medians(rows)
    wall = time.monotonic() - t0
    threads = f"{args.threads} OpenMP thread(s) per server" if args.threads else "vLLM's thread binding"
    n_rule = f"max({args.prompts_per_slot}·c, {args.min_prompts})"
    report = [
        "### Serving over HTTP: `vllm bench serve` against stock, top-k and the plugin",
        "",
        f"{machine}. Random dataset, {args.input_len} prompt → {args.output_len} generated tokens "
        f"(ignore_eos), {n_rule} prompts per run after c warm-ups, `--max-concurrency c`; servers one at a "
        f"time, prefix caching off, {'eager' if args.eager else 'torch.compile (vLLM default)'}, {threads}; "
        f"{args.rounds} round(s), medians; wall {wall / 60:.1f} min. Latencies in ms. "
        "Ratios: times better (latency base/value, tok/s value/base).",
        "",
        results_table(med, labels, args.concurrency, labels[0], "(c) b=1.0 header", status),
        "",
    ]
    if cut_off:
        report += [f"Stopped early: {cut_off}.", ""]
    if problems:
        report += ["Problems:", "", *(f"- {p}" for p in problems), ""]
    text = "\n".join(report)
    print("\n" + text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        by_config: dict[str, dict[int, dict[str, float]]] = {}
        for (label, c), values in med.items():
            by_config.setdefault(label, {})[c] = values
        settings = {k: v for k, v in vars(args).items() if k not in ("out", "json")}
        doc = {
            "machine": machine,
            "settings": settings,
            "medians": by_config,
            "runs": rows,
            "problems": problems,
            "cut_off": cut_off,
            "wall_s": wall,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 1 if problems else 0


def measure(
    v: Variant,
    model: str,
    url: str,
    c: int,
    args: argparse.Namespace,
    *,
    seed: int,
    round_: int,
    tmp: Path,
    deadline: float,
) -> dict[str, Any]:
    """One `vllm bench serve` run of variant v at concurrency c, with its budget checks on server (c)."""
    n = num_prompts(c, args.prompts_per_slot, args.min_prompts)
    row: dict[str, Any] = {
        "config": v.label,
        "concurrency": c,
        "round": round_,
        "prompts": n,
        "metrics": None,
        "problems": [],
        "cut_off": False,
    }
    if v.budget is not None:
        headers = {BUDGET_HEADER: repr(v.budget)} if v.by == "header" else {}
        name = model_name(model, v.budget) if v.by == "alias" else model
        row["problems"] += applied_problems(*probe(url, name, headers), v.budget)
    before = settled_text(url) if v.budget is not None else ""
    result = tmp / f"{v.server}-{v.by or 'stock'}-{v.budget or 0:g}-c{c}-round{round_}.json"
    argv = [
        sys.executable,
        str(WRAPPER),
        *client_args(
            v, model, int(url.rsplit(":", 1)[1]), c, n, args.input_len, args.output_len, seed, result
        ),
    ]
    log = result.with_suffix(".log")
    t0 = time.monotonic()
    with log.open("wb") as out:
        try:
            subprocess.run(
                argv,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        except subprocess.TimeoutExpired:
            row["cut_off"] = True
            return row
        except subprocess.CalledProcessError as e:
            row["problems"].append(f"vllm bench serve exited with {e.returncode}; log: {log}")
            return row
    row["metrics"] = summarize(json.loads(result.read_text()))
    if v.budget is not None:
        row["problems"] += budget_problems(before, settled_text(url), v.budget, n + c)  # + c warm-ups
    print(
        f"{v.label:<18} c={c:<3} round {round_}: "
        + ", ".join(f"{t} {row['metrics'][k]:.1f}" for k, t, _ in COLUMNS)
        + f" ({time.monotonic() - t0:.0f} s)",
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
