"""The pure helpers of benchmarks/soak.py (request mix, request bodies, counter arithmetic); no server."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak

from vllm_alloc.budget import load_budget_file


def fake_prompt(rng: random.Random, long: bool) -> str:
    return "x " * (500 if long else 5)


def test_mixed_plan_proportions():
    specs = soak.plan(400, random.Random(0), fake_prompt)
    assert len(specs) == 400
    invalid = [s for s in specs if s.invalid]
    assert len(invalid) == 40 and all(s.budget is None for s in invalid)
    assert {s.invalid for s in invalid} == {kind for kind, _, _ in soak.INVALID}
    assert sum(s.disconnect for s in specs) == 40 and all(s.stream for s in specs if s.disconnect)
    assert sum(s.stream and not s.invalid for s in specs) == 80  # 20%, half of them disconnect
    assert {s.budget for s in specs if not s.invalid} == set(soak.BUDGETS)
    assert any(s.header for s in specs if s.budget) and any(s.body_budget for s in specs if s.budget)
    assert 0.7 < sum(s.seed is not None for s in specs) / 400 < 0.9
    assert {s.chat for s in specs} == {True, False} and not any(s.ignore_eos for s in specs)


def test_verification_plan_has_only_completed_requests():
    specs = soak.plan(40, random.Random(1), fake_prompt, mixed=False)
    assert not any(s.invalid or s.disconnect for s in specs)
    assert all(s.ignore_eos for s in specs) and sum(s.stream for s in specs) == 10


def test_request_bodies():
    spec = soak.Spec(chat=True, prompt="hi", max_tokens=5, budget=0.5, body_budget=0.5, stream=True, seed=7)
    path, headers, content = soak.request(spec)
    body = json.loads(content)
    assert path == "/v1/chat/completions" and "X-Activation-Budget" not in headers
    assert (
        body["messages"] == [{"role": "user", "content": "hi"}]
        and body["vllm_xargs"]["activation_budget"] == 0.5
    )
    assert body["seed"] == 7 and body["temperature"] == 0.8 and body["stream_options"]["include_usage"]
    huge = soak.Spec(chat=False, prompt="x", max_tokens=1, header="0.5", body_budget=10**400, invalid="huge")
    path, headers, content = soak.request(huge)
    assert path == "/v1/completions" and headers["X-Activation-Budget"] == "0.5"
    assert json.loads(content)["vllm_xargs"]["activation_budget"] == 10**400  # an integer, not a float
    assert json.loads(content)["temperature"] == 0.0


def test_computed_tokens():
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}}
    assert soak.computed_tokens(usage) == 9 - 4 + 5 - 1
    assert (
        soak.computed_tokens({"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": None})
        == 13
    )


def test_expected_counters_use_the_budget_file():
    bf = load_budget_file("default")
    L, K, A = bf.model.num_moe_layers, bf.model.top_k, bf.model.full_activations
    B = bf.absolute_budget(0.5)
    want = soak.expected_counters({A: 10, B: 3}, bf)
    assert len(want) == 2 * 2 * L
    for i, layer in enumerate(map(str, bf.model.moe_layers)):
        assert want[(soak.FULL, layer, "1")] == want[(soak.ROUTED, layer, "1")] == K * 10
        assert want[(soak.FULL, layer, "0.5")] == K * 3
        assert want[(soak.ROUTED, layer, "0.5")] == bf.k_vector(0.5)[i] * 3
    assert sum(want[(soak.ROUTED, str(layer), "0.5")] for layer in bf.model.moe_layers) == B * 3  # exact pool


def test_counter_problems_exact_unless_B_carries():
    bf = load_budget_file("default")
    K, A = bf.model.top_k, bf.model.full_activations
    layers = list(map(str, bf.model.moe_layers))
    carrying = bf.carrying()
    B_carry = bf.absolute_budget(0.5)
    assert carrying[B_carry]
    B_exact = next(B for B in range(A + 1) if not carrying[B] and B < A)
    tokens = {A: 10, B_carry: 3, B_exact: 5}
    want = soak.expected_counters(tokens, bf)
    assert soak.counter_problems(want, tokens, bf) == []
    label_c, label_e = (soak.budget_label(B / A) for B in (B_carry, B_exact))
    # A carrying B: one layer spends one expert more, another one less; the pool holds.
    ks = [int(k) for k in bf.allocation_table()[B_carry]]
    up = next(i for i, k in enumerate(ks) if k < K)
    down = next(i for i, k in enumerate(ks) if k > bf.k_base and i != up)
    moved = dict(want)
    moved[(soak.ROUTED, layers[up], label_c)] += 1
    moved[(soak.ROUTED, layers[down], label_c)] -= 1
    assert soak.counter_problems(moved, tokens, bf) == []
    # ... but not past the pool, nor a layer past K or under k_base per token.
    over = dict(want)
    over[(soak.ROUTED, layers[0], label_c)] += 1
    assert [p for p in soak.counter_problems(over, tokens, bf) if "over the layers" in p]
    high = dict(want)
    high[(soak.ROUTED, layers[0], label_c)] = K * 3 + 1
    high[(soak.ROUTED, layers[1], label_c)] = 0
    problems = soak.counter_problems(high, tokens, bf)
    assert {p.split(",")[0] for p in problems} >= {f"{soak.ROUTED}{{layer={i}" for i in layers[:2]}
    # A B that does not carry stays exact, and full is exact everywhere.
    for key in [(soak.ROUTED, layers[0], label_e), (soak.FULL, layers[0], label_c)]:
        off = dict(want)
        off[key] += 1
        assert soak.counter_problems(off, tokens, bf) == soak.mismatches(off, want)
    # Pairs the distinct-expert cap dropped did not run but were kept by Alloc-T: routed + dropped is
    # checked, so moving pairs from routed to dropped adds up, and dropped pairs on top do not.
    cut = dict(want)
    cut[(soak.ROUTED, layers[0], label_e)] -= 2
    cut[(soak.DROPPED, layers[0], label_e)] = 2.0
    assert soak.counter_problems(cut, tokens, bf) == []
    cut[(soak.DROPPED, layers[0], label_e)] = 3.0
    assert soak.counter_problems(cut, tokens, bf) != []


def test_parse_metrics_and_checks():
    text = "\n".join(
        [
            "# TYPE vllm_alloc:full_activations counter",
            'vllm_alloc:full_activations_total{budget="0.5",layer="0"} 8.0',
            "# TYPE vllm_alloc:routed_activations counter",
            'vllm_alloc:routed_activations_total{budget="0.5",layer="0"} 9.0',
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="m"} 2.0',
            "",
        ]
    )
    m = soak.parse_metrics(text)
    assert m[("vllm:num_requests_running", "", "")] == 2.0
    assert soak.activations(m) == {(soak.FULL, "0", "0.5"): 8.0, (soak.ROUTED, "0", "0.5"): 9.0}
    assert soak.routed_over_full(m) == ["routed > full for layer=0 budget=0.5: 9 > 8"]
    assert soak.mismatches({"a": 1.0}, {"a": 1.0}) == []
    key = (soak.FULL, "0", "1")
    assert len(soak.mismatches({}, {key: 4.0})) == 1  # an absent series is 0
    assert soak.mismatches({key: 5.0}, {key: 4.0}, ">=") == []


@pytest.mark.parametrize("failed", [False, True])
def test_table(failed: bool):
    stats = soak.Stats(sent=10, completed=7, disconnects=1, rejected=Counter({"non-numeric": 2}), wall_s=3.2)
    if failed:
        stats.error("invalid accepted", "details")
        stats.counter_problems.append("x")
    out = soak.table(stats)
    assert "| 400 (non-numeric) | 2 |" in out and "| wall time (s) | 3 |" in out
    assert ("| error (invalid accepted) | 1 |" in out) == failed
    assert ("| counter check | 1 problems |" if failed else "| counter check | ok |") in out


USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "prompt_tokens_details": None}


def fake_server(request: httpx.Request) -> httpx.Response:
    """400 for budget 1.5 (header), accepts anything else; streams 5 chunks and the usage."""
    body = json.loads(request.content)
    if request.headers.get("X-Activation-Budget") == "1.5":
        return httpx.Response(400, json={"error": {"message": "out of range"}})
    applied = {"x-activation-budget-applied": request.headers.get("X-Activation-Budget", "1.0")}
    if not body["stream"]:
        return httpx.Response(200, headers=applied, json={"usage": USAGE})
    chunks = [{"choices": [{"text": "x"}], "usage": None}] * 5 + [{"choices": [], "usage": USAGE}]
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return httpx.Response(200, headers=applied | {"content-type": "text/event-stream"}, text=sse)


def test_send_counts_every_outcome():
    stats = soak.Stats()

    async def run() -> list[tuple[float, int] | None]:
        s = soak.Soak(None, "http://127.0.0.1:1", 4, stats, load_budget_file("default"))  # type: ignore[arg-type]
        s.client = httpx.AsyncClient(
            transport=httpx.MockTransport(fake_server), base_url="http://127.0.0.1:1"
        )
        base = {"chat": False, "prompt": "x", "max_tokens": 5}
        specs = [
            soak.Spec(**base, budget=0.5, header="0.5"),
            soak.Spec(**base, stream=True),
            soak.Spec(**base, budget=0.75, header="0.75", stream=True, disconnect=True),
            soak.Spec(**base, header="1.5", invalid="out of range"),
            soak.Spec(**base, header="abc", invalid="non-numeric"),  # the fake server accepts it
        ]
        return [await s.send(spec) for spec in specs]

    assert asyncio.run(run()) == [(0.5, 13), (1.0, 13), None, None, None]
    assert (stats.sent, stats.completed, stats.disconnects) == (5, 2, 1)
    assert stats.rejected == {"out of range": 1} and stats.errors == {"invalid accepted": 1}
    assert stats.examples[0].startswith("invalid accepted: non-numeric (header abc, body None): HTTP 200")
