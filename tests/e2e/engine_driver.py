"""Runs vLLM CPU engines for the end-to-end tests, one per process start, and writes JSON results.

    python tests/e2e/engine_driver.py SPEC.json OUT.json

SPEC: {"model": path, "engines": [{"plugin": bool, "eager": bool, "additional_config": {...},
        "llm_kwargs": {...}, "env": {...}, "runs": [{"prompts": [...], "budgets": [b or null, ...],
        "max_tokens": n, "set_allocation": {B: [K_l...]} (optional)}]}]}
Each engine runs in this process, one after another; `plugin: false` sets VLLM_ALLOC_DISABLE=1 before the
engine starts, so its worker processes run stock vLLM. Results per run: token ids, sample logprobs,
prompt logprobs, and the plugin's cumulative counters after the run. An engine that fails to start is
reported as {"error": str} with the process's stderr left to the caller.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from typing import Any


def run_engine(model: str, spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ALLOC_DISABLE"] = "0" if spec.get("plugin", True) else "1"
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=model,
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=16,
        max_num_batched_tokens=256,
        gpu_memory_utilization=0.25,
        enforce_eager=spec.get("eager", True),
        seed=0,
    )
    kwargs.update(spec.get("llm_kwargs", {}))
    if spec.get("additional_config") is not None:
        kwargs["additional_config"] = spec["additional_config"]
    try:
        llm = LLM(**kwargs)
    except Exception as e:  # start-up failure is a result the tests check
        return {"error": f"{type(e).__name__}: {e}"}
    results = []
    for run in spec["runs"]:
        if run.get("set_allocation"):
            llm.collective_rpc("vllm_alloc_set_allocation", args=(run["set_allocation"],))
        params = [
            SamplingParams(
                max_tokens=run.get("max_tokens", 6),
                temperature=0.0,
                logprobs=1,
                prompt_logprobs=1,
                extra_args=None if b is None else {"activation_budget": b},
            )
            for b in run["budgets"]
        ]
        outputs = llm.generate(run["prompts"], params, use_tqdm=False)
        counters = llm.collective_rpc("vllm_alloc_counters") if spec.get("plugin", True) else None
        results.append(
            {
                "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
                "logprobs": [
                    [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
                    for o in outputs
                ],
                "prompt_logprobs": [
                    [d[t].logprob for d, t in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:], strict=True)]
                    for o in outputs
                ],
                "counters": counters[0] if counters else None,
                "counters_per_rank": counters,
            }
        )
    del llm
    gc.collect()
    return {"runs": results}


def main() -> int:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    out = [run_engine(spec["model"], engine) for engine in spec["engines"]]
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
