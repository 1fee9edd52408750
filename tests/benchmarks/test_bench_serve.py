"""benchmarks/bench_serve.py: its pure helpers (statistics, ratios, tables, the cap profile), and one e2e
run of the quick benchmark (engines (c) and (d))."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_serve
import serve_lib


def test_summarize_one_prefill_step_then_decode():
    # 2 requests, P = 10, submitted at 0; both first tokens at 0.5 s, then a token every 0.1 s.
    times = [[0.5, 0.6, 0.7], [0.5, 0.6, 0.7]]
    s = serve_lib.summarize(serve_lib.Timeline(start=0.0, token_times=times, prompt_len=10))
    assert s["prefill_tps"] == pytest.approx(2 * 10 / 0.5)
    assert s["decode_tps"] == pytest.approx(4 / 0.2)
    assert s["ttft_ms"] == pytest.approx(500.0)
    assert s["itl_ms"] == pytest.approx(100.0)


def test_summarize_uses_last_first_token_and_medians():
    times = [[0.2, 0.3, 0.4], [0.4, 0.6, 0.8], [0.3, 0.5, 0.7]]  # TTFTs 0.2/0.4/0.3, ITLs 0.1/0.2/0.2
    s = serve_lib.summarize(serve_lib.Timeline(start=0.0, token_times=times, prompt_len=4))
    assert s["prefill_tps"] == pytest.approx(12 / 0.4)  # prefill ends with the last first token
    assert s["decode_tps"] == pytest.approx(6 / (0.8 - 0.4))
    assert s["ttft_ms"] == pytest.approx(300.0)
    assert s["itl_ms"] == pytest.approx(200.0)


def test_summarize_refuses_single_token_requests():
    with pytest.raises(ValueError, match="at least 2"):
        serve_lib.summarize(serve_lib.Timeline(start=0.0, token_times=[[0.1]], prompt_len=4))


def test_median_by_key_over_rounds():
    samples = [(("a", 1), {"x": v}) for v in (3.0, 1.0, 2.0)] + [(("b", 1), {"x": 5.0})]
    assert serve_lib.median_by_key(samples) == {("a", 1): {"x": 2.0}, ("b", 1): {"x": 5.0}}


def test_ratio_is_times_better_for_throughput_and_latency():
    assert serve_lib.ratio(130.0, 100.0, "decode_tps") == pytest.approx(1.3)
    assert serve_lib.ratio(50.0, 100.0, "itl_ms") == pytest.approx(2.0)  # half the latency: 2× better


def _medians(decode_a: float, decode_full: float, decode_half: float) -> dict:
    def row(d: float) -> dict[str, float]:
        return {"prefill_tps": 100.0, "decode_tps": d, "ttft_ms": 10.0, "itl_ms": 1000.0 / d}

    return {
        ("(a) stock", 1): row(decode_a),
        ("(c) b=1", 1): row(decode_full),
        ("(c) b=0.5", 1): row(decode_half),
    }


def test_results_table_has_ratios_against_a():
    text = serve_lib.results_table(_medians(100.0, 96.0, 150.0), ["(a) stock", "(c) b=1", "(c) b=0.5"], [1])
    lines = text.splitlines()
    assert lines[0].startswith("| batch | config |") and len(lines) == 2 + 3
    assert "| 1 | (a) stock | 100 | 100 | 10.0 | 10.0 | 1.00 | 1.00 | 1.00 | 1.00 |" in lines
    assert lines[-1].split(" | ")[-3] == "1.50"  # decode ratio of b=0.5 against (a)


@pytest.mark.parametrize(
    ("full", "half", "marks"),
    [
        (96.0, 130.0, ["met", "met"]),  # both at their thresholds
        (90.0, 100.0, ["**missed**", "**missed**"]),  # 0.90× of (a); 1.11× of b=1.0
    ],
)
def test_target_lines(full: float, half: float, marks: list[str]):
    lines = serve_lib.target_lines(_medians(100.0, full, half), [1], "(a) stock", "(c) b=1", "(c) b=0.5")
    assert [line.rsplit(": ", 1)[1] for line in lines] == marks


def test_share_rows_and_table_mark_the_5_percent_target():
    # alloc_t_share results of batch 2 with P = 4: prefill T = 8, decode T = 2.
    half = {"budget": {8: [5.0, 100.0, 4.0], 2: [20.0, 100.0, 12.0]}, "stock": {}}
    full = {"budget": {}, "stock": {8: [0.0, 180.0, 4.0], 2: [0.0, 170.0, 12.0]}}
    rows = serve_lib.share_rows(half, full, batch=2, prompt_len=4)
    assert [(r["T"], r["pass"], r["stock_us"]) for r in rows] == [(8, "prefill", 180.0), (2, "decode", 170.0)]
    lines = serve_lib.share_table(rows).splitlines()
    assert "| 5.0% | met |" in lines[2]  # exactly 5%
    assert "| 20.0% | **missed** |" in lines[3]


def test_config_names_put_stock_first():
    names = bench_serve.config_names(["a", "b", "c"], [1.0, 0.75, 0.5], K=8)
    assert [n[:3] for n in names] == [
        ("(a) stock", "a", None),
        ("(b) top-4", "b", None),
        ("(c) b=1", "c", 1.0),
        ("(c) b=0.75", "c", 0.75),
        ("(c) b=0.5", "c", 0.5),
    ]
    assert all(n.cap is None for n in names)


def test_topk_engines_follow_the_budgets():
    """(t): vLLM's own top-⌊b·K⌋ per budget below 1.0, one engine per expert count, at least one expert."""
    assert bench_serve.topk_budgets([1.0, 0.75, 0.5, 0.33], K=4) == [(0.75, 3), (0.5, 2), (0.33, 1)]
    assert bench_serve.topk_budgets([0.1], K=4) == [(0.1, 1)]
    assert bench_serve.topk_budgets([0.5], K=6) == [(0.5, 3)]  # b·K exact: no float rounding down
    names = bench_serve.config_names(["a", "c", "t"], [1.0, 0.5], K=8)
    assert [n[:3] for n in names] == [
        ("(a) stock", "a", None),
        ("(c) b=1", "c", 1.0),
        ("(c) b=0.5", "c", 0.5),
        ("(t) top-4 b=0.5", "t4", None),
    ]


def test_quick_settings_and_parsing():
    args = bench_serve.parse_args(["--quick", "--budgets", "1.0,0.5"])
    assert args.rounds == 1 and args.batch_sizes == [1, 4] and args.budgets == [1.0, 0.5]
    assert not math.isnan(args.prompt_len)


def test_config_names_and_cap_lines_with_the_capped_engine():
    names = bench_serve.config_names(["a", "b", "c", "d"], [1.0], K=8, caps=(0.5, 0.25), cap_budgets=(0.5,))
    assert names[-2:] == [
        bench_serve.Config("(d) b=0.5 ρ=0.5", "d", 0.5, 0.5),
        bench_serve.Config("(d) b=0.5 ρ=0.25", "d", 0.5, 0.25),
    ]
    assert bench_serve.config_names(["a", "d"], [1.0], K=8) == [("(a) stock", "a", None, None)]  # no ρ
    medians = {
        ("(c) b=1", 32): {"decode_tps": 100.0},
        ("(b) top-4", 32): {"decode_tps": 130.0},
        ("(d) b=0.5 ρ=0.25", 32): {"decode_tps": 170.0},
        ("(c) b=1", 8): {"decode_tps": 100.0},
        ("(d) b=0.5 ρ=0.25", 8): {"decode_tps": 150.0},
    }
    lines = serve_lib.cap_lines(medians, [8, 32], "(d) b=0.5 ρ=0.25", "(c) b=1", "(b) top-4")
    assert lines == [
        "- batch 8: (d) b=0.5 ρ=0.25 decode = 1.50× of b=1.0",
        "- batch 32: (d) b=0.5 ρ=0.25 decode = 1.70× of b=1.0 (target ≥ 1.6): met; 1.31× of (b) top-4 "
        "(target > 1): met",
    ]


def test_expert_cap_takes_several_shares_and_names_a_bad_one(capsys: pytest.CaptureFixture[str]):
    args = bench_serve.parse_args(["--batch-sizes", "8,32,64", "--expert-cap", "0.9,0.5"])
    assert args.expert_caps == [0.9, 0.5] and args.configs[-1] == "d" and args.profile_batch == 32
    assert bench_serve.parse_args(["--batch-sizes", "8,16"]).profile_batch == 16  # no 32: the largest
    for argv, message in (
        (["--expert-cap", "0.9,1.0"], "--expert-cap 1: must be in [0.001, 1)"),
        (["--expert-cap", "0.5,x"], "expected comma-separated shares"),
        (["--batch-sizes", "8,32", "--profile-batch", "16"], "--profile-batch 16: must be one of"),
        (["--expert-cap", "0.9996"], "--expert-cap 0.9996: must be in [0.001, 1)"),  # 1000 thousandths
        (["--expert-cap", "0.5,0.5"], "a share is listed twice"),
        (["--rounds", "0"], "--rounds 0: must be at least 1"),
        (["--png", "p.png"], "--png plots the cap profile: it needs --expert-cap"),
        (["--expert-cap", "0.5", "--no-share", "--png", "p.png"], "and no --no-share"),
    ):
        with pytest.raises(SystemExit):
            bench_serve.parse_args(argv)
        assert message in capsys.readouterr().err


def test_profile_configs_are_the_uncapped_plugin_and_every_cap():
    names = bench_serve.config_names(
        ["a", "b", "c", "d"], [1.0, 0.75, 0.5], K=8, caps=(0.9, 0.5), cap_budgets=(0.5,)
    )
    assert [c.label for c in bench_serve.profile_configs(names)] == [
        "(c) b=1",
        "(c) b=0.5",
        "(d) b=0.5 ρ=0.9",
        "(d) b=0.5 ρ=0.5",
    ]


def test_cap_profile_rows_table_and_plot(tmp_path: Path):
    # alloc_t_share results at batch 32: [Alloc-T µs, layer µs, calls, mean distinct experts] per T.
    full = {"budget": {}, "stock": {32: [0.0, 640.0, 124.0, 64.0], 1024: [0.0, 9000.0, 4.0, 64.0]}}
    half = {"budget": {32: [20.0, 560.0, 124.0, 56.0]}, "stock": {}}
    capped = {"budget": {32: [25.0, 290.0, 124.0, 28.0]}, "stock": {}}
    rows = [
        serve_lib.profile_row("(c) b=1", 1.0, None, full, 32, 400.0),
        serve_lib.profile_row("(c) b=0.5", 0.5, None, half, 32, 460.0),
        serve_lib.profile_row("(d) b=0.5 ρ=0.5", 0.5, 0.5, capped, 32, 800.0),
    ]
    assert serve_lib.profile_row("(c) b=0.5", 0.5, None, half, 8, 1.0) is None  # no T = 8 call
    assert rows[2] == {
        "config": "(d) b=0.5 ρ=0.5",
        "budget": 0.5,
        "share": 0.5,
        "distinct": 28.0,
        "layer_us": 290.0,
        "calls": 124.0,
        "decode_tps": 800.0,
    }
    lines = serve_lib.cap_profile_table([r for r in rows if r], 64, full_tps=400.0).splitlines()
    assert "(of 64)" in lines[0] and len(lines) == 2 + 3
    assert lines[2] == "| (c) b=1 | — | 64.0 | 640 | 10.0 | 400 | 1.00 |"
    assert lines[4] == "| (d) b=0.5 ρ=0.5 | 0.5 | 28.0 | 290 | 10.4 | 800 | 2.00 |"
    png = tmp_path / "profile.png"
    serve_lib.cap_profile_png([r for r in rows if r], 400.0, 430.0, png, "test", target=1.6)
    assert png.stat().st_size > 10_000


def test_mean_of_known_distinct_counts():
    assert serve_lib._mean_known([4.0, math.nan, 6.0]) == 5.0
    assert math.isnan(serve_lib._mean_known([math.nan]))


@pytest.mark.e2e
def test_quick_run_serves_every_share_and_profiles_it(tmp_path: Path):
    """bench_serve end to end on the quick model (engines (c) and (d), one round, eager): every ρ is served
    by the one engine (d), and the profile's distinct experts fall with ρ and below the uncapped runs."""
    pytest.importorskip("vllm")
    out, report = tmp_path / "r.json", tmp_path / "r.md"
    argv = ["--quick", "--eager", "--configs", "c", "--expert-cap", "0.5,0.25", "--json", str(out)]
    assert bench_serve.main([*argv, "--out", str(report), "--png", str(tmp_path / "p.png")]) == 0
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {
        "(c) b=1",
        "(c) b=0.75",
        "(c) b=0.5",
        "(d) b=0.5 ρ=0.5",
        "(d) b=0.5 ρ=0.25",
    }
    profile = {row["config"]: row for row in result["cap_profile"]}
    assert list(profile) == ["(c) b=1", "(c) b=0.5", "(d) b=0.5 ρ=0.5", "(d) b=0.5 ρ=0.25"]
    distinct = [row["distinct"] for row in profile.values()]
    assert distinct == sorted(distinct, reverse=True) and distinct[-1] < distinct[1], distinct
    assert all(row["calls"] > 0 and row["layer_us"] > 0 for row in profile.values())
    text = report.read_text()
    assert "### Alloc-T share of MoE-layer time" in text and "| 4 | decode |" in text  # the stock path timed
    assert "### Cap profile: decode at batch 4" in text and (tmp_path / "p.png").stat().st_size > 10_000
