"""Alloc-T on the host (`alloc_t_host`, the CPU serving path) keeps what `alloc_t.reallocate` keeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given

from tests.routing.test_alloc_t import SETTINGS, Case, cases
from vllm_alloc.routing import alloc_t_host
from vllm_alloc.routing.alloc_t import reallocate


def host_pairs(case: Case, weights: str, singleton: bool = False) -> alloc_t_host.KeptPairs:
    return alloc_t_host.reallocate_pairs(
        case.keys.numpy(),
        case.weights.float().numpy(),
        case.ids.numpy(),
        case.k_tok.numpy(),
        case.group.numpy(),
        k_base=case.k_base,
        weights=weights,
        singleton_groups=singleton,
    )


def per_token(pairs: alloc_t_host.KeptPairs, T: int) -> list[dict[int, float]]:
    """{expert id: weight} of each token, from either layout; a pair twice is an error."""
    out: list[dict[int, float]] = [{} for _ in range(T)]
    R, n = pairs.weights.shape
    assert pairs.ids.shape == (R, n) and pairs.ids.dtype == np.int32
    assert pairs.weights.dtype == np.float32
    if pairs.tokens is None:
        assert R == T
    for r in range(R):
        t = r if pairs.tokens is None else int(pairs.tokens[r])
        for j in range(n):
            e = int(pairs.ids[r, j])
            assert e not in out[t], f"pair ({t}, {e}) kept twice"
            out[t][e] = float(pairs.weights[r, j])
    return out


def assert_same(case: Case, weights: str, singleton: bool = False) -> None:
    want_w, want_ids, kept = reallocate(
        case.keys, case.weights, case.ids, case.k_tok, case.group, case.k_base, weights, singleton
    )
    T, K = want_ids.shape
    np.testing.assert_array_equal(
        alloc_t_host.kept_mask(
            case.keys.numpy(), case.k_tok.numpy(), case.group.numpy(), case.k_base, singleton
        ),
        kept.numpy(),
    )
    pairs = host_pairs(case, weights, singleton)
    np.testing.assert_array_equal(pairs.per_token, kept.sum(dim=1).numpy())
    got = per_token(pairs, T)
    for t in range(T):
        want = {int(want_ids[t, j]): float(want_w[t, j]) for j in range(K) if want_ids[t, j] >= 0}
        assert got[t].keys() == want.keys(), f"token {t}"
        for e, w in want.items():
            if weights == "topk":  # the input weight, bit for bit
                assert got[t][e] == w
            else:  # a rescaled sum: numpy and torch may associate it differently
                assert got[t][e] == pytest.approx(w, rel=1e-6)


@SETTINGS
@given(case=cases())
def test_host_matches_reallocate(case: Case) -> None:
    assert_same(case, "topk")
    assert_same(case, "kept")


@SETTINGS
@given(case=cases(max_T=12))
def test_host_singleton_groups_match_reallocate(case: Case) -> None:
    case.group = torch.arange(case.k_tok.shape[0])
    assert_same(case, "topk", singleton=True)
    assert_same(case, "topk", singleton=False)


@pytest.mark.parametrize("T", [1, 5])
def test_even_counts_use_token_rows(T: int) -> None:
    """Every token keeping n pairs: rows are the tokens, routed top-n, best first."""
    keys = np.array([[0.1, 0.5, 0.3, 0.5]] * T, dtype=np.float32)  # a tie: column 1 ranks before 3
    ids = np.tile(np.array([7, 8, 9, 10], dtype=np.int64), (T, 1))
    pairs = alloc_t_host.reallocate_pairs(
        keys, keys, ids, np.full(T, 2), np.arange(T), k_base=1, singleton_groups=True
    )
    assert pairs.tokens is None
    assert pairs.ids.tolist() == [[8, 10]] * T
    assert pairs.weights.tolist() == [[0.5, 0.5]] * T


def test_uneven_counts_use_one_row_per_pair() -> None:
    keys = np.array([[0.9, 0.1], [0.8, 0.7]], dtype=np.float32)
    ids = np.array([[0, 1], [2, 3]], dtype=np.int32)
    # One group of two tokens with a pool of 3: token 1's second candidate (0.7) beats token 0's (0.1).
    pairs = alloc_t_host.reallocate_pairs(keys, keys, ids, np.array([1, 2]), np.zeros(2, np.int64))
    assert pairs.tokens is not None
    assert pairs.tokens.tolist() == [0, 1, 1]
    assert pairs.ids[:, 0].tolist() == [0, 2, 3]
    assert pairs.weights[:, 0].tolist() == pytest.approx([0.9, 0.8, 0.7])
    assert pairs.per_token.tolist() == [1, 2]


def test_bad_arguments_are_refused() -> None:
    z, one = np.zeros((1, 2), dtype=np.float32), np.ones(1, np.int64)
    with pytest.raises(ValueError, match="weights='raw'"):
        alloc_t_host.reallocate_pairs(z, z, z.astype(np.int32), one, one * 0, weights="raw")
    with pytest.raises(ValueError, match="k_base=0"):
        alloc_t_host.reallocate_pairs(z, z, z.astype(np.int32), one, one * 0, k_base=0)


@SETTINGS
@given(case=cases(max_T=12))
def test_layer_call_reads_the_table_and_counts(case: Case) -> None:
    """The serving entry point: k_tok = table[B_t, column], and used[B_t] grows by the pairs kept."""
    T = case.keys.shape[0]
    k_tok = case.k_tok.clamp(min=0).numpy()
    # A table whose row B_t = t + 1 holds token t's k_tok in column 1 (padding rows: B = 0, row 0 = 0).
    table = np.zeros((T + 1, 2), dtype=np.int32)
    table[1:, 1] = k_tok
    token_budget = np.where(k_tok > 0, np.arange(1, T + 1), 0)
    used = np.zeros(T + 1)
    want = host_pairs(case, "topk")
    got = alloc_t_host.layer_call(
        case.keys.numpy(), case.weights.float().numpy(), case.ids.numpy(), token_budget, table, 1,
        case.group.numpy(), case.k_base, "topk", False, used, True,
    )  # fmt: skip
    assert per_token(got, T) == per_token(want, T)
    np.testing.assert_array_equal(used[token_budget[k_tok > 0]], want.per_token[k_tok > 0])
    assert used[0] == 0  # padding rows keep nothing
