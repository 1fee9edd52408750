"""A real `vllm-alloc serve` process for the server end-to-end tests: start, health, /metrics, stop.

Started through the launcher itself (`python -m vllm_alloc.cli serve`), on a tiny checkpoint, with its
output in a log file that failures quote.
"""

from __future__ import annotations

import contextlib
import os
import signal as signals
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

START_TIMEOUT_S = 240


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    model: str
    log: Path
    prometheus_dir: str

    def client(self) -> Any:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def async_client(self) -> Any:
        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=300
        )

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def healthy(self) -> bool:
        try:
            return self.process.poll() is None and httpx.get(f"{self.base_url}/health", timeout=5).is_success
        except httpx.HTTPError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_fraction() -> str:
    # The tiny model needs well under 1 GiB; ask for at most 10% of memory and half of what is free now.
    vm = psutil.virtual_memory()
    return f"{max(0.02, min(0.1, 0.5 * vm.available / vm.total)):.3f}"


def stop_tree(pid: int) -> None:
    """SIGTERM, then SIGKILL, for `pid` and its descendants, by PID (never by name)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


@contextlib.contextmanager
def serve(model: str, args: list[str], log: Path) -> Iterator[Server]:
    """`vllm-alloc serve MODEL ARGS` on a free port, until healthy; stopped (tree, by PID) on exit."""
    port = free_port()
    argv = [sys.executable, "-m", "vllm_alloc.cli", "serve", model, "--port", str(port), *args]
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(process, f"http://127.0.0.1:{port}", model, log, prometheus_dir="")
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not srv.healthy():
            if process.poll() is not None:
                pytest.fail(f"vllm-alloc serve exited with {process.returncode}:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(1)
        (vllm,) = psutil.Process(process.pid).children()
        srv.prometheus_dir = vllm.environ()["PROMETHEUS_MULTIPROC_DIR"]
        yield srv
    finally:
        if process.poll() is None:
            stop_tree(process.pid)


def metrics(srv: Server, prefix: str = "vllm_alloc:") -> dict[tuple[str, str, str], float]:
    """{(metric, layer, budget): value} of the series named `prefix...` on /metrics ('' for absent
    labels; a histogram bucket's `le` stands in the budget place)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{srv.base_url}/metrics", timeout=10).text
    out: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(prefix):
                key = (s.name, s.labels.get("layer", ""), s.labels.get("budget", s.labels.get("le", "")))
                out[key] = out.get(key, 0.0) + s.value
    return out


def delta(after: dict[Any, float], before: dict[Any, float]) -> dict[Any, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def stop_with_requests_in_flight(
    srv: Server,
    signum: signals.Signals,
    budgets: list[str],
    *,
    max_tokens: int,
    settle_s: float,
    wait_s: float,
) -> tuple[int, list[str]]:
    """Start one completion per budget, send `signum` `settle_s` later, and check a clean stop: the
    server exits 0 within `wait_s`, leaves no process behind and removes its metrics dir. Returns (the
    requests already answered when the signal went out, each request's outcome: "done N" for N tokens,
    or the openai error's type). Fails when a request is still waiting 60 s after the exit."""
    outcomes: list[str] = []

    def one(i: int, budget: str) -> None:
        try:
            out = srv.client().completions.create(
                model=srv.model,
                prompt=f"in flight {i}:",
                max_tokens=max_tokens,
                extra_body={"ignore_eos": True},
                extra_headers={"X-Activation-Budget": budget},
            )
            outcomes.append(f"done {out.usage.completion_tokens}")
        except (openai.APIConnectionError, openai.APIStatusError) as e:
            outcomes.append(type(e).__name__)

    threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(budgets)]
    for t in threads:
        t.start()
    time.sleep(settle_s)  # the requests are in the engine
    assert srv.healthy(), srv.log_tail()
    answered_before = len(outcomes)
    descendants = psutil.Process(srv.process.pid).children(recursive=True)
    srv.process.send_signal(signum)
    try:
        code = srv.process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {wait_s:g} s after {signum.name}:\n{srv.log_tail()}")
    for t in threads:
        t.join(timeout=60)
    assert len(outcomes) == len(budgets), f"a request hung past the shutdown: {outcomes}"
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert code == 0, srv.log_tail()
    assert not Path(srv.prometheus_dir).exists()
    return answered_before, outcomes
