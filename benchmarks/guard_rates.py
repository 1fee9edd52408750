"""The profiler guard's false-winner rate and power, by simulation (docs/profiling.md, "How often the
guard is wrong").

A synthetic profile of the default model's shape (L = 4, K = 4, budgets 0.33, 0.5, 0.75; every B
validated; both protocols, the carried balance and the distinct-expert cap tried, as `make_default_budget`
profiles it) runs the whole guard, `runner.profile` then `guard.choose_cap` at each requested B, on
held-out runs drawn from a noise model fitted to a real profile (`guard_noise.json`, written by
`fit_guard_noise.py`): every run's per-sequence mean NLL is the sequence's difficulty (shared, so pairing
cancels it) plus the configuration's true effect plus Student-t noise whose pairwise differences have
the deviation measured at that B and regime.

- **null**: every configuration is, in truth, equal to uniform. A file is *wrong* when it ships a
  challenger or a cap at any B; the rate of wrong files must stay below 1 − confidence (5 %). Where it
  confirms Alloc-T (also no better in truth) is counted apart.
- **gain**: the isolating DP at b = 0.5 (with Alloc-T) is 1 % better than uniform in every regime, all
  else as in null. The rate at which it ships there is the guard's power at that size.

Three sizes: the shipped profile's (360 held-out sequences of 256 tokens), `vllm-alloc profile`'s
defaults (192 of 512; the fitted deviations scaled by √(256/512), as the mean NLL of a sequence twice as
long) and a user's 32 k-token profile (64 of 256). The last column runs the guard from before the
confirmation split on the same runs: choose and certify on every held-out sequence, 95 % per interval.

    python benchmarks/guard_rates.py --seeds 1000 --out build/guard_rates.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vllm_alloc.budget.alloc_l import solve, uniform
from vllm_alloc.profiler import guard, runner
from vllm_alloc.profiler.protocols import isolating_sensitivity

NOISE = Path(__file__).with_name("guard_noise.json")
L, K = 4, 4
REQUESTED = (5, 8, 12)  # b = 0.33, 0.5, 0.75 of A = 16
WEIGHTS = (8.0, 1.0, 1.0, 1.0)  # the profile split's layer weights: the DPs move experts to layer 0
GAIN = 0.01  # the true gain of the "gain" case, in mean NLL (≈ 1 % of perplexity)
GAIN_B = 8
SIZES = {"shipped profile": (360, 256), "profile defaults": (192, 512), "32 k-token profile": (64, 256)}
POWER_SIZES = ("shipped profile", "profile defaults")  # where a 1 % gain must ship (#32)


@dataclass(frozen=True)
class NoiseModel:
    """Student-t noise per regime, with the deviation of pairwise differences per B (guard_noise.json)."""

    df: dict[str, float]
    sd: dict[str, dict[int, float]]
    seq_len: int

    @classmethod
    def load(cls, path: Path = NOISE) -> NoiseModel:
        data = json.loads(path.read_text(encoding="utf-8"))
        regimes = data["regimes"]
        return cls(
            df={r: m["df"] for r, m in regimes.items()},
            sd={r: {int(B): sd for B, sd in m["sd_by_budget"].items()} for r, m in regimes.items()},
            seq_len=int(data["seq_len"]),
        )

    def draw(self, rng: np.random.Generator, regime: str, B: int, n: int, seq_len: int) -> np.ndarray:
        """One run's noise: unit-variance t draws times sd/√2 (so two runs differ by the fitted sd), the
        sd of the nearest measured B, scaled from the fitted sequence length to `seq_len`."""
        sds = self.sd[regime]
        sd = sds[min(sds, key=lambda b: abs(b - B))] * math.sqrt(self.seq_len / seq_len)
        df = max(self.df[regime], 2.5)  # a unit variance needs df > 2
        return rng.standard_t(df, n) * math.sqrt((df - 2) / df) * sd / math.sqrt(2)


def thresholds(ks: Sequence[int]) -> list[float | None]:
    return [None if k == 1 else 0.1 * k for k in ks]


def additive(ks: Sequence[int], split: str) -> float:
    return 1.0 + sum(w / k for w, k in zip(WEIGHTS, ks, strict=True))


@dataclass
class Outcome:
    challenger: bool  # a challenger ships at some B (other than the true gain where it ships)
    cap: bool  # a cap ships at some B
    alloc_t: bool  # "uniform" (Alloc-T confirmed) ships at some validated B
    gain_shipped: bool  # the isolating DP ships at GAIN_B
    old_challenger: bool  # the guard before the confirmation split would ship a false challenger

    @property
    def wrong(self) -> bool:
        return self.challenger or self.cap


def one_file(noise: NoiseModel, seed: int, n: int, seq_len: int, gain: bool) -> Outcome:
    """Profile once with the synthetic held-out runs of `seed` and say what shipped."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(3.0, 0.5, n)
    iso = solve(isolating_sensitivity(additive, L, K), k_min=1)[GAIN_B] if gain else None

    def validate(ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> np.ndarray:
        key = (tuple(ks), alloc_t, regime, carry)
        run_rng = np.random.default_rng([seed, zlib.crc32(repr(key).encode())])
        effect = -GAIN if iso is not None and list(ks) == iso and alloc_t and not carry else 0.0
        return difficulty + effect + noise.draw(run_rng, regime, sum(ks), n, seq_len)

    per_budget = guard.cap_comparisons(1, len(guard.CAP_SHARES), len(guard.CAP_STREAMS))
    result = runner.profile(
        additive,
        L,
        K,
        list(REQUESTED),
        validate=validate,
        thresholds=thresholds,
        cap_tests=per_budget * len(REQUESTED),
    )
    by_b = {a["budget"]: a for a in result.allocations}
    gain_shipped = iso is not None and by_b[GAIN_B]["k"] == iso and not by_b[GAIN_B].get("carry")
    challenger = any(
        a["chosen"] not in (guard.UNIFORM, guard.UNIFORM + guard.NO_ALLOC_T)
        and not (gain_shipped and B == GAIN_B)
        for B, a in by_b.items()
    )
    alloc_t = any(a["chosen"] == guard.UNIFORM and "candidates" in a for a in by_b.values())
    cap = False
    for B in REQUESTED:
        baseline = validate(uniform(L, K, B), False, "decode")

        def capped(B: int, share: float | None, streams: int, _B: int = B) -> np.ndarray:
            run_rng = np.random.default_rng([seed, B, streams, int(1000 * (share or 0.0)), 7])
            return difficulty + noise.draw(run_rng, "decode", B, n, seq_len)

        shipped, _ = guard.choose_cap(
            B, L, capped, baseline, confirmation_confidence=result.confirmation_confidence
        )
        cap |= shipped is not None
    return Outcome(challenger, cap, alloc_t, gain_shipped, old_guard_ships(by_b, validate, iso))


def old_guard_ships(by_b: dict[int, dict], validate: guard.Validate, true_gain: list[int] | None) -> bool:
    """What the guard before the confirmation split did with the same runs: a challenger ships where it
    holds against both baselines on every held-out sequence at 95 % per interval, the data that chose
    it; True where it would ship a challenger that is not the true gain."""
    from vllm_alloc.budget.records import PairedTest, holds

    runs = guard.Validations(validate)
    for a in by_b.values():
        rows = a.get("candidates", [])
        for c in rows[2:]:
            if c["allocation"] == true_gain and c["alloc_t"] and not c["carry"]:
                continue
            tests = [
                PairedTest(
                    regime=r,
                    baseline=b["name"],
                    **guard.paired_test(
                        runs(c["allocation"], c["alloc_t"], r, c["carry"]),
                        runs(b["allocation"], b["alloc_t"], r),
                    ),
                )
                for b in rows[:2]
                for r in guard.REGIMES
            ]
            if holds(tests):
                return True
    return False


def rates(
    noise: NoiseModel, seeds: int, n: int, seq_len: int, gain: bool, first_seed: int = 0
) -> dict[str, float]:
    outcomes = [one_file(noise, first_seed + s, n, seq_len, gain) for s in range(seeds)]

    def rate(pick: Callable[[Outcome], bool]) -> float:
        return sum(map(pick, outcomes)) / seeds

    return {
        "wrong": rate(lambda o: o.wrong),
        "challenger": rate(lambda o: o.challenger),
        "cap": rate(lambda o: o.cap),
        "alloc_t": rate(lambda o: o.alloc_t),
        "gain_shipped": rate(lambda o: o.gain_shipped),
        "old_challenger": rate(lambda o: o.old_challenger),
    }


def upper95(k: float, n: int) -> float:
    """Clopper-Pearson upper bound (one-sided 95 %) of a rate seen as k/n."""
    from scipy import stats

    hits = round(k * n)
    return 1.0 if hits >= n else float(stats.beta.ppf(0.95, hits + 1, n - hits))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1000, help="synthetic files per case and size")
    p.add_argument("--out", type=Path, help="also write the table (markdown)")
    args = p.parse_args(argv)
    noise = NoiseModel.load()
    lines = [
        f"Guard rates over {args.seeds} synthetic files per row ({guard.CONFIDENCE:.0%} per file; "
        f"noise: {NOISE.name}, fitted at {noise.seq_len} tokens)",
        "",
        "| size | case | file wrong (challenger or cap) | challenger | cap | Alloc-T confirmed | "
        "1 % gain ships | before the split: false challenger |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (n, seq_len) in SIZES.items():
        for case in ("null", "gain"):
            start = time.monotonic()
            r = rates(noise, args.seeds, n, seq_len, case == "gain")
            wrong = f"{r['wrong']:.2%} (≤ {upper95(r['wrong'], args.seeds):.2%})"
            lines.append(
                f"| {name}: {n} × {seq_len} | {case} | {wrong} | {r['challenger']:.2%} | {r['cap']:.2%} | "
                f"{r['alloc_t']:.2%} | {r['gain_shipped']:.2%} | {r['old_challenger']:.2%} |"
            )
            print(lines[-1], f"({time.monotonic() - start:.0f} s)", flush=True)
    text = "\n".join(lines) + "\n\n(≤: the one-sided 95 % Clopper-Pearson upper bound of the rate)\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
