"""The held-out guard: which Alloc-L allocation ships at each budget, and the distinct-expert cap's rule,
over abstract held-out runs (no vLLM here).

Selection rule (the guard), per absolute budget B from L·K_base to A:
  1. Baselines: "uniform" (alloc_l.uniform with Alloc-T: what the plugin serves without a budget file)
     and "uniform (no Alloc-T)" (every token keeps its top-K_l: at B = L·k this is vLLM's own top-k).
     Challengers: the isolating DP at B and, at requested budgets only, the operating-point DP at B,
     each with and without Alloc-T; and where the profiler calibrated the carried balance
     (`vllm_alloc.routing.carry`), uniform and each DP with Alloc-T carrying it (" + carry").
  2. Every configuration is run on the held-out split in each regime it is served in: prefill (scope
     `budget`: a step's tokens at one B share a pool) and decode of a lone stream (scope `token`: groups
     of one token, where Alloc-T has nothing to move, so with and without it are one run; carrying, in
     decode order with the θ and pool it ships with). Nothing carries in prefill, so there a carrying
     candidate is its twin's run. A run gives the mean NLL of each held-out sequence.
  3. The held-out sequences are cut in two (`split_at`): the first quarter *selects*, the other three
     quarters, which the selection never saw, *confirm*. Picking the best of several noisy estimates
     favours luck (the winner's curse); a confirmation on other data does not. Ranking needs less data
     than confirming a gain at the corrected confidence, hence the unequal cut (with half and half, a
     true 1 % gain shipped in 63-77 % of simulated files at the default sizes; with a quarter, 95-98 %:
     `benchmarks/guard_rates.py`).
  4. Paired test: a configuration against a baseline, in one regime, is the per-sequence difference of
     mean NLL; its mean and normal-approximation interval, as relative changes of perplexity
     (`paired_test`). A configuration *holds* against the baselines when against each it differs in
     some regime and, in every regime where the two differ, the whole interval is below zero
     (`budget.records.holds`).
  5. Selection (first quarter, intervals at `confidence`, recorded as each candidate's `tests`): among
     the challengers that differ from both baselines, the one whose worst estimate (over both baselines
     and every regime where they differ) is lowest, if that is below zero.
  6. Confirmation (the rest, recorded as `confirmation`): the selected challenger against both
     baselines, with intervals at `confirmation_confidence` = 1 − (1 − confidence) / m, where m counts
     every paired comparison the profiler makes (`comparisons`: candidates × baselines × regimes ×
     budgets, plus the cap's shares × streams × budgets), so `confidence` bounds the chance that the
     file holds any false claim. It ships if it holds. Otherwise B ships uniform: with Alloc-T where the
     confirmation shows "uniform" holding against "uniform (no Alloc-T)", else without. The loader
     checks the same rule (`budget.records._check_against_uniform`).
  7. Candidates are measured only at the *validated* budgets: the requested ones, plus every B when
     there are at most `all_budgets_up_to` budgets in the range, else every multiple of L (b = k/K).
     Every other B keeps uniform, with no candidates recorded: an allocation nobody measured is never
     shipped. B = A is always all K (the stock model), and no candidate is measured there.
  8. Resolution: the median half-width of the confirmation's intervals, at its confidence, over every
     challenger-baseline comparison that differs (`Selected.widths`). The profiler reports it against
     the difference the split should resolve (`TARGET`, 0.2 %) and, where it does not, the tokens that
     would.

The distinct-expert cap (`choose_cap`) is chosen the same way, per requested B, in the decode regime,
once the file's allocations are known (`profiler.cap_stage`): the shares searched on the selection's
sequences, the chosen one confirmed on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from vllm_alloc.profiler.protocols import check_shape

__all__ = [
    "CAP_KEEP",
    "CAP_SHARES",
    "CAP_STREAMS",
    "CARRY",
    "REGIMES",
    "CapValidate",
    "Selected",
    "Validate",
    "Validations",
    "cap_comparisons",
    "cap_test",
    "choose_cap",
    "comparisons",
    "corrected",
    "paired_test",
    "select",
    "split_at",
    "validated_budgets",
]

# (K vector, Alloc-T on, regime, carried balance on) -> the mean NLL of each held-out sequence, in one
# fixed order.
Validate = Callable[[Sequence[int], bool, str, bool], Sequence[float]]
REGIMES: tuple[str, ...] = ("prefill", "decode")
CONFIDENCE = 0.95  # of every paired interval
TARGET = 0.002  # the relative perplexity difference the held-out split should resolve
UNIFORM = "uniform"
NO_ALLOC_T = " (no Alloc-T)"  # suffix of a candidate's name that runs without Alloc-T
CARRY = (
    " + carry"  # suffix of a candidate's name that carries the balance in decode (vllm_alloc.routing.carry)
)


def validated_budgets(
    L: int, K: int, requested: Iterable[int], k_base: int = 1, all_budgets_up_to: int = 32
) -> list[int]:
    """The budgets B whose candidates are measured on held-out data (rule 4 of the module docstring)."""
    check_shape(L, K, k_base)
    lo, A = L * k_base, L * K
    chosen = set(requested)
    bad = sorted(B for B in chosen if not lo <= B <= A)
    if bad:
        raise ValueError(
            f"requested budgets B = {bad} are outside the valid range [L·K_base = {lo}, A = {A}]"
        )
    if A - lo + 1 <= all_budgets_up_to:
        chosen.update(range(lo, A + 1))
    else:
        chosen.update(B for B in range(lo, A + 1) if B % L == 0)
    chosen.discard(A)  # the stock model, by definition
    return sorted(chosen)


def paired_test(
    challenger: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """Rule 3: per-sequence mean NLL of a challenger and a baseline on the same sequences -> the relative
    change of perplexity, exp(mean difference) − 1, and its interval (normal approximation, two-sided at
    `confidence`). Exactly 0, 0, 0 when every difference is 0 (the two ran the same configuration)."""
    d = np.asarray(challenger, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"a paired test needs two equal lists of ≥ 2 sequences, got shape {d.shape}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} is outside the valid range (0, 1)")
    if not d.any():
        return {"delta": 0.0, "low": 0.0, "high": 0.0}
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    mean, half = float(d.mean()), z * float(d.std(ddof=1)) / math.sqrt(d.size)
    return {"delta": math.expm1(mean), "low": math.expm1(mean - half), "high": math.expm1(mean + half)}


class Validations:
    """Wraps a `Validate`: each distinct (vector, Alloc-T, regime, carry) runs once; `runs` counts real
    runs.

    In the decode regime (groups of one token) Alloc-T has nothing to move, so with and without it are
    one run. In prefill no token is alone in its group, so nothing carries: with and without the carried
    balance are one run."""

    def __init__(self, validate: Validate) -> None:
        self._validate = validate
        self.cache: dict[tuple[tuple[int, ...], bool, str, bool], np.ndarray] = {}

    @staticmethod
    def key(
        ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False
    ) -> tuple[tuple[int, ...], bool, str, bool]:
        if regime not in REGIMES:
            raise ValueError(f"regime {regime!r} is not valid; expected one of {REGIMES}")
        decode = regime == "decode"
        return tuple(int(k) for k in ks), bool(alloc_t) or decode, regime, bool(carry) and decode

    @property
    def runs(self) -> int:
        return len(self.cache)

    def __call__(self, ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> np.ndarray:
        key = self.key(ks, alloc_t, regime, carry)
        if key not in self.cache:
            values = np.asarray(self._validate(list(key[0]), key[1], regime, key[3]), dtype=np.float64)
            if values.ndim != 1 or values.size < 2 or not np.isfinite(values).all():
                raise RuntimeError(
                    f"held-out run of K = {list(key[0])} (Alloc-T {key[1]}, {regime}, carry {key[3]}) gave "
                    f"{values[:8]}; "
                    "need a finite mean NLL for each of ≥ 2 sequences"
                )
            if self.cache and values.size != next(iter(self.cache.values())).size:
                raise RuntimeError(f"held-out run of K = {list(key[0])} returned {values.size} sequences")
            self.cache[key] = values
        return self.cache[key]


def split_at(sequences: int) -> int:
    """How many of the held-out sequences select (the first quarter, at least 2); the rest confirm
    (rule 3)."""
    if sequences < 4:
        raise ValueError(
            f"{sequences} held-out sequences are too few: the guard needs ≥ 2 to select and ≥ 2 to confirm"
        )
    return max(2, sequences // 4)


def corrected(confidence: float, comparisons: int) -> float:
    """The confidence of each confirmation interval (rule 6, Bonferroni): 1 − (1 − confidence) / m."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence = {confidence} is outside the valid range (0, 1)")
    if comparisons < 1:
        raise ValueError(f"comparisons = {comparisons} is outside the valid range [1, inf)")
    return 1.0 - (1.0 - confidence) / comparisons


def comparisons(candidates_per_budget: Iterable[int], regimes: int, cap_tests: int = 0) -> int:
    """m of rule 6: per validated B, each challenger against both baselines in every regime and uniform
    against uniform without Alloc-T in every regime; plus `cap_tests` (`cap_comparisons`)."""
    return sum((n - 2) * 2 * regimes + regimes for n in candidates_per_budget) + cap_tests


@dataclass
class Selected:
    """`select`'s result: the `Allocation` dict, and the confirmation's half-widths of every
    challenger-baseline comparison that differs (rule 8)."""

    allocation: dict[str, Any]
    widths: list[float] = field(default_factory=list)


def select(
    candidates: Sequence[tuple[str, Sequence[int], bool, bool]],
    validations: Validations,
    regimes: Sequence[str] = REGIMES,
    confidence: float = CONFIDENCE,
    thresholds: Callable[[Sequence[int]], list[float | None]] | None = None,
    *,
    confirmation_confidence: float | None = None,
) -> Selected:
    """Run each candidate in each regime, select on the first quarter of the held-out sequences and
    confirm on the rest (rules 1 to 6).

    `candidates` are (name, K vector, Alloc-T, carry) and must start with the two baselines:
    ("uniform", u, True, False) and ("uniform (no Alloc-T)", u, False, False). Where the winner carries,
    `thresholds(K)` gives its θ per layer (the allocation's `carry`). `confirmation_confidence` defaults
    to `confidence` corrected for this budget's own comparisons alone."""
    names = [c[0] for c in candidates]
    baselines_ok = len(candidates) >= 2 and candidates[0][2] and not (candidates[0][3] or candidates[1][3])
    if not baselines_ok or names[:2] != [UNIFORM, UNIFORM + NO_ALLOC_T]:
        raise ValueError(
            f"the first candidates must be {UNIFORM!r} (Alloc-T on) and {UNIFORM + NO_ALLOC_T!r}, neither "
            f"carrying; got {names}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    if thresholds is None and any(c[3] for c in candidates):
        raise ValueError("candidates that carry need thresholds (their θ per layer)")
    if confirmation_confidence is None:
        confirmation_confidence = corrected(confidence, comparisons([len(candidates)], len(regimes)))
    nll = [{r: validations(ks, on, r, carry) for r in regimes} for _, ks, on, carry in candidates]
    cut = split_at(nll[0][regimes[0]].size)
    first, second = slice(0, cut), slice(cut, None)

    def tests(c: int, against: Sequence[int], half: slice, level: float) -> list[dict[str, Any]]:
        return [
            {"regime": r, "baseline": names[b], **paired_test(nll[c][r][half], nll[b][r][half], level)}
            for b in against
            if b != c
            for r in regimes
        ]

    rows: list[dict[str, Any]] = []
    for c, (name, ks, alloc_t, carry) in enumerate(candidates):
        row: dict[str, Any] = {
            "name": name,
            "allocation": [int(k) for k in ks],
            "alloc_t": bool(alloc_t),
            "carry": bool(carry),
            "measured": math.exp(float(nll[c][regimes[0]].mean())),
        }
        if "decode" in regimes:
            row["decode"] = math.exp(float(nll[c]["decode"].mean()))
        row["tests"] = tests(c, (0, 1), first, confidence)
        rows.append(row)

    from vllm_alloc.budget.records import PairedTest, holds  # the file's own rule: profiler and loader agree

    def worst(c: int) -> float:
        """The selection's worst estimate against the baselines; +inf where against one of them it ran
        the same configuration in every regime (it is that baseline)."""
        differ = {b: [t for t in rows[c]["tests"] if t["baseline"] == b and not _same(t)] for b in names[:2]}
        return max(t["delta"] for ts in differ.values() for t in ts) if all(differ.values()) else math.inf

    def confirmed(found: list[dict[str, Any]]) -> bool:
        return holds([PairedTest.model_validate(t) for t in found])

    # Every comparison on the confirmation's sequences: the resolution reads them all (rule 8), the
    # picked challenger's and, where it fails, uniform's are recorded.
    confirming = {
        c: tests(c, (0, 1) if c >= 2 else (1,), second, confirmation_confidence)
        for c in range(len(rows))
        if c != 1
    }
    widths = [(t["high"] - t["low"]) / 2 for found in confirming.values() for t in found if not _same(t)]
    picked = min(range(2, len(rows)), key=worst, default=None)  # min keeps the earliest of ties
    chosen = 0
    if picked is not None and worst(picked) < 0.0:
        rows[picked]["confirmation"] = confirming[picked]
        if confirmed(confirming[picked]):
            chosen = picked
    if chosen == 0:
        rows[0]["confirmation"] = confirming[0]
        chosen = 0 if confirmed(confirming[0]) else 1
    best = rows[chosen]
    allocation = {
        "budget": sum(candidates[0][1]),
        "k": best["allocation"],
        "chosen": best["name"],
        "alloc_t": best["alloc_t"],
        "candidates": rows,
    }
    if best["carry"]:
        assert thresholds is not None
        allocation["carry"] = thresholds(best["allocation"])
    return Selected(allocation, widths)


def _same(test: dict[str, Any]) -> bool:
    """The two ran the same configuration in the test's regime (`PairedTest.same`)."""
    return test["low"] == test["high"] == 0.0


# The distinct-expert cap (`vllm_alloc.routing.cap`), chosen per requested B in the decode regime
# (`choose_cap`):
# the shares tried, largest first; the decode streams each is measured at (N streams decoding together,
# as served); and the least share of the served configuration's gain over uniform without Alloc-T that
# a capped B keeps (BENCHMARKS.md: one hand-picked C lost to vLLM's top-k at N = 8).
CAP_SHARES: tuple[float, ...] = (0.9, 0.75, 0.6, 0.5, 0.4, 0.3)
CAP_STREAMS: tuple[int, ...] = (8, 64)
CAP_KEEP = 0.5
# (B, share or None for no cap, N streams) -> the mean NLL of each held-out sequence, the file's own
# configuration at B decoding N streams together as served.
CapValidate = Callable[[int, float | None, int], Sequence[float]]


def cap_test(
    capped: Sequence[float] | np.ndarray,
    served: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> dict[str, float]:
    """The capped run against the baseline (`paired_test`), and `kept`: the share of the served
    (uncapped) run's gain over the baseline, in mean NLL, that the capped run keeps (0 where the served
    run gains nothing: a cap has nothing to keep there)."""
    base = float(np.mean(baseline))
    gain = base - float(np.mean(served))
    kept = (base - float(np.mean(capped))) / gain if gain > 0 else 0.0
    return {**paired_test(capped, baseline, confidence), "kept": kept}


def cap_comparisons(budgets: int, shares: int, streams: int) -> int:
    """The cap's part of m (rule 6): every share at every stream count, at each capped B."""
    return budgets * shares * streams


def choose_cap(
    B: int,
    L: int,
    validate: CapValidate,
    baseline: Sequence[float] | np.ndarray,
    streams: Sequence[int] = CAP_STREAMS,
    shares: Sequence[float] = CAP_SHARES,
    keep: float = CAP_KEEP,
    confidence: float = CONFIDENCE,
    *,
    confirmation_confidence: float | None = None,
    selection: int | None = None,
) -> tuple[list[float] | None, list[dict[str, Any]]]:
    """The cap of B: (ρ for every layer, or None for no cap; the tests run).

    Selection, on the first `selection` held-out sequences (the file's `Guard.selection_sequences`;
    default `split_at`), at `confidence`: shares are
    tried from the largest down, each at every stream count N (smallest first); a share passes where at
    every N the capped run is better than `baseline` (uniform without Alloc-T at B, the same in every
    regime) with confidence, and keeps at least `keep` of the served configuration's gain over it. The
    search stops at the first share that fails (cutting more does not give quality back), and the
    smallest share that passed is chosen. Confirmation, on the other sequences, at `confirmation_confidence`
    (default: `confidence` corrected for this B's shares × streams): the chosen share ships only if it
    passes there too at every N. The served configuration is the file's at B, carrying and Alloc-T as
    they ship. Both halves come from the same runs."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep = {keep} is outside the valid range [0, 1]")
    bad = [r for r in shares if not 0.001 <= r < 1.0]
    if bad or not shares or not streams or any(n < 2 for n in streams):
        raise ValueError(
            f"shares {list(shares)} must be in [0.001, 1) and streams {list(streams)} at least 2 (a lone "
            "stream is never capped)"
        )
    if confirmation_confidence is None:
        m = cap_comparisons(1, len(set(shares)), len(set(streams)))
        confirmation_confidence = corrected(confidence, m)
    base = np.asarray(baseline, dtype=np.float64)
    cut = split_at(base.size) if selection is None else selection
    if not 2 <= cut <= base.size - 2:
        raise ValueError(f"selection = {cut} is outside the valid range [2, {base.size - 2}]")
    first, second = slice(0, cut), slice(cut, None)
    served = {n: np.asarray(validate(B, None, n), dtype=np.float64) for n in sorted(streams)}
    runs: dict[tuple[float, int], np.ndarray] = {}

    def test(share: float, n: int, half: slice, level: float, split: str) -> dict[str, Any]:
        if (share, n) not in runs:
            runs[share, n] = np.asarray(validate(B, share, n), dtype=np.float64)
        found = cap_test(runs[share, n][half], served[n][half], base[half], level)
        return {"share": share, "streams": n, "split": split, **found}

    def passes(t: dict[str, Any]) -> bool:
        return bool(t["high"] < 0.0 and t["kept"] >= keep)

    tests: list[dict[str, Any]] = []
    chosen: float | None = None
    for share in sorted(set(shares), reverse=True):
        passed = True
        for n in sorted(streams):
            tests.append(test(share, n, first, confidence, "selection"))
            if not passes(tests[-1]):
                passed = False
                break
        if not passed:
            break
        chosen = share
    if chosen is None:
        return None, tests
    confirmation = [test(chosen, n, second, confirmation_confidence, "confirmation") for n in sorted(streams)]
    return ([chosen] * L if all(map(passes, confirmation)) else None), tests + confirmation
