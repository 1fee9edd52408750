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
    requests_check.install()
    _add_worker_method(compat.worker_base_cls())
    _installed = True


def _add_worker_method(worker_base: type) -> None:
    """`LLM.collective_rpc("vllm_alloc_counters")` returns each worker's cumulative counters."""

    def vllm_alloc_counters(self: Any) -> dict[str, Any]:
        from vllm_alloc.integration.state import STATE

        return STATE.counters()

    if not hasattr(worker_base, "vllm_alloc_counters"):
        worker_base.vllm_alloc_counters = vllm_alloc_counters  # type: ignore[attr-defined]
