"""Deprecated alias of `vllm_alloc.serving.middleware`, kept so that plain `vllm serve
--middleware vllm_alloc.server.ActivationBudgetMiddleware` (the path documented before the package
layout) keeps working. Use `--middleware vllm_alloc.serving.middleware.ActivationBudgetMiddleware`.
"""

from __future__ import annotations

import warnings

from vllm_alloc.serving.middleware import ActivationBudgetMiddleware

warnings.warn(
    "vllm_alloc.server is deprecated: pass --middleware "
    "vllm_alloc.serving.middleware.ActivationBudgetMiddleware instead of "
    "vllm_alloc.server.ActivationBudgetMiddleware",
    FutureWarning,
    stacklevel=2,
)

__all__ = ["ActivationBudgetMiddleware"]
