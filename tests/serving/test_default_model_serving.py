"""The shipped default: models/default and configs/default.json load and serve under the plugin.

One vLLM CPU engine (tests/e2e/engine_driver.py in a child process) loads the checkpoint with
`{"vllm_alloc": {"budget_file": "default"}}` (the shipped name, as `--budget-config default` passes it),
generates at b = 1.0 and b = 0.5, and the activation counters show exactly the shipped allocation:
at b = 0.5 every MoE layer l ran K_l(B) experts per token, B = floor(0.5·A).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_alloc.budget import load_budget_file
from vllm_alloc.profiler.engine import fingerprint, read_moe_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "default"
SHIPPED = ROOT / "configs" / "default.json"
DRIVER = ROOT / "tests" / "e2e" / "engine_driver.py"
PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Stack:\n    def __init__(self", "for i in range("]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not SHIPPED.is_file():
        pytest.fail(f"{SHIPPED} is missing; run scripts/make_default_budget.py")
    tmp = tmp_path_factory.mktemp("default-serving")
    spec = {
        "model": str(MODEL),
        "engines": [
            {
                "plugin": True,
                "additional_config": {"vllm_alloc": {"budget_file": "default"}},
                "runs": [
                    {"prompts": PROMPTS, "budgets": [None] * len(PROMPTS), "max_tokens": 8},
                    {"prompts": PROMPTS, "budgets": [0.5] * len(PROMPTS), "max_tokens": 8},
                ],
            }
        ],
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(tmp / "spec.json"), str(tmp / "out.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    out = tmp / "out.json"
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"engine driver failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    engine = json.loads(out.read_text())[0]
    assert "error" not in engine, engine.get("error")
    return engine


def test_generates_at_full_and_half_budget(served: dict) -> None:
    full, half = served["runs"]
    for run in (full, half):
        assert all(len(tokens) == 8 for tokens in run["tokens"])
        assert all(all(lp <= 0.0 for lp in lps) for lps in run["logprobs"])
    # b = 1.0 ran the stock path: no routed activation was saved.
    counters = full["counters"]
    assert sum(map(sum, counters["used"])) == sum(map(sum, counters["full"])) > 0


def test_counters_follow_the_shipped_allocation(served: dict) -> None:
    bf = load_budget_file(SHIPPED)
    B = bf.absolute_budget(0.5)
    ks = bf.allocations[B - bf.model.num_moe_layers * bf.k_base].k
    counters = served["runs"][1]["counters"]
    K = counters["K"]
    tokens = None
    used_total = 0.0
    for column in range(len(ks)):
        used, full = counters["used"][column][B], counters["full"][column][B]
        assert full > 0 and full % K == 0, f"layer column {column}: {full} full activations at B = {B}"
        tokens = tokens or full // K
        assert full // K == tokens, "every MoE layer sees the same tokens"
        assert bf.k_base * tokens <= used <= K * tokens, f"layer column {column}: used {used}"
        used_total += used
    # The decode streams carry one bank each (the file's carry_group lets these few carry), so a layer
    # may spend more or less than its K_l; summed over the layers nothing exceeds the pool, B per token.
    assert bf.carrying()[B] and len(PROMPTS) <= bf.carry_group
    assert used_total <= sum(ks) * tokens, f"used {used_total} > B {sum(ks)} × {tokens} tokens"
    # Prompt tokens plus the 7 decode steps after the first sampled token, per request.
    prompt_tokens = sum(served["runs"][1]["prompt_tokens"])
    assert tokens == prompt_tokens + 7 * len(PROMPTS)


def test_fingerprint_matches_the_loaded_model(served: dict) -> None:
    bf = load_budget_file(SHIPPED)
    counters = served["runs"][1]["counters"]
    assert fingerprint(read_moe_config(MODEL), counters) == bf.model
    assert counters["A"] == bf.model.full_activations
