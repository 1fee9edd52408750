"""vllm-alloc: serve Mixture-of-Experts models in vLLM under per-request activation budgets.

`import vllm_alloc` never imports vLLM: the pure algorithms (`alloc_l`, `alloc_t`, `reference`) and the
Triton kernels (`vllm_alloc.kernels`) must import where only torch and Triton exist (the GPU test machine).
vLLM calls `register()` through the `vllm.general_plugins` entry point in every process it starts.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

# In a source checkout (PYTHONPATH=.), the top-level kernels/ folder stands in for the vllm_alloc.kernels
# subpackage that the wheel ships (pyproject maps one onto the other).
_checkout_kernels = Path(__file__).resolve().parent.parent / "kernels"
if not (Path(__file__).parent / "kernels").is_dir() and (_checkout_kernels / "__init__.py").is_file():
    __path__.append(str(_checkout_kernels.parent))


def register() -> None:
    """vLLM general-plugin entry point: install the budget hooks in this process (idempotent).

    Cheap where nothing is served (the API server imports the classes, builds nothing); vLLM itself is
    imported only here, lazily.
    """
    from vllm_alloc.integration import install

    install()
