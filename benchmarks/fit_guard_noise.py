"""Fit the noise of the profiler guard's paired tests to a real profile's held-out runs, for the guard's
false-winner simulation (`benchmarks/guard_rates.py`, tests/profiler/test_guard_rates.py).

Input: the .npz that `vllm-alloc profile --dump-heldout` writes (every held-out run's per-sequence mean
NLL; `scripts/make_default_budget.py` writes build/quality/default-heldout.npz). For every two distinct
runs at the same budget B in the same regime, the per-sequence difference minus its mean is what the
guard's paired test sees as noise. Per regime and B: the median standard deviation of those differences;
per regime: a Student-t fitted (location 0) to the differences scaled to unit deviation, pooled over every
pair, for the shape of the tails. Written as JSON.

    python benchmarks/fit_guard_noise.py build/quality/default-heldout.npz --seq-len 256 \
        --source "models/default, configs/default.json's profile" --out benchmarks/guard_noise.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROUNDING = 1e-4  # per-sequence deviations below this are float rounding, not another configuration


def parse_key(key: str) -> tuple[tuple[int, ...], bool, str, bool]:
    """`K=2,1,1,1|alloc_t=1|prefill|carry=0` (profiler.build.dump_runs) -> (K, Alloc-T, regime, carry)."""
    ks, alloc_t, regime, carry = key.split("|")
    return (
        tuple(int(k) for k in ks.removeprefix("K=").split(",")),
        alloc_t == "alloc_t=1",
        regime,
        carry == "carry=1",
    )


def fit(runs: dict[str, np.ndarray]) -> dict[str, Any]:
    """The noise model of every regime in `runs` (module docstring)."""
    from scipy import stats

    groups: dict[tuple[str, int], list[np.ndarray]] = defaultdict(list)
    for key, values in runs.items():
        ks, _, regime, _ = parse_key(key)
        groups[regime, sum(ks)].append(np.asarray(values, dtype=np.float64))
    sds: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    scaled: dict[str, list[np.ndarray]] = defaultdict(list)
    for (regime, B), values in sorted(groups.items()):
        for a, b in itertools.combinations(values, 2):
            d = a - b
            if not d.any():
                continue  # the same configuration in this regime
            r = d - d.mean()
            sd = float(r.std(ddof=1))
            if sd < ROUNDING:
                continue  # the same configuration up to float rounding (e.g. every K_l at K_base)
            sds[regime][B].append(sd)
            scaled[regime].append(r / sd)
    if not sds:
        raise ValueError("no two distinct runs at one budget in one regime: nothing to fit")
    model: dict[str, Any] = {}
    for regime in sorted(sds):
        pooled = np.concatenate(scaled[regime])
        df, _, scale = stats.t.fit(pooled, floc=0.0)
        by_budget = {B: statistics.median(v) for B, v in sorted(sds[regime].items())}
        model[regime] = {
            "df": float(df),
            "scale": float(scale),
            "sd_by_budget": {str(B): sd for B, sd in by_budget.items()},
            "pairs": sum(len(v) for v in sds[regime].values()),
            "kurtosis": float(stats.kurtosis(pooled)),
        }
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("npz", type=Path, help="held-out runs from `vllm-alloc profile --dump-heldout`")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per held-out sequence")
    p.add_argument("--source", required=True, help="which model and profile the runs come from")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("guard_noise.json"))
    args = p.parse_args(argv)
    with np.load(args.npz) as data:
        runs = {k: data[k] for k in data.files}
    sequences = {v.size for v in runs.values()}
    if len(sequences) != 1:
        raise SystemExit(f"{args.npz}: runs of different lengths {sorted(sequences)}")
    result = {
        "source": args.source,
        "sequences": sequences.pop(),
        "seq_len": args.seq_len,
        "regimes": fit(runs),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for regime, m in result["regimes"].items():
        sds = list(m["sd_by_budget"].values())
        print(
            f"{regime}: {m['pairs']} pairs, sd {min(sds):.4f}-{max(sds):.4f} (median by B), "
            f"t df {m['df']:.2f}, excess kurtosis {m['kurtosis']:.2f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
