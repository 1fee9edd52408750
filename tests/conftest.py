"""Shared pytest setup: offline environment for vLLM/transformers, and the tiny-model fixture."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# Set before anything imports vLLM or transformers (they read these at import time). setdefault: a person
# or CI that sets them on purpose wins.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
    os.environ.setdefault(_name, "1")

# Kernel tests run on CUDA when present, else on CPU under the Triton interpreter. TRITON_INTERPRET is
# read when `triton.jit` decorates the kernels, so it is set here, before any test module of any folder
# imports vllm_alloc.kernels (tests/kernels/ is collected after tests/budget/, tests/integration/, ...);
# and only without CUDA, so a GPU box runs the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`tiny_model(family, **kwargs) -> Path`: a built tiny checkpoint (vllm_alloc.tiny.cached_model).

    Cached in $VLLM_ALLOC_TEST_CACHE when set (kept between runs), else in this session's tmp dir.
    """
    from vllm_alloc.tiny import cached_model

    env = os.environ.get("VLLM_ALLOC_TEST_CACHE")
    cache_dir = Path(env) if env else tmp_path_factory.mktemp("tiny-models")

    def build(family: str, **kwargs: Any) -> Path:
        return cached_model(family, cache_dir, **kwargs)

    return build
