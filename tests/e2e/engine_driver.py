"""Runs vLLM CPU engines for the end-to-end tests, one per process start, and writes JSON results.

    python tests/e2e/engine_driver.py SPEC.json OUT.json

SPEC: {"model": path, "engines": [{"plugin": bool, "eager": bool, "additional_config": {...},
        "llm_kwargs": {...}, "env": {...}, "runs": [{"prompts": [...], "budgets": [b or null, ...],
        "max_tokens": n, "temperature": t, "seed": s, "prompt_logprobs": bool,
        "set_allocation": {B: [K_l...]} (optional), "decode_order": bool (prompts prefilled one
        token per pass, `vllm_alloc.profiler.engine.decode_order`)}]}]}
Each engine runs in a process of its own, one after another; `plugin: false` sets VLLM_ALLOC_DISABLE=1
before the engine starts, so neither it nor its worker processes load the plugin. Results per run: token
ids, sample logprobs, prompt logprobs, prompt tokens served from the prefix cache, and the plugin's
cumulative counters after the run; per engine, the class names of the MoE runners its workers built
(`moe_runners`). An engine that fails to start is reported as {"error": str} with the process's stderr
left to the caller.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any


def moe_runner_classes(worker: Any) -> list[str]:
    """Class names of the MoE runners in a worker's model (runs in the worker, via collective_rpc):
    `BudgetMoERunner` where the plugin is active, vLLM's own `MoERunner` where it is not."""
    found = set()
    for module in worker.model_runner.get_model().modules():
        for value in (module, *vars(module).values()):
            if "MoERunner" in type(value).__name__:
                found.add(type(value).__name__)
    return sorted(found)


def run_engine(model: str, spec: dict[str, Any]) -> dict[str, Any]:
    os.environ["VLLM_ALLOC_DISABLE"] = "0" if spec.get("plugin", True) else "1"
    # The engine core in this process: `generate` queues every request before the first step, so two
    # engines given the same runs prefill the same batches. With the core in a process of its own, a step
    # can start before the last requests arrive; the batches then differ from engine to engine, and so do
    # Alloc-T's groups (outputs at b < 1) and the kernels' shapes (rounding, at any b).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.update(spec.get("env", {}))
    # collective_rpc with a function (moe_runner_classes) pickles it to the workers.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
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
    # What actually runs, so a "stock" baseline is checked stock, and a plugin engine checked active.
    runners = llm.collective_rpc(moe_runner_classes)
    results = []
    for run in spec["runs"]:
        if run.get("set_allocation"):
            llm.collective_rpc("vllm_alloc_set_allocation", args=(run["set_allocation"],))
        if run.get("set_scope"):
            llm.collective_rpc("vllm_alloc_set_scope", args=(run["set_scope"],))
        reconfigured = []
        for change in run.get("reconfigure", []):  # as the admin route does it: check on all, then apply
            checked = llm.collective_rpc("vllm_alloc_reconfigure", args=(change, False))
            ok = not any("error" in answer for answer in checked)
            reconfigured.append(
                llm.collective_rpc("vllm_alloc_reconfigure", args=(change, True)) if ok else checked
            )
        params = [
            SamplingParams(
                max_tokens=run.get("max_tokens", 6),
                temperature=run.get("temperature", 0.0),
                seed=run.get("seed"),
                logprobs=1,
                # Prompt logprobs turn prefix-cache hits off in vLLM; runs that test the cache skip them.
                prompt_logprobs=1 if run.get("prompt_logprobs", True) else None,
                extra_args=None if b is None else {"activation_budget": b},
            )
            for b in run["budgets"]
        ]
        from vllm_alloc.profiler.engine import decode_order

        with decode_order(llm, bool(run.get("decode_order"))):
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
                    if o.prompt_logprobs is not None
                ],
                "counters": counters[0] if counters else None,
                "cached_tokens": [o.num_cached_tokens for o in outputs],
                "counters_per_rank": counters,
                "reconfigured": reconfigured,
            }
        )
    del llm
    gc.collect()
    return {"runs": results, "moe_runners": runners}


def main() -> int:
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    if len(spec["engines"]) == 1:
        out = [run_engine(spec["model"], spec["engines"][0])]
    else:
        # One process per engine: the plugin installs its front-end hooks (budget check, prefix-cache
        # salt) in the process that creates the engine, once; a stock engine must share no process with
        # them, and a plugin engine must not inherit a stock engine's "disabled".
        out = []
        for i, engine in enumerate(spec["engines"]):
            one_spec, one_out = f"{out_path}.{i}.spec", f"{out_path}.{i}"
            with open(one_spec, "w") as f:
                json.dump({"model": spec["model"], "engines": [engine]}, f)
            proc = subprocess.run([sys.executable, __file__, one_spec, one_out], check=False)
            if proc.returncode != 0:
                return proc.returncode
            with open(one_out) as f:
                out += json.load(f)
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
