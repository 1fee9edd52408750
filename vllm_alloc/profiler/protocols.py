"""Alloc-L profiling protocols and the held-out guard, over an abstract evaluator (no vLLM here).

Everything measures through one callable, `evaluate(K_vector, split) -> metric` (lower is better;
`vllm-alloc profile` passes calibration perplexity measured through the served model, tests pass a
fake). `split` is "profile" (sensitivities) or "heldout" (validation of candidates).

Protocols (DESIGN.md §2), both giving a matrix S[l][k-1] for `alloc_l.solve`:
  * isolating (the paper's): S[l][k] = metric with layers < l at K, layer l at k, layers > l at K_base
    (top-1 by default), measured deep to shallow. S[l][K] is the configuration of S[l+1][K_base], so it
    is reused, not re-run: L·(K − K_base) + 1 distinct evaluations, and one matrix serves every B.
  * operating-point at budget B: the same one-layer sweep with the other layers at uniform(B); the
    configuration k = uniform(B)[l] is shared by every row, so also L·(K − K_base) + 1 evaluations, per B.
Columns k < K_base cannot be run (the integration refuses K_l < K_base); they copy the K_base column,
which the DP never reads (k_min = K_base).

Selection rule (the guard), per absolute budget B from L·K_base to A:
  1. Baselines: "uniform" (alloc_l.uniform with Alloc-T: what the plugin serves without a budget file)
     and "uniform (no Alloc-T)" (every token keeps its top-K_l: at B = L·k this is vLLM's own top-k).
     Challengers: "uniform (no Alloc-T)", the isolating DP at B and, at requested budgets only, the
     operating-point DP at B, each with and without Alloc-T; and where the profiler calibrated the
     carried balance (`vllm_alloc.routing.carry`), uniform and each DP with Alloc-T carrying it (" + carry").
  2. Every configuration is run on the held-out split in each regime it is served in: prefill (scope
     `budget`: a step's tokens at one B share a pool) and decode of a lone stream (scope `token`: groups
     of one token, where Alloc-T has nothing to move, so with and without it are one run; scope
     `stream` where it carries the balance). Nothing carries in prefill, so there a carrying candidate
     is its twin's run. A run gives the mean NLL of each held-out sequence.
  3. Paired test: a challenger against a baseline, in one regime, is the per-sequence difference of mean
     NLL; its mean and normal-approximation interval at `confidence`, as relative changes of perplexity
     (`paired_test`). A challenger *passes* when against each baseline (other than itself) it differs in
     some regime, and in every regime where the two differ the whole interval is below zero (better with
     that confidence). A challenger that runs a baseline's configuration therefore never ships under
     its own name. The passing challenger with the best worst-regime change against "uniform" ships;
     with none, B runs "uniform". The loader checks the same rule (`budget.Candidate.passes`).
  4. Candidates are measured only at the *validated* budgets: the requested ones, plus every B when
     there are at most `all_budgets_up_to` budgets in the range, else every multiple of L (b = k/K).
     Every other B keeps uniform, with no candidates recorded: an allocation nobody measured is never
     shipped. B = A is always all K (the stock model), and no candidate is measured there.
  5. Resolution: the median half-width of the intervals that compare different runs. The profiler
     reports it against the difference the split should resolve (`TARGET`, 0.2 %).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

from vllm_alloc.budget.alloc_l import solve, uniform

__all__ = [
    "CAP_KEEP",
    "CAP_SHARES",
    "CAP_STREAMS",
    "CARRY",
    "PROTOCOLS",
    "REGIMES",
    "CapValidate",
    "Evaluate",
    "Memo",
    "ProfileResult",
    "Validate",
    "Validations",
    "cap_test",
    "choose_cap",
    "isolating_configs",
    "isolating_sensitivity",
    "operating_point_configs",
    "operating_point_sensitivity",
    "paired_test",
    "profile",
    "select",
    "validated_budgets",
]

Evaluate = Callable[[Sequence[int], str], float]
# (K vector, Alloc-T on, regime, carried balance on) -> the mean NLL of each held-out sequence, in one
# fixed order.
Validate = Callable[[Sequence[int], bool, str, bool], Sequence[float]]
PROTOCOLS: tuple[str, ...] = ("isolating", "operating-point")
REGIMES: tuple[str, ...] = ("prefill", "decode")
CONFIDENCE = 0.95  # of every paired interval
TARGET = 0.002  # the relative perplexity difference the held-out split should resolve
UNIFORM = "uniform"
NO_ALLOC_T = " (no Alloc-T)"  # suffix of a candidate's name that runs without Alloc-T
CARRY = (
    " + carry"  # suffix of a candidate's name that carries the balance in decode (vllm_alloc.routing.carry)
)
PROFILE_SPLIT, HELDOUT_SPLIT = "profile", "heldout"


def _check_shape(L: int, K: int, k_base: int) -> None:
    if L < 1 or K < 1:
        raise ValueError(f"L = {L}, K = {K}: both must be ≥ 1")
    if not 1 <= k_base <= K:
        raise ValueError(f"k_base = {k_base} is outside the valid range [1, K = {K}]")


def _metric(value: float, ks: Sequence[int], split: str) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise RuntimeError(
            f"evaluation of K = {list(ks)} on the {split} split gave {v}; need a finite metric"
        )
    return v


def isolating_configs(L: int, K: int, k_base: int = 1) -> list[tuple[int, int, list[int]]]:
    """(l, k, vector) for every distinct run of the isolating protocol, in run order (deep to shallow).

    The first run is all K (= S[L-1][K]); then for l = L-1..0, k = K-1..K_base. S[l][K] for l < L-1 is
    the run of (l+1, K_base), which already happened: layers ≤ l at K, layers > l at K_base."""
    _check_shape(L, K, k_base)
    runs = [(L - 1, K, [K] * L)]
    for l in range(L - 1, -1, -1):
        for k in range(K - 1, k_base - 1, -1):
            runs.append((l, k, [K] * l + [k] + [k_base] * (L - l - 1)))
    return runs


def isolating_sensitivity(evaluate: Evaluate, L: int, K: int, k_base: int = 1) -> list[list[float]]:
    """S[l][k-1] under the isolating protocol; calls `evaluate` exactly L·(K − K_base) + 1 times."""
    S = [[math.nan] * K for _ in range(L)]
    for l, k, ks in isolating_configs(L, K, k_base):
        S[l][k - 1] = _metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
    for l in range(L - 1):
        S[l][K - 1] = S[l + 1][k_base - 1]  # the shared configuration (see isolating_configs)
    return _fill_below_base(S, k_base)


def operating_point_configs(L: int, K: int, B: int, k_base: int = 1) -> list[tuple[int, int, list[int]]]:
    """(l, k, vector) for the operating-point sweep at B: uniform(B) first, then each layer l at every
    other k with the rest at uniform(B)."""
    _check_shape(L, K, k_base)
    base = uniform(L, K, B, k_min=k_base)
    runs = [(-1, 0, list(base))]  # (-1, 0): the shared centre, S[l][base[l]] for every l
    for l in range(L):
        for k in range(k_base, K + 1):
            if k != base[l]:
                runs.append((l, k, [*base[:l], k, *base[l + 1 :]]))
    return runs


def operating_point_sensitivity(
    evaluate: Evaluate, L: int, K: int, B: int, k_base: int = 1
) -> list[list[float]]:
    """S[l][k-1] with the other layers at uniform(B); calls `evaluate` L·(K − K_base) + 1 times."""
    base = uniform(L, K, B, k_min=k_base)
    S = [[math.nan] * K for _ in range(L)]
    for l, k, ks in operating_point_configs(L, K, B, k_base):
        value = _metric(evaluate(ks, PROFILE_SPLIT), ks, PROFILE_SPLIT)
        if l < 0:
            for row, k_l in zip(S, base, strict=True):
                row[k_l - 1] = value
        else:
            S[l][k - 1] = value
    return _fill_below_base(S, k_base)


def _fill_below_base(S: list[list[float]], k_base: int) -> list[list[float]]:
    # k < K_base is not runnable; copy the K_base column so the matrix is complete and finite for the
    # budget-file schema. solve(k_min=K_base) never reads these entries.
    for row in S:
        for k in range(1, k_base):
            row[k - 1] = row[k_base - 1]
    return S


def validated_budgets(
    L: int, K: int, requested: Iterable[int], k_base: int = 1, all_budgets_up_to: int = 32
) -> list[int]:
    """The budgets B whose candidates are measured on held-out data (rule 3 of the module docstring)."""
    _check_shape(L, K, k_base)
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


def select(
    candidates: Sequence[tuple[str, Sequence[int], bool, bool]],
    validations: Validations,
    regimes: Sequence[str] = REGIMES,
    confidence: float = CONFIDENCE,
    thresholds: Callable[[Sequence[int]], list[float | None]] | None = None,
) -> dict[str, Any]:
    """Run each candidate in each regime and pick the winner (rules 1 to 3): an `Allocation` dict.

    `candidates` are (name, K vector, Alloc-T, carry) and must start with the two baselines:
    ("uniform", u, True, False) and ("uniform (no Alloc-T)", u, False, False). Where the winner carries,
    `thresholds(K)` gives its θ per layer (the allocation's `carry`)."""
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
    baselines = candidates[:2]
    rows: list[dict[str, Any]] = []
    for name, ks, alloc_t, carry in candidates:
        nll = {r: validations(ks, alloc_t, r, carry) for r in regimes}
        row: dict[str, Any] = {
            "name": name,
            "allocation": [int(k) for k in ks],
            "alloc_t": bool(alloc_t),
            "carry": bool(carry),
            "measured": math.exp(float(nll[regimes[0]].mean())),
        }
        if "decode" in regimes:
            row["decode"] = math.exp(float(nll["decode"].mean()))
        row["tests"] = [
            {"regime": r, "baseline": b_name, **paired_test(nll[r], validations(b_ks, b_on, r), confidence)}
            for b_name, b_ks, b_on, _ in baselines
            if b_name != name
            for r in regimes
        ]
        rows.append(row)

    def worst_vs_uniform(row: dict[str, Any]) -> float:
        return max(t["delta"] for t in row["tests"] if t["baseline"] == UNIFORM)

    from vllm_alloc.budget import Candidate  # the file's own rule, so profiler and loader agree

    passing = [row for row in rows[1:] if Candidate.model_validate(row).passes()]
    best = min(passing, key=worst_vs_uniform) if passing else rows[0]  # min keeps the earliest of ties
    chosen = {
        "budget": sum(candidates[0][1]),
        "k": best["allocation"],
        "chosen": best["name"],
        "alloc_t": best["alloc_t"],
        "candidates": rows,
    }
    if best["carry"]:
        assert thresholds is not None
        chosen["carry"] = thresholds(best["allocation"])
    return chosen


def half_widths(allocations: Iterable[dict[str, Any]]) -> list[float]:
    """Half-widths of every recorded interval that compares different runs (rule 5)."""
    return [
        (t["high"] - t["low"]) / 2
        for a in allocations
        for c in a.get("candidates", [])
        for t in c.get("tests", [])
        if not t["low"] == t["high"] == 0.0
    ]


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


def choose_cap(
    B: int,
    L: int,
    validate: CapValidate,
    baseline: Sequence[float] | np.ndarray,
    streams: Sequence[int] = CAP_STREAMS,
    shares: Sequence[float] = CAP_SHARES,
    keep: float = CAP_KEEP,
    confidence: float = CONFIDENCE,
) -> tuple[list[float] | None, list[dict[str, Any]]]:
    """The cap of B: (ρ for every layer, or None for no cap; the tests run).

    Shares are tried from the largest down, each at every stream count N (smallest first); a share
    passes where at every N the capped run is better than `baseline` (uniform without Alloc-T at B,
    the same in every regime) with confidence, and keeps at least `keep` of the served configuration's
    gain over it. The search stops at the first share that fails (cutting more does not give quality
    back), and the smallest share that passed ships. The served configuration is the file's at B,
    carrying and Alloc-T as they ship."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep = {keep} is outside the valid range [0, 1]")
    bad = [r for r in shares if not 0.001 <= r < 1.0]
    if bad or not shares or not streams or any(n < 2 for n in streams):
        raise ValueError(
            f"shares {list(shares)} must be in [0.001, 1) and streams {list(streams)} at least 2 (a lone "
            "stream is never capped)"
        )
    served = {n: validate(B, None, n) for n in sorted(streams)}
    tests: list[dict[str, Any]] = []
    chosen: float | None = None
    for share in sorted(set(shares), reverse=True):
        passed = True
        for n in sorted(streams):
            test = {
                "share": share,
                "streams": n,
                **cap_test(validate(B, share, n), served[n], baseline, confidence),
            }
            tests.append(test)
            if not (test["high"] < 0.0 and test["kept"] >= keep):
                passed = False
                break
        if not passed:
            break
        chosen = share
    return ([chosen] * L if chosen is not None else None), tests


@dataclass
class ProfileResult:
    """What `profile` measured and decided; `vllm_alloc.profiler.profile` turns it into a BudgetFile."""

    L: int
    K: int
    k_base: int
    isolating: list[list[float]] | None = None  # S under the isolating protocol
    operating_point: dict[int, list[list[float]]] = field(default_factory=dict)  # B -> S
    allocations: list[dict[str, Any]] = field(default_factory=list)  # one per B, Allocation schema
    validated: list[int] = field(default_factory=list)  # the B whose candidates were measured


class Memo:
    """Wraps an evaluator: each distinct (vector, split) runs once; `runs` counts real evaluations.

    Across protocols configurations repeat (all-K, the operating-point centre at B = L·K_base, ...);
    the memo keeps the model from running any of them twice."""

    def __init__(self, evaluate: Evaluate, on_run: Callable[[], None] | None = None) -> None:
        self._evaluate = evaluate
        self._on_run = on_run
        self.cache: dict[tuple[tuple[int, ...], str], float] = {}

    @property
    def runs(self) -> int:
        return len(self.cache)

    def __call__(self, ks: Sequence[int], split: str) -> float:
        key = (tuple(int(k) for k in ks), split)
        if key not in self.cache:
            self.cache[key] = _metric(self._evaluate(list(key[0]), split), key[0], split)
            if self._on_run is not None:
                self._on_run()
        return self.cache[key]


def planned_profile_runs(
    L: int, K: int, budgets: Iterable[int], protocols: Sequence[str], k_base: int = 1
) -> int:
    """Distinct profile-split evaluations `profile` will run (for a progress bar's total)."""
    configs: set[tuple[int, ...]] = set()
    if "isolating" in protocols:
        configs.update(tuple(ks) for _, _, ks in isolating_configs(L, K, k_base))
    if "operating-point" in protocols:
        for B in budgets:
            configs.update(tuple(ks) for _, _, ks in operating_point_configs(L, K, B, k_base))
    return len(configs)


def profile(
    evaluate: Evaluate,
    L: int,
    K: int,
    budgets: Sequence[int],
    protocols: Sequence[str] = PROTOCOLS,
    k_base: int = 1,
    all_budgets_up_to: int = 32,
    on_plan: Callable[[int], None] | None = None,
    *,
    validate: Validate | Validations,
    regimes: Sequence[str] = REGIMES,
    confidence: float = CONFIDENCE,
    thresholds: Callable[[Sequence[int]], list[float | None]] | None = None,
) -> ProfileResult:
    """Run the protocols on the profile split (`evaluate`), then choose K(B) and Alloc-T for every B by
    the guard on the held-out split (`validate`; module docstring).

    `budgets` are the requested absolute budgets B (operating-point sweeps run at each, A excluded:
    there is nothing to allocate at the full budget). `on_plan(n)` is told the number of held-out runs
    still to come once the sensitivities are known (progress bars). With `thresholds` (θ per layer of a
    K vector, `vllm_alloc.routing.carry`), every candidate with Alloc-T also runs carrying the balance in
    decode
    (" + carry"), against the same baselines."""
    _check_shape(L, K, k_base)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"protocols {list(protocols)} are not valid; choose one or more of {PROTOCOLS}")
    if not regimes or any(r not in REGIMES for r in regimes) or len(set(regimes)) != len(regimes):
        raise ValueError(f"regimes {list(regimes)} are not valid; choose one or more of {REGIMES}")
    lo, A = L * k_base, L * K
    validated = validated_budgets(L, K, budgets, k_base, all_budgets_up_to)
    requested = sorted(set(budgets) - {A})
    result = ProfileResult(L=L, K=K, k_base=k_base, validated=validated)
    validations = validate if isinstance(validate, Validations) else Validations(validate)

    solved_iso: dict[int, list[int]] = {}
    if "isolating" in protocols:
        result.isolating = isolating_sensitivity(evaluate, L, K, k_base)
        solved_iso = solve(result.isolating, k_min=k_base)
    solved_op: dict[int, list[int]] = {}
    if "operating-point" in protocols:
        for B in requested:
            S = operating_point_sensitivity(evaluate, L, K, B, k_base)
            result.operating_point[B] = S
            solved_op[B] = solve(S, k_min=k_base)[B]

    def candidates(B: int) -> list[tuple[str, list[int], bool, bool]]:
        found = [(UNIFORM, uniform(L, K, B, k_min=k_base))]
        if B in solved_iso:
            found.append(("isolating", solved_iso[B]))
        if B in solved_op:
            found.append(("operating-point", solved_op[B]))
        with_t = [(name, ks, True, False) for name, ks in found]
        without_t = [(name + NO_ALLOC_T, ks, False, False) for name, ks in found]
        carried = [(name + CARRY, ks, True, True) for name, ks in found] if thresholds else []
        challengers = [c for pair in zip(with_t[1:], without_t[1:], strict=True) for c in pair]
        return [with_t[0], without_t[0], *challengers, *carried]

    if on_plan is not None:
        keys = {
            validations.key(ks, on, r, carry)
            for B in validated
            for _, ks, on, carry in candidates(B)
            for r in regimes
        }
        on_plan(len(keys - set(validations.cache)))

    for B in range(lo, A + 1):
        if B in validated:
            result.allocations.append(select(candidates(B), validations, regimes, confidence, thresholds))
        else:
            k = uniform(L, K, B, k_min=k_base)
            result.allocations.append({"budget": B, "k": k, "chosen": UNIFORM, "alloc_t": True})
    return result
