"""Profile the embedded default model (models/default) and write its budget file, configs/default.json.

    python scripts/make_default_budget.py [--tokens 153600] [--seq-len 256] [--heldout 0.6] [--variants]

The calibration text is the manifest's CALIBRATION split (never the test split, which the quality
benchmark reads): the split's files, concatenated in sorted order with the end-of-text token after each,
tokenized exactly as training did and checked against the manifest's SHA-256 of the split's text. The
token ids are written to a .npy file and handed to `vllm-alloc profile` (one subprocess per profile, so
each engine is gone before the next starts). The shipped file uses both protocols and budgets
0.33, 0.5, 0.75 (every B of this small model is validated on the held-out part of the calibration split).

`--variants` also writes, into a scratch folder (not shipped; default build/quality/), the files the
quality benchmark compares as levers: a small-calibration profile (1/8 of the tokens) and K_base = 2
(budgets 0.5, 0.75: with K_base = 2 the smallest budget is b = 0.5); `--large` a profile from twice the
calibration tokens (isolating protocol only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "default"
SHIPPED = ROOT / "configs" / "default.json"
SCRATCH = ROOT / "build" / "quality"
BUDGETS = "0.33,0.5,0.75"
EOS = "<|endoftext|>"
NO_CAPS = ("--cap-streams", "none")


def split_texts(split: str, model: Path = MODEL) -> list[tuple[str, str]]:
    """(relative path, text) of each file of one split of the default model's data, in the manifest's
    (sorted) order, as scripts/train_default_model.py read them.

    Refuses to go on when the stdlib text here is not the text the manifest recorded (another Python)."""
    import sysconfig

    manifest = json.loads((model / "data_manifest.json").read_text(encoding="utf-8"))
    entry = manifest["splits"][split]
    root = Path(sysconfig.get_paths()["stdlib"])
    digest = hashlib.sha256()
    texts: list[tuple[str, str]] = []
    for rel in entry["files"]:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        digest.update(rel.encode() + b"\0" + text.encode() + b"\0")
        texts.append((rel, text))
    if digest.hexdigest() != entry["sha256"]:
        raise RuntimeError(
            f"the {split} split read from {root} does not match {model}/data_manifest.json (sha256 "
            f"{digest.hexdigest()[:16]} vs {entry['sha256'][:16]}); this Python's stdlib differs from "
            f"Python {manifest['python']}, the one the model was trained on"
        )
    return texts


def split_ids(split: str, model: Path = MODEL) -> list[int]:
    """Token ids of one split of the default model's data, as scripts/train_default_model.py built it:
    each file's tokens followed by the end-of-text token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    sep = tokenizer.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for _, text in split_texts(split, model):
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(sep)
    return ids


def write_calibration(path: Path, model: Path = MODEL) -> int:
    import numpy as np

    ids = split_ids("calibration", model)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(ids, dtype=np.int64))
    return len(ids)


def profile(
    calib: Path,
    out: Path,
    *,
    tokens: int,
    seq_len: int,
    heldout: float,
    model: Path = MODEL,
    protocols: str = "isolating,operating-point",
    budgets: str = BUDGETS,
    k_base: int = 1,
    extra: tuple[str, ...] = (),
) -> None:
    cmd = [
        sys.executable,
        "-m",
        "vllm_alloc.cli",
        "profile",
        str(model),
        "--calib",
        str(calib),
        "--tokens",
        str(tokens),
        "--seq-len",
        str(seq_len),
        "--heldout",
        str(heldout),
        "--budgets",
        budgets,
        "--protocols",
        protocols,
        "--k-base",
        str(k_base),
        "--dtype",
        "bfloat16",
        "--out",
        str(out),
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  {out} in {time.monotonic() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The whole calibration split (601 windows of 256): 360 held-out windows resolve about 0.2 % here.
    parser.add_argument("--tokens", type=int, default=153600, help="calibration tokens (default 153600)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    parser.add_argument(
        "--heldout", type=float, default=0.6, help="held-out fraction, the guard's (default 0.6)"
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=MODEL,
        help=f"a model from train_default_model.py (default {MODEL})",
    )
    parser.add_argument("--out", type=Path, default=SHIPPED, help=f"budget file (default {SHIPPED})")
    parser.add_argument("--variants", action="store_true", help="also write the benchmark's variant files")
    parser.add_argument(
        "--large", action="store_true", help="also a 2x-calibration profile (isolating only, variant folder)"
    )
    parser.add_argument("--no-shipped", action="store_true", help="skip the shipped file (variants only)")
    parser.add_argument(
        "--caps-only",
        action="store_true",
        help="keep the shipped file's allocations and only (re)choose its distinct-expert caps",
    )
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help=f"variant folder (default {SCRATCH})")
    args = parser.parse_args(argv)

    calib = args.scratch / "calibration.npy"
    n = write_calibration(calib, args.model)
    print(f"calibration split: {n} tokens -> {calib} (profile uses the first {args.tokens})", flush=True)
    common = dict(tokens=args.tokens, seq_len=args.seq_len, heldout=args.heldout, model=args.model)
    if not args.no_shipped:
        # Every held-out run's per-sequence NLL beside the variants (tests/profiler/guard_noise.py fits the
        # guard's false-winner test to them).
        dump = ("--dump-heldout", str(args.scratch / f"{args.out.stem}-heldout.npz"))
        profile(calib, args.out, **common, extra=("--caps-only",) if args.caps_only else dump)
    if args.variants:
        # Per-protocol allocations need no extra profile: the shipped file keeps each protocol's DP
        # vector per validated B as a candidate, and the benchmark installs those vectors directly.
        # Lever files for the prefill rows: no distinct-expert caps (those act on decode only).
        small = {**common, "tokens": max(2 * args.seq_len, args.tokens // 8), "extra": NO_CAPS}
        profile(calib, args.scratch / "small-calib.json", **small)
        # K_base = 2: the smallest budget is B = 2·L, i.e. b = 0.5 here, so 0.33 cannot be requested.
        profile(calib, args.scratch / "kbase2.json", budgets="0.5,0.75", k_base=2, extra=NO_CAPS, **common)
    if args.large:
        # Twice the calibration tokens; isolating only, to fit a few minutes of CPU (the operating-point
        # candidate did not win at any B of the shipped profile).
        profile(
            calib,
            args.scratch / "large-calib.json",
            protocols="isolating",
            tokens=2 * args.tokens,
            seq_len=args.seq_len,
            heldout=args.heldout,
            model=args.model,
            extra=NO_CAPS,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
