"""Where production breaks: the server under prefix caching, split prefills, preemption, seeds, aborts and
SIGINT, end to end with the openai client against one real `vllm-alloc serve` process.

The server is squeezed on purpose: `--max-num-batched-tokens 64` splits every long prompt's prefill
across steps (and shares steps between requests), and a KV cache of 12 blocks of 32 tokens (384 tokens)
cannot hold four long requests at once, so the scheduler preempts and recomputes. Tiny Qwen3-MoE:
L = 2, E = 16, K = 4 (A = 8); the uniform allocation gives K_l = 2 at b = 0.5, 1 at b = 0.25.
Tests run in file order; the last one stops the server with SIGINT while requests are in flight.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("vllm")

from tests.e2e.serving import Server, delta, memory_fraction, metrics, serve, stop_with_requests_in_flight  # noqa: E402

K, L = 4, 2
ROUTED_FRACTION = {"1": 1.0, "0.5": 0.5, "0.25": 0.25}  # K_l(B) / K under the uniform allocation
BLOCK = 32  # tokens per KV block (the CPU attention backend needs a multiple of 32)
# ~150 tokens each: longer than the 64-token step budget (split prefill) and several KV blocks.
LONG = [f"# module {i}\n" + "def f(x):\n    return x * 2 + 1\n" * 11 for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = str(tiny_model("qwen3_moe", num_layers=L, top_k=K, num_experts=16, hidden_size=128))
    args = [
        "--default-budget",
        "1.0",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "8",
        "--enable-chunked-prefill",
        "--max-num-batched-tokens",
        "64",
        "--block-size",
        str(BLOCK),
        "--num-gpu-blocks-override",
        "12",
        "--enable-prefix-caching",
        "--budget-aliases",
        "0.5",
        "--enforce-eager",
        "--gpu-memory-utilization",
        memory_fraction(),
        "--enable-prompt-tokens-details",  # usage reports cached prompt tokens
    ]
    with serve(model, args, tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


def complete(srv: Server, prompt: str, b: float | None, **kwargs: Any) -> Any:
    headers = {} if b is None else {"X-Activation-Budget": str(b)}
    params: dict[str, Any] = {"max_tokens": 4, "temperature": 0.0, **kwargs}
    return srv.client().completions.create(model=srv.model, prompt=prompt, extra_headers=headers, **params)


def cached(usage: Any) -> int:
    return (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0


def idle(srv: Server) -> None:
    """Wait until no request runs or waits and the plugin's last counter flush has landed."""
    for _ in range(120):
        engine = metrics(srv, "vllm:num_requests_")
        if all(
            v == 0
            for k, v in engine.items()
            if k[0] in ("vllm:num_requests_running", "vllm:num_requests_waiting")
        ):
            break
        time.sleep(0.25)
    else:
        pytest.fail(f"requests still running after 30 s:\n{srv.log_tail()}")
    time.sleep(0.5)


def activations(srv: Server, before: dict[Any, float]) -> dict[tuple[str, str], tuple[float, float]]:
    """{(layer, budget): (routed, full)} added since `before`."""
    d = delta(metrics(srv), before)
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for (name, layer, budget), v in d.items():
        if name.endswith("activations_total"):
            routed, full = out.get((layer, budget), (0.0, 0.0))
            out[(layer, budget)] = (routed + v, full) if "routed" in name else (routed, full + v)
    return out


def assert_pools_exact(got: dict[tuple[str, str], tuple[float, float]]) -> None:
    """Every (layer, budget) series performed exactly K_l(B)/K of its full-budget activations."""
    assert got, "no activations counted"
    for (layer, budget), (routed, full) in got.items():
        assert full > 0 and full % K == 0, (layer, budget, full)
        assert routed == full * ROUTED_FRACTION[budget], (layer, budget, routed, full)


# -- prefix cache -------------------------------------------------------------------------------------------


def test_prefix_cache_never_shared_across_budgets(server: Server) -> None:
    prompt = LONG[0]
    first = complete(server, prompt, 1.0)
    assert first.usage.prompt_tokens > BLOCK  # longer than one KV block: a hit would show
    assert cached(first.usage) == 0
    half = complete(server, prompt, 0.5)
    assert cached(half.usage) == 0, "KV computed at b = 1.0 served a b = 0.5 request"
    again = complete(server, prompt, 0.5)
    assert cached(again.usage) >= BLOCK, "the same budget twice must hit the prefix cache"
    full = complete(server, prompt, None)  # the server default, 1.0: the stock namespace
    assert cached(full.usage) >= BLOCK
    quarter = complete(server, prompt, 0.25)
    assert cached(quarter.usage) == 0


def test_prefix_cache_isolation_holds_for_budget_aliases(server: Server) -> None:
    """An alias shares the prefix cache of its budget, never another's: NAME@0.5 and the header 0.5 are
    one namespace, NAME (b = 1.0) another."""
    prompt = LONG[1]
    client = server.client()

    def run(model: str, headers: dict[str, str] | None = None) -> int:
        out = client.completions.create(model=model, prompt=prompt, max_tokens=2, extra_headers=headers or {})
        return cached(out.usage)

    assert run(server.model) == 0
    assert run(f"{server.model}@0.5") == 0, "KV computed at b = 1.0 served the alias at b = 0.5"
    assert run(server.model, {"X-Activation-Budget": "0.5"}) >= BLOCK, "the same budget is one namespace"
    assert run(f"{server.model}@0.5") >= BLOCK


# -- seeded requests whose prefill is split across steps ----------------------------------------------------


@pytest.mark.parametrize("b", [1.0, 0.5])
def test_seeded_request_with_split_prefill(server: Server, b: float) -> None:
    """vLLM CPU 0.32 kills the engine here (a CPU generator has no offset to rewind); ours keeps serving,
    and the seeded stream is the same whether the prompt's prefill shares its steps or not."""
    seeded = {"temperature": 1.0, "seed": 1234, "max_tokens": 12, "extra_body": {"ignore_eos": True}}
    target = LONG[1] + f"# budget {b}\n"
    alone = complete(server, target, b, **seeded)
    assert server.healthy(), server.log_tail()

    async def batched() -> list[Any]:
        async with server.async_client() as client:
            calls = [
                client.completions.create(
                    model=server.model,
                    prompt=p,
                    max_tokens=8,
                    temperature=0.0,
                    extra_headers={"X-Activation-Budget": "0.5"},
                )
                for p in LONG[2:5]
            ]
            calls.insert(
                1,
                client.completions.create(
                    model=server.model, prompt=target, extra_headers={"X-Activation-Budget": str(b)}, **seeded
                ),
            )
            return list(await asyncio.gather(*calls))

    outs = asyncio.run(batched())
    assert server.healthy(), server.log_tail()
    assert outs[1].usage.completion_tokens == 12
    assert outs[1].choices[0].text == alone.choices[0].text


# -- chunked prefill and preemption under mixed budgets ------------------------------------------------------


def test_split_prefill_and_preemption_keep_counters_exact(server: Server) -> None:
    idle(server)
    budgets = [1.0, 0.5, 0.25, 1.0, 0.5, 0.25]
    prompts = [p + f"# {i}\n" for i, p in enumerate(LONG[2:8])]
    # b = 1.0 requests alone first: their passes are all at b = 1.0, vLLM's stock path.
    reference = {i: complete(server, prompts[i], 1.0, max_tokens=24).choices[0].text for i in (0, 3)}
    idle(server)
    before = metrics(server)
    preempted_before = sum(metrics(server, "vllm:num_preemptions").values())

    async def run_all() -> list[Any]:
        async with server.async_client() as client:
            return list(
                await asyncio.gather(
                    *(
                        client.completions.create(
                            model=server.model,
                            prompt=p,
                            max_tokens=24,
                            temperature=0.0,
                            extra_headers={"X-Activation-Budget": str(b)},
                            extra_body={"ignore_eos": True},
                        )
                        for p, b in zip(prompts, budgets, strict=True)
                    )
                )
            )

    outs = asyncio.run(run_all())
    assert all(o.usage.completion_tokens == 24 for o in outs)
    idle(server)
    preempted = sum(metrics(server, "vllm:num_preemptions").values()) - preempted_before
    assert preempted > 0, "the KV cache was meant to force preemption; the test lost its point"
    got = activations(server, before)
    assert_pools_exact(got)
    # Every token computed at least once (recomputation after preemption adds to it, and is counted).
    tokens: dict[str, int] = defaultdict(int)
    for o, b in zip(outs, budgets, strict=True):
        tokens[f"{b:.4g}"] += o.usage.prompt_tokens - cached(o.usage) + o.usage.completion_tokens - 1
    for (_, budget), (_, full) in got.items():
        assert full >= K * tokens[budget]
    # Full-budget requests batched with budgeted ones, split and preempted: still the stock greedy text.
    for i, text in reference.items():
        assert outs[i].choices[0].text == text


# -- aborts and disconnects ----------------------------------------------------------------------------------


def test_aborts_and_disconnects_leave_server_healthy_and_exact(server: Server) -> None:
    idle(server)
    generated_before = generated(server)
    # Short prompts, long answers: the clients leave long before the 200th token.
    body = {"model": server.model, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True}
    outcomes: list[str] = []

    def stream_then_leave(i: int, b: float) -> None:
        payload = {**body, "prompt": f"stream {i}:", "stream": True}
        with (
            httpx.Client(base_url=server.base_url, timeout=60) as client,
            client.stream(
                "POST", "/v1/completions", json=payload, headers={"X-Activation-Budget": str(b)}
            ) as r,
        ):
            lines = 0
            for line in r.iter_lines():
                lines += bool(line)
                if lines >= 3:
                    break  # leave mid-stream: the connection closes with the block
            outcomes.append(f"stream {r.status_code} {lines}")

    def wait_then_leave(i: int, b: float) -> None:
        try:  # the client gives up before the answer
            httpx.post(
                f"{server.base_url}/v1/completions",
                json={**body, "prompt": f"wait {i}:"},
                headers={"X-Activation-Budget": str(b)},
                timeout=0.3,
            )
            outcomes.append("wait answered")
        except httpx.TimeoutException:
            outcomes.append("wait left")

    threads = [
        threading.Thread(target=stream_then_leave, args=(i, b)) for i, b in enumerate((1.0, 0.5, 0.25))
    ]
    threads += [threading.Thread(target=wait_then_leave, args=(i, b)) for i, b in enumerate((0.5, 1.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes) == ["stream 200 3"] * 3 + ["wait left"] * 2
    idle(server)
    assert server.healthy(), server.log_tail()
    # Aborted, not run to the end: 5 requests of 200 tokens would generate 1000.
    assert generated(server) - generated_before < 500, "requests whose client left kept generating"

    before = metrics(server)
    tokens: dict[str, int] = defaultdict(int)
    for b in (1.0, 0.5, 0.25):
        out = complete(server, f"after the aborts, b = {b}", b, max_tokens=6, extra_body={"ignore_eos": True})
        tokens[f"{b:.4g}"] += out.usage.prompt_tokens - cached(out.usage) + out.usage.completion_tokens - 1
    idle(server)
    got = activations(server, before)
    assert_pools_exact(got)
    assert {budget: full for (layer, budget), (_, full) in got.items() if layer == "0"} == {
        budget: K * n for budget, n in tokens.items()
    }


def generated(srv: Server) -> float:
    """Tokens vLLM generated so far (its own counter)."""
    return sum(metrics(srv, "vllm:generation_tokens").values())


# -- SIGINT with requests in flight (last: stops the module's server) ----------------------------------------


def test_sigint_with_requests_in_flight(server: Server) -> None:
    answered, results = stop_with_requests_in_flight(
        server, signal.SIGINT, ["1.0", "0.5"] * 2, max_tokens=240, settle_s=0.5, wait_s=90
    )
    assert answered < 4, f"nothing in flight to test: {results}"
    assert all(r == "done 240" for r in results), results  # drained: in-flight requests finish
