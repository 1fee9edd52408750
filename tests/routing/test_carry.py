"""The request balance carried across decode steps (`carry`): its bounds, its edges, and the host twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.routing.test_alloc_t import SETTINGS
from vllm_alloc.routing import alloc_t_host
from vllm_alloc.routing.carry import carry_counts, threshold_for


@st.composite
def streams(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
    """N lone streams decoding S steps: keys [S, N, K], K_l per stream [N] (>= K_base), θ [N]."""
    K = draw(st.integers(1, 8))
    kb = draw(st.integers(1, K))
    N = draw(st.integers(1, 6))
    S = draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(S, N, K, generator=g)
    if draw(st.booleans()):  # ties: a coarse router
        keys = (keys * 4).round() / 4
    k_l = torch.randint(kb, K + 1, (N,), generator=g)
    theta = torch.rand(N, generator=g) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    alpha = draw(st.sampled_from([0.0, 0.05, 0.5, 3.0]))
    return keys, k_l, theta, kb, alpha


@SETTINGS
@given(streams())
def test_pool_never_exceeded_and_excess_bounded(case: tuple) -> None:
    """β >= 0 after every step, so every prefix of a request's steps stays within its pool; each step
    exceeds K_l by at most min(K − K_l, β before it); k_t in [K_base, K]."""
    keys, k_l, theta, kb, alpha = case
    S, N, K = keys.shape
    balance = torch.zeros(N, dtype=torch.int64)
    spent = torch.zeros(N, dtype=torch.int64)
    for s in range(S):
        n_keep, after = carry_counts(keys[s], k_l, balance, theta, kb, alpha)
        assert ((n_keep >= kb) & (n_keep <= K)).all()
        assert (n_keep - k_l <= torch.minimum(K - k_l, balance)).all(), "per-step excess bound"
        assert (after >= 0).all(), "nothing is borrowed"
        spent += n_keep
        assert (spent <= (s + 1) * k_l).all(), "the request's pool"
        assert torch.equal(spent, (s + 1) * k_l - after)
        balance = after


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_one_bank_pool_over_layers_host_and_device(
    L: int, N: int, S: int, seed: int, singleton: bool
) -> None:
    """Pool "request": N lone requests decode S steps through L layers, one bank each for all their
    layers. After every layer call β >= 0, so a request's kept pairs over any prefix of its (step, layer)
    calls stay within the K_l it was given there (B per token summed over a step); each call exceeds K_l
    by at most min(K − K_l, β before it). The host layer call and the device path agree on every call."""
    from vllm_alloc.routing.device_budget import Carry as DeviceCarry
    from vllm_alloc.routing.device_budget import layer_routing

    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, 7))
    kb = int(rng.integers(1, K + 1))
    A = L * K
    table = np.zeros((A + 1, L), np.int32)
    table[A] = rng.integers(kb, K + 1, L)  # every request at B = A's row, K_l >= K_base
    budget = np.full(N, A, np.int64)
    slot = np.arange(1, N + 1, dtype=np.int64)
    theta = np.zeros((A + 1, L))
    theta[A] = rng.random(L) * 0.6
    alpha = float(rng.choice([0.0, 0.025, 0.5]))
    host_balance = np.zeros((N + 1, L), np.int64)
    dev_balance = torch.zeros(N + 1, L, dtype=torch.int64)
    group = np.arange(N, dtype=np.int64)
    given_k = np.zeros(N, np.int64)
    spent = np.zeros(N, np.int64)
    ids = np.tile(np.arange(K, dtype=np.int32), (N, 1))
    for _ in range(S):
        for column in range(L):
            keys = rng.random((N, K), dtype=np.float32)
            before = host_balance[1:, 0].copy()
            pairs = alloc_t_host.layer_call(
                keys, keys, ids, budget, table, column, group, kb, "topk", singleton, np.zeros(A + 1), False,
                alloc_t_host.Carry(slot, host_balance, theta, alpha, one_bank=True),
            )  # fmt: skip
            _, kept_ids = layer_routing(
                torch.from_numpy(keys), torch.from_numpy(keys), torch.from_numpy(ids),
                table=torch.from_numpy(table), token_budget=torch.from_numpy(budget),
                token_group=torch.from_numpy(group), used=torch.zeros(L, A + 1), column=column,
                k_base=kb, singleton_groups=singleton,
                carry=DeviceCarry(torch.from_numpy(slot), dev_balance, torch.from_numpy(theta), alpha, True),
            )  # fmt: skip
            kept = pairs.per_token
            np.testing.assert_array_equal((kept_ids >= 0).sum(dim=1).numpy(), kept)
            np.testing.assert_array_equal(dev_balance.numpy(), host_balance)
            k_l = table[A, column]
            assert ((kept >= kb) & (kept <= K)).all()
            assert (kept - k_l <= np.minimum(K - k_l, before)).all(), "per-call excess bound"
            given_k += k_l
            spent += kept
            assert (host_balance[1:, 0] >= 0).all(), "nothing is borrowed"
            assert (spent <= given_k).all(), "the request's pool, over its layers"
            np.testing.assert_array_equal(spent, given_k - host_balance[1:, 0])
    assert (host_balance[:, 1:] == 0).all(), "one bank: the other columns are never touched"


def test_edges_of_the_bar() -> None:
    keys = torch.tensor([[0.6, 0.3, 0.1, 0.0]] * 3)
    k_l = torch.tensor([2, 2, 2])
    zero = torch.zeros(3, dtype=torch.int64)
    # +inf: only the floor, the rest banked; −inf: as much as the cap allows.
    n, after = carry_counts(keys, k_l, zero, torch.full((3,), math.inf), k_base=1)
    assert n.tolist() == [1, 1, 1] and after.tolist() == [1, 1, 1]
    n, after = carry_counts(keys, k_l, torch.tensor([0, 1, 5]), torch.full((3,), -math.inf), k_base=1)
    assert n.tolist() == [2, 3, 4] and after.tolist() == [0, 0, 3]
    # The bar falls with the bank (α = 0.05): 0.5 at β = 0 (only 0.6 clears it), 0.18 at β = 20 (0.6
    # and 0.3), 0.068 at β = 40 (three); α = 0 keeps it at 0.5.
    balance = torch.tensor([0, 20, 40])
    n, _ = carry_counts(keys, k_l, balance, torch.full((3,), 0.5), k_base=1, alpha=0.05)
    assert n.tolist() == [1, 2, 3]
    n, _ = carry_counts(keys, k_l, balance, torch.full((3,), 0.5), k_base=1, alpha=0.0)
    assert n.tolist() == [1, 1, 1]


def test_padding_rows_and_the_floor() -> None:
    keys = torch.rand(3, 4)
    n, after = carry_counts(
        keys, torch.tensor([0, -1, 1]), torch.tensor([4, 4, 0]), torch.full((3,), -math.inf), k_base=2
    )
    assert n.tolist() == [0, 0, 2], "padding keeps nothing; the floor wins over K_l = 1"
    assert after.tolist() == [4, 4, -1], "padding leaves the balance; only the floor can borrow"


def test_single_candidate_model() -> None:
    n, after = carry_counts(torch.rand(2, 1), torch.tensor([1, 1]), torch.tensor([0, 3]), torch.zeros(2))
    assert n.tolist() == [1, 1] and after.tolist() == [0, 3]


@pytest.mark.parametrize("alpha", [0.0, 0.05, 1.0])
def test_host_twin_equals_torch(alpha: float) -> None:
    rng = np.random.default_rng(7)
    for K, kb in ((4, 1), (8, 2), (6, 6), (1, 1)):
        keys = rng.random((257, K), dtype=np.float32)
        k_tok = rng.integers(-1, K + 1, 257)
        balance = rng.integers(0, 40, 257)
        theta = rng.random(257).astype(np.float32)
        theta[:5] = [np.inf, -np.inf, 0.0, 1.0, 0.5]
        want = carry_counts(
            torch.from_numpy(keys), torch.from_numpy(k_tok), torch.from_numpy(balance),
            torch.from_numpy(theta), kb, alpha,
        )  # fmt: skip
        got = alloc_t_host.carry_counts(keys, k_tok, balance, theta, kb, alpha)
        np.testing.assert_array_equal(got[0], want[0].numpy())
        np.testing.assert_array_equal(got[1], want[1].numpy())


def test_threshold_for_hits_the_mean() -> None:
    extras = np.random.default_rng(0).random((1000, 3))
    theta = threshold_for(extras, 1.25)
    assert (extras >= theta).sum() == 1250
    assert threshold_for(extras, 0.0) == math.inf
    assert threshold_for(extras, 3.0) == -math.inf
    with pytest.raises(ValueError, match="must be 2-D"):
        threshold_for(extras.ravel(), 1.0)


@pytest.mark.parametrize("alpha", [-0.1, math.nan, math.inf, True, "0.1"])
def test_bad_alpha_is_named(alpha: object) -> None:
    with pytest.raises(ValueError, match="alpha="):
        carry_counts(torch.rand(1, 2), torch.tensor([1]), torch.tensor([0]), torch.zeros(1), alpha=alpha)  # type: ignore[arg-type]


@pytest.mark.parametrize("one_bank", [False, True])
@pytest.mark.parametrize("singleton", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.05])
def test_device_layer_routing_carries_as_the_host_path(alpha: float, singleton: bool, one_bank: bool) -> None:
    """One decode step of 12 lone requests (distinct slots) mixed with uncarried rows and padding: the
    device path (`device_budget.layer_routing`) keeps and banks what the host layer call does."""
    from vllm_alloc.routing.device_budget import Carry, layer_routing

    rng = np.random.default_rng(3)
    T, K, L, A = 16, 4, 2, 8
    keys = rng.random((T, K), dtype=np.float32)
    ids = np.tile(np.arange(K, dtype=np.int32), (T, 1))
    table = np.zeros((A + 1, L), np.int32)
    table[2:] = [[1, 1], [1, 2], [2, 2], [2, 3], [3, 3], [3, 4], [4, 4]]
    budget = rng.integers(2, A, T).astype(np.int64)
    budget[-2:] = 0  # padding rows
    group = np.arange(T, dtype=np.int64)
    slot = np.arange(1, T + 1, dtype=np.int64)
    slot[12:] = 0  # rows 12-13 not carried
    theta = np.full((A + 1, L), 0.4)
    balance0 = rng.integers(0, 5, (T + 1, L)).astype(np.int64)

    host_balance = balance0.copy()
    used = np.zeros(A + 1)
    pairs = alloc_t_host.layer_call(
        keys, keys, ids, budget, table, 1, group, 1, "topk", singleton, used, True,
        alloc_t_host.Carry(slot, host_balance, theta, alpha, one_bank),
    )  # fmt: skip
    dev_balance = torch.from_numpy(balance0.copy())
    dev_used = torch.zeros(L, A + 1, dtype=torch.float64)
    _, kept_ids = layer_routing(
        torch.from_numpy(keys), torch.from_numpy(keys), torch.from_numpy(ids),
        table=torch.from_numpy(table), token_budget=torch.from_numpy(budget),
        token_group=torch.from_numpy(group), used=dev_used, column=1, k_base=1, singleton_groups=singleton,
        carry=Carry(torch.from_numpy(slot), dev_balance, torch.from_numpy(theta), alpha, one_bank),
    )  # fmt: skip
    np.testing.assert_array_equal((kept_ids >= 0).sum(dim=1).numpy(), pairs.per_token)
    np.testing.assert_array_equal(dev_balance[1:].numpy(), host_balance[1:])
    np.testing.assert_array_equal(dev_used[1].numpy(), used)
    bank, other = (0, 1) if one_bank else (1, 0)  # layer 1's call: its own column, or the request's bank
    assert not np.array_equal(host_balance[1:13, bank], balance0[1:13, bank]), "some request banked or spent"
    np.testing.assert_array_equal(host_balance[13:, bank], balance0[13:, bank])
    np.testing.assert_array_equal(host_balance[:, other], balance0[:, other])
