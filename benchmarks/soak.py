"""Bounded soak of `vllm-alloc serve` on the default model; stops by itself.

    python benchmarks/soak.py [--requests 400] [--concurrency 32] [--max-seconds 900] [--seed 0]
                              [--out FILE.md] [--json FILE]
    python benchmarks/soak.py --minutes N [--warmup-seconds 60] [--concurrency 32] ...

With --minutes, the soak under load (soak_long.py): the benchmark model, a closed loop of clients for N
minutes, RSS and latency over time, then the same quiet phase and counter check. Without it:

Starts the server (port chosen free, loopback only, log in a temp file), then:
  1. mixed load: budgets {1.0, 0.75, 0.5, 0.33, default} by header or body, seeded sampling, long
     (300-700 token) and short prompts of stdlib source, /v1/completions and /v1/chat/completions, 20%
     streaming (half of them disconnect after a few chunks), 10% invalid budgets that must get HTTP 400;
  2. quiet phase: once vLLM reports no running or waiting request, a verification batch of completed
     requests whose activation counters must add up: per (layer, budget) series, full = K · tokens
     exactly, with tokens = prompt − cached + completion − 1; routed = K_l(B) · tokens exactly where B
     does not carry. Where B carries (decode streams keep one balance over their layers and steps), a
     layer may spend more or less than K_l, so the check is the pool: Σ_layers routed ≤ B · tokens, and
     each layer within [k_base, K] · tokens. Routed counts what Alloc-T kept: the pairs that ran plus
     those the distinct-expert cap dropped (`vllm_alloc:cap_dropped_pairs_total`).
Over the whole run, routed ≤ full for every series and full ≥ K · tokens of the completed requests
(disconnected requests computed an unknown number of tokens on top).

Exits 1 on a server death, an accepted invalid budget, or counters that do not add up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from vllm_alloc.budget import BudgetFile, load_budget_file
from vllm_alloc.metrics import budget_label

ROOT = Path(__file__).resolve().parents[1]
MODEL = "models/default"
SERVER_ARGS = ["--budget-config", "default", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
SERVER_ARGS += ["--enable-prompt-tokens-details", "--max-num-batched-tokens", "256"]  # long prefills split
BUDGETS: tuple[float | None, ...] = (1.0, 0.75, 0.5, 0.33, None)  # None: the server default
INVALID: list[tuple[str, str | None, Any]] = [  # (kind, header, body's activation_budget); must be 400
    ("out of range", "1.5", None),
    ("out of range", None, 0),
    ("out of range", "-1", None),
    ("non-numeric", "abc", None),
    ("non-numeric", None, "abc"),
    ("huge integer", None, 10**400),  # json.dumps writes all 401 digits
    ("header/body disagree", "0.5", 0.75),
]
CORPUS = ["textwrap.py", "heapq.py", "functools.py", "argparse.py", "json/decoder.py", "string.py"]
FULL, ROUTED = "vllm_alloc:full_activations_total", "vllm_alloc:routed_activations_total"
DROPPED = "vllm_alloc:cap_dropped_pairs_total"  # pairs Alloc-T kept that the distinct-expert cap cut
PromptFn = Callable[[random.Random, bool], str]  # (rng, long) -> prompt text
Series = dict[tuple[str, str, str], float]  # {(sample name, layer, budget): value}


@dataclass(frozen=True)
class Spec:
    chat: bool
    prompt: str
    max_tokens: int
    budget: float | None = None  # the valid budget asked for; None: the server default
    header: str | None = None  # X-Activation-Budget sent
    body_budget: Any = None  # vllm_xargs.activation_budget sent (None: absent)
    invalid: str | None = None  # kind of invalid budget: the answer must be 400
    stream: bool = False
    disconnect: bool = False  # close the stream after a few chunks
    seed: int | None = None  # sample at temperature 0.8 with this seed; None: greedy
    ignore_eos: bool = False  # verification: no early stop, exact token counts


@dataclass
class Stats:
    sent: int = 0
    completed: int = 0
    disconnects: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # 400s by invalid kind
    errors: Counter[str] = field(default_factory=Counter)  # by kind: "HTTP 500", an exception type, ...
    examples: list[str] = field(default_factory=list)  # the first errors, verbatim
    deaths: int = 0
    verified_tokens: int = 0  # tokens of the verification batch, checked exactly
    cap_dropped: float = 0.0  # pairs the distinct-expert cap dropped in the verification batch
    counter_problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {detail[:300]}")


# -- pure helpers (tests/benchmarks/test_soak.py) ---------------------------------------------------------
def plan(n: int, rng: random.Random, prompt: PromptFn, mixed: bool = True) -> list[Spec]:
    """n requests. mixed: 10% invalid, 10% streamed to the end, 10% disconnected, the rest plain;
    else (verification) 25% streamed to the end, `ignore_eos`, never invalid or disconnected."""
    if mixed:
        roles = ["invalid"] * (n // 10) + ["stream"] * (n // 10) + ["disconnect"] * (n // 10)
    else:
        roles = ["stream"] * (n // 4)
    roles += ["plain"] * (n - len(roles))
    rng.shuffle(roles)
    specs = []
    for i, role in enumerate(roles):
        b = BUDGETS[i % len(BUDGETS)]
        header, body = (None, None) if b is None else (str(b), None) if rng.random() < 0.5 else (None, b)
        invalid = None
        if role == "invalid":
            invalid, header, body = rng.choice(INVALID)
        specs.append(
            Spec(
                chat=rng.random() < 0.5,
                prompt=prompt(rng, rng.random() < 0.3),
                max_tokens=rng.randint(32, 64) if role == "disconnect" else rng.randint(4, 48),
                budget=None if invalid else b,
                header=header,
                body_budget=body,
                invalid=invalid,
                stream=role in ("stream", "disconnect") or (role == "invalid" and rng.random() < 0.2),
                disconnect=role == "disconnect",
                seed=rng.randrange(2**31) if rng.random() < 0.8 else None,
                ignore_eos=not mixed,
            )
        )
    return specs


def request(spec: Spec, model: str = MODEL) -> tuple[str, dict[str, str], bytes]:
    """(path, headers, JSON body) of one spec, for the served model `model`."""
    body: dict[str, Any] = {"model": model, "max_tokens": spec.max_tokens, "stream": spec.stream}
    body |= {"messages": [{"role": "user", "content": spec.prompt}]} if spec.chat else {"prompt": spec.prompt}
    body |= {"temperature": 0.0} if spec.seed is None else {"temperature": 0.8, "seed": spec.seed}
    body["ignore_eos"] = spec.ignore_eos
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    if spec.body_budget is not None:
        body["vllm_xargs"] = {"activation_budget": spec.body_budget}
    headers = {"content-type": "application/json"}
    if spec.header is not None:
        headers["X-Activation-Budget"] = spec.header
    path = "/v1/chat/completions" if spec.chat else "/v1/completions"
    return path, headers, json.dumps(body).encode()


def computed_tokens(usage: dict[str, Any]) -> int:
    """Tokens a finished request ran through the model: the last sampled token is never fed back."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return usage["prompt_tokens"] - cached + usage["completion_tokens"] - 1


def parse_metrics(text: str) -> Series:
    """{(sample name, layer, budget): value} of a /metrics page, summed over other labels."""
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, s.labels.get("layer", ""), s.labels.get("budget", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def expected_counters(tokens_by_B: dict[int, int], bf: BudgetFile) -> Series:
    """full = K · tokens and routed = K_l(B) · tokens, per (layer, budget label) series."""
    K, A, table = bf.model.top_k, bf.model.full_activations, bf.allocation_table()
    out: Series = {}
    for B, tokens in tokens_by_B.items():
        label = budget_label(B / A)  # B values sharing a label cannot exist: B/A to 4 digits is exact here
        for i, layer in enumerate(map(str, bf.model.moe_layers)):
            out[(FULL, layer, label)] = out.get((FULL, layer, label), 0.0) + K * tokens
            out[(ROUTED, layer, label)] = out.get((ROUTED, layer, label), 0.0) + int(table[B, i]) * tokens
    return out


def counter_problems(got: Series, tokens_by_B: dict[int, int], bf: BudgetFile) -> list[str]:
    """What does not add up in `got` (the verification batch's counters), one line each.

    Every series is exact (`expected_counters`) except routed at a B that carries: there a request's
    balance moves experts between layers and steps, so only the pool is exact as a bound. Routed is
    checked as what Alloc-T kept: the pairs that ran plus those the distinct-expert cap dropped.
    """
    kept = {k: v for k, v in got.items() if k[0] != DROPPED}
    for (name, layer, label), v in got.items():
        if name == DROPPED:
            kept[(ROUTED, layer, label)] = kept.get((ROUTED, layer, label), 0.0) + v
    got = kept
    want = expected_counters(tokens_by_B, bf)
    carrying, A, K = bf.carrying(), bf.model.full_activations, bf.model.top_k
    loose = {budget_label(B / A): (B, t) for B, t in tokens_by_B.items() if carrying[B]}
    layers = list(map(str, bf.model.moe_layers))
    exact = {k for k in set(got) | set(want) if not (k[0] == ROUTED and k[2] in loose)}
    problems = mismatches({k: got[k] for k in exact if k in got}, {k: want[k] for k in exact if k in want})
    for label, (B, tokens) in sorted(loose.items()):
        routed = [float(got.get((ROUTED, layer, label), 0.0)) for layer in layers]
        problems += [
            f"{ROUTED}{{layer={layer},budget={label}}}: got {r:g}, want within "
            f"[{bf.k_base * tokens}, {K * tokens}] (k_base, K per token; B carries)"
            for layer, r in zip(layers, routed, strict=True)
            if not bf.k_base * tokens <= r <= K * tokens
        ]
        if sum(routed) > B * tokens:
            problems.append(
                f"{ROUTED}{{budget={label}}} over the layers: got {sum(routed):g} > B {B} × {tokens}"
            )
    return problems


def activations(metrics: Series) -> Series:
    return {k: v for k, v in metrics.items() if k[0] in (FULL, ROUTED, DROPPED)}


def mismatches(got: dict[Any, float], want: dict[Any, float], relation: str = "==") -> list[str]:
    """One line per series where `got relation want` fails (absent series count as 0)."""
    ok = {"==": float.__eq__, ">=": float.__ge__}[relation]
    out = []
    for k in sorted(set(got) | set(want)):
        g, w = float(got.get(k, 0.0)), float(want.get(k, 0.0))
        if not ok(g, w):
            out.append(f"{k[0]}{{layer={k[1]},budget={k[2]}}}: got {g:g}, want {relation} {w:g}")
    return out


def routed_over_full(metrics: Series) -> list[str]:
    full = {(layer, b): v for (name, layer, b), v in metrics.items() if name == FULL}
    return [
        f"routed > full for layer={layer} budget={b}: {v:g} > {full.get((layer, b), 0.0):g}"
        for (name, layer, b), v in metrics.items()
        if name == ROUTED and v > full.get((layer, b), 0.0)
    ]


def table(stats: Stats) -> str:
    rows = [("requests sent (mixed + verification)", stats.sent), ("completed", stats.completed)]
    rows += [(f"400 ({kind})", n) for kind, n in sorted(stats.rejected.items())]
    rows += [("disconnects", stats.disconnects)]
    rows += [(f"error ({kind})", n) for kind, n in sorted(stats.errors.items())] or [("errors", 0)]
    rows += [
        ("verification tokens", stats.verified_tokens),
        ("pairs the cap dropped, net of replacements (verification)", f"{stats.cap_dropped:g}"),
        ("server deaths", stats.deaths),
        ("wall time (s)", f"{stats.wall_s:.0f}"),
    ]
    problems = len(stats.counter_problems)
    rows += [("counter check", f"{problems} problems" if problems else "ok")]
    return "\n".join(["| what | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


# -- the server ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    port: int, log: Path, args: Sequence[str] = SERVER_ARGS, model: str = MODEL
) -> subprocess.Popen[bytes]:
    """`vllm-alloc serve MODEL ARGS` on 127.0.0.1:port, from the repository root."""
    argv = [sys.executable, "-m", "vllm_alloc.cli", "serve", model, *args]
    return launch([*argv, "--host", "127.0.0.1", "--port", str(port)], log)


def launch(argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A server process `argv` from the repository root, offline, with `env` on top of this one's, its
    output to `log`."""
    full = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}  # the launcher makes one
    full.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", **(env or {}))
    with log.open("wb") as out:  # own session: a Ctrl-C here reaches the server only through stop_server
        return subprocess.Popen(
            argv, cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} while starting; log: {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s; log: {log}")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the launcher (it forwards to vLLM), then SIGKILL to whatever of its tree is left."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


# -- the load --------------------------------------------------------------------------------------------
class Soak:
    """One running server: the request clients, the statistics, and the stop flag a server death sets."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        url: str,
        concurrency: int,
        stats: Stats,
        bf: BudgetFile,
        model: str = MODEL,
    ):
        self.proc, self.concurrency, self.stats, self.bf, self.model = proc, concurrency, stats, bf, model
        limits = httpx.Limits(max_connections=concurrency)
        self.client = httpx.AsyncClient(base_url=url, timeout=300, limits=limits)
        self.ctl = httpx.AsyncClient(base_url=url, timeout=30)  # /health, /metrics: never queued behind load
        self.stop = asyncio.Event()

    async def send(self, spec: Spec) -> tuple[float, int] | None:
        """One request; (applied budget, computed tokens) when it completed with usage, else None."""
        stats, (path, headers, content) = self.stats, request(spec, self.model)
        stats.sent += 1
        try:
            async with self.client.stream("POST", path, headers=headers, content=content) as r:
                if spec.invalid or r.status_code != 200 or not spec.stream:
                    await r.aread()
                if spec.invalid:
                    if r.status_code == 400:
                        stats.rejected[spec.invalid] += 1
                    else:
                        sent = f"header {spec.header}, body {spec.body_budget!s:.20}"
                        stats.error(
                            "invalid accepted", f"{spec.invalid} ({sent}): HTTP {r.status_code} {r.text}"
                        )
                    return None
                if r.status_code != 200:
                    stats.error(f"HTTP {r.status_code}", r.text)
                    return None
                applied = float(r.headers.get("x-activation-budget-applied", "nan"))
                if applied != (self.bf.default_budget if spec.budget is None else spec.budget):
                    stats.error("wrong applied budget", f"asked {spec.budget}, applied {applied}")
                usage = await self.stream_usage(r, spec) if spec.stream else json.loads(r.content)["usage"]
        except Exception as e:  # any failure is a finding of the soak, counted by its type
            stats.error(type(e).__name__, f"{path}: {e!r}")
            return None
        if usage is None:
            return None  # a disconnect or an error in the stream, counted as such
        stats.completed += 1
        return applied, computed_tokens(usage)

    async def stream_usage(self, r: httpx.Response, spec: Spec) -> dict[str, Any] | None:
        """Read an SSE stream to its end (its last chunk has the usage); None after a disconnect or error."""
        chunks, usage = 0, None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk, chunks = json.loads(line[6:]), chunks + 1
            if "error" in chunk:
                self.stats.error("error in stream", line)
                return None
            if spec.disconnect and chunks == 3:  # the caller leaves the `stream` block: connection closed
                self.stats.disconnects += 1
                return None
            usage = chunk.get("usage") or usage
        if usage is None:
            self.stats.error("no usage", f"stream of {chunks} chunks ended without usage")
        return usage

    async def batch(self, specs: list[Spec], deadline: float, desc: str) -> Counter[int]:
        """Send `specs`, `concurrency` at a time, until done, a server death or `deadline`: tokens by B."""
        tokens: Counter[int] = Counter()
        todo = iter(specs)
        with tqdm(total=len(specs), desc=desc, unit="req") as bar:

            async def worker() -> None:
                for spec in todo:  # one shared iterator: every spec goes to one worker
                    if self.stop.is_set() or time.monotonic() > deadline:
                        return
                    done = await self.send(spec)
                    if done is not None:
                        tokens[self.bf.absolute_budget(done[0])] += done[1]
                    bar.update()

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return tokens

    async def watch(self) -> None:
        """A server death: the process exited, or /health failed 3 times in a row (2 s apart)."""
        failures = 0
        while failures < 3 and self.proc.poll() is None:
            await asyncio.sleep(2)
            try:
                healthy = (await self.ctl.get("/health", timeout=10)).status_code == 200
            except httpx.HTTPError:
                healthy = False
            failures = 0 if healthy else failures + 1
        self.stats.deaths += 1
        code = self.proc.poll()
        self.stats.examples.append(
            f"server death: {'/health failing' if code is None else f'exit code {code}'}"
        )
        self.stop.set()

    async def metrics(self) -> Series:
        return parse_metrics((await self.ctl.get("/metrics")).text)

    async def idle(self, timeout_s: float = 180) -> bool:
        """Whether vLLM reports no running or waiting request (before a death or `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            m = await self.metrics()
            if sum(m.get((f"vllm:num_requests_{s}", "", ""), 0.0) for s in ("running", "waiting")) == 0:
                return True
            await asyncio.sleep(0.5)
        return False

    async def run(self, load: list[Spec], check: list[Spec], deadline: float) -> None:
        """The mixed load, then the verification batch on an idle server and the counter checks."""
        watcher = asyncio.create_task(self.watch())
        try:
            run_tokens = await self.batch(load, deadline, "mixed")
            await self.verify(check, run_tokens)
        finally:
            watcher.cancel()
            await self.client.aclose()
            await self.ctl.aclose()

    async def verify(self, check: list[Spec], run_tokens: Counter[int]) -> None:
        """After the load (`run_tokens`: its completed tokens by B): wait for a quiet server, send the
        verification batch, and check the counters (`Stats.counter_problems`)."""
        problems = self.stats.counter_problems
        if self.stop.is_set():
            return  # a server death: reported as such, nothing left to check
        if not await self.idle():
            problems.append("vLLM never went idle after the mixed load")
            return
        before = activations(await self.metrics())
        tokens = await self.batch(check, float("inf"), "verify")
        if not await self.idle():
            problems.append("no quiet phase after the verification batch (server death or never idle)")
            return
        self.stats.verified_tokens = sum(tokens.values())
        for _ in range(40):  # the worker flushes after each pass, which can land after the response
            now = activations(await self.metrics())
            got = {k: v - before.get(k, 0.0) for k, v in now.items() if v != before.get(k, 0.0)}
            if not counter_problems(got, tokens, self.bf):
                break
            await asyncio.sleep(0.25)
        problems += counter_problems(got, tokens, self.bf) + routed_over_full(now)
        self.stats.cap_dropped = sum(v for k, v in got.items() if k[0] == DROPPED)
        lower = {k: v for k, v in expected_counters(run_tokens + tokens, self.bf).items() if k[0] == FULL}
        problems += mismatches({k: now.get(k, 0.0) for k in lower}, lower, ">=")


def prompt_maker(model: Path = ROOT / MODEL) -> PromptFn:
    """Prompts cut from stdlib source (the default model's training domain), 300-700 or 4-40 tokens of
    `model`'s tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids = tok.encode("\n".join((stdlib / f).read_text() for f in CORPUS)).ids

    def prompt(rng: random.Random, long: bool) -> str:
        n = rng.randint(300, 700) if long else rng.randint(4, 40)
        start = rng.randrange(len(ids) - n)
        return tok.decode(ids[start : start + n])

    return prompt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--requests", type=int, help="requests of the mixed load (default 400; not with --minutes)"
    )
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--verify", type=int, default=40, help="requests of the quiet verification batch")
    p.add_argument(
        "--max-seconds",
        type=float,
        help="stop sending the mixed load after this (default 900; not with --minutes)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument(
        "--minutes",
        type=float,
        help="the soak under load (soak_long.py): N minutes of a closed loop of --concurrency clients on the "
        "benchmark model",
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=60,
        help="with --minutes: closed-loop load before the timed minutes; RSS growth is measured from its end",
    )
    p.add_argument("--out", type=Path, help="also write the markdown report to this file")
    p.add_argument(
        "--json", type=Path, help="write the results here (default: vllm-alloc-soak[-long].json in /tmp)"
    )
    args = p.parse_args()
    if args.minutes is not None:
        for flag in ("requests", "max_seconds"):
            if getattr(args, flag) is not None:
                p.error(
                    f"--{flag.replace('_', '-')} is for the bounded soak; with --minutes the load is timed"
                )
        if not 0 < args.minutes <= 24 * 60 or args.warmup_seconds < 0:
            p.error(
                f"--minutes {args.minutes:g}, --warmup-seconds {args.warmup_seconds:g}: want (0, 1440], >= 0"
            )
        import soak_long  # here: it imports this module, and only the timed mode needs it

        return soak_long.main(args)
    args.requests = 400 if args.requests is None else args.requests
    args.max_seconds = 900.0 if args.max_seconds is None else args.max_seconds
    args.json = args.json or Path(tempfile.gettempdir()) / "vllm-alloc-soak.json"
    bf = load_budget_file("default")
    K = json.loads((ROOT / MODEL / "config.json").read_text())["num_experts_per_tok"]
    if bf.model.top_k != K:
        raise RuntimeError(f"configs/default.json has K = {bf.model.top_k}, {MODEL} has K = {K}")
    rng, prompt = random.Random(args.seed), prompt_maker()
    load, check = plan(args.requests, rng, prompt), plan(args.verify, rng, prompt, mixed=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `kill` of the soak still stops the server
    stats, t0, port = Stats(), time.monotonic(), free_port()
    log = Path(tempfile.mkstemp(prefix="vllm-alloc-soak-", suffix=".log")[1])
    print(f"server log: {log}")
    proc = start_server(port, log)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        soak = Soak(proc, f"http://127.0.0.1:{port}", args.concurrency, stats, bf)
        asyncio.run(soak.run(load, check, deadline=time.monotonic() + args.max_seconds))
    finally:
        stop_server(proc)
        stats.wall_s = time.monotonic() - t0
    text = "\n".join([table(stats), *(f"- {line}" for line in stats.examples + stats.counter_problems)])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    write_json(args, vars(stats))
    failed = stats.deaths or stats.errors["invalid accepted"] or stats.counter_problems
    return 1 if failed else 0


def write_json(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """{"args": the command line, **results} to --json."""
    given = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": given, **results}, indent=1, default=str))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    sys.exit(main())
