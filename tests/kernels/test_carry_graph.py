"""The carried balance on the device path (`device_budget.layer_routing(carry=...)`) recorded once and
replayed over decode steps: the balance buffer persists between replays, as it does between CUDA-graph
replays of a decode pass.

On CPU the routing is traced with fake tensors (`make_fx`) and replayed under a mode that refuses host
reads; on CUDA it is captured in a `torch.cuda.CUDAGraph`. Either way every step's kept pairs, the
balances and the activation counts must equal eager calls bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from tests.kernels.moe_cases import DEVICE, ON_CUDA
from tests.kernels.test_budget_graph import NoHostReads, allocation_table
from vllm_alloc.routing.device_budget import Carry, layer_routing

T_PAD, K, E, L = 8, 4, 8, 3
A = L * K
COLUMN, ALPHA, STEPS = 1, 0.05, 6
N_REAL = 6  # rows 6-7 are graph padding (B = 0)


def step_inputs(step: int) -> dict[str, torch.Tensor]:
    """One decode step of N_REAL lone requests: fresh router scores each step, fixed budgets and slots."""
    gen = torch.Generator().manual_seed(100 + step)
    weights, ids = torch.randn(T_PAD, E, generator=gen).softmax(dim=-1).topk(K, dim=-1)
    return {"keys": weights.to(DEVICE), "ids": ids.int().to(DEVICE)}


def static_buffers() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    budget = torch.randint(L, A, (T_PAD,), generator=gen)
    budget[N_REAL:] = 0
    slot = torch.arange(1, T_PAD + 1)
    slot[N_REAL - 1 :] = 0  # the last real row does not carry (another request's prefill, say)
    buffers = {
        "table": allocation_table(gen),
        "token_budget": budget.long(),
        "token_group": torch.arange(T_PAD),
        "token_slot": slot.long(),
        "balance": torch.zeros(T_PAD + 1, L, dtype=torch.int64),
        "theta": torch.rand(A + 1, L, generator=gen, dtype=torch.float64) * 0.4,
        "used": torch.zeros(L, A + 1, dtype=torch.float64),
    }
    return {n: t.to(DEVICE) for n, t in buffers.items()}


def routing(keys: torch.Tensor, ids: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
    _, kept_ids = layer_routing(
        keys, keys, ids, table=b["table"], token_budget=b["token_budget"], token_group=b["token_group"],
        used=b["used"], column=COLUMN, k_base=1,
        carry=Carry(b["token_slot"], b["balance"], b["theta"], ALPHA),
    )  # fmt: skip
    return kept_ids


def eager_steps() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    b = static_buffers()
    out = []
    for s in range(STEPS):
        x = step_inputs(s)
        out.append((routing(x["keys"], x["ids"], b).clone(), b["balance"].clone(), b["used"].clone()))
    return out


def check(replay_steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    want = eager_steps()
    changed = False
    for s, ((ids, bal, used), (w_ids, w_bal, w_used)) in enumerate(zip(replay_steps, want, strict=True)):
        assert torch.equal(ids, w_ids) and torch.equal(bal, w_bal) and torch.equal(used, w_used), s
        changed |= bool((bal[1:] != 0).any())
    assert changed, "some request banked or spent over the steps"
    assert (want[-1][1] >= 0).all(), "nothing is borrowed (every K_l >= K_base here)"


def test_traced_carry_replays_eager_steps() -> None:
    b = static_buffers()
    names = sorted(b)

    def flat(keys: torch.Tensor, ids: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return routing(keys, ids, dict(zip(names, tensors, strict=True)))

    x0 = step_inputs(0)
    graph = make_fx(flat, tracing_mode="fake")(x0["keys"], x0["ids"], *(b[n] for n in names))
    steps = []
    for s in range(STEPS):
        x = step_inputs(s)
        with NoHostReads():
            ids = graph(x["keys"], x["ids"], *(b[n] for n in names))
        steps.append((ids.clone(), b["balance"].clone(), b["used"].clone()))
    check(steps)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_cuda_graph_carry_replays_eager_steps() -> None:
    b = static_buffers()
    x = step_inputs(0)
    warm = {n: t.clone() for n, t in b.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        routing(x["keys"].clone(), x["ids"].clone(), warm)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_ids = routing(x["keys"], x["ids"], b)
    steps = []
    for s in range(STEPS):
        new = step_inputs(s)
        x["keys"].copy_(new["keys"])
        x["ids"].copy_(new["ids"])
        graph.replay()
        torch.cuda.synchronize()
        steps.append((static_ids.clone(), b["balance"].clone(), b["used"].clone()))
    check(steps)
