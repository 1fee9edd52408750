"""Build `next_line.jsonl`, the data of the `stdlib_next_line` lm-eval tasks (`stdlib_next_line.yaml`).

    python benchmarks/lm_eval/make_task.py [--items 128] [--seed 0]

Where the text comes from: the **test** split of the default model's data (docs/default-model.md), i.e.
the Python 3.11.7 standard-library files that `models/default/data_manifest.json` lists under `test`,
read from this Python's stdlib and checked against the manifest's SHA-256 (scripts/make_default_budget.py
`split_texts`). No training, model-selection or profiling step saw these files.

One item: up to CONTEXT_LINES lines of a file (at most CONTEXT_CHARS characters, whole lines) and four
candidate next lines: the real one and three distractors, lines of *other* test files with the same
indentation and a similar length, so neither indentation nor length gives the answer away. Each choice
ends with its newline, so the model also scores where the line stops. Items are spread over the files
(at most PER_FILE from one) and stored in a drawn order, so the first N items (lm-eval's --limit N) are
a sample of the whole; the position of the real line is drawn too. Everything is seeded: a rerun on the
same stdlib writes the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))
from make_default_budget import MODEL, split_texts  # noqa: E402  (after sys.path)

OUT = HERE / "next_line.jsonl"
CONTEXT_LINES = 10
CONTEXT_CHARS = 256
MIN_CONTEXT_LINES = 3  # below this a line has too little to go on
LINE_CHARS = (12, 72)  # stripped length of a real line: long enough to carry content, short enough to fit
PER_FILE = 8
CHOICES = 4


def indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def eligible(line: str) -> bool:
    s = line.strip()
    return LINE_CHARS[0] <= len(s) <= LINE_CHARS[1] and not s.startswith("#")


def context_before(lines: list[str], i: int) -> str | None:
    """The whole lines before line i, newest last, within CONTEXT_LINES and CONTEXT_CHARS; None when fewer
    than MIN_CONTEXT_LINES of them are non-blank."""
    picked: list[str] = []
    for line in reversed(lines[max(0, i - CONTEXT_LINES) : i]):
        if sum(len(x) + 1 for x in picked) + len(line) + 1 > CONTEXT_CHARS:
            break
        picked.append(line)
    picked.reverse()
    if sum(bool(x.strip()) for x in picked) < MIN_CONTEXT_LINES:
        return None
    return "".join(x + "\n" for x in picked)


def build(files: list[tuple[str, str]], items: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    lines_of = {rel: text.split("\n") for rel, text in files}
    # Distractor pool: every eligible line by (file, indentation); the same text counts once per file.
    pool: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for rel, lines in lines_of.items():
        for line in dict.fromkeys(filter(eligible, lines)):
            pool[indent(line)][rel].append(line)
    candidates = []
    for rel, lines in lines_of.items():
        spots = [i for i, line in enumerate(lines) if eligible(line) and lines.count(line) == 1]
        rng.shuffle(spots)
        candidates += [(rel, i) for i in spots[:PER_FILE]]
    rng.shuffle(candidates)
    out: list[dict[str, object]] = []
    for rel, i in candidates:
        lines = lines_of[rel]
        real, context = lines[i], context_before(lines, i)
        if context is None:
            continue
        n = len(real.strip())
        others = sorted(
            {
                line
                for other, same_indent in pool[indent(real)].items()
                if other != rel
                for line in same_indent
                if 0.6 * n <= len(line.strip()) <= 1.6 * n and line.strip() not in context
            }
            - {real}  # the same line in another file is no distractor
        )
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1)
        label = rng.randrange(CHOICES)
        choices.insert(label, real)
        out.append(
            {
                "id": f"{rel}:{i + 1}",
                "context": context,
                "choices": [c + "\n" for c in choices],
                "label": label,
            }
        )
        if len(out) == items:
            break
    if len(out) < items:
        raise RuntimeError(f"only {len(out)} items could be built from the test split; asked for {items}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=MODEL, help="the model whose data manifest names the split")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    docs = build(split_texts("test", args.model), args.items, args.seed)
    args.out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"wrote {len(docs)} items ({args.out.stat().st_size / 1024:.1f} KiB) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
