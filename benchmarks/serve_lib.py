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
import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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


def share_table(rows: Sequence[dict[str, float]]) -> str:
    """Markdown table of Alloc-T's share of MoE-layer time per T (target ≤ 5%)."""
    lines = [
        "| T | Alloc-T µs | experts b=0.5 µs | experts b=1.0 (stock) µs | share | target ≤ 5% |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r["alloc_us"] / (r["alloc_us"] + r["experts_us"])
        lines.append(
            f"| {int(r['T'])} | {r['alloc_us']:.0f} | {r['experts_us']:.0f} | {r['stock_us']:.0f} | "
            f"{100 * share:.1f}% | {_met(share <= 0.05)} |"
        )
    return "\n".join(lines)


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
        self.llm = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        self.vocab = int(self.llm.llm_engine.model_config.get_vocab_size())
        self._n = 0

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


# -- Alloc-T share micro-benchmark (own process: it needs vLLM's CPU kernels) --------------------------------
def alloc_t_share(spec: dict[str, Any]) -> list[dict[str, float]]:
    """Alloc-T time vs the plugin's expert compute of one MoE layer, per T; runs in a spawned process."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_share_main, args=(child, spec), name="bench-alloc-t")
    proc.start()
    child.close()
    try:
        if not parent.poll(spec.get("timeout", 900)):
            raise TimeoutError("Alloc-T share micro-benchmark did not finish")
        status, value = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)
    if status != "ok":
        raise RuntimeError(f"Alloc-T share micro-benchmark failed:\n{value}")
    return list(value)


def _share_main(conn: Any, spec: dict[str, Any]) -> None:
    import traceback

    try:
        conn.send(("ok", _share_rows(spec)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _share_rows(spec: dict[str, Any]) -> list[dict[str, float]]:
    """Per T: Alloc-T (ranking keys + `alloc_t.reallocate`) against the expert compute the plugin runs.

    The expert compute repeats the plugin's CPU path (`_compacted_experts`): kept pairs become top-1 rows
    through vLLM's `cpu_fused_moe` on prepacked weights, summed back per token. Inputs are realistic: softmax
    routing over E experts with logit std 2 (as in the benchmark model), renormalised top-K, one budget group,
    every token at K_l = K/2 (b = 0.5 of the uniform allocation).
    """
    import torch
    from vllm import _custom_ops as ops

    from vllm_alloc import alloc_t
    from vllm_alloc.integration.layer import _compacted_experts

    # vLLM's CPU worker serves with one torch/OMP thread on a 2-core machine ("Reducing Torch threads");
    # match it. Two threads on a loaded machine also stall at OMP barriers for whole scheduler ticks.
    torch.set_num_threads(spec.get("threads", 1))
    E, K, H, I = spec["E"], spec["K"], spec["H"], spec["I"]
    reps = spec.get("reps", 20)
    isa = "amx" if torch.cpu._is_amx_tile_supported() else "vec"
    g = torch.Generator().manual_seed(0)
    w13 = ops.cpu_prepack_moe_weight((torch.randn(E, 2 * I, H, generator=g) * 0.02).bfloat16(), isa)
    w2 = ops.cpu_prepack_moe_weight((torch.randn(E, H, I, generator=g) * 0.02).bfloat16(), isa)

    def timed(fn: Any) -> float:
        fn()  # warm-up: allocator, OMP pool
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(samples)

    def experts(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, w13, w2, None, None, w, ids, "silu", isa, False)
        return out

    class _RoutedExperts:  # what `_compacted_experts` calls on a runner, minus vLLM's modular wrapper
        def forward_modular(
            self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, **_: Any
        ) -> torch.Tensor:
            return experts(x, topk_weights, topk_ids)

    class _Runner:
        routed_experts = _RoutedExperts()

    runner = _Runner()
    rows = []
    for T in spec["T"]:
        x = torch.randn(T, H, generator=g).bfloat16()
        logits = torch.randn(T, E, generator=g) * 2.0
        probs = logits.softmax(-1)
        topk_w, topk_ids = probs.topk(K, dim=-1)
        topk_w = topk_w / topk_w.sum(-1, keepdim=True)
        topk_ids = topk_ids.to(torch.int32)
        k_tok = torch.full((T,), K // 2, dtype=torch.int64)
        group = torch.zeros(T, dtype=torch.int64)

        def realloc(
            topk_w: torch.Tensor = topk_w,
            topk_ids: torch.Tensor = topk_ids,
            k_tok: torch.Tensor = k_tok,
            group: torch.Tensor = group,
            singleton: bool = T == 1,
        ) -> Any:
            keys = topk_w.float()  # rank_keys() without a score-correction bias
            # One group of T tokens, dispatched as the plugin does (closed form when T = 1).
            return alloc_t.reallocate(
                keys, topk_w, topk_ids, k_tok, group, weights="topk", singleton_groups=singleton
            )

        w, ids, _ = realloc()

        def compacted(x: torch.Tensor = x, w: torch.Tensor = w, ids: torch.Tensor = ids) -> torch.Tensor:
            return _compacted_experts(runner, x, w, ids)

        rows.append(
            {
                "T": T,
                "alloc_us": timed(realloc),
                "experts_us": timed(compacted),
                "stock_us": timed(lambda x=x, w=topk_w, ids=topk_ids: experts(x, w, ids)),
            }
        )
    return rows
