"""`vllm-alloc show`: the table names the winner and the candidates' numbers; the PNG is written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from vllm_alloc.budget import ModelFingerprint, parse_budget_file, uniform_budget_file
from vllm_alloc.cli import main as cli_main
from vllm_alloc.profiler.build import profile_to_file
from vllm_alloc.profiler.calibration import CalibrationData
from vllm_alloc.profiler.show import summary


@pytest.fixture
def budget_file_path(tmp_path: Path) -> Path:
    model = ModelFingerprint(
        architecture="Qwen3MoeForCausalLM",
        moe_layers=[0, 1, 2, 3],
        num_experts=16,
        top_k=4,
        hidden_size=128,
        intermediate_size=64,
    )
    seqs = [[i] * 8 for i in range(4 + 32)]
    calib = CalibrationData(seqs[:4], seqs[4:], "test data", 8, "4 profile / 32 held-out")
    difficulty = np.linspace(2.0, 4.0, 32)

    def evaluate(ks: Sequence[int], split: str) -> float:
        return 10.0 + sum(w / k for w, k in zip([8.0, 1.0, 1.0, 1.0], ks, strict=True))

    def validate(ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> list[float]:
        wobble = 1e-3 * np.cos(np.arange(32) * (1 + sum(ks) + 7 * alloc_t + (regime == "decode")))
        return list(difficulty + np.log(evaluate(ks, "heldout")) + wobble)

    out = tmp_path / "f.json"
    profile_to_file(evaluate, validate, model, calib, [0.33, 0.5, 0.75], out, progress=False)
    return out


def test_show_prints_the_table_and_draws(budget_file_path: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "plot" / "f.png"
    assert cli_main(["show", str(budget_file_path), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "L = 4 MoE layers [0, 1, 2, 3], E = 16, K = 4" in text
    assert "sensitivity isolating: 288 tokens × seq_len 8 from test data" in text
    assert (
        "guard: 32 held-out sequences × 8 tokens, regimes prefill, decode: the first 8 select (paired 95% "
        "intervals), the other 24 confirm (paired 99.9653% intervals: 95% for the file's 144 comparisons "
        "together)" in text
    )
    assert "which resolves the 0.20% target" in text and "WARNING" not in text
    row = next(line for line in text.splitlines() if line.lstrip().startswith("0.5 "))
    # The isolating DP (with or without Alloc-T: in this fake the two differ only by noise) and the
    # confirmation's two intervals against uniform.
    assert row.split()[2] == "4,2,1,1" and row.split()[5] == "isolating" and row.count("%") == 6
    full = next(line for line in text.splitlines() if line.lstrip().startswith("1 "))
    assert "4,4,4,4" in full
    block = text.split("b = 0.5 (B = 8): the selection's held-out candidates")[1].split("\n\n")[0]
    winner = next(line for line in block.splitlines() if line.startswith("isolating") and " *" in line)
    assert " 4,2,1,1 " in winner and "same run" not in winner
    assert (
        next(line for line in block.splitlines() if line.startswith("uniform (no Alloc-T)")).count("same run")
        == 1
    )  # decode: a lone stream gives Alloc-T nothing to move
    title = "b = 0.5 (B = 8): confirmation on the 24 sequences the selection never saw, at "
    confirmed = text.split(title)[1]
    line = next(x for x in confirmed.splitlines() if x.startswith("isolating"))
    assert line.rstrip().endswith("]") and line.count("%") == 12 and "*" in line  # four intervals, shipped
    # b = 0.33: the DPs land on uniform; nothing to confirm but Alloc-T, which the fake does not help.
    b033 = next(line for line in text.splitlines() if line.lstrip().startswith("0.33 "))
    assert "uniform (no Alloc-T)" in b033 and b033.split()[-2:] == ["baseline", "baseline"]
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_show_marks_unmeasured_budgets_and_bad_input(tmp_path: Path, capsys) -> None:
    model = ModelFingerprint(
        architecture="X", moe_layers=[1, 3], num_experts=8, top_k=2, hidden_size=64, intermediate_size=32
    )
    path = tmp_path / "u.json"
    uniform_budget_file(model).dump(path)
    text = summary(uniform_budget_file(model), [0.5, 0.75])
    assert "uniform (unmeasured)" in text and "0 of 3 budgets validated" in text
    kbase2 = tmp_path / "k2.json"
    uniform_budget_file(model, k_base=2).dump(kbase2)  # the minimum is b = 1.0: default budgets below it
    assert cli_main(["show", str(kbase2)]) == 0  # are left out, not refused
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[:2] for r in rows if len(r) > 2 and r[1].isdigit()] == [["1", "4"]]
    assert cli_main(["show", str(path), "--budgets", "0.2"]) == 2
    assert "--budgets=0.2" in capsys.readouterr().err
    assert cli_main(["show", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_show_prints_caps_where_a_file_has_them() -> None:
    model = ModelFingerprint(
        architecture="X", moe_layers=[1, 3], num_experts=8, top_k=2, hidden_size=64, intermediate_size=32
    )
    data = uniform_budget_file(model).model_dump(mode="json")
    assert "cap ρ" not in summary(uniform_budget_file(model), [0.5])
    data["allocations"][0]["cap"] = [0.5, 0.75]  # B = 2, b = 0.5
    text = summary(parse_budget_file(data), [0.5, 1.0])
    assert "distinct-expert cap: the decode tokens at one B (two or more in a pass) share at most" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:4].strip() in ("0.5", "1")}
    assert rows["0.5"][5] == "0.5,0.75" and rows["1"][5] == "off"
