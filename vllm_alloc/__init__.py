"""vllm-alloc: serve Mixture-of-Experts models in vLLM under per-request activation budgets.

`import vllm_alloc` never imports vLLM: the routing rule (`vllm_alloc.routing`), the budget file
(`vllm_alloc.budget`) and the Triton kernels (`vllm_alloc.kernels`) must import where only torch and
Triton exist (the GPU test machine). Everything that touches vLLM is in `vllm_alloc.integration`; the
HTTP side in `vllm_alloc.serving`; the offline profiler in `vllm_alloc.profiler`. docs/design.md walks
through the folders; tests/test_layout.py holds the imports to the layers.
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
