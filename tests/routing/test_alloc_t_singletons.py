"""reallocate(singleton_groups=True): the one-token-group closed form equals the general path bit for bit."""

from __future__ import annotations

import pytest
import torch

from vllm_alloc.routing import alloc_t


@pytest.mark.parametrize(
    ("T", "K", "k_base", "seed"),
    [
        (1, 8, 1, 0),  # a lone decode token
        (7, 8, 1, 1),  # several requests, each its own group
        (5, 6, 2, 2),  # K_base > 1: tokens with K_l < K_base keep the floor
        (4, 4, 9, 3),  # K_base above K means K
        (6, 1, 1, 4),  # K = 1: nothing to reallocate
    ],
)
@pytest.mark.parametrize("ties", [False, True])  # equal keys: the stable tie rule must match
def test_singleton_groups_match_reallocate(T: int, K: int, k_base: int, seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(T, K, generator=g)
    if ties:
        keys = (keys * 3).floor()
    weights = torch.rand(T, K, generator=g).bfloat16()
    ids = torch.randperm(64, generator=g)[: T * K].view(T, K).to(torch.int32)
    k_tok = torch.randint(-1, K + 1, (T,), generator=g)  # <= 0: padding rows
    group = torch.arange(T)
    want = alloc_t.reallocate(keys, weights, ids, k_tok, group, k_base=k_base, weights="topk")
    got = alloc_t.reallocate(
        keys, weights, ids, k_tok, group, k_base=k_base, weights="topk", singleton_groups=True
    )
    for w, o in zip(want, got, strict=True):
        assert w.dtype == o.dtype
        assert torch.equal(w, o)


def test_shared_groups_and_kept_weights() -> None:
    keys = torch.tensor([[0.9, 0.1], [0.8, 0.7]])
    weights = keys.clone()
    ids = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    k_tok = torch.tensor([1, 1])
    shared = torch.zeros(2, dtype=torch.int64)  # one group of two tokens
    got = alloc_t.reallocate(keys, weights, ids, k_tok, shared, k_base=1, weights="topk")
    assert got[1].tolist() == [[0, -1], [2, -1]]
    got = alloc_t.reallocate(
        keys, weights, ids, k_tok, torch.arange(2), k_base=1, weights="kept", singleton_groups=True
    )
    want = alloc_t.reallocate(keys, weights, ids, k_tok, torch.arange(2), k_base=1, weights="kept")
    assert all(torch.equal(w, o) for w, o in zip(want, got, strict=True))
