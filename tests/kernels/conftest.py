"""Kernel tests run on CUDA when present, else on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before `triton.jit` decorates the kernels (it is read then), hence here, at
conftest import, before any test module imports vllm_alloc.kernels; and only without CUDA, so a GPU box
runs the compiled kernels. Shared shapes, dtypes and tolerances live in moe_cases.py.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
