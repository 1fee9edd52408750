"""Loader of the `stdlib_next_line` tasks: `next_line.jsonl` beside this file, whatever the working folder.

lm-eval calls `load` through the YAML's `custom_dataset: !function stdlib_next_line.load` with the task's
metadata as keyword arguments (none are used). No Hugging Face hub or dataset cache is involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "next_line.jsonl"


def load(**_: Any) -> dict[str, Any]:
    import datasets

    docs = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line]
    return {"test": datasets.Dataset.from_list(docs)}
