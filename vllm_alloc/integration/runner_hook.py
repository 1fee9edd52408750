"""Runner hooks: fill the per-token budget buffers before each real forward pass.

V1 runner (the CPU build; CUDA with VLLM_USE_V2_MODEL_RUNNER=0): `_model_forward` runs for every real
step and never for profile/warm-up/capture dummy runs, so wrapping it both fills the buffers and bounds
what is counted. The per-request budget comes from `requests[req_id].sampling_params.extra_args`.

V2 runner (CUDA default): it keeps no SamplingParams, so `add_requests` records each new request's
budget, `_remove_request` forgets it, and `prepare_inputs` (which runs before a FULL CUDA-graph replay,
unlike any model code) fills the buffers from the `InputBatch` it returns. `execute_model` ends the pass.

`load_model` is wrapped in both: once the model is built, the plan (budget file validated against the
model, buffers) is made, so a bad budget file stops start-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from vllm_alloc.integration import compat
from vllm_alloc.integration.state import STATE
from vllm_alloc.values import budget_from_extra_args

_MARK = "_vllm_alloc_wrapped"


def _wrap(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(cls, name)
    if getattr(original, _MARK, False):
        return
    wrapped = functools.wraps(original)(make(original))
    setattr(wrapped, _MARK, True)
    setattr(cls, name, wrapped)


def _finalize(runner: Any) -> None:
    vllm_config = runner.vllm_config
    scheduler = vllm_config.scheduler_config
    max_tokens = max(
        int(scheduler.max_num_batched_tokens),
        int(getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", 0) or 0),
    )
    plan = STATE.finalize(
        max_tokens=max_tokens + 64,
        device=torch.device(runner.device),
        max_requests=int(scheduler.max_num_seqs),
    )
    if plan is not None:
        log = compat.logger("vllm_alloc")
        if plan.source == "uniform":
            log.warning(
                "vllm-alloc: no budget file configured; using a uniform allocation (every MoE layer gets "
                "the same K_l). Profile the model with `vllm-alloc profile` and pass the file with "
                '--additional-config \'{"vllm_alloc": {"budget_file": PATH}}\' for better quality.'
            )
        bf = plan.budget_file
        log.info(
            "vllm-alloc: %d MoE layers, E=%d, K=%d, A=%d; allocation from %s; scope=%s, weights=%s, "
            "K_base=%d, default budget %.3g, minimum budget %.4g",
            bf.model.num_moe_layers,
            bf.model.num_experts,
            bf.model.top_k,
            bf.model.full_activations,
            plan.source,
            plan.scope,
            plan.weights,
            bf.k_base,
            plan.default_budget,
            bf.min_budget,
        )


def _load_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        _finalize(self)
        return result

    return load_model


# -- V1 ---------------------------------------------------------------------------------------------
def _v1_model_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if STATE.plan is None:
            return original(self, *args, **kwargs)
        req_ids, query_start_loc, starts = compat.v1_batch(self)
        raw = [budget_from_extra_args(compat.v1_request_extra_args(self, r)) for r in req_ids]
        STATE.fill(req_ids, raw, query_start_loc, starts)
        try:
            return original(self, *args, **kwargs)
        finally:
            STATE.end_pass()

    return _model_forward


# -- seeded requests on CPU ---------------------------------------------------------------------------
# A seeded request whose prefill is split across steps is sampled at every step, and vLLM discards the
# samples of the incomplete steps; to keep the seeded stream as if they never happened it rewinds the
# request's generator with `set_offset`, which CPU generators do not have (the engine dies: vLLM CPU 0.32,
# stock too). On CPU the plugin instead saves those generators' states before sampling and restores them
# after, then hides them from the rewind: the stream advances only for samples that are kept, which is
# what the rewind achieves on CUDA. Plugin or not, budgets or not: no request may stop the server.
def _v1_sample(original: Callable[..., Any]) -> Callable[..., Any]:
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        discarded = compat.v1_discarded_cpu_generators(self)
        states = {i: g.get_state() for i, g in discarded.items()}
        try:
            return original(self, *args, **kwargs)
        finally:
            for i, state in states.items():
                discarded[i].set_state(state)

    return _sample


def _v1_bookkeeping_sync(original: Callable[..., Any]) -> Callable[..., Any]:
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        generators = compat.v1_generators(self)
        hidden = {i: generators.pop(i) for i in compat.v1_discarded_cpu_generators(self)}
        try:
            return original(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    return _bookkeeping_sync


# -- V2 ---------------------------------------------------------------------------------------------
_V2_BUDGETS: dict[str, Any] = {}


def _v2_add_requests(original: Callable[..., Any]) -> Callable[..., Any]:
    def add_requests(self: Any, scheduler_output: Any) -> Any:
        for new in scheduler_output.scheduled_new_reqs:
            params = getattr(new, "sampling_params", None)
            _V2_BUDGETS[new.req_id] = budget_from_extra_args(getattr(params, "extra_args", None))
        return original(self, scheduler_output)

    return add_requests


def _v2_remove_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def _remove_request(self: Any, req_id: str) -> Any:
        _V2_BUDGETS.pop(req_id, None)
        return original(self, req_id)

    return _remove_request


def _v2_prepare_inputs(original: Callable[..., Any]) -> Callable[..., Any]:
    def prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        input_batch = original(self, *args, **kwargs)
        if STATE.plan is not None:
            req_ids, query_start_loc, starts = compat.v2_batch(input_batch)
            STATE.fill(req_ids, [_V2_BUDGETS.get(r) for r in req_ids], query_start_loc, starts)
        return input_batch

    return prepare_inputs


def _v2_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            if STATE.counting:
                STATE.end_pass()

    return execute_model


def install() -> None:
    v1 = compat.v1_runner_cls()
    _wrap(v1, "load_model", _load_model)
    _wrap(v1, "_model_forward", _v1_model_forward)
    _wrap(v1, "_sample", _v1_sample)
    _wrap(v1, "_bookkeeping_sync", _v1_bookkeeping_sync)
    cpu = compat.cpu_runner_cls()
    if cpu is not None:
        _wrap(cpu, "load_model", _load_model)
    v2 = compat.v2_runner_cls()
    if v2 is not None:
        _wrap(v2, "load_model", _load_model)
        _wrap(v2, "add_requests", _v2_add_requests)
        _wrap(v2, "_remove_request", _v2_remove_request)
        _wrap(v2, "prepare_inputs", _v2_prepare_inputs)
        _wrap(v2, "execute_model", _v2_execute_model)
