"""The profile run over an abstract evaluator (no vLLM here): the protocols on the profile split, then the
guard at every budget (`profile` -> `ProfileResult`), each distinct configuration run once (`Memo`).

The protocols are `profiler.protocols`, the guard and the rule for which budgets are validated
`profiler.guard` (module docstrings); `profiler.build` turns the result into a budget file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_alloc.budget.alloc_l import solve, uniform
from vllm_alloc.profiler.guard import (
    CARRY,
    CONFIDENCE,
    NO_ALLOC_T,
    REGIMES,
    UNIFORM,
    Validate,
    Validations,
    comparisons,
    corrected,
    select,
    validated_budgets,
)
from vllm_alloc.profiler.protocols import (
    PROTOCOLS,
    Evaluate,
    check_shape,
    finite_metric,
    isolating_configs,
    isolating_sensitivity,
    operating_point_configs,
    operating_point_sensitivity,
)

__all__ = ["Memo", "ProfileResult", "planned_profile_runs", "profile"]


@dataclass
class ProfileResult:
    """What `profile` measured and decided; `vllm_alloc.profiler.build` turns it into a BudgetFile."""

    L: int
    K: int
    k_base: int
    isolating: list[list[float]] | None = None  # S under the isolating protocol
    operating_point: dict[int, list[list[float]]] = field(default_factory=dict)  # B -> S
    allocations: list[dict[str, Any]] = field(default_factory=list)  # one per B, Allocation schema
    validated: list[int] = field(default_factory=list)  # the B whose candidates were measured
    comparisons: int = 1  # m: every paired comparison the profiler makes (`guard.comparisons`)
    confirmation_confidence: float = CONFIDENCE  # of each confirmation interval (`guard.corrected`)
    widths: list[float] = field(default_factory=list)  # the confirmation's half-widths (guard rule 8)


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
            self.cache[key] = finite_metric(self._evaluate(list(key[0]), split), key[0], split)
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
    cap_tests: int = 0,
) -> ProfileResult:
    """Run the protocols on the profile split (`evaluate`), then choose K(B) and Alloc-T for every B by
    the guard on the held-out split (`validate`; module docstring).

    `budgets` are the requested absolute budgets B (operating-point sweeps run at each, A excluded:
    there is nothing to allocate at the full budget). `on_plan(n)` is told the number of held-out runs
    still to come once the sensitivities are known (progress bars). With `thresholds` (θ per layer of a
    K vector, `vllm_alloc.routing.carry`), every candidate with Alloc-T also runs carrying the balance in
    decode
    (" + carry"), against the same baselines. `cap_tests`: the paired comparisons the cap stage will
    make (`guard.cap_comparisons`), counted in the confirmation's correction."""
    check_shape(L, K, k_base)
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

    result.comparisons = comparisons([len(candidates(B)) for B in validated], len(regimes), cap_tests)
    result.confirmation_confidence = corrected(confidence, result.comparisons)
    for B in range(lo, A + 1):
        if B in validated:
            selected = select(
                candidates(B),
                validations,
                regimes,
                confidence,
                thresholds,
                confirmation_confidence=result.confirmation_confidence,
            )
            result.allocations.append(selected.allocation)
            result.widths += selected.widths
        else:
            k = uniform(L, K, B, k_min=k_base)
            result.allocations.append({"budget": B, "k": k, "chosen": UNIFORM, "alloc_t": True})
    return result
