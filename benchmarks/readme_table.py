"""The README's first-screen table: what each budget buys on the embedded default model.

Speed comes from `benchmarks/bench_serve.py --json` run on models/default with its budget file (decode
tokens/s of the plugin's engine at each b, as a ratio of b = 1.0 in the same run); quality from
`benchmarks/quality.py`'s results.json (test-split perplexity of the shipped configuration, decode regime
with one stream and prefill regime). `make readme-table` runs the speed half and this script; the quality
half is `make bench-quality`'s. With --readme the table replaces the block between the markers.

    python benchmarks/readme_table.py --speed build/readme/speed.json \\
        --quality build/quality/results.json [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

START, END = "<!-- budget-table:start -->", "<!-- budget-table:end -->"
FULL = "full model"
DECODE = "L+T shipped (decode N=1)"  # quality.py's names of the shipped configuration's rows
PREFILL = "L+T shipped (budget, topk)"
TOPK = "uniform top-⌊bK⌋ @{b}"  # vLLM's own uniform top-k (`--hf-overrides`), for reference


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--speed", type=Path, required=True, help="bench_serve.py --json output")
    p.add_argument("--quality", type=Path, required=True, help="quality.py results.json")
    p.add_argument("--readme", type=Path, help="rewrite the table between the markers in this file")
    return p.parse_args(argv)


def table(speed: dict[str, Any], quality: dict[str, Any]) -> str:
    """Markdown: one row per budget, speed as × b = 1.0 at each batch size, perplexity per regime."""
    medians = speed["medians"]
    results = quality["results"]
    full_speed = medians["(c) b=1"]
    batches = sorted(full_speed, key=int)
    budgets = sorted(
        (float(label.split("=")[1]) for label in medians if label.startswith("(c) b=")), reverse=True
    )
    head = ["b"] + [f"decode speed, {n} stream{'s' if int(n) > 1 else ''}" for n in batches]
    head += ["perplexity, decode (1 stream)", "perplexity, prefill", "perplexity, vLLM top-⌊b·K⌋"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in budgets:
        key = f"{b:g}"
        cells = [key]
        for n in batches:
            cells.append(f"{medians[f'(c) b={key}'][n]['decode_tps'] / full_speed[n]['decode_tps']:.2f}×")
        if b == 1.0:
            full = results[FULL]["1.0"]
            cells += [f"{full:.2f}", f"{full:.2f}", "(same)"]
        else:
            cells += [_ppl(results, DECODE, key), _ppl(results, PREFILL, key)]
            cells.append(_ppl(results, TOPK.format(b=key), "1.0"))  # a stock engine: run at b = 1.0
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _ppl(results: dict[str, Any], name: str, key: str) -> str:
    value = results.get(name, {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"


def block(speed: dict[str, Any], quality: dict[str, Any]) -> str:
    return "\n".join(
        [
            START,
            table(speed, quality),
            "",
            "Speed: decode tokens/s as × b = 1.0 in the same run, the plugin with `configs/default.json`, "
            f"`make readme-table` ({speed['machine']}). Perplexity: test split, lower is better, "
            "`make bench-quality` (BENCHMARKS.md names its commit); vLLM's own top-⌊b·K⌋ is the same in "
            "every regime.",
            END,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speed = json.loads(args.speed.read_text())
    quality = json.loads(args.quality.read_text())
    text = block(speed, quality)
    print(text)
    if args.readme:
        readme = args.readme.read_text()
        pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"{args.readme}: no {START} ... {END} block to replace")
        args.readme.write_text(pattern.sub(lambda _: text, readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
