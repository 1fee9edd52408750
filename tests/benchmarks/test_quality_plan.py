"""benchmarks/quality.py without engines: the cap's engines in the plan, and its rows in the report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality  # noqa: E402  (after sys.path)


def test_expert_cap_adds_decode_engines_as_served(tmp_path: Path) -> None:
    doc = json.loads((ROOT / "configs" / "default.json").read_text())
    for a in doc["allocations"]:
        a["cap"], a["cap_tests"] = None, []
    shipped = tmp_path / "uncapped.json"
    shipped.write_text(json.dumps(doc))
    assert not [e for e in quality.plan(shipped, tmp_path) if "cap" in e["name"]]
    engines = {e["name"]: e for e in quality.plan(shipped, tmp_path, expert_cap=0.5)}
    # The file carries in groups of up to 8: N = 8 runs in decode order under scope budget, as served;
    # N = 64 (no carrying) teacher-forces 64 windows per pass under scope position.
    eight, sixty_four = engines["decode N=8 cap ρ=0.5"], engines["decode N=64 cap ρ=0.5"]
    assert eight["additional_config"]["vllm_alloc"] == {
        "budget_file": str(shipped),
        "scope": "budget",
        "expert_cap": 0.5,
    }
    assert eight["streams"] == 8 and eight["decode_order"]
    assert sixty_four["additional_config"]["vllm_alloc"]["scope"] == "position"
    assert sixty_four["streams"] == 64 and "decode_order" not in sixty_four
    assert [e["label"] for e in sixty_four["evals"]] == ["L+T shipped, cap ρ=0.5 (decode N=64)"]
    assert "no cap" not in " ".join(engines), "an uncapped file needs no uncapped rows"


def test_a_capping_file_adds_its_rows_without_caps(tmp_path: Path) -> None:
    doc = json.loads((ROOT / "configs" / "default.json").read_text())
    doc["allocations"][8 - 4]["cap"] = [0.5] * 4
    doc["allocations"][8 - 4]["cap_tests"] = []
    shipped = tmp_path / "capped.json"
    shipped.write_text(json.dumps(doc))
    engines = {e["name"]: e for e in quality.plan(shipped, tmp_path)}
    for n in (8, 64):
        engine = engines[f"decode N={n} no cap"]
        assert engine["additional_config"]["vllm_alloc"]["expert_cap"] == 1.0
        assert [e["label"] for e in engine["evals"]] == [f"L+T shipped, no cap (decode N={n})"]


def test_cap_rows_appear_in_their_regime_with_paired_intervals() -> None:
    low = ["0.75", "0.5", "0.33"]
    row = dict.fromkeys(low, 21.0)
    results = {
        "full model": {"1.0": 20.0},
        **{f"uniform top-⌊bK⌋ @{b}": {"1.0": 23.0} for b in low},
        "uniform same-B (token, topk)": dict.fromkeys(low, 22.0),
        quality.cap_label(0.5, 64): row,
    }
    nll = {f"uniform top-⌊bK⌋ @{b}": {"1.0": [3.1, 3.2, 3.3, 3.0]} for b in low} | {
        quality.cap_label(0.5, 64): {key: [3.0, 3.1, 3.2, 2.9] for key in low}
    }
    text = quality.regime_tables(results, nll)
    block = text.split("**decode N = 64")[1]
    assert "| L+T shipped, cap ρ=0.5 | 21.000 (+5.00%)" in block
    assert "L+T shipped, cap ρ=0.5, paired: never worse with 95 % confidence" in block
    assert "cap ρ" not in text.split("**decode N = 64")[0], "N = 64 only"


def test_an_only_run_without_baselines_saves_its_rows_and_names_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--only` with one engine and no earlier results: the rows are written and printed, and the tables
    (which compare against the baselines) are skipped with the engines to run, not a KeyError."""
    row = {"L+T shipped, cap ρ=0.75 (decode N=8)": {"0.5": 21.657}}
    monkeypatch.setattr(quality, "split_ids", lambda split, model: list(range(4 * quality.SEQ_LEN)))
    monkeypatch.setattr(quality, "run_all", lambda *a: (row, {next(iter(row)): {"0.5": [3.0]}}))
    out = tmp_path / "results.json"
    argv = ["--expert-cap", "0.75", "--scratch", str(tmp_path), "--out", str(out)]
    assert quality.main([*argv, "--only", "decode N=8 cap ρ=0.75"]) == 0
    assert json.loads(out.read_text())["results"] == row
    text = capsys.readouterr().out
    assert "L+T shipped, cap ρ=0.75 (decode N=8): b=0.5 ppl 21.657" in text
    assert "the tables need rows ['full model', " in text
    # What it names are engines of the plan: the stock model, its top-k at every b, uniform same-B and
    # the shipped file's engine.
    needed = text.split("run --only '")[1].split("'")[0].split(",")
    assert needed == sorted(["default", "stock", "stock top-1", "stock top-2", "stock top-3", "token/topk"])
    names = {e["name"] for e in quality.plan(quality.SHIPPED, tmp_path, 0.75)}
    assert set(needed) <= names
