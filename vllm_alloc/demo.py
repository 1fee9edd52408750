"""Demo: a tiny MoE in vLLM with the plugin, generating under two activation budgets.

    python -m vllm_alloc.demo [--model DIR] [--budgets 1.0,0.5]

Without --model it uses the embedded default model of a source checkout (`models/default`, with its
budget file `configs/default.json`), else builds (once, cached) a tiny random-weight Qwen3-MoE with
`vllm_alloc.tiny`; either way it runs offline. It prints each budget's completions and the routed
activations each MoE layer performed, next to what the full model would have performed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, item):"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_alloc.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="HF-format MoE checkpoint")
    parser.add_argument("--budget-config", default=None, help="budget file path or shipped name")
    parser.add_argument("--budgets", default="1.0,0.5", help="comma-separated budgets b in (0, 1]")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from vllm_alloc.values import BudgetError, parse_budget

    try:
        budgets = [parse_budget(b, source="--budgets") for b in args.budgets.split(",")]
    except BudgetError as e:
        parser.error(str(e))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    model, budget_config = args.model, args.budget_config
    shipped = Path(__file__).resolve().parent.parent / "models" / "default"
    if model is None and (shipped / "config.json").is_file():
        model = shipped
        if budget_config is None and (shipped.parent.parent / "configs" / "default.json").is_file():
            budget_config = "default"
        print(f"[demo] embedded default model at {model}, budget file: {budget_config or 'uniform'}")
    if model is None:
        from vllm_alloc.tiny import cached_model

        model = cached_model("qwen3_moe")
        print(f"[demo] tiny random-weight Qwen3-MoE at {model}")

    from vllm import LLM, SamplingParams

    extra: dict[str, Any] = {}
    if budget_config:
        extra["additional_config"] = {"vllm_alloc": {"budget_file": budget_config}}
    start = time.perf_counter()
    llm = LLM(
        model=str(model),
        dtype="bfloat16",
        max_model_len=512,
        max_num_seqs=8,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        seed=0,
        **extra,
    )
    print(f"[demo] engine ready in {time.perf_counter() - start:.0f} s")
    before = llm.collective_rpc("vllm_alloc_counters")[0]
    for b in budgets:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=0.0, extra_args={"activation_budget": b}
        )
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        after = llm.collective_rpc("vllm_alloc_counters")[0]
        print(f"\n=== activation budget b = {b:g}")
        for prompt, out in zip(PROMPTS, outputs, strict=True):
            print(f"{prompt!r} -> {out.outputs[0].text!r}")
        for column, layer in enumerate(after["layers"]):
            used = sum(after["used"][column]) - sum(before["used"][column])
            full = sum(after["full"][column]) - sum(before["full"][column])
            print(
                f"  MoE layer {layer}: {used:.0f} routed activations "
                f"of {full:.0f} at full budget ({used / full:.0%})"
            )
        before = after
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
