"""The pure helpers of benchmarks/soak.py (request mix, request bodies, counter arithmetic) and of
soak_long.py (RSS bound, latency windows, report); no server."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import soak
import soak_long

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


# -- the soak under load (soak_long.py): its pure parts ---------------------------------------------------
def test_rss_bound():
    warm = 1000 * soak_long.MiB
    assert soak_long.rss_problem(warm, warm) is None
    assert soak_long.rss_problem(warm, 900 * soak_long.MiB) is None  # shrinking is fine
    assert soak_long.rss_problem(warm, 1100 * soak_long.MiB) is None  # exactly at the bound
    problem = soak_long.rss_problem(warm, 1101 * soak_long.MiB)
    assert problem == "RSS grew past the bound: end 1101 MiB > 1.1 × after warm-up 1000 MiB = 1100 MiB"
    assert soak_long.rss_problem(warm, 1300 * soak_long.MiB, ratio=1.5) is None


def test_percentile_is_nearest_rank():
    xs = [float(x) for x in range(1, 101)]  # 1 .. 100
    assert soak_long.percentile(xs, 0.5) == 50 and soak_long.percentile(xs, 0.99) == 99
    assert soak_long.percentile([3.0], 0.5) == soak_long.percentile([3.0], 0.99) == 3.0  # one value
    assert soak_long.percentile([5.0, 1.0, 2.0], 0.99) == 5.0  # fewer than 100: the max; unsorted input
    with pytest.raises(ValueError, match="percentile of 0 values"):
        soak_long.percentile([], 0.5)


def test_windows_by_send_time():
    D = soak_long.Done
    done = [
        D(-5.0, "1", 99.0),  # warm-up: left out
        D(0.0, "1", 1.0),  # the first instant of window 0
        D(5.9, "1", 3.0),
        D(6.0, "0.5", 2.0),  # window 1 starts at 6 s (60 s / 10)
        D(59.9, "default", 7.0),  # the last window
        D(60.0, "1", 50.0),  # sent after the timed phase: left out
    ]
    ws = soak_long.windows(done, 60.0)
    assert len(ws) == 10 and (ws[1].start_s, ws[1].end_s) == (6.0, 12.0)
    assert ws[0].cells == {"1": soak_long.Cell(2, 1.0, 3.0)}
    assert ws[1].cells == {"0.5": soak_long.Cell(1, 2.0, 2.0)}
    assert ws[9].cells == {"default": soak_long.Cell(1, 7.0, 7.0)} and ws[5].cells == {}
    whole = soak_long.overall(done, 60.0)
    assert whole.cells["1"] == soak_long.Cell(2, 1.0, 3.0) and sum(c.n for c in whole.cells.values()) == 4


def test_endless_keeps_the_mix_with_long_answers():
    specs = list(itertools.islice(soak_long.endless(random.Random(0), fake_prompt), 300))  # 3 plans of 100
    lo, hi = soak_long.ANSWER_TOKENS
    plain = [s for s in specs if not (s.invalid or s.disconnect)]
    assert all(lo <= s.max_tokens <= hi for s in plain)
    assert sum(bool(s.invalid) for s in specs) == 30 and sum(s.disconnect for s in specs) == 30
    assert {soak_long.column(s.budget) for s in plain} == set(soak_long.COLUMNS)


def long_result(end_mib: int) -> soak_long.Result:
    stats = soak.Stats(sent=130, completed=100, disconnects=5, rejected=Counter({"out of range": 8}))
    stats.wall_s = 190.0
    stats.error("ReadTimeout", "/v1/completions: ReadTimeout()")
    r = soak_long.Result("CPU x, 2 cores, commit abc1234", 2, 30, 8, stats, timed_sent=100)
    MiB = soak_long.MiB
    r.rss = {
        "start (idle)": (0.0, 2000 * MiB),
        "after warm-up": (30.0, 3000 * MiB),
        "middle": (90.0, 3050 * MiB),
        "end": (150.0, end_mib * MiB),
    }
    r.rss_series = [(0.0, 2000 * MiB), (30.0, 3000 * MiB), (75.0, 3400 * MiB), (150.0, end_mib * MiB)]
    if problem := soak_long.rss_problem(r.rss["after warm-up"][1], r.rss["end"][1]):
        r.problems.append(problem)
    return r


def test_report():
    D = soak_long.Done
    done = [D(-1.0, "1", 9.0), D(1.0, "1", 2.0), D(2.0, "1", 4.0), D(100.0, "0.33", 1.5)]
    text = soak_long.report(long_result(3100), done)
    lines = text.splitlines()
    assert lines[0] == "### Soak under load: 2 min at 8 concurrent requests (benchmark model)"
    assert "CPU x, 2 cores, commit abc1234." in lines
    assert "| error (ReadTimeout) | 1 |" in lines and "| server deaths | 0 |" in lines
    assert "| requests sent in the timed phase | 100 |" in lines
    assert "| completed in the timed phase, per minute | 1.5 |" in lines  # 3 of the 4, over 2 min
    assert "| after warm-up | 30 | 3000 |" in lines and "| max (every 5 s) | 75 | 3400 |" in lines
    bound = next(line for line in lines if line.startswith("Bound:"))
    assert "3100 ≤ 3300 MiB: **ok** (+3.3%)" in bound and "+50 MiB, +1000 MiB per 1000 requests" in bound
    header = "| sent (s) | b = 1 | b = 0.75 | b = 0.5 | b = 0.33 | b = default |"
    assert header in lines
    assert "| 0-12 | 2.00 / 4.00 (2) | - | - | - | - |" in lines  # windows of 120 s / 10
    assert "| 96-108 | - | - | - | 1.50 / 1.50 (1) | - |" in lines
    assert "| all | 2.00 / 4.00 (2) | - | - | 1.50 / 1.50 (1) | - |" in lines
    assert lines[-1] == "Result: **passed**." and "- ReadTimeout: /v1/completions: ReadTimeout()" in lines
    failed = soak_long.report(long_result(3400), done)
    assert "**exceeded**" in failed and failed.endswith("Result: **FAILED**.")
    assert "- RSS grew past the bound: end 3400 MiB > 1.1 × after warm-up 3000 MiB = 3300 MiB" in failed
