"""One MoE layer's budget routing on the device, from persistent buffers: the path CUDA graphs capture.

Inside a captured region nothing may depend on per-pass host data, so everything a pass changes is read
from device buffers that the runner hook writes before the forward (`integration.plan.Plan`):
`token_budget[t]` (the absolute budget B of token t, 0 for a padding row) and `token_group[t]`, and
`table[B, l]` = K_l(B). Alloc-T then runs with the padded T of the graph, and pruned pairs come out as
data (id −1, weight 0), never as shapes. The activation count is a device scatter into `used[l, B]`:
padding rows keep nothing and add 0, so graph warm-up, dummy and capture runs (all-zero budgets) count
nothing without a host flag.

At b = 1.0 every token keeps all K candidates, and `alloc_t.reallocate` returns the input weights bit
for bit (`torch.where`, never a product) and the input ids; both are cast back to the input dtypes, so
the expert call that follows receives exactly what the stock router produced.

Passes where every token is at b = 1.0 must stay the stock model under graphs too. `stock_or_budget`
captures both paths into one graph behind CUDA-graph conditional (IF) nodes on a device flag the runner
hook writes: a replay runs the stock expert call on the stock routing (the same kernels on the same
inputs as vLLM without the plugin, so the same bits) or the budget path, never both.

On CUDA, where the pass fits (`fused_fits`: T ≤ 16 at K = 8 and E = 128, kernels/routing.py) and keys and
weights are float32, `layer_routing` runs the same rule as one Triton launch (`vllm_alloc::budget_routing`)
instead of 50–190 torch kernels; the torch code below stays the reference, the CPU path and the path for
larger passes. Imports no vLLM; Triton only on that CUDA branch (the GPU test machine has it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from vllm_alloc.routing import alloc_t
from vllm_alloc.routing.cap import SCALE, cap_experts, distinct_experts
from vllm_alloc.routing.carry import carry_counts, check_alpha

if TYPE_CHECKING:
    from vllm_alloc.kernels import AlignedPairs


class Carry(NamedTuple):
    """The carried balance's device buffers (`carry.py`): token_slot [N] int64 (0 = not carried; a
    carried token's request row of `balance`, one token per request in a pass), balance [S + 1, L] int64
    (row 0 scratch), theta [A + 1, L] float64 (θ_l(B)), alpha, one_bank (static: a request's layers
    share column 0 of its row, the pool "request")."""

    token_slot: torch.Tensor
    balance: torch.Tensor
    theta: torch.Tensor
    alpha: float
    one_bank: bool = False


class Cap(NamedTuple):
    """The distinct-expert cap's device buffers (`cap.py`): token_cap [N] int64 (a capped token's cap
    group + 1, 0 = not capped), table [A + 1, L] int64 (the share ρ_l(B) in thousandths; `cap.SCALE` =
    no cap), E, and the counters: dropped [L, A + 1] (pairs the cap dropped, per layer and B), distinct
    [L, E + 1] (layer calls by the distinct experts their kept pairs touch; padding-only calls count
    nothing)."""

    token_cap: torch.Tensor
    table: torch.Tensor
    num_experts: int
    dropped: torch.Tensor
    distinct: torch.Tensor
    on: bool = True  # static: some B is capped (False: only the distinct experts are counted)


def _check_rows(rank_keys: torch.Tensor, token_budget: torch.Tensor, token_group: torch.Tensor) -> int:
    T = rank_keys.shape[0]
    if token_budget.shape[0] < T or token_group.shape[0] < T:
        raise ValueError(
            f"T={T} tokens exceed the budget buffers (token_budget {tuple(token_budget.shape)}, "
            f"token_group {tuple(token_group.shape)})"
        )
    return T


def layer_routing(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    table: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    weights: str = "topk",
    singleton_groups: bool = False,
    carry: Carry | None = None,
    cap: Cap | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alloc-T for the T rows of this layer call; returns (weights, ids) [T, K] in the input dtypes.

    rank_keys/topk_weights/topk_ids: [T, K] as in `alloc_t.reallocate`. table: [A + 1, L] int, K_l(B)
    (row 0 all zero). token_budget, token_group: [N ≥ T] int, read for rows [0, T). used: [L, A + 1],
    activations performed, incremented in place. column: this layer's column l. singleton_groups: a
    static promise (read at trace time); under a captured graph it must be False. carry: the carried
    balance's buffers, or None where no budget carries (static, like singleton_groups). cap: the
    distinct-expert cap's buffers and counters (applied after Alloc-T and the carried balance where
    `cap.on`), or None: neither cap nor count (static).

    On CUDA within the fused kernel's size (`fused_fits`) one launch (`fused_layer_routing`), else
    `torch_layer_routing`; both give the same bits.
    """
    return layer_routing_aligned(
        rank_keys, topk_weights, topk_ids, table=table, token_budget=token_budget, token_group=token_group,
        used=used, column=column, k_base=k_base, weights=weights, singleton_groups=singleton_groups,
        carry=carry, cap=cap,
    )[:2]  # fmt: skip


def layer_routing_aligned(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    table: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    weights: str = "topk",
    singleton_groups: bool = False,
    carry: Carry | None = None,
    cap: Cap | None = None,
    num_experts: int = 0,
    block_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AlignedPairs | None]:
    """`layer_routing`, plus, where the fused kernel ran and block_m > 0, its kept pairs aligned for the
    expert kernel (`kernels.align_pairs(ids, num_experts, block_m)`, from the same launch); else None."""
    E = cap.num_experts if cap is not None else (num_experts if block_m else 0)
    if rank_keys.is_cuda and fused_fits(rank_keys, topk_weights, E):
        return fused_layer_routing(
            rank_keys, topk_weights, topk_ids, table=table, token_budget=token_budget,
            token_group=token_group, used=used, column=column, k_base=k_base, weights=weights,
            singleton_groups=singleton_groups, carry=carry, cap=cap, num_experts=num_experts, block_m=block_m,
        )  # fmt: skip
    kept_w, kept_ids = torch_layer_routing(
        rank_keys, topk_weights, topk_ids, table=table, token_budget=token_budget, token_group=token_group,
        used=used, column=column, k_base=k_base, weights=weights, singleton_groups=singleton_groups,
        carry=carry, cap=cap,
    )  # fmt: skip
    return kept_w, kept_ids, None


def torch_layer_routing(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    table: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    weights: str = "topk",
    singleton_groups: bool = False,
    carry: Carry | None = None,
    cap: Cap | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`layer_routing` in torch: the reference, the CPU path and the path above the fused kernel's size.
    Arguments and result as `layer_routing`'s."""
    T = _check_rows(rank_keys, token_budget, token_group)
    budget = token_budget[:T]
    k_tok = table[budget, column]
    n_keep = None
    if carry is not None:
        # Every row reads its slot's balance; rows not carried use slot 0, a scratch row they write back
        # unchanged (all writes to it carry the value read, so duplicate indices are harmless).
        slot = carry.token_slot[:T]
        bank = 0 if carry.one_bank else column
        before = carry.balance[slot, bank]
        n, after = carry_counts(rank_keys, k_tok, before, carry.theta[budget, column], k_base, carry.alpha)
        carried = slot > 0
        n_keep = torch.where(carried, n, -1)
        carry.balance[slot, bank] = torch.where(carried, after, before).to(carry.balance.dtype)
    kept_w, kept_ids, kept = alloc_t.reallocate(
        rank_keys,
        topk_weights,
        topk_ids,
        k_tok,
        token_group[:T],
        k_base=k_base,
        weights=weights,
        singleton_groups=singleton_groups,
        n_keep=n_keep,
    )
    if cap is not None:
        E = cap.num_experts
        if cap.on:
            token_cap = cap.token_cap[:T]
            q_tok = torch.where(token_cap > 0, cap.table[budget, column], SCALE)
            pairs = kept.sum(dim=1)  # what Alloc-T (and the carried balance) gave each token
            capped = cap_experts(
                rank_keys, topk_ids, kept, (token_cap - 1).clamp(min=0), q_tok, E, k_base=k_base
            )
            kept, distinct = capped.kept, capped.distinct
            kept_w, kept_ids = alloc_t.kept_routing(kept, topk_weights, topk_ids, weights)
            cap.dropped[column].index_add_(0, budget, (pairs - kept.sum(dim=1)).to(cap.dropped.dtype))
        else:
            distinct = distinct_experts(topk_ids, kept, E)
        # A padding-only call (graph warm-up, dummy runs) touches no expert and counts nothing.
        one = (distinct > 0).to(cap.distinct.dtype).view(1)
        cap.distinct[column].index_add_(0, distinct.view(1), one)
    used[column].index_add_(0, budget, kept.sum(dim=1).to(used.dtype))
    return kept_w.to(topk_weights.dtype), kept_ids.to(topk_ids.dtype)


def fused_fits(rank_keys: torch.Tensor, topk_weights: torch.Tensor, num_experts: int = 0) -> bool:
    """Whether `layer_routing` runs the fused routing kernel on this call (static: shapes and dtypes only).
    num_experts: E where experts are counted, capped or aligned, else 0."""
    from vllm_alloc.kernels import REGISTER_TILE, fused_routing_fits

    T, K = rank_keys.shape
    return (
        rank_keys.dtype == torch.float32
        and topk_weights.dtype == torch.float32
        and fused_routing_fits(T, K, num_experts, REGISTER_TILE)
    )


def fused_layer_routing(
    rank_keys: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    table: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    weights: str = "topk",
    singleton_groups: bool = False,
    carry: Carry | None = None,
    cap: Cap | None = None,
    num_experts: int = 0,
    block_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AlignedPairs | None]:
    """`layer_routing_aligned` in one launch of the `vllm_alloc::budget_routing` op (same arguments, same
    bits; `fused_fits` must hold). Weights "kept" rescale in torch (`alloc_t.kept_routing`, a few more
    launches): the rescale's float32 row sum is torch's, whose summation order depends on device and ISA."""
    from vllm_alloc.kernels import AlignedPairs  # registers the op too

    _check_rows(rank_keys, token_budget, token_group)
    alloc_t.check_options(k_base, weights)
    if carry is not None:
        check_alpha(carry.alpha)
    if cap is not None and num_experts not in (0, cap.num_experts):
        raise ValueError(f"num_experts={num_experts} differs from the cap's E={cap.num_experts}")
    E = cap.num_experts if cap is not None else num_experts
    on = cap if cap is not None and cap.on else None  # the cap's buffers, where it caps
    kept_w, kept_ids, *aligned = torch.ops.vllm_alloc.budget_routing(
        rank_keys, topk_weights, topk_ids, token_budget, token_group, table, used, column, k_base,
        singleton_groups,
        carry.token_slot if carry else None, carry.balance if carry else None, carry.theta if carry else None,
        float(carry.alpha) if carry else 0.0, bool(carry.one_bank) if carry else False,
        E, on.token_cap if on else None, on.table if on else None, on.dropped if on else None,
        cap.distinct if cap else None, block_m,
    )  # fmt: skip
    if weights == "kept":
        kept_w, kept_ids = alloc_t.kept_routing(kept_ids >= 0, topk_weights, topk_ids, weights)
    pairs = AlignedPairs(*aligned, block_m) if block_m else None
    return kept_w.to(topk_weights.dtype), kept_ids.to(topk_ids.dtype), pairs


def conditional_nodes_available() -> bool:
    """Whether this torch can capture CUDA-graph conditional nodes from Python (torch >= 2.12)."""
    graph = getattr(torch.cuda, "CUDAGraph", None)
    return all(
        hasattr(graph, name)
        for name in (
            "get_currently_capturing_graph",
            "begin_capture_to_if_node",
            "end_capture_to_conditional_node",
        )
    )


def stock_or_budget(
    all_full: torch.Tensor,
    stock: Callable[[], torch.Tensor],
    budget: Callable[..., torch.Tensor],
    graph: torch.cuda.CUDAGraph | None = None,
    not_full: torch.Tensor | None = None,
    *,
    into_stock: bool = False,
) -> torch.Tensor:
    """Inside a CUDA-graph capture: `stock()` where the device flag `all_full` (a CUDA bool scalar) is
    true at replay, else `budget()`, as two conditional nodes of the graph being captured.

    Both callables must return tensors of one shape and dtype; only the taken body's kernels run at replay,
    and nothing is read on the host. Outside a capture there is no graph to branch in: the caller decides
    on the host (it knows the pass), so this raises rather than guess. graph: the graph being captured;
    None asks torch (`CUDAGraph.get_currently_capturing_graph`, which older torch releases lack).
    not_full: the negated flag, kept by the host beside `all_full` (`Plan.not_full`); None records a
    `logical_not` per call instead, one more launch per layer at every replay. into_stock: `budget` is
    called with the stock body's output and may write its result there and return it (the expert kernel's
    combine does: `fused_moe(out=...)`), which saves the copy; a result elsewhere is still copied.
    """
    if not (all_full.is_cuda and torch.cuda.is_current_stream_capturing()):
        raise RuntimeError("stock_or_budget branches inside a CUDA-graph capture only")
    for name, flag in (("all_full", all_full), ("not_full", not_full)):
        if flag is not None and (flag.dtype != torch.bool or flag.numel() != 1):
            raise ValueError(f"{name} must be one CUDA bool; got {flag.dtype} of shape {tuple(flag.shape)}")
    if graph is None:
        current = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
        if current is None:
            raise RuntimeError(
                f"torch {torch.__version__} cannot name the CUDA graph being captured "
                "(no CUDAGraph.get_currently_capturing_graph); pass graph= explicitly"
            )
        graph = current()
    return branches(graph, all_full, not_full, stock, budget, into_stock=into_stock)


def branches(
    graph: torch.cuda.CUDAGraph,
    all_full: torch.Tensor,
    not_full: torch.Tensor | None,
    stock: Callable[[], torch.Tensor],
    budget: Callable[..., torch.Tensor],
    *,
    into_stock: bool = False,
) -> torch.Tensor:
    """The two IF nodes of `stock_or_budget`, recorded into `graph`. The scaffolding around the bodies is
    the copy of the budget body's result into the stock body's output, none where the budget body wrote it
    there (into_stock), plus the `logical_not` where `not_full` is None (tests/kernels/test_launch_count.py
    counts them). Writing into the stock body's output is safe: it is alive across both captures, so the
    budget body's intermediates never share its memory, and only one body runs per replay."""
    if not_full is None:
        not_full = torch.logical_not(all_full)  # recorded before the bodies, in the enclosing graph
    graph.begin_capture_to_if_node(all_full)
    try:
        out = stock()
    finally:
        graph.end_capture_to_conditional_node()
    graph.begin_capture_to_if_node(not_full)
    try:
        result = budget(out) if into_stock else budget()
        if result is not out:
            out.copy_(result)
    finally:
        graph.end_capture_to_conditional_node()
    return out
