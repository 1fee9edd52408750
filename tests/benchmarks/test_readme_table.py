"""benchmarks/readme_table.py: the README's budget table from the speed and quality results (no engine)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import readme_table

ROOT = Path(__file__).resolve().parents[2]


def speed() -> dict:
    rows = {"(c) b=1": 100.0, "(c) b=0.5": 150.0, "(a) stock": 110.0, "(t) top-2 b=0.5": 220.0}
    return {
        "machine": "test machine",
        "medians": {label: {"1": {"decode_tps": v}, "8": {"decode_tps": 2 * v}} for label, v in rows.items()},
    }


def quality() -> dict:
    return {
        "results": {
            "full model": {"1.0": 20.0},
            "L+T shipped (decode N=1)": {"0.5": 21.0},
            "L+T shipped (budget, topk)": {"0.5": 20.5},
            "uniform top-⌊bK⌋ @0.5": {"1.0": 22.0},
        }
    }


def test_one_row_per_budget_with_ratios_and_both_regimes() -> None:
    lines = readme_table.table(speed(), quality()).splitlines()
    assert lines[0].startswith(
        "| b | decode speed, 1 stream | decode speed, 8 streams | vLLM top-⌊b·K⌋ speed, 1 stream | "
        "vLLM top-⌊b·K⌋ speed, 8 streams | perplexity, decode"
    )
    assert lines[2] == "| 1 | 1.00× | 1.00× | (stock) | (stock) | 20.00 | 20.00 | (same) |"
    assert lines[3] == "| 0.5 | 1.50× | 1.50× | 2.00× | 2.00× | 21.00 | 20.50 | 22.00 |"  # top-2 over (a)


def test_reference_columns_say_n_a_where_the_run_lacks_them() -> None:
    partial = speed()
    del partial["medians"]["(a) stock"]
    assert (
        readme_table.table(partial, quality())
        .splitlines()[3]
        .startswith("| 0.5 | 1.50× | 1.50× | n/a | n/a |")
    )


def test_the_bench_model_table_has_the_speed_columns_only() -> None:
    lines = readme_table.speed_table(speed()).splitlines()
    assert lines[0].startswith("| b | decode speed, 1 stream |") and lines[0].count("|") == 6
    assert lines[3] == "| 0.5 | 1.50× | 1.50× | 2.00× | 2.00× |"
    text = readme_table.block(speed(), quality(), {**speed(), "machine": "bench machine"})
    assert "benchmark model" in text and "bench machine" in text and text.count("| 0.5 |") == 2


def test_readme_block_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(speed()))
    (tmp_path / "q.json").write_text(json.dumps(quality()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.START}\nold\n{readme_table.END}\n\nrest\n")
    args = [
        "--speed",
        str(tmp_path / "s.json"),
        "--quality",
        str(tmp_path / "q.json"),
        "--readme",
        str(readme),
    ]
    assert readme_table.main(args) == 0
    text = readme.read_text()
    assert "old" not in text and "| 0.5 | 1.50×" in text and text.endswith("\n\nrest\n")
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no <!-- budget-table:start -->"):
        readme_table.main(args)


def test_the_readme_shows_the_table() -> None:
    text = (ROOT / "README.md").read_text()
    block = text[text.index(readme_table.START) : text.index(readme_table.END)]
    assert "| 0.5 |" in block and "make readme-table" in block


def test_a_speed_only_refresh_keeps_the_readme_perplexities(tmp_path: Path) -> None:
    (tmp_path / "s.json").write_text(json.dumps(speed()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{readme_table.block(speed(), quality())}\n")
    new_speed = speed()
    new_speed["medians"]["(c) b=0.5"] = {"1": {"decode_tps": 120.0}, "8": {"decode_tps": 240.0}}
    (tmp_path / "s.json").write_text(json.dumps(new_speed))
    assert readme_table.main(["--speed", str(tmp_path / "s.json"), "--readme", str(readme)]) == 0
    assert "| 0.5 | 1.20× | 1.20× | 2.00× | 2.00× | 21.00 | 20.50 | 22.00 |" in readme.read_text()
    readme.write_text(f"{readme_table.START}\n| b | x |\n|---|---|\n| 1 | y |\n{readme_table.END}\n")
    with pytest.raises(SystemExit, match="lacks the columns"):
        readme_table.main(["--speed", str(tmp_path / "s.json"), "--readme", str(readme)])
    with pytest.raises(SystemExit, match="--quality FILE"):
        readme_table.main(["--speed", str(tmp_path / "s.json")])
