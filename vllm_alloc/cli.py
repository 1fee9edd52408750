"""`vllm-alloc` command line: serve | profile | show.

Each subcommand lives in its own module (`serving.launch`, `profiler.cli`, `profiler.show`), which
provides `add_parser(subparsers)` and the function the parser dispatches to (`args.func(args)`); this
file only assembles them. Heavy imports (vLLM, torch, matplotlib) happen inside the subcommands, so
`vllm-alloc --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "serve": "vllm_alloc.serving.launch",
    "profile": "vllm_alloc.profiler.cli",
    "show": "vllm_alloc.profiler.show",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-alloc",
        description="Serve Mixture-of-Experts models in vLLM under per-request activation budgets.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for module_name in SUBCOMMANDS.values():
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # `serve` passes every argument it does not know to vLLM, so it parses its own tail.
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if rest and not getattr(args, "accepts_extra_args", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.extra_args = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
