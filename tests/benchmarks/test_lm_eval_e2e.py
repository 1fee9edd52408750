"""lm-evaluation-harness against `vllm-alloc serve` on the default model, at b = 1.0 and b = 0.5 by name.

One server for the module (tests/e2e/serving.py), started as a user would, with `--budget-aliases 0.5`.
benchmarks/lm_eval_bench.py's own `run_budget` drives lm-eval's `local-completions` model against it on
the first LIMIT items of the repository's stdlib tasks (benchmarks/lm_eval/, held-out data shipped in the
repository): once under the model's name, once under its alias `NAME@0.5`. The server's budget histogram
must have counted every request of the alias run at b = 0.5, and its activation counters must show the
pruning. The b = 1.0 choice accuracy must beat chance (0.25): measured on these 40 items, acc 0.400 and
acc_norm 0.375 (16 and 15 right, 10 is chance), at b = 0.5 the same; bits per byte 1.639 and 1.661.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("lm_eval")
pytest.importorskip("vllm")
pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import lm_eval_bench  # noqa: E402

from tests.e2e.serving import Server, delta, memory_fraction, metrics, serve  # noqa: E402

LIMIT = 40
CHOICES = 4  # stdlib_next_line: the real line and three distractors
REQUESTS = LIMIT * (CHOICES + 1)  # one per choice, one per snippet (a snippet fits in one rolling window)
BUCKETS = "vllm_alloc:request_budget_bucket"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = [
        "--budget-config", "default",
        "--budget-aliases", "0.5",
        "--max-model-len", str(lm_eval_bench.MAX_MODEL_LEN),
        "--enforce-eager",  # starts ~50 s sooner than compiling; the plugin's path is the same
        "--gpu-memory-utilization", memory_fraction(),
        "--disable-log-stats",
    ]  # fmt: skip
    with serve(
        str(ROOT / "models" / "default"), args, tmp_path_factory.mktemp("lm-eval") / "server.log"
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def runs(server: Server) -> dict[float, tuple[dict[str, Any], dict[Any, float]]]:
    """{b: (run_budget's result, the /metrics delta of that run)} for b = 1.0, then 0.5."""
    out = {}
    for b in (1.0, 0.5):
        before = metrics(server)
        run = lm_eval_bench.run_budget(server.base_url, server.model, b, limit=LIMIT)
        out[b] = (run, delta(metrics(server), before))  # run_budget waited for the counters to settle
    return out


def score(run: dict[str, Any], task: str, metric: str) -> float:
    return float(run["results"][task][f"{metric},none"])


def test_alias_names_the_budget(runs: dict[float, Any], server: Server) -> None:
    assert runs[1.0][0]["model"] == server.model
    assert runs[0.5][0]["model"] == f"{server.model}@0.5"


def test_scores_are_numbers(runs: dict[float, Any]) -> None:
    for run, _ in runs.values():
        assert run["n"]["stdlib_next_line"]["effective"] == LIMIT
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= score(run, "stdlib_next_line", metric) <= 1.0
        bpb = score(run, "stdlib_snippet_ppl", "bits_per_byte")
        assert math.isfinite(bpb) and bpb > 0.0


def test_full_budget_beats_chance(runs: dict[float, Any]) -> None:
    run = runs[1.0][0]
    for metric in ("acc", "acc_norm"):
        assert score(run, "stdlib_next_line", metric) > 1 / CHOICES, run["results"]["stdlib_next_line"]


def test_server_applied_each_budget(runs: dict[float, Any]) -> None:
    """Every request of a run landed in its budget's histogram bucket (le = 0.5 holds b ≤ 0.5; none of
    the b = 1.0 run's went below 1), and the MoE layers ran fewer experts only in the alias run."""
    full, half = runs[1.0][1], runs[0.5][1]
    assert full[(BUCKETS, "", "1.0")] == full[("vllm_alloc:request_budget_count", "", "")] == REQUESTS
    assert full.get((BUCKETS, "", "0.95"), 0.0) == 0.0
    assert half[(BUCKETS, "", "0.5")] == half[("vllm_alloc:request_budget_count", "", "")] == REQUESTS
    for d, label, pruned in ((full, "1", False), (half, "0.5", True)):
        layers = {k[1] for k in d if k[0] == "vllm_alloc:full_activations_total"}
        assert layers and all(k[2] == label for k in d if k[0].endswith("activations_total")), d
        for layer in layers:
            routed = d[("vllm_alloc:routed_activations_total", layer, label)]
            assert (routed < d[("vllm_alloc:full_activations_total", layer, label)]) is pruned
