"""The distinct-expert cap in the worker state and settings: which tokens are capped, in which groups,
the budget file's caps and the expert_cap override, and the counters flushed to Prometheus (no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from test_integration_unit import A, E, H, I, K, L, make_state

from vllm_alloc import alloc_t_host, cap_host
from vllm_alloc.budget import BudgetFileError, parse_budget_text, uniform_budget_file
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.state import AllocState


def capped_state(scope: str = "budget", expert_cap: int | None = 2) -> AllocState:
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
    # stream: one teacher-forced sequence, each token alone (a lone decode stream).
    state = capped_state(scope="stream")
    state.fill(["a"], [0.5], np.array([0, 3]), np.array([0]))
    assert caps(state, 3) == [1, 2, 3]
    # token: lone streams in decode order (one token per sequence per pass), each alone too.
    state = capped_state(scope="token")
    state.fill(["a", "b", "c"], [0.5] * 3, np.array([0, 1, 2, 3]), np.array([4, 4, 4]))
    assert caps(state, 3) == [1, 2, 3]


def test_expert_cap_zero_and_no_cap() -> None:
    for cap in (0, None):  # 0 turns a file's caps off; without a file and a setting there are none
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
    row["cap"] = [3, E]
    bf = parse_budget_text(json.dumps(doc), "caps.json")
    table = bf.cap_table()
    assert table.shape == (A + 1, L) and table[B].tolist() == [3, E]
    assert (table[torch.arange(A + 1) != B] == E).all(), "no cap elsewhere"
    assert (bf.cap_table(override=5)[:A] == 5).all() and (bf.cap_table(override=5)[A] == E).all()
    assert (bf.cap_table(override=0) == E).all() and (bf.cap_table(override=99)[:A] == E).all()
    for bad, match in [([3], "one per layer"), ([0, 3], "C = 0 is outside the valid range \\[1, E = 8\\]")]:
        row["cap"] = bad
        with pytest.raises(BudgetFileError, match=match) as err:
            parse_budget_text(json.dumps(doc), "caps.json")
        assert "caps.json" in str(err.value) and f"allocations[{B - L}].cap" in str(err.value)
    row["cap"] = None
    doc["allocations"][-1]["cap"] = [1, 1]
    with pytest.raises(BudgetFileError, match="never capped"):
        parse_budget_text(json.dumps(doc), "caps.json")


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_expert_cap_setting_is_checked(bad: object) -> None:
    with pytest.raises(ValueError, match=f"expert_cap={bad!r} is not valid; expected an integer >= 0"):
        PluginConfig.from_additional_config({"vllm_alloc": {"expert_cap": bad}})


def test_env_expert_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_EXPERT_CAP", "3")
    assert PluginConfig.from_additional_config({}).expert_cap == 3
    monkeypatch.setenv("VLLM_ALLOC_EXPERT_CAP", "x")
    with pytest.raises(ValueError, match="VLLM_ALLOC_EXPERT_CAP='x' is not an integer"):
        PluginConfig.from_additional_config({})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_host_layer_calls_count_drops_and_distinct_experts_to_prometheus() -> None:
    state = capped_state(expert_cap=1)
    plan = state.plan
    assert plan is not None and plan.host is not None
    # Four decode tokens at b = 0.5 (K_l = 2 each): Alloc-T keeps each token's experts 0 and 1 + t. Every
    # token's top expert (its floor) is 0, and C = 1: the group keeps expert 0 only, and each token has no
    # other allowed candidate, so it drops one pair.
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
    next(a for a in doc["allocations"] if a["budget"] == B)["cap"] = [3, 5]
    state.reconfigure({"budget_file": {"source": "caps.json", "text": json.dumps(doc)}}, apply=True)
    assert plan.cap_table is table and plan.cap_table[B].tolist() == [3, 5]
    assert plan.capping.tolist() == [b == B for b in range(A + 1)]
    state.reconfigure({"budget_file": None}, apply=True)
    assert not plan.capping.any() and (plan.cap_table == E).all()
    overridden = make_state(expert_cap=0)
    overridden.reconfigure({"budget_file": {"source": "caps.json", "text": json.dumps(doc)}}, apply=True)
    assert overridden.plan is not None and not overridden.plan.capping.any()
