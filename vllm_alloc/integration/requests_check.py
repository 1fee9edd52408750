"""Refuse invalid budgets where a request enters vLLM, so a bad request fails alone.

`SamplingParams._verify_extra_args` runs when a request is created, in the process that receives it
(offline `LLM.generate`, or the OpenAI server, which answers a `VLLMValidationError` with HTTP 400).
The plugin extends it to check `extra_args["activation_budget"]`: numeric, finite, in (0, 1]. The
model-specific minimum (L·K_base / A) is checked by the server middleware, which knows the model; a
budget below it that arrives some other way runs at the minimum (the worker clamps and logs).
"""

from __future__ import annotations

from typing import Any

from vllm_alloc.integration import compat
from vllm_alloc.requests import BUDGET_KEY, BudgetError, budget_from_extra_args, parse_budget

_MARK = "_vllm_alloc_wrapped"


def install() -> None:
    cls: Any = compat.sampling_params_cls()
    original = cls._verify_extra_args
    if getattr(original, _MARK, False):
        return

    def _verify_extra_args(self: Any) -> None:
        original(self)
        raw = budget_from_extra_args(self.extra_args)
        if raw is None:
            return
        try:
            parse_budget(raw, source=BUDGET_KEY)
        except BudgetError as e:
            raise compat.validation_error(str(e), parameter=BUDGET_KEY) from None

    setattr(_verify_extra_args, _MARK, True)
    cls._verify_extra_args = _verify_extra_args
