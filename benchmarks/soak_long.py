"""The soak under load (`soak.py --minutes N`): the benchmark model at constant concurrency for N minutes.

    python benchmarks/soak.py --minutes N [--warmup-seconds 60] [--concurrency 32] [--verify 40] [--seed 0]
                              [--out FILE.md] [--json FILE]

The server is `vllm-alloc serve` on bench_serve's benchmark model (L = 4 MoE layers, E = 64, K = 8,
H = 1024, I = 512, built once by vllm_alloc.tiny and cached, as bench_serve builds it) with its uniform
budget file, a 256 MiB KV cache, --max-num-batched-tokens 256 and prefix caching, on 127.0.0.1 only. The
load is a closed loop: C clients (--concurrency), each sending its next request as soon as its previous
one ends, so C requests are in flight all along: --warmup-seconds, then N minutes timed. Requests are the
bounded soak's mix (soak.plan: budgets 1.0 / 0.75 / 0.5 / 0.33 / the default by header or body, 10%
invalid, 20% streamed of which half disconnect, seeded sampling, long and short prompts) with longer
answers (ANSWER_TOKENS). Then the bounded soak's quiet phase, verification batch and counter check
(soak.Soak.verify).

Recorded: requests, errors by kind, server deaths (soak.Stats); the RSS of the launcher's whole process
tree (psutil, summed over the launcher, the API server, the engine core and its worker) every 5 s and at
the marks start / after warm-up / middle / end / after verification; the latency (send to last byte) of
every completed request, p50 and p99 per budget per tenth of the timed phase, by the time it was sent.

The RSS bound, which fails the run: RSS at the end of the timed phase ≤ RSS_RATIO (1.10) × RSS after the
warm-up. Both are taken under the same load (C requests in flight), so transient activations count in
both. The weights and the KV cache are allocated at start-up (vLLM preallocates its KV blocks), and the
warm-up runs every request shape at full concurrency (all budgets, 256-token prefill chunks, streams,
disconnects, 400s), so the allocators' working set is in place when it ends. What is left is drift
(allocator fragmentation, Python caches), a few per cent; a leak is growth proportional to the requests
served. 10% of this tree (about 4.1 GiB on CPU: launcher 0.25, API server 0.85, engine core 0.85, its
worker 2.2 with the weights and the KV cache) is about 400 MiB: over a 10-minute run at C = 32 (about 100
requests a minute on 2 cores, so about 1000 timed) that catches a leak of about 400 KiB per request (a
request's KV blocks, a kept tensor) or more. Smaller leaks are for the report's growth from the middle to
the end, per 1000 requests, to show (in runs of a few minutes it still holds the tail of the warm-up: a
figure to read over 10 minutes).

It stops by itself: server start-up at most 300 s (soak.wait_healthy), then the load, the quiet phase
and the verification within warm-up + N minutes + TAIL_S; past that the run stops and fails.
Exits 1 on a server death, an accepted invalid budget, counters that do not add up, RSS over the bound,
or the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil
import soak
from tqdm import tqdm

from vllm_alloc.budget import BudgetFile, ModelFingerprint, uniform_budget_file

RSS_RATIO = 1.10  # end of the timed phase ≤ RSS_RATIO × after warm-up (the docstring says why)
RSS_EVERY_S = 5.0
WINDOWS = 10  # latency percentiles per tenth of the timed phase (per minute for N = 10)
ANSWER_TOKENS = (32, 192)  # max_tokens of the completed requests: long answers, decode-heavy load
TAIL_S = 600.0  # the quiet phase and the verification after the load, at most
# --max-model-len: the longest prompt (700 tokens cut from text, re-encoded, chat template) plus 192.
# The KV cache is sized, not vLLM CPU's default share of the machine (5 GiB here, touched at allocation):
# 256 MiB is 128 Ki tokens of this model, 3x what 32 requests of 1280 tokens hold, and keeps the tree's
# RSS, and so the bound's slack, near what the server itself uses.
SERVER_ARGS = ["--max-model-len", "1280", "--kv-cache-memory-bytes", str(256 * 2**20)]
SERVER_ARGS += ["--enable-prompt-tokens-details", "--max-num-batched-tokens", "256"]
MiB = 2**20


class Done(NamedTuple):
    """One completed request of the timed phase."""

    sent_s: float  # seconds from the start of the timed phase (< 0: during warm-up)
    budget: str  # its budget's column: "1", "0.75", ..., "default"
    latency_s: float


class Cell(NamedTuple):
    n: int
    p50: float
    p99: float


@dataclass
class Window:
    start_s: float
    end_s: float
    cells: dict[str, Cell] = field(default_factory=dict)  # by budget column; absent: no request


@dataclass
class Result:
    machine: str
    minutes: float
    warmup_s: float
    concurrency: int
    stats: soak.Stats
    rss: dict[str, tuple[float, int]] = field(default_factory=dict)  # mark -> (s from load start, bytes)
    rss_series: list[tuple[float, int]] = field(default_factory=list)
    timed_sent: int = 0  # requests sent in the timed phase
    problems: list[str] = field(default_factory=list)  # RSS bound, hard limit
    load_t0: float = 0.0  # time.monotonic() at the start of the load

    def failed(self) -> bool:
        s = self.stats
        return bool(s.deaths or s.errors["invalid accepted"] or s.counter_problems or self.problems)


# -- pure helpers (tests/benchmarks/test_soak.py) ---------------------------------------------------------
def column(budget: float | None) -> str:
    return "default" if budget is None else f"{budget:g}"


COLUMNS = [column(b) for b in soak.BUDGETS]


def rss_problem(warm: int, end: int, ratio: float = RSS_RATIO) -> str | None:
    """The line that fails the run when `end` (bytes) is over ratio × `warm`; None within the bound."""
    if end <= ratio * warm:
        return None
    return (
        f"RSS grew past the bound: end {end / MiB:.0f} MiB > {ratio:g} × after warm-up "
        f"{warm / MiB:.0f} MiB = {ratio * warm / MiB:.0f} MiB"
    )


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest x with at least q of the values ≤ x (p99 of fewer than 100 is the max)."""
    if not xs or not 0 < q <= 1:
        raise ValueError(f"percentile of {len(xs)} values at q = {q}: want values and q in (0, 1]")
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def windows(done: Sequence[Done], length_s: float, n: int = WINDOWS) -> list[Window]:
    """p50 / p99 latency per budget in each of n equal windows of [0, length_s), by send time;
    requests sent outside it (warm-up) are left out."""
    out = [Window(length_s * i / n, length_s * (i + 1) / n) for i in range(n)]
    by: dict[tuple[int, str], list[float]] = {}
    for d in done:
        if 0 <= d.sent_s < length_s:
            by.setdefault((min(n - 1, int(d.sent_s / length_s * n)), d.budget), []).append(d.latency_s)
    for (i, budget), xs in by.items():
        out[i].cells[budget] = Cell(len(xs), percentile(xs, 0.5), percentile(xs, 0.99))
    return out


def overall(done: Sequence[Done], length_s: float) -> Window:
    """The whole timed phase as one window."""
    return windows(done, length_s, 1)[0]


def report(r: Result, done: Sequence[Done]) -> str:
    """The markdown report: the load, the counts, RSS with its bound, latency over time."""
    length_s = r.minutes * 60
    completed = sum(1 for d in done if 0 <= d.sent_s < length_s)
    lines = [
        f"### Soak under load: {r.minutes:g} min at {r.concurrency} concurrent requests (benchmark model)",
        "",
        f"{r.machine}.",
        "",
        f"Closed loop of {r.concurrency} clients (each sends its next request when the previous ends), "
        f"{r.warmup_s:g} s warm-up, then {r.minutes:g} min timed; the bounded soak's mix (budgets "
        f"{', '.join(COLUMNS)}; 10% invalid, 20% streamed, half of those disconnecting) with "
        f"{ANSWER_TOKENS[0]}-{ANSWER_TOKENS[1]} new tokens; then the quiet phase, verification batch and "
        "counter check.",
        "",
        soak.table(r.stats),
        f"| requests sent in the timed phase | {r.timed_sent} |",
        f"| completed in the timed phase, per minute | {completed / r.minutes:.1f} |",
        "",
        "RSS of the launcher's process tree (launcher, API server, engine core, worker):",
        "",
        "| when | s from load start | RSS (MiB) |",
        "|---|---|---|",
        *(f"| {mark} | {t:.0f} | {b / MiB:.0f} |" for mark, (t, b) in r.rss.items()),
    ]
    if r.rss_series:
        peak = max(r.rss_series, key=lambda s: s[1])
        lines.append(f"| max (every {RSS_EVERY_S:g} s) | {peak[0]:.0f} | {peak[1] / MiB:.0f} |")
    if "after warm-up" in r.rss and "end" in r.rss:
        warm, end = r.rss["after warm-up"][1], r.rss["end"][1]
        verdict = "exceeded" if rss_problem(warm, end) else "ok"
        lines += [
            "",
            f"Bound: end ≤ {RSS_RATIO:g} × after warm-up: {end / MiB:.0f} ≤ "
            f"{RSS_RATIO * warm / MiB:.0f} MiB: **{verdict}** ({(end / warm - 1) * 100:+.1f}%).",
        ]
        if "middle" in r.rss and r.timed_sent:
            grew = (end - r.rss["middle"][1]) / MiB
            per_1000 = grew / (r.timed_sent / 2) * 1000  # about half the timed requests were sent after it
            lines[-1] += f" Middle to end: {grew:+.0f} MiB, {per_1000:+.0f} MiB per 1000 requests."
    lines += [
        "",
        "Latency of completed requests (send to last byte, s), p50 / p99 (requests), by the tenth of the "
        "timed phase in which they were sent:",
        "",
        "| sent (s) | " + " | ".join(f"b = {c}" for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for w in [*windows(done, length_s), overall(done, length_s)]:
        when = "all" if w.end_s - w.start_s == length_s else f"{w.start_s:.0f}-{w.end_s:.0f}"
        cells = [f"{c.p50:.2f} / {c.p99:.2f} ({c.n})" if (c := w.cells.get(k)) else "-" for k in COLUMNS]
        lines.append(f"| {when} | " + " | ".join(cells) + " |")
    problems = r.problems + r.stats.counter_problems + r.stats.examples
    lines += ["", *(f"- {p}" for p in problems)] if problems else []
    lines += ["", f"Result: **{'FAILED' if r.failed() else 'passed'}**."]
    return "\n".join(lines)


# -- the model and the load ------------------------------------------------------------------------------
def uniform_file(model: Path) -> BudgetFile:
    """The uniform budget file of a Qwen3-MoE checkpoint whose every decoder layer is MoE."""
    cfg = json.loads((model / "config.json").read_text())
    if cfg.get("decoder_sparse_step", 1) != 1 or cfg.get("mlp_only_layers"):
        raise RuntimeError(f"{model}: expected every layer MoE (decoder_sparse_step 1, no mlp_only_layers)")
    fp = ModelFingerprint(
        architecture=cfg["architectures"][0],
        moe_layers=list(range(cfg["num_hidden_layers"])),
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["moe_intermediate_size"],
    )
    return uniform_budget_file(fp)


def endless(rng: random.Random, prompt: soak.PromptFn) -> Iterator[soak.Spec]:
    """The bounded soak's mix, 100 at a time, forever; completed requests answer ANSWER_TOKENS."""
    while True:
        for s in soak.plan(100, rng, prompt):
            long = not (s.invalid or s.disconnect)
            yield dataclasses.replace(s, max_tokens=rng.randint(*ANSWER_TOKENS)) if long else s


def tree_rss(pid: int) -> int:
    """RSS of `pid` and all its descendants, bytes (processes that exit meanwhile count 0)."""
    total = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


async def load(s: soak.Soak, r: Result, specs: Iterator[soak.Spec], done: list[Done]) -> Counter[int]:
    """The closed loop: warm-up, then the timed minutes; RSS and progress each second. Tokens by B."""
    tokens: Counter[int] = Counter()
    t0 = r.load_t0 = time.monotonic()
    timed = t0 + r.warmup_s
    until = timed + r.minutes * 60

    async def client() -> None:
        while not s.stop.is_set() and (sent := time.monotonic()) < until:
            spec = next(specs)
            r.timed_sent += sent >= timed
            result = await s.send(spec)
            if result is not None:
                tokens[s.bf.absolute_budget(result[0])] += result[1]
                done.append(Done(sent - timed, column(spec.budget), time.monotonic() - sent))

    async def monitor() -> None:
        marks = [("after warm-up", timed), ("middle", timed + r.minutes * 30), ("end", until)]
        total = round(until - t0)
        with tqdm(total=total, unit="s", desc=f"load ({r.warmup_s:g} s warm-up)") as bar:
            while not s.stop.is_set():
                now = time.monotonic()
                due = not r.rss_series or now - t0 - r.rss_series[-1][0] >= RSS_EVERY_S
                if due or (marks and now >= marks[0][1]):
                    r.rss_series.append((now - t0, tree_rss(s.proc.pid)))
                    while marks and now >= marks[0][1]:
                        r.rss[marks.pop(0)[0]] = r.rss_series[-1]
                errors = sum(s.stats.errors.values())
                bar.n = min(total, round(now - t0))
                bar.set_postfix(done=len(done), errors=errors, rss=f"{r.rss_series[-1][1] / MiB:.0f}MiB")
                if now >= until:
                    return
                await asyncio.sleep(min(1.0, until - now))

    clients = asyncio.gather(*(client() for _ in range(s.concurrency)))
    await asyncio.gather(clients, monitor())
    return tokens


async def run(
    s: soak.Soak, r: Result, specs: Iterator[soak.Spec], check: list[soak.Spec], done: list[Done]
) -> None:
    watcher = asyncio.create_task(s.watch())
    try:
        r.rss["start (idle)"] = (0.0, tree_rss(s.proc.pid))
        tokens = await load(s, r, specs, done)
        await s.verify(check, tokens)
        if not s.stop.is_set():
            r.rss["after verification (idle)"] = (time.monotonic() - r.load_t0, tree_rss(s.proc.pid))
    finally:
        watcher.cancel()
        await s.client.aclose()
        await s.ctl.aclose()


def main(args: argparse.Namespace) -> int:
    import bench_serve

    model = bench_serve.bench_model()
    bf = uniform_file(model)
    machine = bench_serve.machine_info(model, bench_serve.model_shape(model))  # before the server starts
    args.json = args.json or Path(tempfile.gettempdir()) / "vllm-alloc-soak-long.json"
    rng, prompt = random.Random(args.seed), soak.prompt_maker(model)
    specs, check = endless(rng, prompt), soak.plan(args.verify, rng, prompt, mixed=False)
    tmp = Path(tempfile.mkdtemp(prefix="vllm-alloc-soak-long-"))
    bf.dump(tmp / "uniform.json")
    stats = soak.Stats()
    r = Result(machine, args.minutes, args.warmup_seconds, args.concurrency, stats)
    done: list[Done] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` of the soak still stops the server
    t0, port, log = time.monotonic(), soak.free_port(), tmp / "server.log"
    print(f"model {model}; server log: {log}")
    server_args = ["--budget-config", str(tmp / "uniform.json"), *SERVER_ARGS]
    proc = soak.start_server(port, log, server_args, model=str(model))
    hard_s = args.warmup_seconds + args.minutes * 60 + TAIL_S
    try:
        soak.wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        s = soak.Soak(proc, f"http://127.0.0.1:{port}", args.concurrency, stats, bf, model=str(model))
        try:
            asyncio.run(asyncio.wait_for(run(s, r, specs, check, done), timeout=hard_s))
        except TimeoutError:
            r.problems.append(f"hard limit: load, quiet phase and verification not done in {hard_s:.0f} s")
    finally:
        soak.stop_server(proc)
        stats.wall_s = time.monotonic() - t0
    if "after warm-up" in r.rss and "end" in r.rss:
        problem = rss_problem(r.rss["after warm-up"][1], r.rss["end"][1])
        r.problems += [problem] if problem else []
    text = report(r, done)
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    results = {k: v for k, v in vars(r).items() if k not in ("stats", "load_t0")} | {"stats": vars(stats)}
    per_window = [dataclasses.asdict(w) for w in windows(done, args.minutes * 60)]
    soak.write_json(args, results | {"windows": per_window, "done": [d._asdict() for d in done]})
    return 1 if r.failed() else 0
