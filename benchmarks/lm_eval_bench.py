"""lm-evaluation-harness against `vllm-alloc serve`: the same tasks at b = 1.0 and b = 0.5, by model name.

    python benchmarks/lm_eval_bench.py [--budgets 1.0,0.5] [--tasks stdlib_next_line,stdlib_snippet_ppl]
                                       [--limit N] [--num-concurrent 1] [--out build/lm_eval/results.json]

Starts `vllm-alloc serve models/default --budget-config default --budget-aliases 0.5` (port chosen free,
loopback only, log in a temp file) and runs lm-eval's `local-completions` model against it once per
budget, as any OpenAI-compatible client would: b = 1.0 is the plain model name `models/default` (the
server's default budget), every other b its alias `models/default@b`. The tokenizer lm-eval needs for
log-likelihoods is the model folder's own.

The tasks are the repository's own (benchmarks/lm_eval/, data built by make_task.py from the default
model's held-out test split; nothing is downloaded): `stdlib_next_line` picks the real next line of a
snippet among four (acc, acc_norm; chance 0.25), `stdlib_snippet_ppl` scores the same snippets whole
(bits per byte). Before a run's scores count, the server's activation counters must show that it computed
that run's tokens at the run's budget and at no other; a run the server did not budget is an error.

One request at a time by default: at b < 1 the tokens of one forward pass share its expert pool
(Alloc-T), so with requests in flight together a score at b < 1 depends a little on which of them the
server batched (an item or two of 128 on stdlib_next_line between runs at --num-concurrent 4); alone,
each request is its own pass and reruns agree exactly. b = 1.0 scores agree either way.

Prints one row per (budget, task, metric): value ± stderr, items, the run's wall time; writes the rows,
lm-eval's results and the settings to --out as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak import (  # the server's start, health and stop, and /metrics parsing, as the soak does them
    FULL,
    MODEL,
    ROOT,
    Series,
    free_port,
    parse_metrics,
    start_server,
    stop_server,
    wait_healthy,
)

from vllm_alloc.metrics import budget_label

# lm-eval imports `datasets` and `evaluate`, which look for the hub unless told not to; nothing here needs it.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")

TASK_DIR = ROOT / "benchmarks" / "lm_eval"
TASKS = ("stdlib_next_line", "stdlib_snippet_ppl")
MAX_MODEL_LEN = 1024
SERVER_ARGS = ["--budget-config", "default", "--max-model-len", str(MAX_MODEL_LEN)]
SERVER_ARGS += ["--gpu-memory-utilization", "0.3"]


def model_name(model: str, b: float) -> str:
    """The name that asks the server for budget b: the model's own at 1.0, else its alias `model@b`."""
    return model if b == 1.0 else f"{model}@{b!r}"


def alias_flag(budgets: Sequence[float]) -> list[str]:
    """The `--budget-aliases` arguments that serve every budget below 1.0 by name (none: no flag)."""
    aliases = [repr(b) for b in budgets if b != 1.0]
    return ["--budget-aliases", ",".join(aliases)] if aliases else []


def settled_metrics(base_url: str, timeout_s: float = 10.0) -> Series:
    """/metrics once two reads 0.25 s apart agree: the worker flushes its counters after each forward
    pass, which can land a moment after the last response."""
    last = parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10).text)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = parse_metrics(httpx.get(f"{base_url}/metrics", timeout=10).text)
        if now == last:
            break
        last = now
    return last


def budgets_counted(before: Series, after: Series) -> set[str]:
    """Budget labels whose full-activation counters grew from `before` to `after`."""
    return {
        b for (name, layer, b), v in after.items() if name == FULL and v > before.get((name, layer, b), 0.0)
    }


def run_budget(
    base_url: str,
    model: str,
    b: float,
    *,
    tasks: Sequence[str] = TASKS,
    limit: int | None = None,
    num_concurrent: int = 1,
    tokenizer: Path = ROOT / MODEL,
) -> dict[str, Any]:
    """lm-eval's local-completions on `tasks` against the server at base_url, model name for budget b.

    Raises RuntimeError when the server's activation counters do not show b, and b alone, for this run
    (nothing else may use the server meanwhile)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    name = model_name(model, b)
    model_args: dict[str, Any] = {
        "model": name,
        "base_url": f"{base_url}/v1/completions",
        "tokenizer": str(tokenizer),
        "tokenizer_backend": "huggingface",
        "num_concurrent": num_concurrent,
        "max_length": MAX_MODEL_LEN,  # lm-eval's default, 2048, is more than the server takes
        "max_retries": 1,  # a refused request is a finding here, not something to retry
    }
    before = settled_metrics(base_url)
    t0 = time.monotonic()
    out = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=list(tasks),
        # lm-eval's own task index takes 10-30 s to build; only read it for a task that is not ours
        task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=not set(tasks) <= set(TASKS)),
        limit=limit,
        log_samples=False,
    )
    wall_s = time.monotonic() - t0
    if out is None:
        raise RuntimeError("lm_eval.simple_evaluate returned nothing")
    counted = budgets_counted(before, settled_metrics(base_url))
    if counted != {budget_label(b)}:
        raise RuntimeError(
            f"model {name!r} should run at b = {b!r}, but the server counted activations at budgets "
            f"{sorted(counted)}; the scores of this run are not scores at b = {b!r}"
        )
    return {"budget": b, "model": name, "wall_s": wall_s, "results": out["results"], "n": out["n-samples"]}


def rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) of a run_budget result; stderr None where lm-eval gives none."""
    out = []
    for task, metrics in sorted(run["results"].items()):
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr"):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            out.append(
                {
                    "budget": run["budget"],
                    "task": task,
                    "metric": metric,
                    "value": float(value),
                    "stderr": stderr if isinstance(stderr, float) else None,
                    "n": run["n"][task]["effective"],
                    "wall_s": run["wall_s"],
                }
            )
    return out


def table(all_rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| b | task | metric | value | ± stderr | items | run wall s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in all_rows:
        stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(
            f"| {r['budget']!r} | {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {r['n']} | "
            f"{r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def server(budgets: Sequence[float], log: Path) -> Iterator[str]:
    """`vllm-alloc serve models/default` with aliases for `budgets`, until healthy; its base URL."""
    port = free_port()
    proc = start_server(port, log, [*SERVER_ARGS, *alias_flag(budgets)])
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(proc)


def parse_budgets(text: str) -> list[float]:
    budgets = [float(x) for x in text.split(",") if x.strip()]
    bad = [b for b in budgets if not 0.0 < b <= 1.0]
    if not budgets or bad:
        raise argparse.ArgumentTypeError(f"budgets must be in (0, 1], comma-separated; got {text!r}")
    return budgets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=parse_budgets, default=[1.0, 0.5], help="comma-separated, in (0, 1]")
    p.add_argument(
        "--tasks", default=",".join(TASKS), help="lm-eval task names (benchmarks/lm_eval/ is included)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N items of each task (quick runs)")
    p.add_argument(
        "--num-concurrent",
        type=int,
        default=1,
        help="requests lm-eval keeps in flight (more: faster, but scores at b < 1 then vary a little with "
        "which requests share a forward pass)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "build" / "lm_eval" / "results.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /metrics read otherwise
    tasks = [t for t in args.tasks.split(",") if t]
    log = Path(tempfile.mkstemp(prefix="vllm-alloc-lm-eval-", suffix=".log")[1])
    print(f"server log: {log}", flush=True)
    t0 = time.monotonic()
    with server(args.budgets, log) as url:
        start_s = time.monotonic() - t0
        runs = [
            run_budget(url, MODEL, b, tasks=tasks, limit=args.limit, num_concurrent=args.num_concurrent)
            for b in args.budgets
        ]
    all_rows = [r for run in runs for r in rows(run)]
    print(table(all_rows))
    print(f"server start {start_s:.0f} s; whole run {time.monotonic() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {**vars(args), "out": str(args.out), "tasks": tasks, "lm_eval": version("lm_eval")}
    settings |= {"model": MODEL, "server_args": [*SERVER_ARGS, *alias_flag(args.budgets)]}
    doc = {"settings": settings, "server_start_s": start_s, "rows": all_rows, "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1, default=str))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
