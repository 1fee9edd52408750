"""How many kernels one MoE layer's budget body launches: a count that cannot drift (issue #30).

Under CUDA graphs the budget path is launch-bound (research notes §1: ≈1.7 µs per dependent kernel), so the
number of kernels is the cost. The body (routing from the persistent buffers, then the expert kernel) runs
once on CPU under a dispatch mode that records every torch op that launches a kernel on CUDA (views and
allocations launch none) and, inside the plugin's custom ops, every Triton launch. A torch op is counted
once: on CUDA a few launch two or three kernels (a sort: fill + copy + sort; a cumsum: init + scan), so the
torch path's real counts are somewhat higher than these.

Configurations as in the notes: neither the carried balance nor the cap; carry; cap; carry + cap. The fused
path (`device_budget.fused_layer_routing`, what CUDA runs) must stay within TARGET; the torch path (the
reference, CPU and fallback) within its recorded count, so that neither grows unnoticed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import triton
import triton.runtime.interpreter as interpreter
import triton.runtime.jit as jit
from torch.utils._python_dispatch import TorchDispatchMode
from vllm_alloc.kernels import fused_moe
from vllm_alloc.kernels.align import split_bound
from vllm_alloc.kernels.config import default_split

from tests.kernels.moe_cases import DEVICE, SMALL_CONFIG
from tests.kernels.test_fused_routing import Case, make_case
from vllm_alloc.routing.device_budget import Cap, Carry, branches, fused_layer_routing, torch_layer_routing

T, K, E, H, I = 8, 6, 64, 64, 64  # a decode T: the down kernel may split I's 2 steps (kernels/down.py)
# Ops that launch nothing: allocations, metadata, a reshape that is a view in all but its schema, and the
# 0-dim host tensor a Python scalar becomes (`torch.where(mask, x, 0.0)`).
NO_KERNEL = {
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.scalar_tensor.default,
    torch.ops.aten.empty.memory_format,
    torch.ops.aten.empty_like.default,
    torch.ops.aten.empty_strided.default,
    torch.ops.aten.new_empty.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.lift_fresh.default,
}
CONFIGS = ("plain", "carry", "cap", "carry+cap")
# Per layer at most, the expert kernel included: the fused routing (which also aligns the kept pairs, notes
# §4.3 step 7), gate_up, down, combine (which writes into the layer's output under graphs, so the IF-node
# scaffolding adds no copy: test_conditional_scaffolding_launches; and sums the down kernel's split-K parts,
# so the split adds no launch either). The target is <= 6.
TARGET = {config: 4 for config in CONFIGS}
# The torch path as measured at this commit (torch ops, not CUDA kernels; see the module docstring).
TORCH_PATH = {"plain": 43, "carry": 72, "cap": 142, "carry+cap": 171}


class CountLaunches(TorchDispatchMode):
    """Records each kernel-launching torch op, and for the plugin's custom ops the Triton launches inside."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.namespace == "vllm_alloc":
            launches = self.launches
            runs = (jit.JITFunction.run, interpreter.InterpretedFunction.run)

            def counted(run):  # type: ignore[no-untyped-def]
                def wrapper(fn, *a, **kw):  # type: ignore[no-untyped-def]
                    launches[f"triton:{getattr(fn, '__name__', fn)}"] += 1
                    return run(fn, *a, **kw)

                return wrapper

            jit.JITFunction.run, interpreter.InterpretedFunction.run = (counted(r) for r in runs)  # type: ignore[method-assign]
            try:
                return func(*args, **(kwargs or {}))
            finally:
                jit.JITFunction.run, interpreter.InterpretedFunction.run = runs  # type: ignore[method-assign]
        if not (func.is_view or func in NO_KERNEL):
            self.launches[str(func)] += 1
        return func(*args, **(kwargs or {}))


def body(case: Case, fused: bool, into: bool = False) -> tuple[Counter[str], torch.Tensor]:
    """One layer's budget body on `case`: routing, then the expert kernel; the launches it made, and y.
    into: the expert kernel writes y into a given tensor, as under graphs (`integration.cuda`)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=gen).to(DEVICE)
    w13 = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(DEVICE)
    w2 = (torch.randn(E, H, I, generator=gen) / I**0.5).to(DEVICE)
    c = case.counters()
    carry = Carry(case.token_slot, c["balance"], case.theta, case.alpha) if case.carry else None
    cap = Cap(case.token_cap, case.cap_table, E, c["dropped"], c["distinct"]) if case.cap else None
    args = (case.keys, case.weights, case.ids)
    kwargs = dict(
        table=case.table, token_budget=case.token_budget, token_group=case.token_group, used=c["used"],
        column=1, k_base=case.k_base, carry=carry, cap=cap,
    )  # fmt: skip
    out = torch.full_like(x, float("nan")) if into else None
    with CountLaunches() as mode:
        if fused:  # what `integration.cuda` runs: routing and alignment in one launch, then the experts
            block_m = SMALL_CONFIG["BLOCK_M"]
            weights, ids, aligned = fused_layer_routing(*args, **kwargs, num_experts=E, block_m=block_m)  # type: ignore[arg-type]
            y = fused_moe(x, w13, w2, ids, weights, config=SMALL_CONFIG, aligned=aligned, out=out)
        else:
            weights, ids = torch_layer_routing(*args, **kwargs)  # type: ignore[arg-type]
            y = fused_moe(x, w13, w2, ids, weights, config=SMALL_CONFIG)
    return mode.launches, y


def case_for(config: str) -> Case:
    carry, cap = "layer" if "carry" in config else None, "cap" if "cap" in config else None
    return make_case(T, K, E, 1, seed=1, carry=carry, cap=cap)


@pytest.mark.parametrize("into", [False, True], ids=["new_y", "into_out"])
@pytest.mark.parametrize("config", CONFIGS)
def test_fused_body_launches_within_target(config, into):
    launches, y = body(case_for(config), fused=True, into=into)
    assert torch.equal(y, body(case_for(config), fused=False)[1]), "the fused body computes another y"
    total = sum(launches.values())
    assert total <= TARGET[config], f"{config}: {total} launches > {TARGET[config]}: {dict(launches)}"
    assert launches["triton:_budget_routing_kernel"] == 1, dict(launches)
    assert not any("align" in op or "count" in op for op in launches), "the alignment ran again"
    # What was counted is the split-K body: its down kernel wrote fp32 parts that the combine summed.
    assert split_bound(default_split(T), triton.cdiv(I, SMALL_CONFIG["BLOCK_K"]), T * K) > 1


@pytest.mark.parametrize("config", CONFIGS)
def test_torch_path_launches_recorded(config):
    """The reference path's count, recorded (it is what the fused kernel replaces; it must not grow)."""
    launches, _ = body(case_for(config), fused=False)
    routing = sum(n for op, n in launches.items() if not op.startswith("triton:"))
    assert routing <= TORCH_PATH[config], f"{config}: {routing} torch ops > {TORCH_PATH[config]}"


def test_counter_counts_views_as_nothing():
    """Negative control of the mode: a view launches nothing, a copy one kernel."""
    t = torch.zeros(4, 4)
    with CountLaunches() as mode:
        t.view(16)
        t.clone()
    assert dict(mode.launches) == {"aten.clone.default": 1}


class RecordingGraph:
    """Stands in for the CUDA graph being captured: records which flag each IF node reads."""

    def __init__(self) -> None:
        self.nodes: list[torch.Tensor] = []

    def begin_capture_to_if_node(self, flag: torch.Tensor) -> None:
        self.nodes.append(flag)

    def end_capture_to_conditional_node(self) -> None:
        pass


@pytest.mark.parametrize(
    "host_flag, into",
    [
        (True, True),  # what `integration.cuda` passes: no scaffolding launch at all
        (True, False),  # a body that returns its own tensor: one copy into the stock body's output
        (False, False),  # no host `not_full`: and one `logical_not`
        (True, None),  # into_stock, but the body could not write there: the copy comes back
    ],
    ids=["into_stock", "copy", "copy+logical_not", "into_stock_fallback"],
)
def test_conditional_scaffolding_launches(host_flag, into):
    """The IF-node scaffolding of `stock_or_budget` (bodies aside). With into_stock the budget body gets the
    stock body's output and writes there (`fused_moe(out=...)`): nothing else launches. Otherwise one copy
    per layer, and one `logical_not` more without the host's `not_full` flag."""
    all_full, not_full = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    stock_out, budget_out = torch.zeros(T, H), torch.ones(T, H)
    graph = RecordingGraph()

    def budget(*out: torch.Tensor) -> torch.Tensor:
        assert len(out) == (into is not False)  # called with the stock output exactly when into_stock
        return out[0].fill_(1.0) if into else budget_out

    with CountLaunches() as mode:
        result = branches(
            graph, all_full, not_full if host_flag else None, lambda: stock_out, budget,  # type: ignore[arg-type]
            into_stock=into is not False,
        )  # fmt: skip
    assert result is stock_out and torch.equal(result, budget_out)  # the budget result in stock's output
    assert graph.nodes[0] is all_full and len(graph.nodes) == 2
    expected = {} if into else {"aten.copy_.default": 1}
    expected |= {} if host_flag else {"aten.logical_not.default": 1}
    launches = dict(mode.launches)
    launches.pop("aten.fill_.Scalar", None)  # the stand-in body's own write, not scaffolding
    assert launches == expected
    if host_flag:
        assert graph.nodes[1] is not_full


@pytest.mark.parametrize("stock_dtype", [torch.float16, torch.float32], ids=["fits", "other_dtype"])
def test_captured_layer_writes_into_stock_output(monkeypatch, stock_dtype):
    """`integration.cuda.captured_experts` hands the stock body's output to the expert kernel (`out=`) where
    the combine can write it (row-major [T, H] of x's dtype): no scaffolding launch. Otherwise the kernel
    makes its own y and the one copy comes back."""
    from types import SimpleNamespace

    from vllm_alloc.integration import cuda
    from vllm_alloc.integration.state import STATE

    x = torch.randn(T, H, dtype=torch.float16)
    stock_out = torch.zeros(T, H, dtype=stock_dtype)
    flags = SimpleNamespace(
        all_full=torch.ones((), dtype=torch.bool), not_full=torch.zeros((), dtype=torch.bool)
    )
    given: list[torch.Tensor | None] = []

    def budget_experts(runner, x, keys, weights, ids, *, out=None):  # type: ignore[no-untyped-def]
        given.append(out)
        return out.fill_(1.0) if out is not None else torch.ones_like(x)

    def recorded(all_full, stock, budget, not_full=None, into_stock=False):  # type: ignore[no-untyped-def]
        return branches(RecordingGraph(), all_full, not_full, stock, budget, into_stock=into_stock)  # type: ignore[arg-type]

    monkeypatch.setattr(STATE, "plan", flags)
    monkeypatch.setattr(cuda, "budget_experts", budget_experts)
    monkeypatch.setattr(cuda, "stock_or_budget", recorded)
    runner = SimpleNamespace(stock_experts=lambda *a: stock_out, budget_inputs=lambda *a: (None, None, None))
    with CountLaunches() as mode:
        y = cuda.captured_experts(runner, x, None, None, None, None)  # type: ignore[arg-type]
    fits = stock_dtype == x.dtype
    assert y is stock_out and (y == 1).all()
    assert len(given) == 1 and given[0] is (stock_out if fits else None)
    launches = dict(mode.launches)
    launches.pop("aten.fill_.Scalar", None)  # the stand-in body's own write
    launches.pop("aten.ones_like.default", None)
    assert launches == ({} if fits else {"aten.copy_.default": 1})
