"""Helpers of `bench_serve.py`: engine workers driven over a pipe, statistics, the markdown report.

One worker process per engine configuration stays alive for the whole benchmark; the parent sends it one
measurement at a time, so configurations alternate round by round and drift (other jobs on a shared
machine, thermal state) hits all of them alike. Each worker runs vLLM in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): `LLMEngine.step()` then runs exactly one scheduler step, and the
time stamp taken when a step returns is the time its tokens were produced, with no IPC queue between.

Nothing here imports vLLM or torch at module level: the parent process never loads an engine.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS: tuple[str, ...] = ("prefill_tps", "decode_tps", "ttft_ms", "itl_ms")
METRIC_TITLES = {
    "prefill_tps": "prefill tok/s",
    "decode_tps": "decode tok/s",
    "ttft_ms": "TTFT ms",
    "itl_ms": "ITL ms",
}
HIGHER_IS_BETTER = {"prefill_tps": True, "decode_tps": True, "ttft_ms": False, "itl_ms": False}


# -- measurements --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timeline:
    """When one batch was submitted and when each request's tokens came out (perf_counter seconds)."""

    start: float
    token_times: list[list[float]]  # per request: one time stamp per generated token
    prompt_len: int


def summarize(t: Timeline) -> dict[str, float]:
    """Prefill and decode throughput, median TTFT and median inter-token latency of one batch.

    All requests are submitted at `start` and prefilled in one step (max_num_batched_tokens covers the
    largest batch), so prefill is [start, last first token] and decode is [last first token, end].
    """
    if not t.token_times or any(len(times) < 2 for times in t.token_times):
        raise ValueError("every request needs at least 2 generated tokens to separate prefill from decode")
    first = [times[0] for times in t.token_times]
    last = [times[-1] for times in t.token_times]
    prefill_end = max(first)
    end = max(last)
    decode_tokens = sum(len(times) - 1 for times in t.token_times)
    itl = [(times[-1] - times[0]) / (len(times) - 1) for times in t.token_times]
    return {
        "prefill_tps": len(t.token_times) * t.prompt_len / (prefill_end - t.start),
        "decode_tps": decode_tokens / (end - prefill_end) if end > prefill_end else float("nan"),
        "ttft_ms": 1e3 * statistics.median(f - t.start for f in first),
        "itl_ms": 1e3 * statistics.median(itl),
    }


def median_by_key(samples: Iterable[tuple[Any, dict[str, float]]]) -> dict[Any, dict[str, float]]:
    """Median of each metric over all samples that share a key (one sample per round)."""
    grouped: dict[Any, list[dict[str, float]]] = {}
    for key, sample in samples:
        grouped.setdefault(key, []).append(sample)
    return {
        key: {m: statistics.median(s[m] for s in group) for m in group[0]} for key, group in grouped.items()
    }


def ratio(value: float, base: float, metric: str) -> float:
    """How many times better than the base: value/base for throughputs, base/value for latencies."""
    return value / base if HIGHER_IS_BETTER[metric] else base / value


# -- report --------------------------------------------------------------------------------------------------
def results_table(
    medians: dict[tuple[str, int], dict[str, float]], configs: Sequence[str], batch_sizes: Sequence[int]
) -> str:
    """Markdown table: absolute medians of every metric and the ratio against the first config (a).

    Ratios are "times better than (a)": throughput / (a)'s, and (a)'s latency / latency, so > 1 is faster.
    """
    base = configs[0]
    head = ["batch", "config"] + [f"{METRIC_TITLES[m]}" for m in METRICS]
    head += [f"× (a) {METRIC_TITLES[m].split()[0]}" for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for bs in batch_sizes:
        for cfg in configs:
            row = medians.get((cfg, bs))
            if row is None:
                continue
            ref = medians[(base, bs)]
            cells = [str(bs), cfg] + [_fmt(row[m]) for m in METRICS]
            cells += [f"{ratio(row[m], ref[m], m):.2f}" for m in METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(
    medians: dict[tuple[str, int], dict[str, float]],
    batch_sizes: Sequence[int],
    stock: str,
    full: str | None,
    half: str | None,
) -> list[str]:
    """DESIGN.md §5 end-to-end targets on decode tok/s, one line per batch size, marked met/missed."""
    out = []
    for bs in batch_sizes:
        if full is not None and (full, bs) in medians:
            r = medians[(full, bs)]["decode_tps"] / medians[(stock, bs)]["decode_tps"]
            out.append(
                f"- batch {bs}: plugin b=1.0 decode = {r:.2f}× of (a) (target ≥ 0.95): {_met(r >= 0.95)}"
            )
        if full is not None and half is not None and (half, bs) in medians and (full, bs) in medians:
            r = medians[(half, bs)]["decode_tps"] / medians[(full, bs)]["decode_tps"]
            out.append(
                f"- batch {bs}: plugin b=0.5 decode = {r:.2f}× of b=1.0 (target ≥ 1.3): {_met(r >= 1.3)}"
            )
    return out


def cap_lines(
    medians: dict[tuple[str, int], dict[str, float]],
    batch_sizes: Sequence[int],
    capped: str,
    full: str | None,
    uniform: str | None,
) -> list[str]:
    """The distinct-expert cap's targets (DESIGN.md §5, issue 17): at batch 32, b = 0.5 with the cap
    decodes at >= 1.6× of b = 1.0 and faster than uniform top-⌊b·K⌋; other batches are reported."""
    out = []
    for bs in batch_sizes:
        if (capped, bs) not in medians:
            continue
        tps = medians[(capped, bs)]["decode_tps"]
        parts = []
        if full is not None and (full, bs) in medians:
            r = tps / medians[(full, bs)]["decode_tps"]
            parts.append(f"{r:.2f}× of b=1.0" + (f" (target ≥ 1.6): {_met(r >= 1.6)}" if bs == 32 else ""))
        if uniform is not None and (uniform, bs) in medians:
            r = tps / medians[(uniform, bs)]["decode_tps"]
            parts.append(f"{r:.2f}× of {uniform}" + (f" (target > 1): {_met(r > 1)}" if bs == 32 else ""))
        if parts:
            out.append(f"- batch {bs}: {capped} decode = " + "; ".join(parts))
    return out


def profile_row(
    label: str, budget: float, share: float | None, layer: Share, batch: int, decode_tps: float
) -> dict[str, Any] | None:
    """One row of `cap_profile_table` from an `alloc_t_share` result at budget b: its decode passes
    (T = batch), on the stock path at b = 1.0, else the budget path; None where the batch had no such
    call."""
    path = "stock" if budget == 1.0 else "budget"
    if batch not in layer[path]:
        return None
    _, layer_us, calls, distinct = layer[path][batch]
    return {
        "config": label,
        "budget": budget,
        "share": share,
        "distinct": distinct,
        "layer_us": layer_us,
        "calls": calls,
        "decode_tps": decode_tps,
    }


def cap_profile_table(rows: Sequence[dict[str, Any]], num_experts: int, full_tps: float | None) -> str:
    """Markdown table of where decode time goes under the cap: per configuration, the distinct experts a
    decode MoE-layer call touches, the call's time, and decode tok/s (medians over the rounds)."""
    lines = [
        f"| config | ρ | distinct experts per MoE-layer call (of {num_experts}) | MoE layer µs | µs per "
        "distinct expert | decode tok/s | × b=1.0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "—" if r["share"] is None else f"{r['share']:g}"
        per = r["layer_us"] / r["distinct"] if r["distinct"] > 0 else math.nan
        times = "—" if full_tps is None else f"{r['decode_tps'] / full_tps:.2f}"
        lines.append(
            f"| {r['config']} | {share} | {r['distinct']:.1f} | {r['layer_us']:.0f} | {per:.1f} | "
            f"{_fmt(r['decode_tps'])} | {times} |"
        )
    return "\n".join(lines)


def cap_profile_png(
    rows: Sequence[dict[str, Any]],
    full_tps: float,
    uniform_tps: float | None,
    png: Path,
    title: str,
    target: float | None = None,
) -> None:
    """Two panels: MoE-layer µs against the distinct experts a decode call touches (one point per
    configuration), and decode speed × b=1.0 at b = 0.5 against the cap's share ρ (1: the uncapped row),
    with the uniform top-⌊bK⌋ baseline and a target speed-up (#17's 1.6× at batch 32), if given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        left.scatter(r["distinct"], r["layer_us"], color="tab:blue")
        left.annotate(r["config"], (r["distinct"], r["layer_us"]), fontsize=7, xytext=(4, 2),
                      textcoords="offset points")  # fmt: skip
    left.set_xlabel("distinct experts per decode MoE-layer call")
    left.set_ylabel("MoE-layer call, µs (median)")
    left.set_xlim(0, 1.2 * max(r["distinct"] for r in rows))  # room for the labels
    left.set_ylim(0, 1.1 * max(r["layer_us"] for r in rows))
    left.grid(alpha=0.3)
    half = [r for r in rows if r["budget"] == 0.5]
    by_share = sorted(half, key=lambda r: 1.0 if r["share"] is None else r["share"])
    xs = [1.0 if r["share"] is None else r["share"] for r in by_share]
    ys = [r["decode_tps"] / full_tps for r in by_share]
    right.plot(xs, ys, "o-", label="b = 0.5 with the cap (ρ = 1: no cap)")
    if target is not None:
        right.axhline(target, color="tab:red", ls="--", lw=1, label=f"target: {target:g}× of b = 1.0")
    if uniform_tps is not None:
        right.axhline(uniform_tps / full_tps, color="tab:gray", ls=":", lw=1, label="vLLM top-⌊bK⌋")
    right.set_xlabel("cap share ρ (distinct experts kept)")
    right.set_ylabel("decode tok/s × b = 1.0")
    right.invert_xaxis()
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def share_table(rows: Sequence[dict[str, float]]) -> str:
    """Markdown table of Alloc-T's share of MoE-layer time per T (target ≤ 5%)."""
    lines = [
        "| T | pass | Alloc-T µs | MoE layer b=0.5 µs | MoE layer b=1.0 µs | share | target ≤ 5% |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["alloc_us"] / r["layer_us"]
        lines.append(
            f"| {int(r['T'])} | {r['pass']} | {r['alloc_us']:.0f} | {r['layer_us']:.0f} | "
            f"{r['stock_us']:.0f} | {100 * share:.1f}% | {_met(share <= 0.05)} |"
        )
    return "\n".join(lines)


Share = dict[str, dict[int, list[float]]]  # what _Engine.alloc_t_share returns


def share_rows(half: Share, full: Share, batch: int, prompt_len: int) -> list[dict[str, Any]]:
    """Rows of `share_table` from two `alloc_t_share` results of one batch (b = 0.5, then b = 1.0): its
    prefill pass (T = batch · prompt_len) and its decode passes (T = batch)."""
    rows: list[dict[str, Any]] = []
    for T, phase in ((batch * prompt_len, "prefill"), (batch, "decode")):
        if T in half["budget"] and T in full["stock"]:
            alloc_us, layer_us = half["budget"][T][:2]
            stock_us = full["stock"][T][1]
            rows.append(
                {"T": T, "pass": phase, "alloc_us": alloc_us, "layer_us": layer_us, "stock_us": stock_us}
            )
    return rows


def _mean_known(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN; NaN if none is."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.fmean(known) if known else math.nan


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


# -- engine workers ------------------------------------------------------------------------------------------
class EngineWorker:
    """One engine configuration in its own process, alive for the benchmark; `measure` is a round trip."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        # Not a daemon: vLLM may start processes of its own, which daemons may not.
        self.process = ctx.Process(target=_worker_main, args=(child, spec), name=f"bench-{name}")
        self.process.start()
        child.close()

    def wait_ready(self, timeout: float) -> None:
        self._recv(timeout, "start")

    def measure(self, request: dict[str, Any], timeout: float = 600.0) -> Timeline:
        self._conn.send(("measure", request))
        start, token_times, prompt_len = self._recv(timeout, "measure")
        return Timeline(start, token_times, prompt_len)

    def call(self, command: str, payload: Any = None, timeout: float = 600.0) -> Any:
        self._conn.send((command, payload))
        return self._recv(timeout, command)

    def stop(self) -> None:
        """Ask the worker to exit; terminate this one process (by its handle, i.e. its PID) if it won't."""
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(("stop", None))
        self.process.join(30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)

    def _recv(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"engine {self.name}: no answer to {what} within {timeout:.0f} s")
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"engine {self.name} failed in {what}:\n{value}")
        return value


def _worker_main(conn: Any, spec: dict[str, Any]) -> None:
    import traceback

    # Before vLLM is imported: the plugin reads VLLM_ALLOC_DISABLE when vLLM loads plugins.
    os.environ["VLLM_ALLOC_DISABLE"] = "0" if spec["plugin"] else "1"
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.get("threads"):
        # A fixed OpenMP team, unbound: on a shared machine, a team of 2 on 2 cores stalls at every barrier
        # for a whole scheduler tick whenever a neighbour's process holds one core (20 ms instead of 1.6 ms
        # for one T = 1 expert call here), which measures the neighbours, not the engine.
        os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    try:
        engine = _Engine(spec)
        conn.send(("ok", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            command, payload = conn.recv()
        except EOFError:
            return
        if command == "stop":
            return
        try:
            conn.send(("ok", getattr(engine, command)(payload)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class _Engine:
    """The vLLM side of a worker (runs in the worker process only)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=spec["model"],
            dtype="bfloat16",
            seed=0,
            max_model_len=spec["max_model_len"],
            max_num_seqs=spec["max_num_seqs"],
            max_num_batched_tokens=spec["max_num_batched_tokens"],
            enable_prefix_caching=False,  # rounds and budgets must never reuse each other's prefill
            gpu_memory_utilization=0.05,
            kv_cache_memory_bytes=spec["kv_cache_bytes"],
            enforce_eager=spec["eager"],
        )
        if spec.get("hf_overrides"):
            kwargs["hf_overrides"] = spec["hf_overrides"]
        plugin_config: dict[str, Any] = {}
        if spec.get("budget_file"):
            plugin_config["budget_file"] = str(Path(spec["budget_file"]).resolve())
        if spec.get("expert_cap") is not None:
            plugin_config["expert_cap"] = spec["expert_cap"]
        if plugin_config:
            kwargs["additional_config"] = {"vllm_alloc": plugin_config}
        self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self.vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        self._n = 0

    def alloc_t_share(self, req: dict[str, Any]) -> dict[str, dict[int, list[float]]]:
        """Run `measure(req)` with the plugin's MoE-layer calls timed inside the engine.

        Returns, per path ("budget": a pass with pruned pairs; "stock": an all-b = 1.0 pass) and per T (tokens
        in the layer call), [median Alloc-T µs, median layer µs, calls, mean distinct experts].
          * Alloc-T: the ranking keys plus the host reallocation and its activation count
            (`layer.rank_keys`, `cpu.host_routing`, which on the CPU path also runs the cap);
          * layer: the whole routed-expert call (`layer._budget_path`: Alloc-T, the cap, then the experts
            on the kept pairs; or the runner's `stock_experts` in an all-b = 1.0 pass);
          * distinct experts: those the call's pairs are on (the plugin's distinct-expert counter on the
            budget path, the stock ids' on the stock path), read outside the timed span.
        Timers cost ~1 µs a call; they wrap the plugin's functions for this one measurement only.
        """
        import torch

        from vllm_alloc.integration import cpu, layer
        from vllm_alloc.integration.state import STATE

        calls: dict[str, dict[int, list[tuple[float, float, float]]]] = {"budget": {}, "stock": {}}
        inner = [0.0]
        in_budget = [False]  # the budget path calls stock_experts on the kept pairs: not a stock call

        def timed_part(fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    inner[0] += time.perf_counter() - t0

            return wrapper

        def timed_budget(fn: Any) -> Any:
            def wrapper(runner: Any, x: Any, *args: Any) -> Any:
                assert STATE.plan is not None
                before = STATE.plan.distinct.clone()
                inner[0], in_budget[0] = 0.0, True
                t0 = time.perf_counter()
                try:
                    out = fn(runner, x, *args)
                finally:
                    in_budget[0] = False
                elapsed = time.perf_counter() - t0
                counted = (STATE.plan.distinct - before).nonzero()  # [(column, D)]: one entry per call
                distinct = float(counted[0, 1]) if counted.shape[0] else math.nan  # not counting
                calls["budget"].setdefault(int(x.shape[0]), []).append((inner[0], elapsed, distinct))
                return out

            return wrapper

        def timed_stock(fn: Any) -> Any:
            def wrapper(runner: Any, x: Any, topk_weights: Any, topk_ids: Any, *args: Any, **kw: Any) -> Any:
                if in_budget[0]:
                    return fn(runner, x, topk_weights, topk_ids, *args, **kw)
                t0 = time.perf_counter()
                out = fn(runner, x, topk_weights, topk_ids, *args, **kw)
                elapsed = time.perf_counter() - t0
                distinct = float(torch.unique(topk_ids).numel())
                calls["stock"].setdefault(int(x.shape[0]), []).append((0.0, elapsed, distinct))
                return out

            return wrapper

        runner_cls = type(next(iter(layer._RUNNERS.values())))
        originals = [
            (layer, "rank_keys", timed_part(layer.rank_keys)),
            (cpu, "host_routing", timed_part(cpu.host_routing)),
            (layer, "_budget_path", timed_budget(layer._budget_path)),
            (runner_cls, "stock_experts", timed_stock(runner_cls.stock_experts)),
        ]
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in originals]
        try:
            for owner, name, wrapped in originals:
                setattr(owner, name, wrapped)
            self.measure(req)
        finally:
            for owner, name, fn in saved:
                setattr(owner, name, fn)
        return {
            path: {
                T: [
                    1e6 * statistics.median(a for a, _, _ in samples),
                    1e6 * statistics.median(t for _, t, _ in samples),
                    float(len(samples)),
                    _mean_known([d for _, _, d in samples]),
                ]
                for T, samples in sorted(by_T.items())
            }
            for path, by_T in calls.items()
        }

    def set_cap(self, share: float) -> None:
        """Cap every budget below A at the share ρ in every MoE layer, as `expert_cap` ρ would (between
        measurements; the plugin's `vllm_alloc_set_cap`)."""
        counters = self.llm.collective_rpc("vllm_alloc_counters")[0]
        layers, A = len(counters["layers"]), int(counters["A"])
        self.llm.collective_rpc("vllm_alloc_set_cap", args=({B: [share] * layers for B in range(1, A)},))

    def measure(self, req: dict[str, Any]) -> tuple[float, list[list[float]], int]:
        import random

        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        rng = random.Random(req["seed"])
        P, M, N = req["prompt_len"], req["max_tokens"], req["batch"]
        # Ids 0-2 are the tokenizer's special tokens; random ordinary ids otherwise.
        prompts = [[rng.randrange(3, self.vocab) for _ in range(P)] for _ in range(N)]
        extra = None if req.get("budget") is None else {"activation_budget": req["budget"]}
        params = SamplingParams(
            max_tokens=M,
            min_tokens=M,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
        )
        ids = []
        times: dict[str, list[float]] = {}
        start = time.perf_counter()
        for prompt in prompts:
            self._n += 1
            rid = f"b{self._n}"
            ids.append(rid)
            times[rid] = []
            self.engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            now = time.perf_counter()
            for out in outputs:
                times[out.request_id].extend([now] * len(out.outputs[0].token_ids))
        for rid in ids:
            if len(times[rid]) != M:
                raise RuntimeError(f"request {rid} produced {len(times[rid])} tokens, expected {M}")
        return start, [times[r] for r in ids], P
