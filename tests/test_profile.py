"""Alloc-L profiling: the protocols and the guard with fake evaluators (fast), then one real profiling
run through vLLM on a tiny checkpoint whose first MoE layer was made to matter more (e2e)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from vllm_alloc import profile_protocols as pp
from vllm_alloc.alloc_l import uniform


def additive(weights: Sequence[float]) -> pp.Evaluate:
    """Fake metric: Σ_l w_l / K_l (layer l hurts w_l-times more when starved), same on both splits."""

    def evaluate(ks: Sequence[int], split: str) -> float:
        return 1.0 + sum(w / k for w, k in zip(weights, ks, strict=True))

    return evaluate


class Counting:
    def __init__(self, inner: pp.Evaluate) -> None:
        self.inner = inner
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def __call__(self, ks: Sequence[int], split: str) -> float:
        self.calls.append((tuple(ks), split))
        return self.inner(ks, split)


@pytest.mark.parametrize(
    "L, K, k_base",
    [
        (1, 1, 1),  # a single layer at K = 1: only the all-K run
        (2, 4, 1),  # the tiny qwen3_moe
        (4, 4, 1),
        (3, 6, 2),  # K_base > 1: the sweep stops at K_base, deeper layers sit at K_base
        (26, 6, 1),  # DeepSeek-V2-Lite's shape
    ],
)
def test_isolating_runs_exactly_L_times_K_minus_1_plus_1(L: int, K: int, k_base: int) -> None:
    ev = Counting(additive([1.0] * L))
    S = pp.isolating_sensitivity(ev, L, K, k_base)
    assert len(ev.calls) == L * (K - k_base) + 1
    assert len(set(ev.calls)) == len(ev.calls)  # no configuration twice
    assert all(split == "profile" for _, split in ev.calls)
    assert all(math.isfinite(v) for row in S for v in row)
    # Deep to shallow: the first run is all K, the last one has layer 0 at K_base.
    assert ev.calls[0][0] == (K,) * L
    assert ev.calls[-1][0][0] == k_base
    # The shared configuration: S[l][K] is the run of S[l+1][K_base].
    for l in range(L - 1):
        assert S[l][K - 1] == S[l + 1][k_base - 1]


def test_isolating_matrix_is_the_paper_definition() -> None:
    L, K = 3, 4
    ev = additive([3.0, 1.0, 2.0])
    S = pp.isolating_sensitivity(ev, L, K)
    for l in range(L):
        for k in range(1, K + 1):
            assert S[l][k - 1] == ev([K] * l + [k] + [1] * (L - l - 1), "profile")


def test_operating_point_sweeps_one_layer_around_uniform() -> None:
    L, K, B = 4, 4, 8
    ev = Counting(additive([1.0, 2.0, 3.0, 4.0]))
    S = pp.operating_point_sensitivity(ev, L, K, B)
    assert len(ev.calls) == L * (K - 1) + 1
    base = uniform(L, K, B)
    for l in range(L):
        for k in range(1, K + 1):
            assert S[l][k - 1] == ev.inner([*base[:l], k, *base[l + 1 :]], "profile")


def test_unequal_layers_get_more_experts_where_they_matter() -> None:
    L, K = 4, 4
    B = L * K // 2
    result = pp.profile(additive([8.0, 1.0, 1.0, 1.0]), L, K, budgets=[B])
    alloc = result.allocations[B - L]
    assert alloc["chosen"] != "uniform"
    assert alloc["k"][0] > max(alloc["k"][1:])
    assert alloc["k"][0] == K


def test_guard_picks_uniform_when_candidates_measure_worse() -> None:
    # The profile split says layer 0 matters; the held-out split says the opposite. Every non-uniform
    # candidate then measures worse than uniform on held-out data, and must not ship.
    def evaluate(ks: Sequence[int], split: str) -> float:
        w = [8.0, 1.0, 1.0, 1.0] if split == "profile" else [1.0, 8.0, 8.0, 8.0]
        return additive(w)(ks, split)

    L, K = 4, 4
    result = pp.profile(evaluate, L, K, budgets=[6, 8, 12])
    for a in result.allocations:
        assert a["k"] == uniform(L, K, a["budget"]), a
        assert a["chosen"] == "uniform"
        for c in a.get("candidates", []):
            assert c["measured"] >= a["candidates"][0]["measured"]
    at8 = result.allocations[8 - L]
    assert {c["name"] for c in at8["candidates"]} == {"uniform", "isolating", "operating-point"}
    assert any(c["allocation"] != at8["k"] for c in at8["candidates"])  # there was something to refuse


def test_ties_go_to_uniform_and_equal_vectors_share_one_measurement() -> None:
    seen: list[list[int]] = []

    def measure(ks: Sequence[int]) -> float:
        seen.append(list(ks))
        return 5.0  # everything measures the same

    a = pp.select([("uniform", [2, 2]), ("isolating", [3, 1]), ("operating-point", [2, 2])], measure)
    assert a["chosen"] == "uniform" and a["k"] == [2, 2]
    assert seen == [[2, 2], [3, 1]]
    with pytest.raises(ValueError, match="first candidate must be 'uniform'"):
        pp.select([("isolating", [3, 1])], measure)


def test_unmeasured_budgets_keep_uniform() -> None:
    # L·K large enough that only requested budgets and multiples of L are validated.
    L, K = 8, 6
    ev = Counting(additive([4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    result = pp.profile(ev, L, K, budgets=[21], all_budgets_up_to=8)
    assert result.validated == [8, 16, 21, 24, 32, 40]
    for a in result.allocations:
        if a["budget"] not in result.validated:
            assert a["chosen"] == "uniform" and "candidates" not in a
            assert a["k"] == uniform(L, K, a["budget"])
    heldout = [ks for ks, split in ev.calls if split == "heldout"]
    assert {sum(ks) for ks in heldout} <= set(result.validated)
    assert result.allocations[-1]["k"] == [K] * L


def test_memo_runs_each_configuration_once() -> None:
    ev = Counting(additive([2.0, 1.0]))
    memo = pp.Memo(ev)
    result = pp.profile(memo, 2, 4, budgets=[2, 4, 6])
    assert memo.runs == len(ev.calls) == len(set(ev.calls))
    profile_runs = sum(1 for _, split in ev.calls if split == "profile")
    assert profile_runs == pp.planned_profile_runs(2, 4, [2, 4, 6], pp.PROTOCOLS)
    assert sorted(result.operating_point) == [2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budgets": [1]}, r"B = \[1\] are outside the valid range \[L·K_base = 2, A = 8\]"),
        ({"budgets": [4], "protocols": ["paper"]}, "protocols \\['paper'\\] are not valid"),
        ({"budgets": [4], "k_base": 5}, r"k_base = 5 is outside the valid range \[1, K = 4\]"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pp.profile(additive([1.0, 1.0]), 2, 4, **kwargs)


def test_non_finite_metric_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="gave nan"):
        pp.isolating_sensitivity(lambda ks, split: math.nan, 2, 2)
