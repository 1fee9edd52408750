"""The distinct-expert cap in the worker state and settings: which tokens are capped, in which groups,
the budget file's caps and the expert_cap override, and the counters flushed to Prometheus (no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from tests.integration.test_integration_unit import A, E, H, I, K, L, make_state
from vllm_alloc.budget import BudgetFileError, parse_budget_text, uniform_budget_file
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.state import AllocState
from vllm_alloc.routing import alloc_t_host, cap_host
from vllm_alloc.values import CAP_SCALE as SCALE

ROOT = Path(__file__).resolve().parents[2]


def capped_state(scope: str = "budget", expert_cap: float | None = 0.5) -> AllocState:
    return make_state(scope=scope, expert_cap=expert_cap)


def caps(state: AllocState, n: int) -> list[int]:
    assert state.plan is not None
    return state.plan.token_cap[:n].tolist()


def test_decode_tokens_below_full_budget_share_one_group_per_budget() -> None:
    state = capped_state()
    # a, c: decode at b = 0.5; b: decode at b = 1.0; d: a 3-token prefill chunk at b = 0.5; e: decode at
    # b = 0.75. Tokens: a=0, b=1, c=2, d=3..5, e=6.
    state.fill(["a", "b", "c", "d", "e"], [0.5, 1.0, 0.5, 0.5, 0.75], np.array([0, 1, 2, 3, 6, 7]))
    assert state.capped
    assert caps(state, 8) == [1, 0, 1, 0, 0, 0, 7, 0], "b = 0.5 decode: group of token 0; b = 0.75: token 6"
    state.end_pass()
    assert not state.capped
    # A pass without a decode token below b = 1.0 caps nothing.
    state.fill(["d"], [0.5], np.array([0, 4]))
    assert not state.capped and caps(state, 4) == [0, 0, 0, 0]


def test_evaluation_scopes_cap_like_the_decode_they_stand_for() -> None:
    # position: N teacher-forced sequences; the tokens at one position are one decode step's group.
    state = capped_state(scope="position")
    state.fill(["a", "b"], [0.5, 0.5], np.array([0, 3, 6]), np.array([0, 0]))
    assert caps(state, 6) == [1, 2, 3, 1, 2, 3]
    # stream: one teacher-forced sequence, each token alone (a lone decode stream), so never capped.
    state = capped_state(scope="stream")
    state.fill(["a"], [0.5], np.array([0, 3]), np.array([0]))
    assert not state.capped and caps(state, 3) == [0, 0, 0]
    # token: lone streams in decode order (one token per sequence per pass), each alone too.
    state = capped_state(scope="token")
    state.fill(["a", "b", "c"], [0.5] * 3, np.array([0, 1, 2, 3]), np.array([4, 4, 4]))
    assert not state.capped and caps(state, 3) == [0, 0, 0]


def test_expert_cap_one_and_no_cap() -> None:
    for cap in (1.0, None):  # 1 turns a file's caps off; without a file and a setting there are none
        state = capped_state(expert_cap=cap)
        state.fill(["a", "b"], [0.5, 0.5], np.array([0, 1, 2]))
        assert state.plan is not None and not state.plan.capping.any() and not state.capped


def test_budget_file_caps_validate_and_fill_the_table() -> None:
    from vllm_alloc.budget import ModelFingerprint

    fp = ModelFingerprint(
        architecture="X", moe_layers=[1, 3], num_experts=E, top_k=K, hidden_size=H, intermediate_size=I
    )
    doc = json.loads(uniform_budget_file(fp).model_dump_json())
    B = A // 2
    row = next(a for a in doc["allocations"] if a["budget"] == B)
    row["cap"] = [0.25, 1]  # a JSON integer is a share too
    bf = parse_budget_text(json.dumps(doc), "caps.json")
    table = bf.cap_table()
    assert table.shape == (A + 1, L) and table[B].tolist() == [250, SCALE]
    assert (table[torch.arange(A + 1) != B] == SCALE).all(), "no cap elsewhere"
    assert (bf.cap_table(override=0.5)[:A] == 500).all() and (bf.cap_table(override=0.5)[A] == SCALE).all()
    assert (bf.cap_table(override=1.0) == SCALE).all()
    for bad, match in [
        ([0.5], "one per layer"),
        ([0, 0.5], "ρ = 0.0 is outside the valid range \\[0.001, 1\\]"),
        ([0.5, 1.5], "ρ = 1.5 is outside"),
    ]:
        row["cap"] = bad
        with pytest.raises(BudgetFileError, match=match) as err:
            parse_budget_text(json.dumps(doc), "caps.json")
        assert "caps.json" in str(err.value) and f"allocations[{B - L}].cap" in str(err.value)
    row["cap"] = None
    doc["allocations"][-1]["cap"] = [0.5, 0.5]
    with pytest.raises(BudgetFileError, match="never capped"):
        parse_budget_text(json.dumps(doc), "caps.json")


def test_a_measured_cap_must_have_passed_its_tests() -> None:
    """The loader checks the profiler's rule: a cap with tests ships only where its share passed its
    confirmation at every stream count the guard names (better than the baseline, keeping cap_keep of
    the gain); the selection's tests alone do not ship it."""
    doc = json.loads((ROOT / "configs" / "default.json").read_text())
    assert doc["guard"]["selection_sequences"], "the shipped file was profiled with the confirmation split"
    doc["guard"].update(cap_streams=[8, 64], cap_keep=0.5)
    row = doc["allocations"][8 - 4]
    good = {"share": 0.5, "delta": -0.02, "low": -0.03, "high": -0.01, "kept": 0.6, "split": "confirmation"}
    row["cap"], row["cap_tests"] = [0.5] * 4, [good | {"streams": 8}, good | {"streams": 64}]
    assert parse_budget_text(json.dumps(doc), "ok.json").allocations[4].cap == [0.5] * 4
    for tests in (
        [good | {"streams": 8}],  # never measured at N = 64
        [good | {"streams": 8}, good | {"streams": 64, "kept": 0.4}],  # keeps too little of the gain
        [good | {"streams": 8}, good | {"streams": 64, "high": 0.001, "delta": 0.0}],  # not better
        [good | {"streams": n, "split": "selection"} for n in (8, 64)],  # chosen, never confirmed
    ):
        row["cap_tests"] = tests
        with pytest.raises(BudgetFileError, match="did not pass its cap confirmation") as err:
            parse_budget_text(json.dumps(doc), "bad.json")
        assert "allocations[4].cap" in str(err.value)
    # A test record itself is checked: a share that caps, two or more streams, an ordered interval.
    for bad, match in [
        ({"streams": 1}, "streams"),
        ({"share": 1.0}, "share"),
        ({"delta": 0.5}, "does not contain delta = 0.5"),
    ]:
        row["cap_tests"] = [good | {"streams": 8}, good | {"streams": 64} | bad]
        with pytest.raises(BudgetFileError, match=match):
            parse_budget_text(json.dumps(doc), "bad.json")
    row["cap"], row["cap_tests"] = [0.5, 0.5, 0.5, 0.6], [good | {"streams": 8}, good | {"streams": 64}]
    with pytest.raises(BudgetFileError, match="the profiler tests one share for every layer"):
        parse_budget_text(json.dumps(doc), "bad.json")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "x", True, 0.0004])
def test_expert_cap_setting_is_checked(bad: object) -> None:
    with pytest.raises(
        ValueError, match=r"expert_cap=.* expected a share of experts in \[0.001, 1\] \(1: no cap\)"
    ):
        PluginConfig.from_additional_config({"vllm_alloc": {"expert_cap": bad}})


def test_env_expert_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_EXPERT_CAP", "0.25")
    assert PluginConfig.from_additional_config({}).expert_cap == 0.25
    monkeypatch.setenv("VLLM_ALLOC_EXPERT_CAP", "3")
    with pytest.raises(ValueError, match=r"VLLM_ALLOC_EXPERT_CAP=.*\[0.001, 1\]"):
        PluginConfig.from_additional_config({})


def test_set_cap_caps_a_budget_live_and_refuses_bad_shares() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None and not plan.capping.any()
    B = A // 2
    state.set_cap({B: [0.5, 0.25]})
    assert plan.cap_table[B].tolist() == [500, 250] and plan.capping.tolist() == [
        b == B for b in range(A + 1)
    ]
    state.set_cap({B: None})
    assert not plan.capping.any() and (plan.cap_table == SCALE).all()
    for bad, match in [
        ({A: [0.5, 0.5]}, "B = A is never capped"),
        ({B: [0.5]}, "2 shares in"),
        ({B: [0, 1]}, "2 shares in"),
    ]:
        with pytest.raises(ValueError, match=match):
            state.set_cap(bad)  # type: ignore[arg-type]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_host_layer_calls_count_drops_and_distinct_experts_to_prometheus() -> None:
    state = capped_state(expert_cap=0.001)
    plan = state.plan
    assert plan is not None and plan.host is not None
    # Four decode tokens at b = 0.5 (K_l = 2 each): Alloc-T keeps each token's experts 0 and 1 + t. Every
    # token's top expert (its floor) is 0, and ρ = 0.001 (C_g = 1 of the 5 wanted): the group keeps expert
    # 0 only, and each token has no other allowed candidate, so it drops one pair.
    state.fill(["a", "b", "c", "d"], [0.5] * 4, np.array([0, 1, 2, 3, 4]))
    keys = np.array([[0.9, 0.5, 0.1, 0.0]] * 4, np.float32)
    ids = np.array([[0, 1 + t, 5, 6 + t % 2] for t in range(4)], np.int32)
    before = sample("vllm_alloc:cap_dropped_pairs_total", layer="1", budget="0.5")
    h = plan.host
    for column in range(L):
        pairs = alloc_t_host.layer_call(
            keys, keys, ids, h["token_budget"][:4], h["table"], column, h["token_group"][:4], plan.k_base,
            "topk", state.singleton_groups, h["used"][column], True, None,
            cap_host.Cap(h["token_cap"][:4], h["cap_table"], E, h["cap_dropped"], h["distinct"]),
        )  # fmt: skip
        assert pairs.per_token.tolist() == [1, 1, 1, 1] and set(pairs.ids.reshape(-1).tolist()) == {0}
    state.end_pass()  # flushes (VLLM_ALLOC_METRICS_FLUSH_STEPS = 1)
    B = A // 2
    assert plan.cap_dropped[:, B].tolist() == [4.0, 4.0] and plan.used[:, B].tolist() == [4.0, 4.0]
    assert plan.distinct[:, 1].tolist() == [1.0, 1.0] and plan.distinct.sum() == 2
    dropped = sample("vllm_alloc:cap_dropped_pairs_total", layer="1", budget="0.5")
    assert dropped - before == 4
    assert sample("vllm_alloc:distinct_experts_bucket", layer="3", le="1.0") >= 1


def test_a_new_budget_file_brings_its_caps_in_place() -> None:
    """The admin route's reconfigure restores the cap table from the new file, in the same buffer (as
    the allocation table), and the expert_cap setting still wins over the file."""
    state = make_state()
    plan = state.plan
    assert plan is not None and not plan.capping.any()
    table = plan.cap_table
    doc = json.loads(uniform_budget_file(state.fingerprint()).model_dump_json())
    B = A // 2
    next(a for a in doc["allocations"] if a["budget"] == B)["cap"] = [0.3, 0.5]
    state.reconfigure({"budget_file": {"source": "caps.json", "text": json.dumps(doc)}}, apply=True)
    assert plan.cap_table is table and plan.cap_table[B].tolist() == [300, 500]
    assert plan.capping.tolist() == [b == B for b in range(A + 1)]
    state.reconfigure({"budget_file": None}, apply=True)
    assert not plan.capping.any() and (plan.cap_table == SCALE).all()
    overridden = make_state(expert_cap=1.0)
    overridden.reconfigure({"budget_file": {"source": "caps.json", "text": json.dumps(doc)}}, apply=True)
    assert overridden.plan is not None and not overridden.plan.capping.any()
