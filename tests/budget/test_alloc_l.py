"""Alloc-L (vllm_alloc.budget.alloc_l): the DP against brute force, its invariants, uniform(), and errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_alloc.budget.alloc_l import allocation_cost, solve, uniform


def brute_force(S: list[list[float]], B: int, k_min: int) -> list[int]:
    """Every vector in [k_min, K]^L with Σ ≤ B; min cost, then max total, then lexicographically max."""
    L, K = len(S), len(S[0])
    best: tuple[float, int, tuple[int, ...]] | None = None
    for ks in itertools.product(range(k_min, K + 1), repeat=L):
        if sum(ks) > B:
            continue
        key = (-sum(S[l][k - 1] for l, k in enumerate(ks)), sum(ks), ks)
        if best is None or key > best:
            best = key
    assert best is not None
    return list(best[2])


def random_matrix(rng: random.Random, L: int, K: int, integer: bool) -> list[list[float]]:
    if integer:  # small integers: exact float sums and many ties, so the tie-breaking is pinned too
        return [[float(rng.randint(0, 4)) for _ in range(K)] for _ in range(L)]
    return [[rng.uniform(0.0, 10.0) for _ in range(K)] for _ in range(L)]


def check_invariants(S: list[list[float]], k_min: int, result: dict[int, list[int]]) -> None:
    L, K = len(S), len(S[0])
    assert sorted(result) == list(range(L * k_min, L * K + 1))  # every B in range, nothing else
    prev = math.inf
    for B, ks in sorted(result.items()):
        assert len(ks) == L
        assert all(k_min <= k <= K for k in ks), (B, ks)
        assert sum(ks) <= B
        cost = allocation_cost(S, ks)
        assert cost <= prev + 1e-9, f"cost rose from {prev} to {cost} at B = {B}"
        prev = cost


@pytest.mark.parametrize(
    ("L", "K", "k_min"),
    [
        (1, 1, 1),  # one layer, one expert: a single budget B = 1
        (1, 4, 1),  # one layer: K(B) = the best k ≤ B
        (3, 1, 1),  # K = 1: only B = L, all ones
        (3, 3, 1),
        (4, 3, 2),  # k_min > 1 narrows both the options and the budget range
        (2, 5, 5),  # k_min = K: only B = L·K
        (5, 2, 1),
    ],
)
@pytest.mark.parametrize("integer", [True, False], ids=["int-ties", "real"])
def test_solve_equals_brute_force(L: int, K: int, k_min: int, integer: bool) -> None:
    rng = random.Random(1000 * L + 10 * K + k_min)
    for _ in range(5):
        S = random_matrix(rng, L, K, integer)
        result = solve(S, k_min=k_min)
        check_invariants(S, k_min, result)
        for B, ks in result.items():
            expected = brute_force(S, B, k_min)
            if integer:  # exact sums: the vector itself, tie-breaking included
                assert ks == expected, (S, B)
            else:
                assert allocation_cost(S, ks) == pytest.approx(allocation_cost(S, expected), abs=1e-9)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[list[float]], int]:
    L = draw(st.integers(1, 4))
    K = draw(st.integers(1, 4))
    k_min = draw(st.integers(1, K))
    value = st.integers(-3, 3).map(float) | st.floats(-100.0, 100.0, allow_nan=False)
    S = draw(st.lists(st.lists(value, min_size=K, max_size=K), min_size=L, max_size=L))
    return S, k_min


@settings(max_examples=60, deadline=None)
@given(problems())
def test_solve_property(problem: tuple[list[list[float]], int]) -> None:
    S, k_min = problem
    result = solve(S, k_min=k_min)
    check_invariants(S, k_min, result)
    for B, ks in result.items():
        expected = brute_force(S, B, k_min)
        assert allocation_cost(S, ks) == pytest.approx(allocation_cost(S, expected), rel=1e-9, abs=1e-9)


def test_row_offsets_do_not_change_the_allocation() -> None:
    # Each layer contributes one term, so adding c_l to row l shifts every candidate's cost by Σ c_l.
    S = [[0.0, 1.0, 3.0, 7.0], [4.0, 2.0, 1.0, 0.5], [9.0, 2.0, 0.0, 0.0]]
    shifted = [[v + 100.0 * (l + 1) for v in row] for l, row in enumerate(S)]
    assert solve(S) == solve(shifted)


def test_ties_prefer_more_experts_then_shallow_layers() -> None:
    flat = [[1.0] * 3 for _ in range(3)]  # every allocation costs the same
    result = solve(flat)
    assert result[9] == [3, 3, 3]
    assert result[5] == [3, 1, 1]  # total 5 (not less), shallow layer first
    assert result[6] == [3, 2, 1]


def test_full_budget_is_all_k_when_more_experts_help() -> None:
    S = [[3.0, 2.0, 1.0], [5.0, 4.0, 0.0]]  # strictly decreasing in k
    assert solve(S)[6] == [3, 3]
    assert solve(S)[2] == [1, 1]


def test_non_monotone_rows_may_leave_budget_unused() -> None:
    # Layer 1 measured best at k = 1 (noise or a harmful expert): the DP does not spend B on it.
    S = [[3.0, 2.0, 1.0], [0.0, 5.0, 5.0]]
    assert solve(S)[6] == [3, 1]


def test_accepts_tensor_input() -> None:
    S = torch.tensor([[3.0, 2.0, 1.0], [9.0, 1.0, 0.5]])
    assert solve(S) == solve(S.tolist())
    assert allocation_cost(S, [3, 2]) == pytest.approx(2.0)


def test_solve_runs_on_model_sized_input() -> None:
    # DeepSeek-V2-Lite shape (L = 26, K = 6): the DP must stay a fraction of a second.
    rng = random.Random(0)
    S = [sorted((rng.uniform(5, 50) for _ in range(6)), reverse=True) for _ in range(26)]
    result = solve(S)
    check_invariants(S, 1, result)
    assert result[156] == [6] * 26


@pytest.mark.parametrize(
    ("S", "k_min", "match"),
    [
        ([], 1, r"empty"),
        ([[]], 1, r"K ≥ 1"),
        ([[1.0, 2.0], [1.0]], 1, r"ragged: row 1 has 1 entries.*K = 2"),
        ([[1.0, math.nan]], 1, r"S\[0\]\[1\].*nan.*finite"),
        ([[1.0], [math.inf]], 1, r"S\[1\]\[0\].*inf.*finite"),
        ([["x", 1.0]], 1, r"S\[0\]\[0\].*'x' is not a number"),
        ([[1.0, 2.0]], 0, r"k_min = 0 is outside the valid range \[1, K = 2\]"),
        ([[1.0, 2.0]], 3, r"k_min = 3 is outside the valid range \[1, K = 2\]"),
        ([[1.0, 2.0]], 1.5, r"k_min = 1.5 must be an integer"),
    ],
)
def test_solve_errors(S: list[list[object]], k_min: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        solve(S, k_min=k_min)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30), st.integers(1, 8), st.data())
def test_uniform_properties(L: int, K: int, data: st.DataObject) -> None:
    k_min = data.draw(st.integers(1, K))
    B = data.draw(st.integers(L * k_min, L * K))
    ks = uniform(L, K, B, k_min=k_min)
    assert len(ks) == L
    assert sum(ks) == B  # uniform spends the whole budget
    assert max(ks) - min(ks) <= 1
    assert all(k_min <= k <= K for k in ks)
    assert ks == uniform(L, K, B, k_min=k_min)  # deterministic


def test_uniform_placement() -> None:
    assert uniform(4, 3, 8) == [2, 2, 2, 2]
    assert uniform(4, 3, 9) == [3, 2, 2, 2]  # r = 1: layer 0
    assert uniform(4, 3, 10) == [3, 2, 3, 2]  # r = 2: evenly spaced from layer 0
    assert uniform(26, 6, 78) == [3] * 26  # DeepSeek-V2-Lite at b = 0.5
    assert uniform(26, 6, 156) == [6] * 26
    assert uniform(26, 6, 26) == [1] * 26


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((4, 3, 3, 1), r"B = 3 is outside the valid range \[L·k_min = 4, L·K = 12\]"),
        ((4, 3, 13, 1), r"B = 13 is outside the valid range \[L·k_min = 4, L·K = 12\]"),
        ((4, 3, 7, 2), r"B = 7 is outside the valid range \[L·k_min = 8, L·K = 12\]"),
        ((0, 3, 0, 1), r"L = 0 is outside the valid range"),
        ((4, 0, 4, 1), r"K = 0 is outside the valid range"),
        ((4, 3, 6, 4), r"k_min = 4 is outside the valid range \[1, K = 3\]"),
        ((4, 3, 6.0, 1), r"B = 6.0 must be an integer"),
    ],
)
def test_uniform_errors(args: tuple[int, int, int, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        uniform(*args)


def test_allocation_cost_errors() -> None:
    S = [[1.0, 2.0], [3.0, 4.0]]
    assert allocation_cost(S, [2, 1]) == 5.0
    with pytest.raises(ValueError, match=r"allocation has 1 entries.*L = 2"):
        allocation_cost(S, [1])
    with pytest.raises(ValueError, match=r"allocation\[1\] = 3 is outside the valid range \[1, K = 2\]"):
        allocation_cost(S, [1, 3])
