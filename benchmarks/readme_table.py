"""The README's first-screen table: what each budget buys on the embedded default model.

Speed comes from `benchmarks/bench_serve.py --configs a,c,t --json` run on models/default with its budget
file: decode tokens/s of the plugin's engine at each b as a ratio of its b = 1.0, and beside it vLLM's own
top-⌊b·K⌋ (engine (t), no plugin) as a ratio of stock vLLM (a), all in the same run. Quality comes from
`benchmarks/quality.py`'s results.json (test-split perplexity of the shipped configuration, decode regime
with one stream and prefill regime). With --bench-speed (the same bench_serve run on its benchmark model,
whose routed experts dominate decode) a second table shows the speed columns there. `make readme-table`
runs the speed halves and this script; the quality half is `make bench-quality`'s. With --readme the
tables replace the block between the markers.

    python benchmarks/readme_table.py --speed build/readme/speed.json \\
        --quality build/quality/results.json [--bench-speed build/readme/bench_speed.json] \\
        [--readme README.md]
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
    p.add_argument(
        "--quality",
        type=Path,
        help="quality.py results.json (default: keep the perplexity columns of --readme's current table)",
    )
    p.add_argument("--bench-speed", type=Path, help="bench_serve.py --json output on the benchmark model")
    p.add_argument("--readme", type=Path, help="rewrite the table between the markers in this file")
    return p.parse_args(argv)


def speed_cells(speed: dict[str, Any], b: float) -> tuple[list[str], list[str]]:
    """(header, cells) of budget b's speed columns: the plugin's decode tok/s per batch size as × its
    b = 1.0, then vLLM's top-⌊b·K⌋ as × stock vLLM (a), where the run measured them ("n/a" otherwise)."""
    medians = speed["medians"]
    full_speed = medians["(c) b=1"]
    batches = sorted(full_speed, key=int)
    streams = [f"{n} stream{'s' if int(n) > 1 else ''}" for n in batches]
    head = [f"decode speed, {s}" for s in streams] + [f"vLLM top-⌊b·K⌋ speed, {s}" for s in streams]
    key = f"{b:g}"
    cells = [_ratio(medians.get(f"(c) b={key}"), full_speed, n) for n in batches]
    if b == 1.0:
        cells += ["(stock)"] * len(batches)
    else:
        topk = next(
            (v for label, v in medians.items() if label.startswith("(t) ") and label.endswith(f" b={key}")),
            None,
        )
        cells += [_ratio(topk, medians.get("(a) stock"), n) for n in batches]
    return head, cells


def _ratio(value: dict[str, Any] | None, base: dict[str, Any] | None, n: str) -> str:
    if value is None or base is None or n not in value or n not in base:
        return "n/a"
    return f"{value[n]['decode_tps'] / base[n]['decode_tps']:.2f}×"


def plugin_budgets(speed: dict[str, Any]) -> list[float]:
    medians = speed["medians"]
    return sorted(
        (float(label.split("=")[1]) for label in medians if label.startswith("(c) b=")), reverse=True
    )


PERPLEXITY = ["perplexity, decode (1 stream)", "perplexity, prefill", "perplexity, vLLM top-⌊b·K⌋"]


def quality_cells(quality: dict[str, Any], b: float) -> list[str]:
    """Budget b's perplexity columns (PERPLEXITY) from quality.py's results.json."""
    results, key = quality["results"], f"{b:g}"
    if b == 1.0:
        full = results[FULL]["1.0"]
        return [f"{full:.2f}", f"{full:.2f}", "(same)"]
    # vLLM's top-⌊b·K⌋ is a stock engine: quality.py runs it at b = 1.0.
    return [_ppl(results, DECODE, key), _ppl(results, PREFILL, key), _ppl(results, TOPK.format(b=key), "1.0")]


def kept_quality(readme: str) -> dict[str, Any]:
    """The perplexity columns of the table now in `readme`, as {"cells": {b: [cell, ...]}}: what a speed-only
    refresh keeps (their source, `make bench-quality`, is named under the table)."""
    start, end = readme.find(START), readme.find(END)
    lines = [line for line in readme[start:end].splitlines() if line.startswith("|")] if start >= 0 else []
    if len(lines) < 3:
        raise SystemExit(f"no budget table between {START} and {END} to keep the perplexities of")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    missing = [name for name in PERPLEXITY if name not in head]
    if missing:
        raise SystemExit(f"the README's budget table lacks the columns {missing}; pass --quality")
    cells = {}
    for line in lines[2:]:
        row = [c.strip() for c in line.strip("|").split("|")]
        cells[row[0]] = [row[head.index(name)] for name in PERPLEXITY]
    return {"cells": cells}


def table(speed: dict[str, Any], quality: dict[str, Any]) -> str:
    """Markdown: one row per budget, speed as × b = 1.0 at each batch size with vLLM's top-⌊b·K⌋ beside it,
    perplexity per regime (from results.json, or {"cells": ...} kept from the README)."""
    rows: list[str] = []
    for b in plugin_budgets(speed):
        key = f"{b:g}"
        head, cells = speed_cells(speed, b)
        if "cells" in quality:
            cells += quality["cells"].get(key, ["n/a"] * len(PERPLEXITY))
        else:
            cells += quality_cells(quality, b)
        head = ["b", *head, *PERPLEXITY]
        if not rows:
            rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows.append("| " + " | ".join([key, *cells]) + " |")
    return "\n".join(rows)


def speed_table(speed: dict[str, Any]) -> str:
    """Markdown: the speed columns alone, one row per budget (the benchmark model has no quality)."""
    rows: list[str] = []
    for b in plugin_budgets(speed):
        head, cells = speed_cells(speed, b)
        if not rows:
            rows = ["| b | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
        rows.append("| " + " | ".join([f"{b:g}", *cells]) + " |")
    return "\n".join(rows)


def _ppl(results: dict[str, Any], name: str, key: str) -> str:
    value = results.get(name, {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"


def block(speed: dict[str, Any], quality: dict[str, Any], bench: dict[str, Any] | None = None) -> str:
    lines = [
        START,
        table(speed, quality),
        "",
        "Speed: decode tokens/s, the plugin with `configs/default.json` as × its b = 1.0, vLLM's own "
        "top-⌊b·K⌋ (no plugin, `num_experts_per_tok` = ⌊b·K⌋) as × stock vLLM, in the same run, "
        f"`make readme-table` ({speed['machine']}). Where the plugin's ratio trails vLLM's top-⌊b·K⌋, that "
        "gap is what the budget path costs (its routing, and the experts Alloc-T keeps); where both stay "
        "near 1.00×, the model is too small for skipped experts to save time. Perplexity: test split, "
        "lower is better, `make bench-quality` (BENCHMARKS.md names its commit); vLLM's own top-⌊b·K⌋ "
        "is the same in every regime.",
    ]
    if bench is not None:
        lines += [
            "",
            "On the benchmark model, whose routed experts dominate decode (random weights, no quality), "
            f"same columns and run layout ({bench['machine']}):",
            "",
            speed_table(bench),
        ]
    return "\n".join([*lines, END])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    speed = json.loads(args.speed.read_text())
    if args.quality:
        quality = json.loads(args.quality.read_text())
    elif args.readme:
        quality = kept_quality(args.readme.read_text())
    else:
        raise SystemExit("--quality FILE, or --readme to keep its table's perplexity columns")
    bench = json.loads(args.bench_speed.read_text()) if args.bench_speed else None
    text = block(speed, quality, bench)
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
