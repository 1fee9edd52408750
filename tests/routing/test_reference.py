"""The oracle against an independent dense computation: every expert on every token, then masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vllm_alloc.routing.reference import count_pairs, distinct_experts, moe_forward


def _weights(E: int, H: int, I: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5


def _dense(x, w13, w2, topk_weights, topk_ids, activation="silu"):
    """All E experts on all T tokens at once (no loops), then a [T, E] combine matrix built by scatter."""
    E, I = w13.shape[0], w13.shape[1] // 2
    h = torch.einsum("th,eih->tei", x.double(), w13.double())  # [T, E, 2I]
    gate, up = h[..., :I], h[..., I:]
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}[activation]
    out = torch.einsum("tei,ehi->teh", act(gate) * up, w2.double())  # [T, E, H]
    keep = topk_ids != -1
    combine = torch.zeros(x.shape[0], E + 1, dtype=torch.float64)  # column E collects the pruned slots
    combine.scatter_add_(1, torch.where(keep, topk_ids, E).long(), topk_weights.double() * keep)
    return torch.einsum("te,teh->th", combine[:, :E], out)


def _routing(T: int, K: int, E: int, seed: int = 0, prune: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    w = torch.rand(T, K, generator=g)
    ids[torch.rand(T, K, generator=g) < prune] = -1
    return w, ids


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize(
    "T, K, E, prune",
    [
        (1, 1, 1, 0.0),  # T = 1, a single expert
        (9, 4, 7, 0.0),  # prime E, no pruning
        (9, 4, 7, 0.5),  # random pruning
        (5, 6, 6, 0.3),  # K = E
    ],
)
def test_matches_dense(T, K, E, prune, activation):
    H, I = 16, 12
    w13, w2 = _weights(E, H, I)
    x = torch.randn(T, H)
    w, ids = _routing(T, K, E, prune=prune)
    y = moe_forward(x, w13, w2, w, ids, activation=activation)
    assert y.dtype == torch.float32 and y.shape == (T, H)
    torch.testing.assert_close(y.double(), _dense(x, w13, w2, w, ids, activation), rtol=1e-5, atol=1e-5)


def test_pruned_pairs_contribute_nothing():
    T, K, E, H, I = 6, 4, 8, 16, 8
    w13, w2 = _weights(E, H, I)
    x = torch.randn(T, H)
    w, ids = _routing(T, K, E, prune=0.5)
    # Whatever weight and whatever pruned slot: the output depends only on the kept pairs.
    w_junk = torch.where(ids == -1, torch.full_like(w, 1e6), w)
    torch.testing.assert_close(moe_forward(x, w13, w2, w_junk, ids), moe_forward(x, w13, w2, w, ids))
    # Dropping the pruned columns altogether is the same computation.
    t = 0
    kept = ids[t] != -1
    torch.testing.assert_close(
        moe_forward(x[t : t + 1], w13, w2, w[t : t + 1, kept], ids[t : t + 1, kept]),
        moe_forward(x, w13, w2, w, ids)[t : t + 1],
    )


def test_all_pruned_token_is_zero_plus_shared():
    T, K, E, H, I, Is = 3, 2, 4, 16, 8, 6
    w13, w2 = _weights(E, H, I)
    g = torch.Generator().manual_seed(1)
    sw13, sw2 = torch.randn(2 * Is, H, generator=g), torch.randn(H, Is, generator=g)
    x = torch.randn(T, H)
    w, ids = _routing(T, K, E)
    ids[1] = -1
    y = moe_forward(x, w13, w2, w, ids)
    assert torch.equal(y[1], torch.zeros(H))
    assert (y[0] != 0).any()
    shared = F.silu(x @ sw13[:Is].T) * (x @ sw13[Is:].T) @ sw2.T
    y_s = moe_forward(x, w13, w2, w, ids, shared_w13=sw13, shared_w2=sw2)
    torch.testing.assert_close(y_s[1], shared[1])
    torch.testing.assert_close(y_s, y + shared)


def test_all_pruned_everywhere_is_zero():
    w13, w2 = _weights(4, 16, 8)
    ids = torch.full((5, 3), -1, dtype=torch.int32)
    y = moe_forward(torch.randn(5, 16), w13, w2, torch.rand(5, 3), ids)
    assert torch.equal(y, torch.zeros(5, 16))


def test_routed_scaling_factor_scales_routed_part_only():
    T, K, E, H, I, Is = 4, 2, 5, 16, 8, 4
    w13, w2 = _weights(E, H, I)
    sw13, sw2 = torch.randn(2 * Is, H), torch.randn(H, Is)
    x = torch.randn(T, H)
    w, ids = _routing(T, K, E)
    base = moe_forward(x, w13, w2, w, ids)
    torch.testing.assert_close(moe_forward(x, w13, w2, w, ids, routed_scaling_factor=2.5), 2.5 * base)
    shared = moe_forward(x, w13, w2, w, ids, shared_w13=sw13, shared_w2=sw2) - base
    scaled = moe_forward(x, w13, w2, w, ids, routed_scaling_factor=2.5, shared_w13=sw13, shared_w2=sw2)
    torch.testing.assert_close(scaled, 2.5 * base + shared)


def test_low_precision_inputs_compute_in_fp32():
    T, K, E, H, I = 4, 2, 4, 16, 8
    w13, w2 = _weights(E, H, I)
    x = torch.randn(T, H)
    w, ids = _routing(T, K, E)
    args = (x.half(), w13.half(), w2.half(), w.half(), ids.long())
    y = moe_forward(*args)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, moe_forward(*(a.float() if a.is_floating_point() else a for a in args)))


def test_helpers():
    ids = torch.tensor([[0, 3, -1], [3, -1, -1], [-1, -1, -1]])
    assert count_pairs(ids) == 3
    assert distinct_experts(ids) == 2
    assert count_pairs(torch.full((2, 2), -1)) == 0
    assert distinct_experts(torch.full((2, 2), -1)) == 0


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(x=torch.randn(2, 3, 16)), r"x must be \[T, H\]"),
        (dict(w13=torch.randn(4, 16, 15)), r"w13 must be \[E, 2I, H\] with H=16"),
        (dict(w13=torch.randn(4, 15, 16)), r"w13 must be \[E, 2I, H\]"),
        (dict(w2=torch.randn(4, 16, 7)), r"w2 must be \[E, H, I\] = \(4, 16, 8\)"),
        (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int32)), r"topk_ids must be \[T, K\] with T=2"),
        (dict(topk_weights=torch.rand(2, 3)), r"topk_weights shape \(2, 3\) must equal"),
        (dict(topk_ids=torch.tensor([[0, 4], [1, 2]])), r"contains 4; expert ids must lie in \[-1, 4\)"),
        (dict(topk_ids=torch.tensor([[0, -2], [1, 2]])), r"contains -2; expert ids must lie in \[-1, 4\)"),
        (dict(topk_ids=torch.zeros(2, 2)), r"topk_ids must be an integer tensor"),
        (dict(activation="relu"), r"activation='relu' is not supported"),
        (dict(shared_w13=torch.randn(8, 16)), r"must be given together"),
        (dict(shared_w13=torch.randn(8, 16), shared_w2=torch.randn(16, 5)), r"shared_w2 must be \[H, Is\]"),
    ],
)
def test_errors_name_value_and_range(change, match):
    E, H, I = 4, 16, 8
    w13, w2 = _weights(E, H, I)
    ids = torch.tensor([[0, 1], [2, 3]])
    args = dict(x=torch.randn(2, H), w13=w13, w2=w2, topk_weights=torch.rand(2, 2), topk_ids=ids)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        moe_forward(**args)
