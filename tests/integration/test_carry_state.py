"""The carried balance in the worker state: which tokens carry, request slots across passes, resets,
calibration from recorded scores, and the host layer call spending and banking (no vLLM engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.integration.test_integration_unit import A, E, H, I, K, make_state
from vllm_alloc.integration.config import PluginConfig
from vllm_alloc.integration.plan import LayerInfo
from vllm_alloc.integration.state import AllocState
from vllm_alloc.routing import alloc_t_host

B_HALF = A // 2  # b = 0.5: K_l = 2 in both layers


def carrying_state(scope: str = "budget") -> AllocState:
    state = make_state(scope=scope)
    state.set_carry({B_HALF: [0.3, 0.3]}, alpha=0.0)
    return state


def slots(state: AllocState, n: int) -> list[int]:
    assert state.plan is not None
    return state.plan.token_slot[:n].tolist()


def test_only_lone_decode_tokens_carry() -> None:
    state = carrying_state()
    # a: decode at b = 0.5, alone at its B; b: prefill (3 tokens) at b = 1.0; c: decode at b = 0.75.
    state.fill(["a", "b", "c"], [0.5, 1.0, 0.75], np.array([0, 1, 4, 5]), np.array([7, 0, 9]))
    got = slots(state, 5)
    assert got[0] > 0 and got[1:] == [0, 0, 0, 0], "b = 0.75 does not carry, b = 1.0 never does"
    state.end_pass()
    # Two decode tokens at b = 0.5 share a group under scope budget: Alloc-T works with the group instead.
    state.fill(["a", "d"], [0.5, 0.5], np.array([0, 1, 2]), np.array([8, 3]))
    assert slots(state, 2) == [0, 0] and not state.carried
    state.end_pass()
    # A prefill chunk of one request at b = 0.5 is a group of its own tokens: not carried either.
    state.fill(["e"], [0.5], np.array([0, 4]), np.array([0]))
    assert slots(state, 4) == [0, 0, 0, 0]


def groups(state: AllocState, n: int) -> list[int]:
    assert state.plan is not None
    return state.plan.token_group[:n].tolist()


def test_carry_group_lets_small_groups_of_decode_tokens_carry() -> None:
    """carry_group G: decode tokens carry where at most G of them share a group, and leave it (a group
    of their own each), so Alloc-T's pool of what remains is only the remaining tokens'."""
    state = carrying_state()
    # a, d: decode at b = 0.5; e: a 3-token prefill chunk at b = 0.5, the same group under scope budget.
    batch = (["a", "d", "e"], [0.5, 0.5, 0.5], np.array([0, 1, 2, 5]), np.array([8, 3, 0]))
    state.fill(*batch)
    assert slots(state, 5) == [0, 0, 0, 0, 0] and groups(state, 5) == [0] * 5, "G = 1: two decode tokens"
    state.end_pass()
    state.set_carry({}, group=2)
    state.fill(*batch)
    got = slots(state, 5)
    assert got[0] > 0 and got[1] > 0 and got[0] != got[1] and got[2:] == [0, 0, 0]
    assert groups(state, 5) == [0, 1, 2, 2, 2], "the chunk keeps a group of its own tokens"
    assert not state.singleton_groups and state.carried
    state.end_pass()
    # Three decode tokens at one B exceed G = 2: none carries, Alloc-T has the group.
    state.fill(["a", "d", "f"], [0.5, 0.5, 0.5], np.array([0, 1, 2, 3]), np.array([9, 4, 7]))
    assert slots(state, 3) == [0, 0, 0] and groups(state, 3) == [0, 0, 0]
    state.end_pass()
    with pytest.raises(ValueError, match="group=0 is not valid"):
        state.set_carry({}, group=0)
    state.reset_allocation()
    assert state.plan is not None and state.plan.carry_group == 1


def test_a_request_keeps_its_slot_and_balance_until_it_restarts() -> None:
    state = carrying_state()
    plan = state.plan
    assert plan is not None
    state.fill(["a"], [0.5], np.array([0, 1]), np.array([10]))
    (slot,) = slots(state, 1)
    plan.balance[slot] = torch.tensor([3, 1])  # as if it had banked
    state.end_pass()
    state.fill(["a"], [0.5], np.array([0, 1]), np.array([11]))  # the next position: same slot, balance kept
    assert slots(state, 1) == [slot] and plan.balance[slot].tolist() == [3, 1]
    state.end_pass()
    state.fill(["x", "y"], [0.5, 0.5], np.array([0, 2, 4]), np.array([0, 0]))  # a skips a step
    state.end_pass()
    state.fill(["a"], [0.5], np.array([0, 1]), np.array([12]))
    assert slots(state, 1) == [slot] and plan.balance[slot].tolist() == [3, 1]
    state.end_pass()
    state.fill(["a"], [0.5], np.array([0, 1]), np.array([5]))  # preempted and recomputed: starts again
    assert slots(state, 1) == [slot] and plan.balance[slot].tolist() == [0, 0]


def test_slots_are_reused_least_recently_seen_first() -> None:
    state = AllocState()
    for layer in make_state().layers.values():
        state.register_layer(LayerInfo(layer.name, layer.layer_id, E, K, H, I), PluginConfig(), "X")
    state.finalize(max_tokens=32, device=torch.device("cpu"), max_requests=1)  # 2 slots
    state.set_carry({B_HALF: [0.3, 0.3]})
    seen = []
    for step, req in enumerate(["a", "b", "c", "a"]):
        state.fill([req], [0.5], np.array([0, 1]), np.array([step + 100]))
        seen.append(slots(state, 1)[0])
        state.end_pass()
    assert sorted(seen[:2]) == [1, 2] and seen[2] == seen[0], "c takes the slot of a, seen longest ago"
    assert seen[3] == seen[1], "a comes back: b's slot, a fresh balance"


def test_scope_stream_carries_every_token_in_order() -> None:
    state = carrying_state(scope="stream")
    state.fill(["a", "b"], [0.5, 1.0], np.array([0, 3, 5]), np.array([0, 0]))
    got = slots(state, 5)
    assert got[0] == got[1] == got[2] > 0 and got[3:] == [0, 0]


def test_host_layer_call_banks_and_spends_in_order() -> None:
    """Under scope stream one request's 4 tokens at K_l = 2, θ = 0.3, α = 0: a confident token (one key
    above θ) keeps 1 and banks 1; an uncertain one (4 keys above θ) then spends it: 3, capped by K_l + β."""
    state = carrying_state(scope="stream")
    plan = state.plan
    assert plan is not None and plan.host is not None
    state.fill(["a"], [0.5], np.array([0, 4]), np.array([0]))
    keys = np.array(
        [[0.9, 0.05, 0.03, 0.02], [0.4, 0.35, 0.33, 0.31], [0.9, 0.05, 0.03, 0.02], [0.4, 0.35, 0.33, 0.31]],
        np.float32,
    )
    ids = np.tile(np.arange(K, dtype=np.int32), (4, 1))
    h = plan.host
    carry = alloc_t_host.Carry(h["token_slot"][:4], h["balance"], h["carry_theta"], plan.carry_alpha)
    pairs = alloc_t_host.layer_call(
        keys, keys, ids, h["token_budget"][:4], h["table"], 0, h["token_group"][:4], 1, "topk", True,
        h["used"][0], True, carry,
    )  # fmt: skip
    assert pairs.per_token.tolist() == [1, 3, 1, 3]
    assert h["balance"][slots(state, 1)[0], 0] == 0  # banked 1, spent 1, twice: the pool is used exactly
    assert h["used"][0][B_HALF] == 8 == 4 * 2


def test_calibration_from_recorded_scores() -> None:
    state = make_state()
    with pytest.raises(RuntimeError, match="no router scores recorded"):
        state.carry_thresholds({B_HALF: [2, 2]}, 0.0)
    state.record_scores(True)
    keys = torch.rand(1000, K, generator=torch.Generator().manual_seed(0))
    for column in (0, 1):
        state.record(column, keys)
    theta = state.carry_thresholds({B_HALF: [2, 2], 2: [1, 1]}, 0.0)
    extras = torch.sort(keys, dim=1, descending=True).values[:, 1:]
    assert int((extras >= theta[B_HALF][0]).sum()) == 1000  # K_l − K_base = 1 extra per token on average
    assert theta[2] == [math.inf, math.inf]  # K_l = K_base: nothing above the floor
    state.record_scores(False)
    assert not state.recording and state.carry_thresholds({2: [1, 1]}, 0.0)  # stopped, still there


def test_set_carry_validates_and_reset_restores_the_file() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    with pytest.raises(ValueError, match="out of range"):
        state.set_carry({A + 1: [0.1, 0.1]})
    with pytest.raises(ValueError, match="expected 2 numbers"):
        state.set_carry({B_HALF: [0.1]})
    with pytest.raises(ValueError, match="alpha="):
        state.set_carry({}, alpha=-1.0)
    state.set_carry({B_HALF: [0.1, math.inf]}, alpha=0.2)
    assert plan.carrying[B_HALF] and plan.carry_theta[B_HALF].tolist() == [0.1, math.inf]
    with pytest.raises(ValueError, match="pool='bank' is not valid"):
        state.set_carry({}, pool="bank")
    plan.balance[1] = torch.tensor([2, 3])
    state.set_carry({}, pool="request")
    assert plan.carry_pool == "request" and not plan.balance.any(), "a new pool starts from zero"
    state.reset_allocation()
    assert not plan.carrying.any() and plan.carry_alpha == 0.05 and plan.carry_pool == "layer"


def test_scope_stream_refuses_one_bank() -> None:
    """Scope `stream` runs a request's tokens layer by layer in one pass: right for a balance per layer,
    not for one bank over the layers (decode reaches layer l of token s after every layer of s − 1)."""
    state = carrying_state(scope="stream")
    with pytest.raises(ValueError, match="per-layer balance only"):
        state.set_carry({}, pool="request")
    state.set_scope("token")
    state.set_carry({}, pool="request")
    with pytest.raises(ValueError, match="per-layer balance only"):
        state.set_scope("stream")


def test_scope_stream_is_refused_on_the_device_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_alloc import envs

    state = make_state()
    monkeypatch.setattr(envs, "VLLM_ALLOC_TEST_DEVICE_PATH", True)
    with pytest.raises(ValueError, match="CPU host path only"):
        state.set_scope("stream")
