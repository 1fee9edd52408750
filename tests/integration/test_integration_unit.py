"""The integration's pieces that run without a vLLM engine: config, per-token buffers, ranking keys,
refusals, and the SamplingParams check (imports vLLM, starts nothing)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_alloc.budget import BudgetFileError, ModelFingerprint, uniform_budget_file
from vllm_alloc.integration.config import PluginConfig, plugin_section, resolve_settings
from vllm_alloc.integration.plan import LayerInfo
from vllm_alloc.integration.state import AllocState

L, E, K, H, I = 2, 8, 4, 64, 32
A = L * K


def make_state(
    scope: str = "budget", default_budget: float | None = None, expert_cap: float | None = None
) -> AllocState:
    state = AllocState()
    config = PluginConfig(scope=scope, default_budget=default_budget, expert_cap=expert_cap)
    for layer_id in (3, 1):  # registered out of order: columns follow the layer index
        state.register_layer(
            LayerInfo(f"model.layers.{layer_id}.mlp.experts", layer_id, E, K, H, I), config, "X"
        )
    state.finalize(max_tokens=32, device=torch.device("cpu"))
    return state


def test_fingerprint_and_columns_follow_layer_order() -> None:
    state = make_state()
    assert state.fingerprint() == ModelFingerprint(
        architecture="X", moe_layers=[1, 3], num_experts=E, top_k=K, hidden_size=H, intermediate_size=I
    )
    assert state.layers["model.layers.1.mlp.experts"].column == 0
    assert state.layers["model.layers.3.mlp.experts"].column == 1
    assert state.plan is not None and state.plan.source == "uniform"


def test_fill_scope_budget_groups_by_absolute_budget() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    # requests: b=0.5 (2 tokens), b=1.0 (1), b=0.5 (3), default (1 token) -> B = 4, 8, 4, 8
    state.fill(["a", "b", "c", "d"], [0.5, "1.0", 0.5, None], np.array([0, 2, 3, 6, 7]))
    assert state.budgeted
    assert plan.token_budget[:8].tolist() == [4, 4, 8, 4, 4, 4, 8, 0]  # row 7 is padding: B = 0
    groups = plan.token_group[:7].tolist()
    assert groups[0] == groups[1] == groups[3] == groups[4] == groups[5]  # every B = 4 token together
    assert groups[2] == groups[6] != groups[0]
    assert max(groups) < 7  # group ids stay below T


def test_fill_scope_request_groups_by_request() -> None:
    state = make_state(scope="request")
    plan = state.plan
    assert plan is not None
    state.fill(["a", "b"], [0.5, 0.5], np.array([0, 2, 5]))
    assert plan.token_group[:5].tolist() == [0, 0, 2, 2, 2]  # a group's id is its first token


@pytest.mark.parametrize("scope", ["budget", "request", "position"])
def test_fill_budgets_without_alloc_t_get_one_token_groups(scope: str) -> None:
    """A budget file may turn Alloc-T off at a B (the guard found it loses there): the tokens of requests
    at that B are their own groups, whatever the scope; the other tokens group as before, apart."""
    state = make_state(scope=scope)
    plan = state.plan
    assert plan is not None
    state.set_allocation({4: [2, 2]}, {4: False})  # b = 0.5 -> B = 4 without Alloc-T; B = 6 keeps it
    # requests: b = 0.75 (3 tokens), b = 0.5 (2), b = 0.75 (2), b = 0.5 (1)
    starts = np.array([0, 0, 0, 0])
    state.fill(["a", "b", "c", "d"], [0.75, 0.5, 0.75, 0.5], np.array([0, 3, 5, 7, 8]), starts)
    groups = plan.token_group[:8].tolist()
    assert [groups[i] for i in (3, 4, 7)] == [3, 4, 7]  # B = 4: alone
    others = [groups[i] for i in (0, 1, 2, 5, 6)]
    assert not set(others) & {3, 4, 7}
    if scope == "budget":
        assert set(others) == {0}
    if scope == "request":
        assert others == [0, 0, 0, 5, 5]
    state.end_pass()
    state.reset_allocation()  # back to the file: Alloc-T everywhere
    state.fill(["b", "d"], [0.5, 0.5], np.array([0, 2, 3]), np.array([0, 0]))
    expected = {"budget": [0, 0, 0], "request": [0, 0, 2], "position": [0, 1, 0]}[scope]
    assert plan.token_group[:3].tolist() == expected
    with pytest.raises(ValueError, match="alloc_t\\[4\\] = 'no' is invalid"):
        state.set_allocation({}, {4: "no"})  # type: ignore[dict-item]


def test_set_scope_between_passes() -> None:
    state = make_state(scope="request")
    plan = state.plan
    assert plan is not None
    state.set_scope("token")
    state.fill(["a"], [0.5], np.array([0, 3]))
    assert plan.token_group[:3].tolist() == [0, 1, 2] and state.singleton_groups
    with pytest.raises(ValueError, match="scope='tokens' is not valid"):
        state.set_scope("tokens")


def test_fill_scope_token_turns_reallocation_off() -> None:
    state = make_state(scope="token")
    plan = state.plan
    assert plan is not None
    state.fill(["a", "b"], [0.5, 0.5], np.array([0, 2, 5]))
    assert plan.token_group[:5].tolist() == [0, 1, 2, 3, 4]


def test_fill_scope_position_groups_by_budget_and_position() -> None:
    """Scope `position`: a group is the tokens at one B and one position of their requests (what N
    same-budget decode streams started together give), wherever the requests' chunks start."""
    state = make_state(scope="position")
    plan = state.plan
    assert plan is not None
    # a: b = 0.5, positions 0-2; b: b = 0.5, positions 1-2 (one token computed); c: b = 0.25, positions
    # 0-1; d: b = 0.5, one decode token at position 7.
    state.fill(["a", "b", "c", "d"], [0.5, 0.5, 0.25, 0.5], np.array([0, 3, 5, 7, 8]), np.array([0, 1, 0, 7]))
    assert plan.token_group[:8].tolist() == [0, 1, 2, 1, 2, 5, 6, 7]
    assert not state.singleton_groups
    # N streams in lockstep decode: one token each at the same position, one group.
    state.end_pass()
    state.fill(["a", "b", "d"], [0.5, 0.5, 0.5], np.array([0, 1, 2, 3]), np.array([9, 9, 9]))
    assert plan.token_group[:3].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="starts"):
        state.fill(["a"], [0.5], np.array([0, 1]))


def test_all_full_pass_takes_stock_path_and_is_counted() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    state.fill(["a", "b"], [None, 1.0], np.array([0, 3, 4]))
    assert not state.budgeted and state.counting
    assert plan.used[:, A].tolist() == [4 * K, 4 * K]
    assert plan.full[:, A].tolist() == [4 * K, 4 * K]
    state.end_pass()
    assert not state.counting


def test_graph_flags_follow_the_pass() -> None:
    """all_full and not_full (what captured graphs branch on) are each other's negation, pass by pass."""
    state = make_state()
    plan = state.plan
    assert plan is not None
    flags = lambda: (bool(plan.all_full), bool(plan.not_full))  # noqa: E731
    assert flags() == (True, False)
    state.fill(["a"], [0.5], np.array([0, 3]))
    assert flags() == (False, True)
    state.end_pass()
    assert flags() == (True, False)
    state.fill(["a"], [1.0], np.array([0, 1]))  # all at b = 1.0: the stock body
    assert flags() == (True, False)
    state.end_pass()


def test_budgeted_pass_counts_full_activations_once_for_every_layer() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    state.fill(["a", "b"], [0.5, None], np.array([0, 3, 4]))  # B = 4 (3 tokens) and B = 8 (1 token)
    assert plan.full[:, 4].tolist() == [3 * K, 3 * K] and plan.full[:, 8].tolist() == [K, K]
    assert plan.full.sum().item() == 2 * 4 * K  # nothing else counted


@pytest.mark.parametrize(
    ("scope", "budgets", "starts", "singleton"),
    [
        ("budget", [0.5], [0, 1], True),  # a lone decode token
        ("budget", [0.5, 0.5], [0, 1, 2], False),  # two tokens share the B = 4 group
        ("budget", [0.5, 0.75], [0, 1, 2], True),  # decode, different budgets: own groups
        ("request", [0.5, 0.5], [0, 1, 2], True),  # decode, scope request
        ("request", [0.5], [0, 3], False),  # prefill: three tokens in one group
        ("token", [0.5], [0, 3], True),  # scope token: always one-token groups
    ],
)
def test_fill_detects_one_token_groups(
    scope: str, budgets: list[float], starts: list[int], singleton: bool
) -> None:
    state = make_state(scope=scope)
    state.fill([f"r{i}" for i in range(len(budgets))], budgets, np.array(starts))
    assert state.singleton_groups is singleton
    state.end_pass()
    assert not state.singleton_groups


def test_invalid_budget_reaching_the_worker_falls_back() -> None:
    state = make_state(default_budget=1.0)
    assert state.absolute_budget("garbage") == A  # refused upstream; here it runs at the default
    assert state.absolute_budget(0.1) == L * 1  # in (0, 1] but below 1/K: runs at the minimum
    assert state.absolute_budget(0.5) == A // 2
    assert state.absolute_budget(10**400) == A  # no float holds it: a budget error, run at the default


def test_a_bool_does_not_share_the_cached_budget_of_one() -> None:
    state = make_state(default_budget=0.5)
    assert state.absolute_budget(True) == A // 2  # True == 1 as a dict key; it is no budget: the default
    assert state.absolute_budget(1) == A


def test_set_and_reset_allocation() -> None:
    state = make_state()
    plan = state.plan
    assert plan is not None
    state.set_allocation({4: [3, 1]})
    assert plan.table[4].tolist() == [3, 1]
    with pytest.raises(ValueError, match="invalid"):
        state.set_allocation({4: [4, 1]})  # sums above B
    with pytest.raises(ValueError, match="out of range"):
        state.set_allocation({A + 1: [4, 4]})
    state.reset_allocation()
    assert plan.table[4].tolist() == [2, 2]


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"scope": "batch"}, "scope='batch' is not valid"),
        ({"weights": "norm"}, "weights='norm' is not valid"),
        ({"default_budget": 2}, "out of range"),
        ({"default_budget": "half"}, "is not a number"),
        ({"budget": 0.5}, "unknown key"),
        ({"budget_file": 3}, "budget_file=3 is not valid"),
        pytest.param({"default_budget": 10**400}, "out of range", id="default-10**400"),
    ],
)
def test_plugin_config_errors(section: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PluginConfig.from_additional_config({"vllm_alloc": section})


@pytest.mark.parametrize("section", [3, "x", [1], False, 0])
def test_plugin_section_must_be_an_object(section: object) -> None:
    with pytest.raises(ValueError, match=r'"vllm_alloc" is .*; expected a JSON object with keys budget_file'):
        plugin_section({"vllm_alloc": section})


def test_plugin_section_absent_or_null_is_empty() -> None:
    assert plugin_section(None) == plugin_section({}) == plugin_section({"vllm_alloc": None}) == {}


def test_overridden_env_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_DEFAULT_BUDGET", "half")
    assert PluginConfig.from_additional_config({"vllm_alloc": {"default_budget": 0.5}}).default_budget == 0.5
    with pytest.raises(ValueError, match="VLLM_ALLOC_DEFAULT_BUDGET='half' is not a number"):
        PluginConfig.from_additional_config({})


MODEL = ModelFingerprint(
    architecture="X", moe_layers=[1, 3], num_experts=E, top_k=K, hidden_size=H, intermediate_size=I
)


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.json"
    uniform_budget_file(MODEL, k_base=2, scope="request", weights="kept", default_budget=0.75).dump(path)
    from_file = resolve_settings({"vllm_alloc": {"budget_file": str(path)}})
    assert (from_file.scope, from_file.weights, from_file.default_budget) == ("request", "kept", 0.75)
    assert from_file.min_budget == 0.5 and from_file.source == str(path)  # k_base / K = 2 / 4
    monkeypatch.setenv("VLLM_ALLOC_BUDGET_FILE", str(path))
    monkeypatch.setenv("VLLM_ALLOC_SCOPE", "token")
    monkeypatch.setenv("VLLM_ALLOC_DEFAULT_BUDGET", "0.5")
    from_env = resolve_settings({})  # the variables over the file
    assert (from_env.scope, from_env.weights, from_env.default_budget) == ("token", "kept", 0.5)
    ours = resolve_settings({"vllm_alloc": {"scope": "budget", "default_budget": 1}})  # the config over both
    assert (ours.scope, ours.default_budget) == ("budget", 1.0)


def test_settings_without_a_budget_file() -> None:
    settings = resolve_settings({}, top_k=4)  # the API server / launcher: uniform, K_base = 1
    assert settings.budget_file is None and settings.source == "uniform"
    assert (settings.scope, settings.weights, settings.default_budget, settings.min_budget) == (
        "budget",
        "topk",
        1.0,
        0.25,
    )
    assert resolve_settings({}).min_budget is None  # the model's K unknown: (0, 1]
    worker = resolve_settings({}, model=MODEL)  # the worker builds the uniform file for the model
    assert worker.budget_file == uniform_budget_file(MODEL) and worker.min_budget == 0.25


def test_settings_check_the_default_against_the_models_minimum() -> None:
    with pytest.raises(ValueError, match=r"default_budget=0.2 is below this model's minimum.*\[0.25, 1\]"):
        resolve_settings({"vllm_alloc": {"default_budget": 0.2}}, top_k=4)
    with pytest.raises(ValueError, match=r"default_budget=0.2 is below"):
        resolve_settings({"vllm_alloc": {"default_budget": 0.2}}, model=MODEL)
    assert resolve_settings({"vllm_alloc": {"default_budget": 0.2}}).default_budget == 0.2  # K unknown


def test_settings_validate_the_file_against_the_model(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    uniform_budget_file(MODEL.model_copy(update={"top_k": 2})).dump(path)
    resolve_settings({"vllm_alloc": {"budget_file": str(path)}})  # no model: loaded as it is
    with pytest.raises(BudgetFileError, match=r"field 'model.top_k'"):
        resolve_settings({"vllm_alloc": {"budget_file": str(path)}}, model=MODEL)


def test_finalize_refuses_a_default_below_the_minimum() -> None:
    with pytest.raises(ValueError, match=r"vllm_alloc default_budget=0.2 is below this model's minimum"):
        make_state(default_budget=0.2)


def test_plugin_config_reads_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ALLOC_SCOPE", "request")
    monkeypatch.setenv("VLLM_ALLOC_DEFAULT_BUDGET", "0.75")
    config = PluginConfig.from_additional_config({})
    assert config.scope == "request" and config.default_budget == 0.75
    # --additional-config wins over the environment
    assert PluginConfig.from_additional_config({"vllm_alloc": {"scope": "budget"}}).scope == "budget"


def test_rank_keys_follow_the_biased_selection_score() -> None:
    from vllm_alloc.integration.layer import rank_keys

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ids = torch.tensor([[3, 2, 1]])
    weights = torch.tensor([[0.5, 0.3, 0.2]])
    plain = SimpleNamespace(scoring_func="softmax", e_score_correction_bias=None)
    assert torch.equal(rank_keys(plain, logits, weights, ids), weights)
    # With a bias the router ranks by sigmoid(logit) + bias, not by the weight it returns.
    bias = torch.tensor([0.0, 5.0, 0.0, 0.0])
    biased = SimpleNamespace(scoring_func="sigmoid", e_score_correction_bias=bias)
    keys = rank_keys(biased, logits, weights, ids)
    assert keys.argmax().item() == 2  # expert 1 carries the +5 bias


def test_sampling_params_refuses_invalid_budgets() -> None:
    pytest.importorskip("vllm")
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    from vllm_alloc.integration import requests_check

    requests_check.install()
    requests_check.install()  # idempotent
    SamplingParams(extra_args={"activation_budget": 0.5})
    for bad in ("abc", float("nan"), 0, 1.5, "0.5é"):
        with pytest.raises(VLLMValidationError, match=r"\(0, 1\]"):
            SamplingParams(extra_args={"activation_budget": bad})
    # vLLM's own extra_args check runs first and refuses integers beyond 64 bits with its message.
    with pytest.raises(VLLMValidationError):
        SamplingParams(extra_args={"activation_budget": 10**400})


def test_refusals_name_the_setting() -> None:
    pytest.importorskip("vllm")
    from vllm_alloc.integration.layer import _refuse_unsupported

    parallel = SimpleNamespace(
        enable_expert_parallel=True, data_parallel_size=2, enable_dbo=False, enable_eplb=False
    )
    vllm_config = SimpleNamespace(parallel_config=parallel, speculative_config=object(), lora_config=None)
    moe_config = SimpleNamespace(moe_parallel_config=SimpleNamespace(use_ep=True))
    experts = SimpleNamespace(quant_method=object())
    runner = SimpleNamespace(routed_input_transform=None, routed_output_transform=None)
    with pytest.raises(RuntimeError) as info:
        _refuse_unsupported("model.layers.0.mlp.experts", vllm_config, moe_config, experts, runner)
    message = str(info.value)
    for fragment in (
        "expert parallelism",
        "data parallelism",
        "speculative decoding",
        "quantised MoE",
        "VLLM_ALLOC_DISABLE",
    ):
        assert fragment in message
