"""Where a request enters vLLM: refuse an invalid budget (a bad request fails alone), and salt the prefix
cache per budget.

`SamplingParams._verify_extra_args` runs when a request is created, in the process that receives it
(offline `LLM.generate`, or the OpenAI server, which answers a `VLLMValidationError` with HTTP 400).
The plugin extends it to check `extra_args["activation_budget"]`: numeric, finite, in (0, 1]. The
model-specific minimum (L·K_base / A) is checked by the server middleware, which knows the model; a
budget below it that arrives some other way runs at the minimum (the worker clamps and logs).

`InputProcessor.process_inputs` builds the `EngineCoreRequest` in that same process. The plugin sets its
`cache_salt` from the budget the request will run at, so KV computed under one budget never serves
another (the experts that produced it differ), on every route and offline alike. b = 1.0 keeps the
client's salt, so full-budget requests share vLLM's stock namespace.
"""

from __future__ import annotations

from typing import Any

from vllm_alloc.integration import compat
from vllm_alloc.values import BUDGET_KEY, BudgetError, budget_from_extra_args, parse_budget

_MARK = "_vllm_alloc_wrapped"


def install() -> None:
    _install_check()
    _install_salt()


def _install_check() -> None:
    cls: Any = compat.sampling_params_cls()
    original = cls._verify_extra_args
    if getattr(original, _MARK, False):
        return

    def _verify_extra_args(self: Any) -> None:
        # Ours first: vLLM's own check refuses integers beyond 2**64 without naming the budget's range.
        raw = budget_from_extra_args(self.extra_args)
        if raw is not None:
            try:
                parse_budget(raw, source=BUDGET_KEY)
            except BudgetError as e:
                raise compat.validation_error(str(e), parameter=BUDGET_KEY) from None
        original(self)

    setattr(_verify_extra_args, _MARK, True)
    cls._verify_extra_args = _verify_extra_args


def _install_salt() -> None:
    cls: Any = compat.input_processor_cls()
    original = cls.process_inputs
    if getattr(original, _MARK, False):
        return

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        params = getattr(request, "sampling_params", None)
        if params is not None:  # pooling requests carry no budget
            request.cache_salt = budget_salt(
                self, budget_from_extra_args(params.extra_args), request.cache_salt
            )
        return request

    setattr(process_inputs, _MARK, True)
    cls.process_inputs = process_inputs


def use_settings(processor: Any, settings: Any) -> None:
    """Salt with these settings from now on (the admin route changed the default budget)."""
    if processor is not None:
        processor._vllm_alloc_settings = settings


def budget_salt(processor: Any, raw: Any, client_salt: str | None) -> str | None:
    """The cache salt of a request with raw budget `raw` (None: the server default) and the client's salt.
    The API server's middleware may have salted the request already; `cache_salt` then leaves it as is."""
    from vllm_alloc.integration.config import settings_from_vllm_config
    from vllm_alloc.values import cache_salt

    settings = getattr(processor, "_vllm_alloc_settings", None)
    if settings is None:
        settings = settings_from_vllm_config(processor.vllm_config)
        processor._vllm_alloc_settings = settings
    try:
        b = settings.default_budget if raw is None else parse_budget(raw)
    except BudgetError:
        return client_salt  # refused by the SamplingParams check before it gets here
    return cache_salt(client_salt, b)
