"""bench_graph.py's routing rows, run eagerly on CPU (the Triton interpreter): the graphs are timed on a GPU
only (`make gpu-check`), but what they replay, each configuration by both paths, is checked here."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_graph
from bench_kernel import LayerShape

T, E, K = 4, 16, 4
SHAPE = LayerShape("tiny", H=32, I=16, E=E, K=K)


def decode_pass() -> bench_graph.Pass:
    L, A = bench_graph.LAYERS, bench_graph.LAYERS * K
    gen = torch.Generator().manual_seed(0)
    weights, ids = torch.randn(L, T, E, generator=gen).softmax(dim=-1).topk(K, dim=-1)
    table = torch.tensor([[0 if B < L else min(K, math.ceil(B / L))] * L for B in range(A + 1)])
    return bench_graph.Pass(
        x=torch.zeros(T, SHAPE.H),
        weights=weights,
        ids=ids.int(),
        table=table.int(),
        token_budget=torch.full((T,), A // 2),
        token_group=torch.zeros(T, dtype=torch.int64),
        used=torch.zeros(L, A + 1, dtype=torch.float64),
    )


@pytest.mark.parametrize("config", bench_graph.ROUTING_CONFIGS)
def test_routing_rows_replay_the_same_rule_by_both_paths(config: str) -> None:
    p = decode_pass()
    torch_ids = bench_graph.routing_variant(p, E, config, fused=False)()
    fused_ids = bench_graph.routing_variant(p, E, config, fused=True)()
    assert torch.equal(torch_ids, fused_ids)
    kept = (torch_ids >= 0).sum(dim=-1)
    assert kept.sum() < T * K * bench_graph.LAYERS  # b = 0.5 prunes: the rows time a real budget pass
