"""Routed-expert compute on CPU for passes with pruned pairs: Alloc-T on the host, then only the kept
pairs through vLLM's own CPU expert kernel.

vLLM's CPU expert kernel corrupts the heap on expert id −1, and computing pruned pairs at weight 0 would
save nothing, so pruned pairs never reach it: Alloc-T runs on the host (`alloc_t_host`, numba) and the
kept pairs are compacted. Sibling of `integration.cuda` (the device path); `integration.layer` picks one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm_alloc.integration.state import STATE

if TYPE_CHECKING:
    # Imported where used, never at plugin registration: numba must not be loaded before vLLM's worker init
    # (see alloc_t_host).
    from vllm_alloc.routing.alloc_t_host import KeptPairs


def budget_experts(
    runner: Any, x: torch.Tensor, keys: torch.Tensor, weights_in: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Alloc-T on the host for this layer call, then the kept pairs through vLLM's CPU kernel."""
    return compacted_experts(runner, x, host_routing(runner._alloc_info.column, keys, weights_in, topk_ids))


def host_routing(
    column: int, keys: torch.Tensor, weights_in: torch.Tensor, topk_ids: torch.Tensor
) -> KeptPairs:
    """Alloc-T of one CPU layer call on the host, and its activation count: the kept pairs."""
    from vllm_alloc.routing import alloc_t_host, cap_host

    plan = STATE.plan
    assert plan is not None and plan.host is not None
    T = keys.shape[0]
    rank = keys.numpy()
    h = plan.host
    carry = (
        alloc_t_host.Carry(
            h["token_slot"][:T], h["balance"], h["carry_theta"], plan.carry_alpha, plan.one_bank
        )
        if STATE.carried
        else None
    )
    cap = cap_host.Cap(
        h["token_cap"][:T] if STATE.capped else _NONE, h["cap_table"], plan.E, h["cap_dropped"], h["distinct"]
    )
    return alloc_t_host.layer_call(
        rank,
        rank if weights_in is keys else weights_in.float().numpy(),
        topk_ids.numpy(),
        plan.host["token_budget"][:T],
        plan.host["table"],
        column,
        plan.host["token_group"][:T],
        plan.k_base,
        plan.alloc_t_weights,
        STATE.singleton_groups,
        plan.host["used"][column],
        STATE.counting,
        carry,
        cap,
    )


_NONE = np.zeros(0, np.int64)  # token_cap when no token of the pass is capped


def compacted_experts(runner: Any, x: torch.Tensor, pairs: KeptPairs) -> torch.Tensor:
    """Kept pairs only, through the layer's stock expert call (`runner.stock_experts`).

    Where every token keeps n pairs, the kernel runs the tokens routed top-n; otherwise the P kept pairs
    become P rows routed top-1 each ([P, H] inputs, [P, 1] ids/weights) and are summed back per token.
    Either way: same kernel, same prepacked weights; work and weight traffic scale with P and the distinct
    experts among them.
    """
    weights = torch.from_numpy(pairs.weights)
    ids = torch.from_numpy(pairs.ids)
    if pairs.tokens is None:
        return runner.stock_experts(x, weights, ids, with_shared=False)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if pairs.tokens.size:
        tokens = torch.from_numpy(pairs.tokens)
        out.index_add_(
            0,
            tokens,
            runner.stock_experts(x.index_select(0, tokens), weights, ids, with_shared=False).float(),
        )
    return out.to(x.dtype)
