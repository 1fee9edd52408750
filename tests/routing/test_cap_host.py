"""The cap on the host (`cap_host`, inside `alloc_t_host.layer_call`) against the device path
(`device_budget.layer_routing` with `cap_experts`): the same kept pairs, counters and histogram, with
Alloc-T groups, padding rows, b = 1.0 tokens and carried balances in the pass."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.routing.test_alloc_t import SETTINGS
from vllm_alloc.routing import alloc_t_host, cap_host
from vllm_alloc.routing.cap import SCALE
from vllm_alloc.routing.device_budget import Cap, Carry, layer_routing


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_host_cap_equals_device_cap(seed: int, carry: bool, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    L = int(rng.integers(1, 4))
    K = int(rng.integers(1, 6))
    E = int(rng.integers(K, K + 12))
    kb = 1 if rng.random() < 0.7 else int(rng.integers(1, K + 1))
    A = L * K
    T = int(rng.integers(1, 40))
    column = int(rng.integers(0, L))
    table = np.zeros((A + 1, L), np.int32)
    for B in range(L * kb, A + 1):  # any K_l in [K_base, K] per row; the last row is b = 1.0
        table[B] = rng.integers(kb, K + 1, L) if B < A else K
    # Padding rows (0), b = 1.0 tokens and two budgets below it, so the cap groups hold several tokens.
    below = rng.integers(L * kb, A, 2) if L * kb < A else [A, A]
    budget = rng.choice([0, A, *below], T, p=[0.1, 0.05, 0.45, 0.4]).astype(np.int64)
    group = np.array([int(np.flatnonzero(budget == b)[0]) for b in budget], np.int64)  # scope budget
    cap_table = np.full((A + 1, L), SCALE, np.int64)
    cap_table[:A] = rng.choice([1, 250, 500, 750, SCALE], (A, L))  # shares ρ in thousandths (SCALE: no cap)
    # Decode tokens at B < A are capped, one cap group per B (named by its first token, + 1).
    token_cap = np.where((budget > 0) & (budget < A) & (rng.random(T) < 0.9), group + 1, 0)
    skew = rng.random(E) ** 3  # some experts far more popular, as trained routers have
    ids = np.argsort(-(rng.random((T, E)) + skew), axis=1)[:, :K].astype(np.int32)
    keys = rng.random((T, K), dtype=np.float32)
    if ties:
        keys = np.round(keys * 3) / 3
    slot = np.where(carry & (budget > 0) & (budget < A), np.arange(1, T + 1), 0).astype(np.int64)
    theta = np.where(rng.random((A + 1, L)) < 0.9, rng.random((A + 1, L)) * 0.5, np.inf)
    balance0 = rng.integers(0, 3, (T + 1, L)).astype(np.int64)
    balance0[0] = 0

    host_used, host_dropped = np.zeros((L, A + 1)), np.zeros((L, A + 1))
    host_distinct, host_balance = np.zeros((L, E + 1)), balance0.copy()
    pairs = alloc_t_host.layer_call(
        keys, keys, ids, budget, table, column, group, kb, "topk", False, host_used[column], True,
        alloc_t_host.Carry(slot, host_balance, theta, 0.05) if carry else None,
        cap_host.Cap(token_cap, cap_table, E, host_dropped, host_distinct),
    )  # fmt: skip
    dev_used, dev_dropped = torch.zeros(L, A + 1), torch.zeros(L, A + 1, dtype=torch.float64)
    dev_distinct, dev_balance = torch.zeros(L, E + 1, dtype=torch.float64), torch.from_numpy(balance0.copy())
    _, kept_ids = layer_routing(
        torch.from_numpy(keys), torch.from_numpy(keys), torch.from_numpy(ids),
        table=torch.from_numpy(table), token_budget=torch.from_numpy(budget),
        token_group=torch.from_numpy(group), used=dev_used, column=column, k_base=kb,
        carry=Carry(torch.from_numpy(slot), dev_balance, torch.from_numpy(theta), 0.05) if carry else None,
        cap=Cap(torch.from_numpy(token_cap), torch.from_numpy(cap_table), E, dev_dropped, dev_distinct),
    )  # fmt: skip

    host_sets = [set() for _ in range(T)]
    rows = pairs.tokens if pairs.tokens is not None else np.repeat(np.arange(T), pairs.ids.shape[1])
    for t, e in zip(rows, pairs.ids.reshape(-1), strict=True):
        host_sets[int(t)].add(int(e))
    dev_sets = [set(row[row >= 0].tolist()) for row in kept_ids]
    assert host_sets == dev_sets
    np.testing.assert_array_equal(dev_used.numpy(), host_used)
    np.testing.assert_array_equal(dev_dropped.numpy(), host_dropped)
    np.testing.assert_array_equal(dev_distinct.numpy(), host_distinct)
    np.testing.assert_array_equal(dev_balance.numpy(), host_balance)
    # The histogram holds this one call, at the distinct experts of all kept pairs (none: nothing ran).
    touched = len(set().union(*host_sets))
    assert host_distinct.sum() == (touched > 0) and (touched == 0 or host_distinct[column, touched] == 1)
    # The counters add up: used + dropped = what Alloc-T (and the carry) kept before the cap.
    uncapped = np.zeros((L, A + 1))
    alloc_t_host.layer_call(
        keys, keys, ids, budget, table, column, group, kb, "topk", False, uncapped[column], True,
        alloc_t_host.Carry(slot, balance0.copy(), theta, 0.05) if carry else None,
    )  # fmt: skip
    np.testing.assert_array_equal(host_used + host_dropped, uncapped)
