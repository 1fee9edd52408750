"""The shipped lm-eval task data (benchmarks/lm_eval/) and the pure helpers of benchmarks/lm_eval_bench.py;
no server. The end-to-end run is tests/benchmarks/test_lm_eval_e2e.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "lm_eval"))
import lm_eval_bench
import make_task

DOCS = [json.loads(line) for line in make_task.OUT.read_text(encoding="utf-8").splitlines()]


def test_shipped_data_is_what_make_task_writes() -> None:
    try:
        files = make_task.split_texts("test")
    except RuntimeError as e:  # another Python's stdlib: the data cannot be rebuilt here
        pytest.skip(str(e))
    assert make_task.build(files, len(DOCS), seed=0) == DOCS


def test_items_hold_the_real_line_and_three_look_alikes() -> None:
    assert len(DOCS) == 128 and len({d["id"] for d in DOCS}) == len(DOCS)
    for d in DOCS:
        choices, real = d["choices"], d["choices"][d["label"]]
        assert len(choices) == make_task.CHOICES == len(set(choices)), d["id"]
        assert all(c.endswith("\n") and c.count("\n") == 1 for c in choices), d["id"]
        # same indentation: the distractors cannot be told apart by their leading whitespace
        assert {make_task.indent(c) for c in choices} == {make_task.indent(real)}, d["id"]
        assert d["context"].endswith("\n") and len(d["context"]) <= make_task.CONTEXT_CHARS
    assert {d["label"] for d in DOCS} == set(range(make_task.CHOICES))


def test_model_names_and_alias_flag() -> None:
    assert lm_eval_bench.model_name("models/default", 1.0) == "models/default"
    assert lm_eval_bench.model_name("models/default", 0.5) == "models/default@0.5"
    assert lm_eval_bench.alias_flag([1.0, 0.5, 0.75]) == ["--budget-aliases", "0.5,0.75"]
    assert lm_eval_bench.alias_flag([1.0]) == []
    with pytest.raises(Exception, match="in \\(0, 1\\]"):
        lm_eval_bench.parse_budgets("1.0,1.5")


def test_budgets_counted_and_rows() -> None:
    full = lm_eval_bench.FULL
    before = {(full, "0", "1"): 10.0, (full, "0", "0.5"): 4.0}
    after = {(full, "0", "1"): 10.0, (full, "0", "0.5"): 8.0, ("vllm_alloc:other", "", ""): 3.0}
    assert lm_eval_bench.budgets_counted(before, after) == {"0.5"}
    run = {
        "budget": 0.5,
        "wall_s": 2.0,
        "n": {"t": {"original": 4, "effective": 4}},
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.25, "bpb,none": 1.5}},
    }
    got = [(r["metric"], r["value"], r["stderr"], r["n"]) for r in lm_eval_bench.rows(run)]
    assert got == [("acc", 0.5, 0.25, 4), ("bpb", 1.5, None, 4)]
    assert "| 0.5 | t | acc | 0.5000 | 0.2500 | 4 | 2 |" in lm_eval_bench.table(lm_eval_bench.rows(run))
