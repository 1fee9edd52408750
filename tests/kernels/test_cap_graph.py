"""The batch-level distinct-expert cap on the device path (`device_budget.layer_routing(cap=...)`) recorded
once and replayed with other buffer contents: budgets, groups, cap groups and the cap's share table all
change between passes, and the counters (activations, dropped pairs, the distinct-expert histogram) persist
between replays, as they do between CUDA-graph replays of a forward pass.

On CPU the routing is traced with fake tensors (`make_fx`) and replayed under a mode that refuses host
reads; on CUDA it is captured in a `torch.cuda.CUDAGraph`. Either way every pass's kept pairs and the three
counters must equal eager calls bit for bit. The cap must also bite (some pass keeps other pairs and fewer
distinct experts than without it, and drops pairs), and a pass with no capped token must route exactly as
the uncapped path does.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from tests.kernels.moe_cases import DEVICE, ON_CUDA
from tests.kernels.test_budget_graph import NoHostReads, allocation_table
from vllm_alloc.routing.cap import SCALE
from vllm_alloc.routing.device_budget import Cap, layer_routing

T_PAD, K, E, L = 8, 4, 8, 3
A = L * K
K_BASE, COLUMN = 1, 1
COUNTERS = ("used", "dropped", "distinct")
SHARES = torch.tensor([1, 250, 500, 750])  # ρ in thousandths (SCALE, no cap: b = 1.0 and mode "no_share")

# Passes replayed on one trace: (seed, real rows, mode); rows >= real rows are graph padding (B = 0, not
# capped). mode "cap": decode tokens below b = 1.0 capped by their budget's share; "no_token": no token is
# capped (token_cap all 0); "no_share": tokens are in cap groups but every share is SCALE.
PASSES = [
    (0, T_PAD, "cap"),
    (1, 5, "cap"),
    (2, T_PAD, "no_token"),
    (3, 2, "cap"),
    (4, 0, "cap"),
    (5, 7, "no_share"),
    (6, T_PAD, "cap"),
    (7, 6, "cap"),
]

Inputs = dict[str, torch.Tensor]
Snapshot = tuple[torch.Tensor, ...]  # kept weights, kept ids, then COUNTERS


def pass_contents(seed: int, n_real: int, mode: str) -> Inputs:
    """One pass: router scores of T_PAD rows and the buffers the runner hook writes for it. Budgets take
    b = 1.0 and two values below it; groups are per budget (named by their first token), and so are cap
    groups (+ 1), which hold several tokens each."""
    gen = torch.Generator().manual_seed(seed)
    skew = torch.rand(E, generator=gen) ** 3  # popular experts, as trained routers have: groups overlap
    weights, ids = (torch.randn(T_PAD, E, generator=gen) + 2 * skew).softmax(dim=-1).topk(K, dim=-1)
    choices = torch.cat([torch.randint(L * K_BASE, A, (2,), generator=gen), torch.tensor([A])])
    budget = choices[torch.multinomial(torch.tensor([0.45, 0.45, 0.1]), T_PAD, True, generator=gen)]
    budget[n_real:] = 0
    first = (budget[:, None] == budget[None, :]).long().argmax(dim=1)
    group = torch.where(budget > 0, first, 0)
    capped = (budget > 0) & (budget < A) & (torch.rand(T_PAD, generator=gen) < 0.9)
    token_cap = torch.where(capped & (mode != "no_token"), group + 1, 0)
    cap_table = SHARES[torch.randint(len(SHARES), (A + 1, L), generator=gen)]
    cap_table[A] = SCALE
    if mode == "no_share":
        cap_table.fill_(SCALE)
    tensors = {
        "keys": weights.clone(),
        "weights": weights,
        "ids": ids.int(),
        "table": allocation_table(gen),
        "token_budget": budget.long(),
        "token_group": group.long(),
        "token_cap": token_cap.long(),
        "cap_table": cap_table.long(),
    }
    return {n: t.to(DEVICE) for n, t in tensors.items()}


def counters() -> Inputs:
    """used and dropped [L, A + 1], distinct [L, E + 1], float64 as the plugin's `Plan` holds them."""
    shapes = {"used": (L, A + 1), "dropped": (L, A + 1), "distinct": (L, E + 1)}
    return {n: torch.zeros(shapes[n], dtype=torch.float64, device=DEVICE) for n in COUNTERS}


def routing(x: Inputs, c: Inputs, *, on: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_routing` of the pass in `x` with the cap (or, on=False, its count only), counting into `c`."""
    return layer_routing(
        x["keys"], x["weights"], x["ids"], table=x["table"], token_budget=x["token_budget"],
        token_group=x["token_group"], used=c["used"], column=COLUMN, k_base=K_BASE,
        cap=Cap(x["token_cap"], x["cap_table"], E, c["dropped"], c["distinct"], on),
    )  # fmt: skip


def snapshot(weights: torch.Tensor, ids: torch.Tensor, c: Inputs) -> Snapshot:
    return (weights.clone(), ids.clone(), *(c[n].clone() for n in COUNTERS))


def touched(ids: torch.Tensor) -> int:
    """The distinct experts the kept pairs of a pass are on."""
    return int(ids[ids >= 0].unique().numel())


def eager_passes(*, on: bool = True) -> list[Snapshot]:
    c = counters()
    out = []
    for seed, n_real, mode in PASSES:
        weights, ids = routing(pass_contents(seed, n_real, mode), c, on=on)
        out.append(snapshot(weights, ids, c))
    return out


def check(replayed: list[Snapshot]) -> None:
    want, uncapped = eager_passes(), eager_passes(on=False)
    names = ("weights", "ids", *COUNTERS)
    changed = fewer = False
    for (seed, _, mode), got, exp, free in zip(PASSES, replayed, want, uncapped, strict=True):
        for name, g, w in zip(names, got, exp, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w), f"pass {seed}: {name} differs from the eager run"
        if mode == "cap":
            changed |= not torch.equal(exp[1], free[1])
            fewer |= touched(exp[1]) < touched(free[1])
        else:  # no token capped: the uncapped routing, bit for bit
            assert torch.equal(exp[0], free[0]) and torch.equal(exp[1], free[1]), f"pass {seed}"
        assert touched(exp[1]) <= touched(free[1]), f"pass {seed}: the cap added distinct experts"
    assert changed and fewer, "some pass's cap cut pairs and distinct experts"
    _, _, used, dropped, distinct = want[-1]
    _, _, free_used, free_dropped, free_distinct = uncapped[-1]
    assert dropped.sum() > 0 and free_dropped.sum() == 0, "the cap dropped some pairs"
    assert torch.equal(used + dropped, free_used), "kept + dropped = what Alloc-T kept before the cap"
    assert distinct.sum() == free_distinct.sum() == sum(n > 0 for _, n, _ in PASSES), "one count per call"
    per_call = torch.arange(E + 1, dtype=torch.float64, device=DEVICE)
    assert (distinct[COLUMN] * per_call).sum() < (free_distinct[COLUMN] * per_call).sum()


def test_traced_cap_replays_eager_passes() -> None:
    x0 = pass_contents(*PASSES[0])
    names = sorted(x0)
    c = counters()

    def flat(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = dict(zip(names, tensors[: len(names)], strict=True))
        return routing(x, dict(zip(COUNTERS, tensors[len(names) :], strict=True)))

    graph = make_fx(flat, tracing_mode="fake")(*(x0[n] for n in names), *(c[n] for n in COUNTERS))
    replayed = []
    for seed, n_real, mode in PASSES:
        x = pass_contents(seed, n_real, mode)
        with NoHostReads():
            weights, ids = graph(*(x[n] for n in names), *(c[n] for n in COUNTERS))
        replayed.append(snapshot(weights, ids, c))
    check(replayed)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_cuda_graph_cap_replays_eager_passes() -> None:
    static, c = pass_contents(*PASSES[0]), counters()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, on copies: the counters stay at zero
        routing({n: t.clone() for n, t in static.items()}, counters())
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_weights, static_ids = routing(static, c)
    replayed = []
    for seed, n_real, mode in PASSES:
        for n, t in pass_contents(seed, n_real, mode).items():
            static[n].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        replayed.append(snapshot(static_weights, static_ids, c))
    check(replayed)
