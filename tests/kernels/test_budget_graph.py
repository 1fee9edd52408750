"""The device budget path (Alloc-T from persistent buffers + the budget-aware kernel) traced once and
replayed with other buffer contents: what a CUDA graph does to it.

On CPU the region is traced with fake tensors (`make_fx`, tracing_mode="fake"): a host sync or a Python
branch on tensor data cannot be traced there, and the replay runs under a mode that refuses any host read
of a tensor value, which covers the kernel wrappers behind the opaque op too. On CUDA the same region is
captured in a `torch.cuda.CUDAGraph` (capture refuses host syncs) and replayed. Either way a replay must
equal the eager run bit for bit, outputs and activation counts, for every budget, group, allocation row
and padding count; and both must equal the fp32 oracle within the dtype's tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode
from vllm_alloc.kernels import fused_moe

from tests.kernels.moe_cases import DEVICE, ON_CUDA, SMALL_CONFIG, TOLERANCES
from vllm_alloc.routing.alloc_t import reallocate
from vllm_alloc.routing.device_budget import conditional_nodes_available, layer_routing
from vllm_alloc.routing.reference import moe_forward

# Graph size T_PAD; L MoE layers; A = L·K. I = 64 is 2 steps of SMALL_CONFIG's BLOCK_K, so the down kernel
# splits I (a decode T_PAD): S, read on the device from the used blocks, changes between replays of a trace.
T_PAD, K, E, H, I, L = 8, 4, 8, 64, 64, 3
A = L * K
K_BASE = 1
COLUMN = 1
BUFFERS = ("table", "token_budget", "token_group", "used")

Inputs = dict[str, torch.Tensor]


def allocation_table(gen: torch.Generator) -> torch.Tensor:
    """[A + 1, L] int32: row B a random K vector with entries in [K_BASE, K] summing to at most B."""
    table = torch.zeros(A + 1, L, dtype=torch.int32)
    for B in range(L * K_BASE, A + 1):
        row = torch.full((L,), K_BASE, dtype=torch.int32)
        for _ in range(B - L * K_BASE):
            open_ = (row < K).nonzero().flatten()
            if open_.numel() == 0:
                break
            row[open_[torch.randint(open_.numel(), (1,), generator=gen)]] += 1
        table[B] = row
    return table


def pass_contents(seed: int, n_real: int, dtype: torch.dtype, *, all_full: bool = False) -> Inputs:
    """One pass: routing of T_PAD rows, and the buffers the runner hook writes for it (rows >= n_real are
    graph padding: budget 0). Budgets, groups and the allocation table all vary with the seed."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T_PAD, E, generator=gen)
    weights, ids = logits.softmax(dim=-1).topk(K, dim=-1)
    budgets = (
        torch.full((T_PAD,), A) if all_full else torch.randint(L * K_BASE, A + 1, (T_PAD,), generator=gen)
    )
    budgets[n_real:] = 0
    group = torch.randint(0, max(n_real, 1), (T_PAD,), generator=gen)
    group[n_real:] = 0
    tensors = {
        "x": torch.randn(T_PAD, H, generator=gen).to(dtype),
        "keys": weights.clone(),
        "weights": weights,
        "ids": ids.int(),
        "table": allocation_table(gen),
        "token_budget": budgets.long(),
        "token_group": group.long(),
        "used": torch.zeros(L, A + 1, dtype=torch.float64),
    }
    return {name: t.to(DEVICE) for name, t in tensors.items()}


def expert_weights(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(dtype).to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).to(dtype).to(DEVICE)
    return w13, w2


def routing(inputs: Inputs, used: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_routing` of the pass in `inputs`, counting into `used`."""
    return layer_routing(
        inputs["keys"],
        inputs["weights"],
        inputs["ids"],
        table=inputs["table"],
        token_budget=inputs["token_budget"],
        token_group=inputs["token_group"],
        used=used,
        column=COLUMN,
        k_base=K_BASE,
    )


def budget_layer(
    inputs: Inputs, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The device-side budget path of one MoE layer: routing from the buffers, then the expert kernel
    (writing into `out` where given, as into the stock body's output under conditional nodes)."""
    weights, ids = routing(inputs, inputs["used"])
    return fused_moe(inputs["x"], w13, w2, ids, weights, config=SMALL_CONFIG, out=out)


def budget_layer_into(inputs: Inputs, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`budget_layer` writing into a tensor made in the region (the mutating `fused_moe_out` op)."""
    return budget_layer(inputs, w13, w2, out=torch.full_like(inputs["x"], float("nan")))


class NoHostReads(TorchDispatchMode):
    """Refuses every op that reads a tensor value on the host (`.item()`, `bool(t)`, `int(t)`, `.tolist()`
    of a computed value): what a CUDA graph replay cannot reproduce."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            raise RuntimeError(f"host read of a tensor value inside the graph region: {func}")
        return func(*args, **(kwargs or {}))


def traced(fn: Callable[[Inputs, torch.Tensor, torch.Tensor], torch.Tensor], inputs: Inputs, w13, w2):
    """fn traced once on fake tensors of `inputs`' shapes; returns replay(inputs) -> output."""
    names = sorted(inputs)

    def flat(*tensors: torch.Tensor) -> torch.Tensor:
        return fn(dict(zip(names, tensors[:-2], strict=True)), tensors[-2], tensors[-1])

    graph = make_fx(flat, tracing_mode="fake")(*(inputs[n] for n in names), w13, w2)

    def replay(new: Inputs) -> torch.Tensor:
        with NoHostReads():
            return graph(*(new[n] for n in names), w13, w2)

    return replay


def oracle(inputs: Inputs, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 oracle output of the pass, and the counts Alloc-T must leave in `used`."""
    T = T_PAD
    budget = inputs["token_budget"][:T].cpu()
    k_tok = inputs["table"].cpu()[budget, COLUMN]
    w, ids, kept = reallocate(
        inputs["keys"].cpu(), inputs["weights"].cpu(), inputs["ids"].cpu(), k_tok, inputs["token_group"].cpu()
    )
    used = torch.zeros(L, A + 1, dtype=torch.float64)
    used[COLUMN].index_add_(0, budget, kept.sum(dim=1).double())
    return moe_forward(inputs["x"].cpu(), w13.cpu(), w2.cpu(), w, ids), used


# Passes replayed on one trace: (seed, real rows). The first pass (traced) has every row real; the others
# change budgets, groups, allocation rows and the padding count; the last is all at b = 1.0.
PASSES = [(0, T_PAD), (1, 5), (2, 1), (3, 0), (4, T_PAD), (5, 3)]


def check_replays(replay: Callable[[Inputs], torch.Tensor], dtype: torch.dtype, w13, w2) -> None:
    rtol, atol = TOLERANCES[dtype]
    for seed, n_real in [*PASSES, (6, T_PAD)]:
        inputs = pass_contents(seed, n_real, dtype, all_full=seed == 6)
        fresh = {n: t.clone() for n, t in inputs.items()}
        out = replay(inputs)
        eager = budget_layer(fresh, w13, w2)
        assert torch.equal(out, eager), f"pass {seed}: replay differs from the eager run"
        assert torch.equal(inputs["used"], fresh["used"]), f"pass {seed}: counts differ from the eager run"
        ref, used = oracle(inputs, w13, w2)
        torch.testing.assert_close(out.float().cpu(), ref, rtol=rtol, atol=atol, msg=f"pass {seed}")
        assert torch.equal(inputs["used"].cpu(), used), (
            f"pass {seed}: counts differ from Alloc-T's kept pairs"
        )
        assert n_real == 0 or out[:n_real].abs().amax(dim=1).min() > 0, "every real row runs experts"
        if n_real < T_PAD:
            assert (out[n_real:] == 0).all(), "padding rows must run no expert"
        if seed == 6:  # all at b = 1.0: the stock routing reaches the kernel unchanged
            weights, ids = routing(inputs, torch.zeros_like(inputs["used"]))
            assert torch.equal(weights, inputs["weights"]) and torch.equal(ids, inputs["ids"])
            assert weights.dtype == inputs["weights"].dtype and ids.dtype == inputs["ids"].dtype


@pytest.mark.parametrize("body", [budget_layer, budget_layer_into], ids=["new_y", "into_out"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_traced_budget_path_replays_eager_results(dtype, body):
    w13, w2 = expert_weights(dtype)
    replay = traced(body, pass_contents(0, T_PAD, dtype), w13, w2)
    check_replays(replay, dtype, w13, w2)


def _with_host_sync(inputs: Inputs, w13, w2) -> torch.Tensor:
    if int(inputs["token_budget"].max()) == A:  # a Python branch on per-pass data
        return torch.zeros_like(inputs["x"])
    return budget_layer(inputs, w13, w2)


def _with_data_dependent_shape(inputs: Inputs, w13, w2) -> torch.Tensor:
    real = inputs["token_budget"].nonzero().flatten()  # pruned rows as a shape, not as data
    y = torch.zeros_like(inputs["x"])
    return y.index_copy(0, real, budget_layer(inputs, w13, w2).index_select(0, real))


@pytest.mark.parametrize("bad", [_with_host_sync, _with_data_dependent_shape])
def test_trace_refuses_per_pass_host_data(bad):
    """Negative control: a region that reads per-pass data on the host is refused, by the trace or (for
    ops fake tensors can trace, such as nonzero) by the replay."""
    w13, w2 = expert_weights(torch.float32)
    with pytest.raises(Exception, match=r"(?i)data.dependent|host read|item|scalar"):
        traced(bad, pass_contents(0, T_PAD, torch.float32), w13, w2)(pass_contents(1, 5, torch.float32))


def test_no_host_reads_catches_a_sync_behind_the_op():
    """Negative control of the replay mode: a sync that tracing cannot see (behind an opaque op)."""
    inputs = pass_contents(1, 5, torch.float32)
    with NoHostReads(), pytest.raises(RuntimeError, match="host read"):
        bool(inputs["token_budget"].sum() > 0)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replays_budget_path(dtype):
    """torch.cuda.CUDAGraph capture of the budget path at T_PAD, replayed with other buffer contents."""
    w13, w2 = expert_weights(dtype)
    static = pass_contents(0, T_PAD, dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the capture
        budget_layer({n: t.clone() for n, t in static.items()}, w13, w2)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = budget_layer(static, w13, w2)

    def replay(new: Inputs) -> torch.Tensor:
        for n, t in new.items():
            static[n].copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        new["used"].copy_(static["used"])
        return static_out.clone()

    check_replays(replay, dtype, w13, w2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_cuda_graph_capture_refuses_host_sync():
    """Negative control on CUDA: capturing a region with a host sync fails."""
    w13, w2 = expert_weights(torch.float16)
    static = pass_contents(0, T_PAD, torch.float16)
    _with_host_sync({n: t.clone() for n, t in static.items()}, w13, w2)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError), torch.cuda.graph(graph):
        _with_host_sync(static, w13, w2)


def stock_twin(inputs: Inputs, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """A stand-in for vLLM's stock expert call (absent on the GPU test machine): the same function as the
    kernel on the unpruned routing, computed by torch, so its bits differ from the kernel's and a test can
    tell which body a replay ran."""
    x, ids, weights = inputs["x"], inputs["ids"].long(), inputs["weights"]
    gate_up = torch.einsum("th,tkih->tki", x.float(), w13[ids].float())
    act = torch.nn.functional.silu(gate_up[..., :I]) * gate_up[..., I:]
    down = torch.einsum("tki,tkhi->tkh", act, w2[ids].float())
    return (down * weights[..., None]).sum(dim=1).to(x.dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.skipif(
    not conditional_nodes_available(),
    reason=f"torch {torch.__version__} lacks CUDA-graph conditional nodes (vLLM 0.32's torch 2.13 has them)",
)
@pytest.mark.parametrize("into_stock", [False, True], ids=["copy", "into_stock"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_conditional_runs_stock_or_budget(dtype, into_stock):
    """One graph, two bodies (device_budget.stock_or_budget): a replay with the flag set runs the stock
    call on the stock routing and counts nothing; with it clear, the budget path and its counts (written
    straight into the stock body's output with into_stock, as `integration.cuda` does)."""
    from vllm_alloc.routing.device_budget import stock_or_budget

    w13, w2 = expert_weights(dtype)
    static = pass_contents(0, T_PAD, dtype)
    flag = torch.ones((), dtype=torch.bool, device=DEVICE)
    for fn in (stock_twin, budget_layer):  # warm-up (Triton compiles) outside the capture
        fn({n: t.clone() for n, t in static.items()}, w13, w2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = stock_or_budget(
            flag,
            lambda: stock_twin(static, w13, w2),
            functools.partial(budget_layer, static, w13, w2),  # given the stock output with into_stock
            graph,
            into_stock=into_stock,
        )
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        stock_or_budget(flag, lambda: static["x"], lambda: static["x"])
    for seed, n_real in PASSES:
        for full in (True, False):
            inputs = pass_contents(seed, n_real, dtype, all_full=full)
            for n, t in inputs.items():
                static[n].copy_(t)
            flag.fill_(full)
            graph.replay()
            torch.cuda.synchronize()
            expected = (stock_twin if full else budget_layer)(inputs, w13, w2)
            assert torch.equal(static_out, expected), f"pass {seed}, full={full}: wrong body or wrong result"
            assert torch.equal(static["used"], inputs["used"]), f"pass {seed}, full={full}: counts"
            assert full or static["used"].sum() == inputs["used"].sum() > 0 or n_real == 0
