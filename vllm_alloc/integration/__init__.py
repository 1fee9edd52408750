"""The only code that touches vLLM internals (private imports go through `compat`)."""

from __future__ import annotations

from typing import Any

_installed = False


def install() -> None:
    """Install the budget hooks in this vLLM process. Idempotent; nothing is built until a model is."""
    global _installed
    if _installed:
        return
    from vllm_alloc import envs

    if envs.VLLM_ALLOC_DISABLE:
        _installed = True
        return
    from vllm_alloc.integration import compat, layer, requests_check, runner_hook

    compat.check_version()
    compat.register_oot_layer(compat.moe_runner_cls(), layer.make_runner_cls())
    runner_hook.install()
    if envs.VLLM_ALLOC_TEST_DEVICE_PATH:
        compat.keep_plain_expert_weights()
    requests_check.install()
    _add_worker_method(compat.worker_base_cls())
    _installed = True


def _add_worker_method(worker_base: type) -> None:
    """Worker methods reachable with `LLM.collective_rpc(name, args=...)`:
    vllm_alloc_counters()            cumulative counters (see AllocState.counters)
    vllm_alloc_fingerprint()         the model fingerprint budget files are validated against
    vllm_alloc_set_allocation(rows, alloc_t=None)  overwrite live K(B) rows, {B: [K_l, ...]}, and
                                     Alloc-T flags, {B: bool} (profiling)
    vllm_alloc_reset_allocation()    restore the budget file's allocation and flags
    vllm_alloc_set_scope(scope)      change the reallocation scope between passes (profiling)
    vllm_alloc_set_carry(theta, alpha=None, pool=None, group=None)  carry the balance at B with θ,
                                     {B: [θ_l, ...] or None}; α, the pool ("layer" or "request"), and
                                     the most decode tokens of a group that carry
    vllm_alloc_set_cap(shares)       cap the distinct experts of decode tokens at B, {B: [ρ_l, ...] or
                                     None} (profiling)
    vllm_alloc_record_scores(on)     start / stop recording router scores (carry calibration)
    vllm_alloc_carry_thresholds(rows, offset)  θ per layer for {B: K(B)} from the recorded scores
    vllm_alloc_reconfigure(change, apply)  check / take a new budget file or default budget (admin route);
                                     a refusal is returned as {"error": message}, not raised
    """
    from vllm_alloc.integration.state import STATE

    methods = {
        "vllm_alloc_counters": lambda self: STATE.counters(),
        "vllm_alloc_fingerprint": lambda self: STATE.fingerprint().model_dump(),
        "vllm_alloc_set_allocation": lambda self, rows, alloc_t=None: STATE.set_allocation(rows, alloc_t),
        "vllm_alloc_reset_allocation": lambda self: STATE.reset_allocation(),
        "vllm_alloc_set_scope": lambda self, scope: STATE.set_scope(scope),
        "vllm_alloc_set_carry": lambda self, theta, alpha=None, pool=None, group=None: STATE.set_carry(
            theta, alpha, pool, group
        ),
        "vllm_alloc_set_cap": lambda self, shares: STATE.set_cap(shares),
        "vllm_alloc_record_scores": lambda self, on: STATE.record_scores(on),
        "vllm_alloc_carry_thresholds": lambda self, rows, offset: STATE.carry_thresholds(rows, offset),
        "vllm_alloc_reconfigure": lambda self, change, apply: _reconfigure(STATE, change, apply),
    }
    for name, method in methods.items():
        if not hasattr(worker_base, name):
            setattr(worker_base, name, method)


def _reconfigure(state: Any, change: dict[str, Any], apply: bool) -> dict[str, Any]:
    # Returned, not raised: when one of several workers raises in a collective RPC, vLLM 0.32's
    # multiprocess executor leaves the others' answers queued, and the next RPC reads those instead of
    # its own (seen with TP = 2 on CPU).
    try:
        return state.reconfigure(change, apply)
    except ValueError as e:
        return {"error": str(e)}
