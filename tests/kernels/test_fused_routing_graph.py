"""The fused routing op traced once and replayed with other buffer contents, as a CUDA graph replays it.

On CPU the fused path (`device_budget.fused_layer_routing`, one `vllm_alloc::budget_routing` node through
its fake implementation) is traced with fake tensors (`make_fx`) and replayed under `NoHostReads`, which
refuses any host read of a tensor value, the kernel's launcher included. Every pass changes budgets, groups,
padding rows, carried slots, θ and the cap's shares; each replay must equal the torch path bit for bit on
the same pass (kept pairs, `used`, `dropped`, `distinct`, the balance; the alignment equals `align_pairs`).
On CUDA the same is captured in a `torch.cuda.CUDAGraph`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from vllm_alloc.kernels import align_pairs

from tests.kernels.moe_cases import ON_CUDA
from tests.kernels.test_budget_graph import NoHostReads
from tests.kernels.test_fused_routing import ALIGNED, NAMES, Case, make_case, run
from vllm_alloc.routing.device_budget import Cap, Carry, fused_layer_routing

T, K, E, K_BASE, BLOCK_M = 12, 6, 64, 1, 16
BUFFERS = ("keys", "weights", "ids", "table", "token_budget", "token_group", "token_slot", "theta")
BUFFERS += ("token_cap", "cap_table")
COUNTERS = ("used", "dropped", "distinct", "balance")
# (seed, real rows): the first pass is traced; the others vary everything, padding included.
PASSES = [(0, T), (1, 7), (2, 1), (3, 0), (4, T), (5, 10)]

Replay = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]


def routing(b: dict[str, torch.Tensor], carry: str | None, cap: str | None, weights: str):
    """fused_layer_routing of the buffers `b` (counters included): kept weights, ids, then the alignment."""
    on = cap == "cap"
    w, ids, aligned = fused_layer_routing(
        b["keys"], b["weights"], b["ids"], table=b["table"], token_budget=b["token_budget"],
        token_group=b["token_group"], used=b["used"], column=1, k_base=K_BASE, weights=weights,
        carry=Carry(b["token_slot"], b["balance"], b["theta"], 0.05, carry == "request") if carry else None,
        cap=Cap(b["token_cap"], b["cap_table"], E, b["dropped"], b["distinct"], on) if cap else None,
        num_experts=E, block_m=BLOCK_M,
    )  # fmt: skip
    assert aligned is not None
    return (w, ids, *aligned[:4])


def case(seed: int, n_real: int, carry: str | None, cap: str | None, weights: str) -> Case:
    return make_case(T, K, E, K_BASE, seed, n_real=n_real, carry=carry, cap=cap, weights_mode=weights)


def buffers(c: Case) -> dict[str, torch.Tensor]:
    return {**{n: getattr(c, n).clone() for n in BUFFERS}, **c.counters()}


def check(replay: Replay, carry: str | None, cap: str | None, weights: str) -> None:
    for seed, n_real in PASSES:
        c = case(seed, n_real, carry, cap, weights)
        b = buffers(c)
        w, ids, *aligned = replay(b)
        got = (w, ids, *(b[n] for n in COUNTERS), *aligned)
        want = run(c, fused=False)
        want += tuple(align_pairs(want[1], E, BLOCK_M)[:4])
        for name, g, exp in zip(NAMES + ALIGNED, got, want, strict=True):
            assert torch.equal(g, exp), f"pass {seed}: {name} differs from the torch path"


MODES = [(None, None, "topk"), ("layer", None, "topk"), (None, "cap", "topk"), ("request", "cap", "kept")]
MODES += [("layer", "count", "topk")]


@pytest.mark.parametrize(("carry", "cap", "weights"), MODES)
def test_traced_fused_routing_replays_eager_results(carry, cap, weights):
    names = sorted(buffers(case(*PASSES[0], carry, cap, weights)))

    def flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return routing(dict(zip(names, tensors, strict=True)), carry, cap, weights)

    first = buffers(case(*PASSES[0], carry, cap, weights))
    graph = make_fx(flat, tracing_mode="fake")(*(first[n] for n in names))
    ops = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.vllm_alloc.budget_routing.default in ops

    def replay(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with NoHostReads():
            return graph(*(b[n] for n in names))

    check(replay, carry, cap, weights)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("carry", "cap", "weights"), MODES)
def test_cuda_graph_replays_fused_routing(carry, cap, weights):
    static = buffers(case(*PASSES[0], carry, cap, weights))
    warm = {n: t.clone() for n, t in static.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # Triton compiles outside the capture
        routing(warm, carry, cap, weights)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = routing(static, carry, cap, weights)

    def replay(b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for n, t in b.items():
            static[n].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        for n in COUNTERS:
            b[n].copy_(static[n])
        return tuple(t.clone() for t in out)

    check(replay, carry, cap, weights)
