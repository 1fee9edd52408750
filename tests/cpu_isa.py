"""Run a check under a forced CPU vector ISA (ATEN_CPU_CAPABILITY), in a fresh interpreter.

Inductor's C++ backend writes different vector code per ISA (AVX2: 256-bit, AVX-512: 512-bit), and a
graph can build under one and not the other (project issue 14: reallocate built under AVX2 only). ATen
reads ATEN_CPU_CAPABILITY once, at import, so each ISA needs its own process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # `tests` is a package under the repo root

# ATEN_CPU_CAPABILITY value -> (the /proc/cpuinfo flag it needs, the vector width Inductor must then pick).
CAPABILITIES: dict[str, tuple[str, int]] = {"avx2": ("avx2", 256), "avx512": ("avx512f", 512)}


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):  # x86 only; the first CPU speaks for all
            return set(line.partition(":")[2].split())
    return set()


def run_under_capability(capability: str, module: str, function: str, tmp_path: Path) -> None:
    """Call `module.function()` (a dotted module, e.g. tests.routing.test_cap) in a subprocess with
    ATEN_CPU_CAPABILITY set.

    Skips when the CPU lacks the ISA. Fails with the subprocess's output when the call raises, or when
    Inductor would not generate code for `capability` (the check would then test the wrong ISA).
    """
    flag, bits = CAPABILITIES[capability]
    if flag not in cpu_flags():
        pytest.skip(f"ATEN_CPU_CAPABILITY={capability} needs the CPU flag {flag}, absent from /proc/cpuinfo")
    env = {
        **os.environ,
        "ATEN_CPU_CAPABILITY": capability,
        # A fresh Inductor cache, so that each run really builds its C++ (a cache hit proves nothing).
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    if shutil.which("g++") or shutil.which("c++"):  # without one Inductor picks no ISA (and is not used)
        code += (
            "from torch._inductor.cpu_vec_isa import pick_vec_isa\n"
            f"isa = pick_vec_isa(); assert isa.bit_width() == {bits}, f'Inductor picked {{isa}}'\n"
        )
    code += f"import importlib; importlib.import_module({module!r}).{function}()\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    if proc.returncode != 0:
        # A failed C++ build prints pages of compiler warnings: lead with the error lines, then the tail.
        lines = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in lines if "error" in line.lower()][:20]
        pytest.fail(
            f"{module}.{function}() under ATEN_CPU_CAPABILITY={capability} exited {proc.returncode}:\n"
            + "\n".join([*errors, "[...]", *lines[-20:]]),
            pytrace=False,
        )
