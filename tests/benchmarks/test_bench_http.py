"""The pure parts of benchmarks/bench_http.py (server and client command lines, the stock and budget checks
on fake responses, the table and its ratios); no server, no vLLM import."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_http as bh

MODEL = "/models/moe"
K = 8


def variant(label: str) -> bh.Variant:
    return next(v for v in bh.variants(K) if v.label == label)


def flag(argv: list[str], name: str) -> str:
    assert argv.count(name) == 1, f"{name} given {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


# -- command lines ------------------------------------------------------------------------------------------
def test_stock_servers_are_vllm_itself_with_the_plugin_off():
    for server in "ab":
        argv, env = bh.server_command(server, MODEL, 8001, K, 64, 32, eager=False)
        assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]  # not the CPU wheel's `vllm` script
        assert env == {"VLLM_ALLOC_DISABLE": "1"} and flag(argv, "--model") == MODEL
        assert "--middleware" not in argv and "--no-enable-prefix-caching" in argv
    a, _ = bh.server_command("a", MODEL, 8001, K, 64, 32, eager=False)
    b, _ = bh.server_command("b", MODEL, 8001, K, 64, 32, eager=False)
    assert "--hf-overrides" not in a
    assert json.loads(flag(b, "--hf-overrides")) == {"num_experts_per_tok": K // 2}  # top-⌊0.5·K⌋


def test_plugin_server_is_vllm_alloc_serve_with_the_alias():
    argv, env = bh.server_command("c", MODEL, 8002, K, 64, 32, eager=True)
    assert argv[1:5] == ["-m", "vllm_alloc.cli", "serve", MODEL]
    assert env == {"VLLM_ALLOC_DISABLE": "0"} and flag(argv, "--budget-aliases") == "0.5"
    assert (
        "--enforce-eager" in argv and flag(argv, "--port") == "8002" and flag(argv, "--max-num-seqs") == "32"
    )
    with pytest.raises(ValueError, match="'d'"):
        bh.server_command("d", MODEL, 8002, K, 64, 32, eager=True)


def test_client_args_budget_by_header_alias_or_none(tmp_path: Path):
    def args(label: str) -> list[str]:
        return bh.client_args(variant(label), MODEL, 8003, 8, 32, 16, 8, 7, tmp_path / "r.json")

    header = args("(c) b=0.5 header")
    assert flag(header, "--header") == "X-Activation-Budget=0.5" and "--served-model-name" not in header
    assert flag(args("(c) b=1.0 header"), "--header") == "X-Activation-Budget=1.0"
    alias = args("(c) b=0.5 alias")
    # The request's "model" is --served-model-name; the tokenizer still loads from --model.
    assert flag(alias, "--served-model-name") == f"{MODEL}@0.5" and flag(alias, "--model") == MODEL
    assert "--header" not in alias
    for label in ("(a) stock", f"(b) top-{K // 2}"):
        assert "--header" not in args(label) and "--served-model-name" not in args(label)
    assert flag(header, "--max-concurrency") == "8" and flag(header, "--num-prompts") == "32"
    assert flag(header, "--num-warmups") == "8" and flag(header, "--seed") == "7"
    assert flag(header, "--random-range-ratio") == "0" and "--ignore-eos" in header
    assert flag(header, "--temperature") == "0"
    assert flag(header, "--percentile-metrics") == "ttft,tpot,itl"
    assert flag(header, "--metric-percentiles") == "50,99"
    assert flag(header, "--result-dir") == str(tmp_path) and flag(header, "--result-filename") == "r.json"


def test_client_flags_and_result_keys_exist_in_this_vllm(tmp_path: Path):
    """Every flag client_args passes is one `vllm bench serve` defines, and the result keys the report reads
    are ones it writes; read from vLLM's source, so the test never imports vLLM (~10 s)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "benchmarks"
    source = (root / "serve.py").read_text() + (root / "datasets" / "datasets.py").read_text()
    for label in ("(c) b=0.5 header", "(c) b=0.5 alias"):
        argv = bh.client_args(variant(label), MODEL, 1, 1, 16, 16, 8, 0, tmp_path / "r.json")
        for name in (a for a in argv if a.startswith("--")):
            assert f'"{name}"' in source, f"vllm bench serve has no {name}"
    assert '"output_throughput"' in source and 'f"p{p_word}_{metric_attribute_name}_ms"' in source


def test_prompt_count_and_schedule_rotation():
    assert [bh.num_prompts(c, 4, 16) for c in (1, 8, 32)] == [16, 32, 128]
    plan = bh.schedule(2, [1, 8], bh.variants(K))
    assert [(r, s) for r, s, _ in plan] == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a")]
    plugin = {r: runs for r, s, runs in plan if s == "c"}
    firsts = [runs[i][1].label for runs in plugin.values() for i in (0, 3)]  # per (round, c)
    assert len(set(firsts)) > 1  # (c)'s variants do not always start with the same one
    assert all(len(runs) == 6 and {c for c, _ in runs} == {1, 8} for runs in plugin.values())


# -- checks -------------------------------------------------------------------------------------------------
STOCK_METRICS = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n"


def test_stock_check_passes_a_stock_answer():
    assert bh.stock_problems(200, {"content-type": "application/json"}, STOCK_METRICS) == []


def test_stock_check_catches_the_plugin():
    found = bh.stock_problems(200, {"x-activation-budget-applied": "0.5"}, STOCK_METRICS)
    assert len(found) == 1 and "applied" in found[0]
    metrics = STOCK_METRICS + 'vllm_alloc:default_budget 1.0\nvllm_alloc:request_budget_count{le="1.0"} 3.0\n'
    found = bh.stock_problems(200, {}, metrics)
    assert len(found) == 1 and "vllm_alloc:default_budget, vllm_alloc:request_budget_count" in found[0]
    assert "HTTP 400" in bh.stock_problems(400, {}, STOCK_METRICS)[0]


def test_applied_check():
    assert bh.applied_problems(200, {"X-Activation-Budget-Applied": "0.5"}, 0.5) == []
    assert bh.applied_problems(200, {"x-activation-budget-applied": "1.0"}, 1.0) == []
    assert "no X-Activation-Budget-Applied" in bh.applied_problems(200, {}, 0.5)[0]
    assert "applied at" in bh.applied_problems(200, {"x-activation-budget-applied": "1.0"}, 0.5)[0]
    assert "HTTP 400" in bh.applied_problems(400, {}, 0.5)[0]


def metrics_page(requests: dict[float, int], activations: dict[str, float]) -> str:
    """A /metrics page: the request_budget histogram of `requests` {b: n} and full activations per label."""
    lines = ["# TYPE vllm_alloc:request_budget histogram"]
    for le in (*bh.BUDGET_BUCKETS, math.inf):
        n = sum(k for b, k in requests.items() if b <= le)
        lines.append(f'vllm_alloc:request_budget_bucket{{le="{"+Inf" if le == math.inf else le}"}} {n}.0')
    lines.append(f"vllm_alloc:request_budget_count {sum(requests.values())}.0")
    lines.append(f"vllm_alloc:request_budget_sum {sum(b * n for b, n in requests.items())}")
    lines.append("# TYPE vllm_alloc:full_activations_total counter")
    lines += [
        f'vllm_alloc:full_activations_total{{budget="{b}",layer="0"}} {v}' for b, v in activations.items()
    ]
    return "\n".join(lines) + "\n"


def test_budget_check_passes_a_run_at_its_budget():
    before = metrics_page({1.0: 1}, {"1": 100.0})
    after = metrics_page({1.0: 1, 0.5: 20}, {"1": 100.0, "0.5": 900.0})
    assert bh.budget_problems(before, after, 0.5, 20) == []
    after = metrics_page({1.0: 21}, {"1": 1000.0})
    assert bh.budget_problems(before, after, 1.0, 20) == []


def test_budget_check_catches_the_wrong_budget_and_lost_requests():
    before = metrics_page({}, {})
    at_full = metrics_page({1.0: 20}, {"1": 900.0})
    found = bh.budget_problems(before, at_full, 0.5, 20)
    assert any("le=0.5 grew by 0" in p for p in found) and any("['1']" in p for p in found)
    below = metrics_page({0.5: 20}, {"0.5": 900.0})
    assert any("le=0.95" in p for p in bh.budget_problems(before, below, 1.0, 20))
    short = metrics_page({0.5: 19}, {"0.5": 900.0})
    assert any("grew by 19, want 20" in p for p in bh.budget_problems(before, short, 0.5, 20))
    mixed = metrics_page({0.5: 20}, {"0.5": 900.0, "1": 5.0})
    assert any("['0.5', '1']" in p for p in bh.budget_problems(before, mixed, 0.5, 20))


# -- report -------------------------------------------------------------------------------------------------
RESULT = {
    "p50_ttft_ms": 20.0,
    "p99_ttft_ms": 40.0,
    "p50_tpot_ms": 10.0,
    "p99_tpot_ms": 12.0,
    "p50_itl_ms": 10.0,
    "p99_itl_ms": 15.0,
    "output_throughput": 100.0,
    "completed": 16,
    "failed": 0,
}


def test_summarize_reads_vllms_keys_and_names_the_missing_ones():
    assert bh.summarize(RESULT)["p99_itl_ms"] == 15.0
    with pytest.raises(KeyError, match="p99_itl_ms"):
        bh.summarize({k: v for k, v in RESULT.items() if k != "p99_itl_ms"})


def test_medians_skip_failed_checks():
    def row(config: str, tps: float, problems: list[str]) -> dict:
        return {
            "config": config,
            "concurrency": 1,
            "metrics": bh.summarize({**RESULT, "output_throughput": tps}),
            "problems": problems,
        }

    med = bh.medians([row("x", 100.0, []), row("x", 300.0, []), row("x", 1e6, ["wrong budget"])])
    assert med[("x", 1)]["output_throughput"] == 200.0


def test_table_ratios_against_stock_and_full_side_by_side():
    def m(ttft: float, tpot: float, tps: float) -> dict[str, float]:
        return bh.summarize({**RESULT, "p50_ttft_ms": ttft, "p50_tpot_ms": tpot, "output_throughput": tps})

    med = {("stock", 1): m(20, 10, 100), ("full", 1): m(20, 12.5, 80), ("half", 1): m(10, 5, 200)}
    text = bh.results_table(
        med, ["stock", "full", "half", "gone"], [1], "stock", "full", {("gone", 1): "cut off"}
    )
    head, rule, stock, full, half, gone = text.splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    assert cols[:2] == ["c", "config"] and "TTFT p99" in cols and "out tok/s" in cols
    assert cols[-6:] == [
        "× stock TTFT p50",
        "× stock TPOT p50",
        "× stock out tok/s",
        "× b=1.0 TTFT p50",
        "× b=1.0 TPOT p50",
        "× b=1.0 out tok/s",
    ]
    assert len(rule.split("|")) == len(head.split("|"))

    def ratios(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")][-6:]

    assert ratios(stock) == ["1.00", "1.00", "1.00", "1.00", "1.25", "1.25"]
    assert ratios(full) == ["1.00", "0.80", "0.80", "1.00", "1.00", "1.00"]
    assert ratios(half) == [
        "2.00",
        "2.00",
        "2.00",
        "2.00",
        "2.50",
        "2.50",
    ]  # latency base/value, tok/s value/base
    assert "| 16/16 |" in half and "cut off" in gone and len(gone.split("|")) == len(head.split("|"))


def test_times_better_without_a_base():
    assert math.isnan(bh.times_better(1.0, 0.0, True)) and bh.times_better(2.0, 4.0, False) == 2.0
    assert math.isnan(bh.times_better(0.004, 4.3, False))  # TPOT 0.0 ms: tokens came in one chunk
    med = {("s", 1): bh.summarize({**RESULT, "p50_tpot_ms": 0.004}), ("f", 1): bh.summarize(RESULT)}
    assert bh.results_table(med, ["s", "f"], [1], "s", "f").splitlines()[3].split("|")[-6].strip() == "—"
