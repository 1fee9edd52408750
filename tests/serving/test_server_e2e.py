"""`vllm-alloc serve` end to end: a real vLLM server process on CPU, driven by the official openai client.

One server for the whole module (a start costs 30-60 s on a small CPU machine), started through the
launcher itself, on the tiny Qwen3-MoE checkpoint: L = 2 MoE layers, E = 16, K = 4, so A = 8 and the
uniform allocation gives K_l = 2 at b = 0.5 and K_l = 1 (= K_base) at b = 0.25. Tests run in file order;
the last one stops the server and checks the shutdown.

Counting rule the metric checks rely on: a request computes prompt_tokens − cached_tokens + completion −
1 tokens (the last sampled token is never fed back), each MoE layer counts K full activations per token,
and the pool at budget B is exact, so routed = full · K_l(B) / K for every (layer, budget) series.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")
pytest.importorskip("vllm")

from tests.e2e.serving import Server, delta, memory_fraction, metrics, serve, stop_with_requests_in_flight  # noqa: E402

K = 4  # the tiny model's top-k
L = 2
ROUTED_FRACTION = {"1": 1.0, "0.5": 0.5, "0.25": 0.25}  # K_l(B) / K under the uniform allocation
RANGE = "[0.25, 1]"  # the valid budgets of this model: K_base / K = 1/4 up to 1
APPLIED = "x-activation-budget-applied"


ADMIN_KEY = "e2e-admin-key-0123456789"
ALIASES = ("0.5", "0.25")


@pytest.fixture(scope="module")
def server(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    model = str(tiny_model("qwen3_moe", num_layers=L, top_k=K, num_experts=16, hidden_size=128))
    key_file = tmp_path_factory.mktemp("admin") / "key"
    key_file.write_text(ADMIN_KEY)
    args = [
        "--default-budget", "1.0",
        "--budget-aliases", ",".join(ALIASES),
        "--admin-key-file", str(key_file),
        "--max-model-len", "256",
        "--max-num-seqs", "16",
        "--enforce-eager",  # loads faster than compiling; the plugin's path is the same
        # On CPU a fraction of the node's memory that must be free at start-up; the machine is shared.
        "--gpu-memory-utilization", memory_fraction(),
        "--enable-prompt-tokens-details",  # usage reports cached prompt tokens, for exact counts
        "--disable-log-stats",
        "--enable-scale-out",  # serves /inference/v1/generate, a route that takes budgets
    ]  # fmt: skip
    with serve(model, args, tmp_path_factory.mktemp("server") / "server.log") as srv:
        yield srv


# -- helpers -------------------------------------------------------------------------------------------------


def computed_tokens(usage: Any) -> int:
    cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
    return usage.prompt_tokens - cached + usage.completion_tokens - 1


def expected_counters(tokens_by_budget: dict[str, int]) -> dict[tuple[str, str, str], float]:
    out = {}
    for label, tokens in tokens_by_budget.items():
        for layer in map(str, range(L)):
            out[("vllm_alloc:full_activations_total", layer, label)] = float(K * tokens)
            out[("vllm_alloc:routed_activations_total", layer, label)] = K * tokens * ROUTED_FRACTION[label]
    return out


def settled_delta(srv: Server, before: dict[Any, float], want: dict[Any, float]) -> dict[Any, float]:
    """The counter delta once the worker's last flush has reached /metrics (it flushes after each pass,
    which can land a moment after the response)."""
    got: dict[Any, float] = {}
    for _ in range(20):
        got = {k: v for k, v in delta(metrics(srv), before).items() if k[0].endswith("activations_total")}
        if got == want:
            break
        time.sleep(0.25)
    return got


async def final_usage(result: Any, stream: bool) -> Any:
    """The usage of an async completion: the last chunk's that has one, when streamed."""
    if not stream:
        return result.usage
    usage = None
    async for chunk in result:
        usage = chunk.usage or usage
    return usage


def label(b: float | None) -> str:
    return "1" if b is None else f"{b:.4g}"


# -- budgets through the openai client -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_header_budgets_change_counted_activations(server: Server, endpoint: str, stream: bool) -> None:
    client = server.client()
    before = metrics(server)
    tokens: dict[str, int] = defaultdict(int)
    for i, b in enumerate((1.0, 0.5, 0.25)):
        kwargs: dict[str, Any] = {
            "model": server.model,
            "max_tokens": 6,
            "extra_headers": {"X-Activation-Budget": str(b)},
            # ignore_eos: a fixed token count (and no stop-token lookahead) keeps the counts exact
            "extra_body": {"ignore_eos": True},
        }
        if stream:
            kwargs.update(stream=True, stream_options={"include_usage": True})
        prompt = f"{endpoint} {stream} request {i}: the budget is {b}"
        api = client.completions if endpoint == "completions" else client.chat.completions
        if endpoint == "completions":
            raw = api.with_raw_response.create(prompt=prompt, **kwargs)
        else:
            raw = api.with_raw_response.create(messages=[{"role": "user", "content": prompt}], **kwargs)
        assert raw.headers[APPLIED] == repr(b)
        result = raw.parse()
        if stream:
            chunks = list(result)
            usage = chunks[-1].usage
            assert usage is not None and usage.completion_tokens == 6
        else:
            usage = result.usage
            assert usage.completion_tokens == 6
        tokens[label(b)] += computed_tokens(usage)
    want = expected_counters(tokens)
    assert settled_delta(server, before, want) == want


def test_body_form_and_default(server: Server) -> None:
    client = server.client()
    before = metrics(server)
    tokens: dict[str, int] = defaultdict(int)
    for i, (xargs, applied) in enumerate([({"activation_budget": 0.5}, 0.5), ({}, 1.0)]):
        raw = client.completions.with_raw_response.create(
            model=server.model,
            prompt=f"body form {i}",
            max_tokens=4,
            extra_body={"vllm_xargs": xargs, "ignore_eos": True},
        )
        assert raw.headers[APPLIED] == repr(applied)
        tokens[label(applied)] += computed_tokens(raw.parse().usage)
    # Header and body that agree are one budget.
    raw = client.completions.with_raw_response.create(
        model=server.model,
        prompt="body and header",
        max_tokens=4,
        extra_headers={"X-Activation-Budget": "0.25"},
        extra_body={"vllm_xargs": {"activation_budget": 0.25}, "ignore_eos": True},
    )
    assert raw.headers[APPLIED] == "0.25"
    tokens["0.25"] += computed_tokens(raw.parse().usage)
    want = expected_counters(tokens)
    assert settled_delta(server, before, want) == want
    hist = delta(metrics(server), before)
    assert hist[("vllm_alloc:request_budget_count", "", "")] == 3
    assert hist[("vllm_alloc:request_budget_sum", "", "")] == pytest.approx(0.5 + 1.0 + 0.25)


def test_responses_endpoint(server: Server) -> None:
    raw = server.client().responses.with_raw_response.create(
        model=server.model, input="hello", max_output_tokens=4, extra_headers={"X-Activation-Budget": "0.5"}
    )
    assert raw.headers[APPLIED] == "0.5"
    assert raw.parse().usage.output_tokens >= 1


@pytest.mark.parametrize("route", ["/v1/messages", "/invocations"])
def test_other_generating_routes_honour_budgets(server: Server, route: str) -> None:
    """vLLM 0.32 also generates on /v1/messages (Anthropic) and /invocations (SageMaker): budgets are
    applied there the same way, and counted."""
    before = metrics(server)
    messages = [{"role": "user", "content": f"hello from {route}"}]
    body: dict[str, Any] = {"model": server.model, "max_tokens": 5, "messages": messages, "ignore_eos": True}
    r = httpx.post(f"{server.base_url}{route}", json=body, headers={"X-Activation-Budget": "0.5"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers[APPLIED] == "0.5"
    got = {}
    for _ in range(20):
        got = {k: v for k, v in delta(metrics(server), before).items() if k[0].endswith("activations_total")}
        if got:
            break
        time.sleep(0.25)
    assert got and {k[2] for k in got} == {"0.5"}, got  # counted at the requested budget only
    for layer in map(str, range(L)):
        full = got[("vllm_alloc:full_activations_total", layer, "0.5")]
        assert got[("vllm_alloc:routed_activations_total", layer, "0.5")] == full * ROUTED_FRACTION["0.5"]


def test_invocations_refuses_a_budget_it_cannot_apply(server: Server) -> None:
    # A pooling body on /invocations generates nothing a budget could apply to: refused, not ignored.
    r = httpx.post(
        f"{server.base_url}/invocations",
        json={"model": server.model, "input": "x"},
        headers={"X-Activation-Budget": "0.5"},
        timeout=60,
    )
    assert r.status_code == 400 and "activation" in r.text.lower(), r.text


# -- the other routes vLLM 0.32 generates on: applied and counted, or refused (issue #33) --------------------


BATCH = "/v1/chat/completions/batch"
GENERATE = "/inference/v1/generate"
SCORING = "/generative_scoring"
FIELD = {
    BATCH: "vllm_xargs.activation_budget",
    GENERATE: "sampling_params.extra_args.activation_budget",
    SCORING: "vllm_xargs.activation_budget",
}
ENGINE_REQUESTS = {BATCH: 2, GENERATE: 1, SCORING: 2}  # what one request of route_request runs


def route_request(
    server: Server, route: str, budget: Any = None, header: str | None = None, tag: str = "", model: str = ""
) -> httpx.Response:
    """One request to `route`, with `budget` where that route's body carries it (FIELD)."""
    body: dict[str, Any] = {"model": model or server.model}
    xargs: dict[str, Any] = {} if budget is None else {"activation_budget": budget}
    if route == BATCH:
        conversations = [[{"role": "user", "content": f"batch {tag}: conversation {i}"}] for i in range(2)]
        body.update(messages=conversations, max_tokens=4, ignore_eos=True)
    elif route == GENERATE:
        sampling: dict[str, Any] = {"max_tokens": 4, "ignore_eos": True}
        body.update(token_ids=[11, 12, 13, 14 + len(tag)], sampling_params=sampling)
        if xargs:
            sampling["extra_args"] = xargs
            xargs = {}
    else:
        body.update(query=f"score {tag}", items=["yes", "no"], label_token_ids=[1, 2])
    if xargs:
        body["vllm_xargs"] = xargs
    headers = {} if header is None else {"X-Activation-Budget": header}
    return httpx.post(f"{server.base_url}{route}", json=body, headers=headers, timeout=60)


def counted(server: Server, before: dict[Any, float], requests: int) -> dict[Any, float]:
    """The metrics' delta once `requests` more requests are in the budget histogram and their activations
    have reached /metrics (the worker flushes after each pass, maybe a moment after the response)."""
    got: dict[Any, float] = {}
    for _ in range(40):
        got = delta(metrics(server), before)
        done = got.get(("vllm_alloc:request_budget_count", "", ""), 0) >= requests
        if done and any(k[0].endswith("activations_total") for k in got):
            time.sleep(0.25)  # one more flush, then the counts stand
            return delta(metrics(server), before)
        time.sleep(0.25)
    return got


def assert_counted_at(got: dict[Any, float], b: float, requests: int) -> None:
    lab = label(b)
    activations = {k: v for k, v in got.items() if k[0].endswith("activations_total")}
    assert activations and {k[2] for k in activations} == {lab}, got  # at the applied budget only
    for layer in map(str, range(L)):
        full = activations[("vllm_alloc:full_activations_total", layer, lab)]
        assert activations[("vllm_alloc:routed_activations_total", layer, lab)] == full * ROUTED_FRACTION[lab]
    assert got[("vllm_alloc:request_budget_count", "", "")] == requests
    assert got[("vllm_alloc:request_budget_sum", "", "")] == pytest.approx(b * requests)


@pytest.mark.parametrize("form", ["body", "header", "alias"])
@pytest.mark.parametrize("route", [BATCH, GENERATE])
def test_batch_and_generate_apply_budgets_and_count_them(server: Server, route: str, form: str) -> None:
    b = {"body": 0.5, "header": 0.25, "alias": 0.5}[form]
    before = metrics(server)
    if form == "body":
        r = route_request(server, route, budget=b, tag=form)
    elif form == "header":
        r = route_request(server, route, header=str(b), tag=form)
    else:
        r = route_request(server, route, tag=form, model=f"{server.model}@{b}")
    assert r.status_code == 200, r.text
    assert r.headers[APPLIED] == repr(b)
    assert_counted_at(counted(server, before, ENGINE_REQUESTS[route]), b, ENGINE_REQUESTS[route])


def test_generative_scoring_refuses_budgets_it_would_drop(server: Server) -> None:
    """vLLM 0.32 builds /generative_scoring's SamplingParams without vllm_xargs: a budget is refused, and
    without one the request runs, and is counted, at the server default."""
    for r in (route_request(server, SCORING, budget=0.5), route_request(server, SCORING, header="0.5")):
        assert r.status_code == 400 and f"is not applied on {SCORING}" in r.json()["error"]["message"], r.text
    before = metrics(server)
    r = route_request(server, SCORING, tag="default")
    assert r.status_code == 200, r.text
    assert APPLIED not in r.headers
    assert_counted_at(counted(server, before, ENGINE_REQUESTS[SCORING]), 1.0, ENGINE_REQUESTS[SCORING])


# -- invalid input: 400 naming the range, the server keeps serving -------------------------------------------


BAD = [
    ({"X-Activation-Budget": "abc"}, None, "not a number"),
    ({"X-Activation-Budget": "nan"}, None, "not finite"),
    ({"X-Activation-Budget": "inf"}, None, "not finite"),
    ({"X-Activation-Budget": "0"}, None, "out of range"),
    ({"X-Activation-Budget": "-0.5"}, None, "out of range"),
    ({"X-Activation-Budget": "1.01"}, None, "out of range"),
    ({"X-Activation-Budget": "0.2"}, None, "below this model's minimum"),
    ({"X-Activation-Budget": "0.5" + "0" * 40}, None, "characters"),
    ({}, "abc", "not a number"),
    ({}, 0, "out of range"),
    ({}, 1.5, "out of range"),
    ({}, 0.1, "below this model's minimum"),
    ({"X-Activation-Budget": "0.5"}, 0.25, "disagree"),
]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize(("headers", "body_budget", "needle"), BAD)
def test_invalid_budget_is_400(
    server: Server, endpoint: str, headers: dict[str, str], body_budget: Any, needle: str
) -> None:
    client = server.client()
    extra_body = {} if body_budget is None else {"vllm_xargs": {"activation_budget": body_budget}}
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(
                model=server.model, prompt="x", max_tokens=1, extra_headers=headers, extra_body=extra_body
            )
        else:
            client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=1,
                stream=True,  # refused before any streaming starts
                extra_headers=headers,
                extra_body=extra_body,
            )
    assert info.value.status_code == 400
    message = info.value.body["message"] if isinstance(info.value.body, dict) else str(info.value)
    assert needle in message and RANGE in message, message


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_body_is_400(server: Server, literal: str) -> None:
    # The openai client refuses to encode NaN; Python's json (and so vLLM) reads these literals.
    body = f'{{"model": "{server.model}", "prompt": "x", "vllm_xargs": {{"activation_budget": {literal}}}}}'
    response = httpx.post(
        f"{server.base_url}/v1/completions",
        content=body.encode(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert "not finite" in error["message"] and RANGE in error["message"]
    assert error["param"] == "activation_budget" and error["type"] == "BadRequestError"


@pytest.mark.parametrize("route", [BATCH, GENERATE, SCORING])
@pytest.mark.parametrize(
    ("budget", "header", "needle"),
    [
        (0.01, None, "below this model's minimum"),  # issue #33: on /v1/chat/completions/batch it ran at 0.25
        (1.5, None, "out of range"),
        (None, "0.2", "below this model's minimum"),
        (None, "0", "out of range"),
    ],
)
def test_invalid_budget_on_other_generating_routes_is_400(
    server: Server, route: str, budget: Any, header: str | None, needle: str
) -> None:
    r = route_request(server, route, budget=budget, header=header)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    field = FIELD[route] if header is None else "X-Activation-Budget header"
    assert message.startswith(field) and needle in message and RANGE in message, message


@pytest.mark.parametrize("route", [BATCH, GENERATE])
def test_header_and_body_that_disagree_on_batch_and_generate_are_400(server: Server, route: str) -> None:
    r = route_request(server, route, budget=0.25, header="0.5")
    assert r.status_code == 400 and f"and {FIELD[route]} (0.25) disagree" in r.text, r.text


def test_generate_refuses_a_top_level_vllm_xargs_budget(server: Server) -> None:
    body = {
        "model": server.model,
        "token_ids": [11, 12],
        "sampling_params": {"max_tokens": 1},
        "vllm_xargs": {"activation_budget": 0.5},  # GenerateRequest would drop it
    }
    r = httpx.post(f"{server.base_url}{GENERATE}", json=body, timeout=60)
    assert r.status_code == 400 and FIELD[GENERATE] in r.json()["error"]["message"], r.text


def test_still_serving_after_bad_requests(server: Server) -> None:
    out = server.client().completions.create(
        model=server.model, prompt="still there?", max_tokens=2, extra_headers={"X-Activation-Budget": "0.5"}
    )
    assert out.usage.completion_tokens >= 1


# -- budget aliases ------------------------------------------------------------------------------------------


def test_aliases_are_listed_and_run_at_their_budget(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model] + [
        f"{server.model}@{a}" for a in ALIASES
    ]
    before = metrics(server)
    tokens: dict[str, int] = defaultdict(int)
    for b in (0.5, 0.25):
        raw = client.completions.with_raw_response.create(
            model=f"{server.model}@{b}", prompt=f"alias {b}", max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert raw.headers[APPLIED] == repr(b)
        tokens[label(b)] += computed_tokens(raw.parse().usage)
    stream = client.chat.completions.create(
        model=f"{server.model}@0.5",
        messages=[{"role": "user", "content": "alias, streamed"}],
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = [c.usage for c in stream if c.usage][-1]
    tokens["0.5"] += computed_tokens(usage)
    want = expected_counters(tokens)
    assert settled_delta(server, before, want) == want
    hist = delta(metrics(server), before)
    assert hist[("vllm_alloc:request_budget_count", "", "")] == 3
    assert hist[("vllm_alloc:request_budget_bucket", "", "0.25")] == 1


def test_alias_refusals(server: Server) -> None:
    client = server.client()
    with pytest.raises(
        openai.BadRequestError, match=r"is a budget alias \(b = 0\.5\).*header \(0\.25\) disagrees"
    ):
        client.completions.create(
            model=f"{server.model}@0.5",
            prompt="x",
            max_tokens=1,
            extra_headers={"X-Activation-Budget": "0.25"},
        )
    r = route_request(server, SCORING, model=f"{server.model}@0.5")
    assert r.status_code == 400 and "cannot apply a budget" in r.text, r.text
    with pytest.raises(openai.NotFoundError):  # not an alias this server serves: vLLM's own 404
        client.completions.create(model=f"{server.model}@0.75", prompt="x", max_tokens=1)


# -- the admin route, changed under load ---------------------------------------------------------------------


def admin(server: Server, body: dict[str, Any] | None = None, key: str = ADMIN_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    url = f"{server.base_url}/vllm-alloc/admin"
    if body is None:
        return httpx.get(url, headers=headers, timeout=60)
    return httpx.post(url, json=body, headers=headers, timeout=60)


def serving_metrics(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(("vllm_alloc:default_budget", "vllm_alloc:budget_file_info", "vllm_alloc:admin"))
    }


def test_admin_changes_budgets_under_load_without_losing_requests(server: Server, tmp_path: Path) -> None:
    """Under a load of 48 requests (alias, header and default budgets, half streaming), the admin route
    sets the default to 0.5 and loads a skewed budget file, then restores both. Every request completes.
    Full-budget counts are exact per applied budget throughout, and so are the pools (routed per budget,
    summed over layers: K_l(B) sums to B in both files); per layer they are exact before and after."""
    from tests.integration.test_engines_e2e import skewed_budget_file

    assert admin(server, key="wrong").status_code == 401
    assert admin(server).json()["default_budget"] == 1.0
    skewed, rows = skewed_budget_file(tmp_path, "Qwen3MoeForCausalLM")
    bad = tmp_path / "bad.json"
    bad.write_text(skewed.read_text().replace('"k": [3, 1]', '"k": [9, 1]'))
    r = admin(server, {"budget_file": str(bad)})
    assert r.status_code == 400 and str(bad) in r.text and "allocations[2].k" in r.text, r.text
    before = metrics(server)
    applied: list[tuple[str, int]] = []

    async def one(client: Any, i: int) -> None:
        model = f"{server.model}@0.5" if i % 3 == 0 else server.model
        headers = {"X-Activation-Budget": "0.25"} if i % 3 == 1 else {}
        stream = i % 2 == 1
        raw = await client.completions.with_raw_response.create(
            model=model,
            prompt=f"under load {i}",
            max_tokens=8,
            stream=stream,
            extra_headers=headers,
            extra_body={"ignore_eos": True},
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )
        # The legacy raw response parses synchronously, stream or not.
        usage = await final_usage(raw.parse(), stream)
        assert usage is not None and usage.completion_tokens == 8
        applied.append((label(float(raw.headers[APPLIED])), computed_tokens(usage)))

    async def change(delay: float, body: dict[str, Any]) -> None:
        await asyncio.sleep(delay)
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                f"{server.base_url}/vllm-alloc/admin",
                json=body,
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
        assert r.status_code == 200, r.text

    async def load() -> None:
        async with server.async_client() as client:
            await asyncio.gather(
                *(one(client, i) for i in range(48)),
                change(1.0, {"default_budget": 0.5, "budget_file": str(skewed)}),
                change(4.0, {"default_budget": 1.0, "budget_file": None}),
            )

    asyncio.run(load())
    assert len(applied) == 48
    assert {lab for lab, _ in applied} >= {"0.5", "0.25", "1"}
    tokens: dict[str, int] = defaultdict(int)
    for lab, n in applied:
        tokens[lab] += n
    got = settled_delta(server, before, expected_counters(tokens))
    for lab, n in tokens.items():
        B = round(float(lab) * L * K)
        full = [got.get(("vllm_alloc:full_activations_total", layer, lab), 0) for layer in map(str, range(L))]
        routed = [
            got.get(("vllm_alloc:routed_activations_total", layer, lab), 0) for layer in map(str, range(L))
        ]
        assert full == [K * n] * L, lab  # every applied budget counted, none lost
        assert sum(routed) == n * B, lab  # each pass spent its pool exactly, in either file
    series = serving_metrics(server)
    assert series[("vllm_alloc:default_budget", ())] == 1.0
    assert series[("vllm_alloc:admin_changes_total", (("result", "applied"),))] == 2
    assert series[("vllm_alloc:admin_changes_total", (("result", "refused"),))] == 1
    assert series[("vllm_alloc:budget_file_info", (("file", str(skewed)), ("sha", admin_sha(skewed))))] == 0

    # After: the skewed file alone, then uniform again; per layer exact under each.
    assert admin(server, {"budget_file": str(skewed)}).json()["budget_file"] == str(skewed)
    before = metrics(server)
    usage = (
        server.client()
        .completions.create(
            model=f"{server.model}@0.5",
            prompt="after the change",
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )
        .usage
    )
    n = computed_tokens(usage)
    want = {}
    for layer, k in zip(map(str, range(L)), rows[4], strict=True):
        want[("vllm_alloc:full_activations_total", layer, "0.5")] = float(K * n)
        want[("vllm_alloc:routed_activations_total", layer, "0.5")] = float(k * n)
    assert settled_delta(server, before, want) == want
    assert (
        serving_metrics(server)[
            ("vllm_alloc:budget_file_info", (("file", str(skewed)), ("sha", admin_sha(skewed))))
        ]
        == 1
    )
    state = admin(server, {"budget_file": None}).json()
    assert state["budget_file"] == "uniform" and state["default_budget"] == 1.0


def admin_sha(path: Path) -> str:
    from vllm_alloc.budget import load_budget_file

    return load_budget_file(path).fingerprint_hash()


# -- load: 64 concurrent requests, mixed budgets, half streaming ---------------------------------------------


def test_64_concurrent_mixed_requests(server: Server) -> None:
    budgets = [1.0, 0.5, 0.25, None]  # None: the server default (1.0)
    before = metrics(server)

    async def one(client: Any, i: int) -> tuple[str, int]:
        b = budgets[i % len(budgets)]
        headers = {} if b is None else {"X-Activation-Budget": str(b)}
        stream = i % 2 == 1
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if stream else {}
        common = {"model": server.model, "max_tokens": 4 + i % 5, "stream": stream, "extra_headers": headers}
        common["extra_body"] = {"ignore_eos": True}
        if i % 4 < 2:
            result = await client.completions.create(prompt=f"request {i} of 64", **common, **extra)
        else:
            messages = [{"role": "user", "content": f"request {i} of 64"}]
            result = await client.chat.completions.create(messages=messages, **common, **extra)
        usage = await final_usage(result, stream)
        assert usage is not None and usage.completion_tokens == 4 + i % 5
        return label(b), computed_tokens(usage)

    async def run_all() -> list[tuple[str, int]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(run_all())
    assert len(results) == 64
    tokens: dict[str, int] = defaultdict(int)
    for lab, n in results:
        tokens[lab] += n
    want = expected_counters(tokens)
    assert settled_delta(server, before, want) == want
    hist = delta(metrics(server), before)
    assert hist[("vllm_alloc:request_budget_count", "", "")] == 64
    assert hist[("vllm_alloc:request_budget_bucket", "", "0.25")] == 16
    assert hist[("vllm_alloc:request_budget_bucket", "", "0.5")] == 32


# -- shutdown (last: stops the module's server) --------------------------------------------------------------


def test_sigterm_with_requests_in_flight_shuts_down_cleanly(server: Server) -> None:
    assert Path(server.prometheus_dir).is_dir()
    assert psutil.Process(server.process.pid).children(recursive=True)  # the API server, EngineCore, ...
    # Each request finishes or fails with a clean error; none may hang past the shutdown (checked inside).
    stop_with_requests_in_flight(
        server, signal.SIGTERM, ["1.0", "0.5", "0.25"] * 2, max_tokens=200, settle_s=1.0, wait_s=60
    )
