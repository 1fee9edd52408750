"""End-to-end: the plugin inside real vLLM CPU engines on tiny checkpoints of every MoE family.

Engines run in a child process (tests/e2e/engine_driver.py), several per process start, so a stock
engine (VLLM_ALLOC_DISABLE=1) and a plugin engine can be compared. Each engine start costs ~20-40 s on
a 2-core machine, so the checks are grouped into few engines.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vllm_alloc.budget import ModelFingerprint, parse_budget_file, uniform_budget_file
from vllm_alloc.tiny import FAMILIES

pytestmark = pytest.mark.e2e

DRIVER = Path(__file__).with_name("engine_driver.py")
PROMPTS = ["def foo(x):", "import os\nimport sys\n", "class Stack:", "The quick brown fox"]
# MLA on the CPU backend runs without chunked prefill and prefix caching.
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "deepseek_v2": {"enable_chunked_prefill": False, "enable_prefix_caching": False},
    "deepseek_v3": {"enable_chunked_prefill": False, "enable_prefix_caching": False},
}
# Stock vLLM itself is not reproducible across engine starts for these families on CPU: two stock
# engines on the same tiny DeepSeek-V3 gave the same tokens but logprobs up to 4.4e-3 apart (and two
# plugin engines at b = 1.0 up to 7.8e-3); on the tiny DeepSeek-V2, two stock engines were bit-equal
# in some runs and up to 4.3e-3 apart in others (1 in 2 runs of the pair here). Bit-identity cannot be
# observed across processes there, so the check is tokens equal and logprobs within that spread.
NOT_REPRODUCIBLE = {"deepseek_v2": 2e-2, "deepseek_v3": 2e-2}
L, E, K, H, I = 2, 16, 4, 128, 64  # the tiny checkpoints' shape (vllm_alloc.tiny defaults)
A = L * K


def drive(
    tmp_path: Path, model: Path, engines: list[dict[str, Any]], name: str = "run"
) -> tuple[list[Any], str]:
    spec = tmp_path / f"{name}-spec.json"
    out = tmp_path / f"{name}-out.json"
    spec.write_text(json.dumps({"model": str(model), "engines": engines}))
    # vLLM's worker processes log to stdout; keep both streams for the messages the tests look for.
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(spec), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"engine driver failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return json.loads(out.read_text()), proc.stdout


def per_budget(counters: dict[str, Any], column: int, B: int) -> tuple[float, float]:
    return counters["used"][column][B], counters["full"][column][B]


def assert_counts_follow(counters: dict[str, Any], allocation: dict[int, list[int]]) -> None:
    """Exactly K_l(B) activations per token per layer: the pool is exact (DESIGN.md §2)."""
    assert counters["A"] == A and counters["K"] == K
    for B, ks in allocation.items():
        for column, k_l in enumerate(ks):
            used, full = per_budget(counters, column, B)
            assert full > 0, f"no tokens counted at B={B}"
            tokens = full / K
            assert tokens == int(tokens)
            assert used == k_l * tokens, f"layer column {column}, B={B}: {used} != {k_l} x {tokens}"


def skewed_budget_file(tmp_path: Path, architecture: str) -> tuple[Path, dict[int, list[int]]]:
    """A valid budget file whose allocation is deliberately unequal across the two layers."""
    model = ModelFingerprint(
        architecture=architecture,
        moe_layers=[0, 1],
        num_experts=E,
        top_k=K,
        hidden_size=H,
        intermediate_size=I,
    )
    data = uniform_budget_file(model).model_dump()
    rows = {2: [1, 1], 3: [2, 1], 4: [3, 1], 5: [4, 1], 6: [4, 2], 7: [4, 3], 8: [4, 4]}
    for allocation in data["allocations"]:
        allocation["k"] = rows[allocation["budget"]]
        allocation["chosen"] = "test-skewed"
    path = tmp_path / "skewed.json"
    parse_budget_file(data).dump(path)
    return path, rows


def test_qwen3_compiled_bit_identical_and_exact_counts(tmp_path: Path, tiny_model: Any) -> None:
    """Compiled mode (vLLM's default on CPU): b = 1.0 is bit-identical to stock vLLM; a mixed-budget
    batch under a skewed budget file performs exactly K_l(B) activations per token per layer."""
    model = tiny_model("qwen3_moe")
    budget_file, rows = skewed_budget_file(tmp_path, "Qwen3MoeForCausalLM")
    mixed = [1.0, 0.5, 0.25, 0.75]  # B = 8, 4, 2, 6
    results, _ = drive(
        tmp_path,
        model,
        [
            {"plugin": False, "eager": False, "runs": [{"prompts": PROMPTS, "budgets": [None] * 4}]},
            {
                "plugin": True,
                "eager": False,
                "additional_config": {"vllm_alloc": {"budget_file": str(budget_file)}},
                "runs": [
                    {"prompts": PROMPTS, "budgets": [None] * 4},
                    {"prompts": PROMPTS, "budgets": mixed},
                ],
            },
        ],
    )
    stock, plugin = results[0]["runs"][0], results[1]["runs"]
    for key in ("tokens", "logprobs", "prompt_logprobs"):
        assert plugin[0][key] == stock[key], f"b = 1.0 differs from stock vLLM in {key}"
    first, second = plugin[0]["counters"], plugin[1]["counters"]
    assert first["layers"] == [0, 1]
    # Run 1 was all at b = 1.0: counted once per layer at B = A, used == full.
    assert first["used"][0][A] == first["full"][0][A] > 0
    delta = {
        "A": A,
        "K": K,
        "used": [
            [s - f for s, f in zip(sr, fr, strict=True)]
            for sr, fr in zip(second["used"], first["used"], strict=True)
        ],
        "full": [
            [s - f for s, f in zip(sr, fr, strict=True)]
            for sr, fr in zip(second["full"], first["full"], strict=True)
        ],
    }
    assert_counts_follow(delta, {B: rows[B] for B in (8, 4, 2, 6)})
    # Budgets below 1 change the model's output somewhere in the batch.
    assert plugin[1]["prompt_logprobs"] != plugin[0]["prompt_logprobs"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_stock_at_full_budget_and_exact_at_half(tmp_path: Path, tiny_model: Any, family: str) -> None:
    """Every MoE family: b = 1.0 bit-identical to stock (eager), b = 0.5 counts exactly uniform K_l."""
    model = tiny_model(family)
    kwargs = FAMILY_KWARGS.get(family, {})
    results, _ = drive(
        tmp_path,
        model,
        [
            {"plugin": False, "llm_kwargs": kwargs, "runs": [{"prompts": PROMPTS, "budgets": [None] * 4}]},
            {
                "plugin": True,
                "llm_kwargs": kwargs,
                "runs": [
                    {"prompts": PROMPTS, "budgets": [1.0] * 4},
                    {"prompts": PROMPTS, "budgets": [0.5] * 4, "max_tokens": 4},
                ],
            },
        ],
        name=family,
    )
    stock, plugin = results[0]["runs"][0], results[1]["runs"]
    assert plugin[0]["tokens"] == stock["tokens"]
    if family in NOT_REPRODUCIBLE:
        for key in ("logprobs", "prompt_logprobs"):
            for ours, theirs in zip(plugin[0][key], stock[key], strict=True):
                assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) <= NOT_REPRODUCIBLE[family]
    else:
        assert plugin[0]["logprobs"] == stock["logprobs"]
        assert plugin[0]["prompt_logprobs"] == stock["prompt_logprobs"]
    counters = plugin[1]["counters"]
    assert len(counters["layers"]) == L
    assert_counts_follow(counters, {A // 2: [K // 2] * L})
    assert all(math.isfinite(x) for row in plugin[1]["logprobs"] for x in row)


def test_tensor_parallel_matches_single_rank(tmp_path: Path, tiny_model: Any) -> None:
    """TP = 2 on CPU: the same greedy tokens as TP = 1 under a mixed-budget batch, the budget file made
    for the unsharded model is accepted (the fingerprint uses the full I, not a rank's share), and
    every rank routes and counts the same tokens (so only rank 0 exports: no double counting)."""
    model = tiny_model("qwen3_moe")
    budget_file, rows = skewed_budget_file(tmp_path, "Qwen3MoeForCausalLM")
    config = {"vllm_alloc": {"budget_file": str(budget_file)}}
    run = {"prompts": PROMPTS, "budgets": [1.0, 0.5, 0.25, 0.75]}
    results, _ = drive(
        tmp_path,
        model,
        [
            {"plugin": True, "additional_config": config, "runs": [run]},
            {
                "plugin": True,
                "additional_config": config,
                # Two CPU workers on one NUMA node need explicit core binding.
                "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                "llm_kwargs": {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.15},
                "runs": [run],
            },
        ],
    )
    single, sharded = results[0]["runs"][0], results[1]["runs"][0]
    assert sharded["tokens"] == single["tokens"]
    per_rank = sharded["counters_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    assert_counts_follow(per_rank[0], {B: rows[B] for B in (8, 4, 2, 6)})
    assert per_rank[0]["used"] == single["counters"]["used"]


def test_scope_request_is_batch_invariant(tmp_path: Path, tiny_model: Any) -> None:
    """Scope `request`: a request gets the same experts alone or batched with others, so its greedy
    output does not depend on what else runs (up to kernel rounding across batch shapes)."""
    model = tiny_model("qwen3_moe")
    target = "def quicksort(xs):\n    if len(xs) <= 1:"
    others = ["import numpy as np", "class Node:\n    def __init__(self):", "for i in range(10):"]
    results, _ = drive(
        tmp_path,
        model,
        [
            {
                "plugin": True,
                "additional_config": {"vllm_alloc": {"scope": "request"}},
                "llm_kwargs": {"enable_prefix_caching": False},
                "runs": [
                    {"prompts": [target], "budgets": [0.5], "max_tokens": 8},
                    {"prompts": [target, *others], "budgets": [0.5, 0.25, 0.5, 0.75], "max_tokens": 8},
                ],
            }
        ],
    )
    alone, batched = results[0]["runs"]
    assert batched["tokens"][0] == alone["tokens"][0]
    for a, b in zip(alone["prompt_logprobs"][0], batched["prompt_logprobs"][0], strict=True):
        assert abs(a - b) < 2e-2  # bf16 kernels round differently at other batch shapes


def test_bad_budget_file_stops_startup(tmp_path: Path, tiny_model: Any) -> None:
    """A budget file for another model (E = 8) stops start-up with the file, the field and the fix."""
    model = tiny_model("qwen3_moe")
    other = ModelFingerprint(
        architecture="Qwen3MoeForCausalLM",
        moe_layers=[0, 1],
        num_experts=8,
        top_k=K,
        hidden_size=H,
        intermediate_size=I,
    )
    path = tmp_path / "other-model.json"
    uniform_budget_file(other).dump(path)
    results, stderr = drive(
        tmp_path,
        model,
        [{"plugin": True, "additional_config": {"vllm_alloc": {"budget_file": str(path)}}, "runs": []}],
    )
    assert "error" in results[0]
    assert f"budget file {path}: field 'model.num_experts'" in stderr
    assert "the loaded model has 16" in stderr
    assert "vllm-alloc profile" in stderr  # the fix
