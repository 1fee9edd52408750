"""Building and writing the budget file: `profile_to_file` runs the profile (`runner.profile`) with a
progress bar, `build_budget_file` assembles and validates the file from its result, `write_atomically`
writes it (temporary file + os.replace: readers see the old file or the new), and `resolution_warning`
says when the held-out split is too small for the guard's target."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_alloc.budget import BudgetFile, ModelFingerprint, load_budget_file, parse_budget_file
from vllm_alloc.profiler.calibration import CalibrationData
from vllm_alloc.profiler.carry_defaults import CARRY_GROUP, CARRY_POOL
from vllm_alloc.profiler.errors import ProfileError
from vllm_alloc.profiler.guard import CONFIDENCE, REGIMES, TARGET, Validate, Validations, split_at
from vllm_alloc.profiler.protocols import PROTOCOLS, Evaluate
from vllm_alloc.profiler.runner import Memo, ProfileResult, planned_profile_runs, profile

METRIC = "perplexity: exp(mean NLL of the next token) over the calibration split, vLLM prompt logprobs"


def build_budget_file(
    model: ModelFingerprint,
    result: ProfileResult,
    calib: CalibrationData,
    *,
    requested: Sequence[int],
    regimes: Sequence[str] = REGIMES,
    confidence: float = CONFIDENCE,
    target: float = TARGET,
    full_heldout: float | None = None,
    carry_alpha: float | None = None,
    carry_pool: str = CARRY_POOL,
    carry_group: int = CARRY_GROUP,
) -> BudgetFile:
    """Assemble and validate the budget file (every problem surfaces as a BudgetFileError)."""
    from vllm_alloc.budget import Calibration

    provenance = Calibration(
        source=calib.source, tokens=calib.tokens, seq_len=calib.seq_len, split=calib.split
    )
    sensitivities: list[dict[str, Any]] = []
    if result.isolating is not None:
        sensitivities.append({"protocol": "isolating", "matrix": result.isolating, "budget": None})
    for B, S in sorted(result.operating_point.items()):
        sensitivities.append({"protocol": "operating-point", "matrix": S, "budget": B})
    for s in sensitivities:
        s.update(metric=METRIC, calibration=provenance.model_dump())
    n = len(calib.heldout)
    chose = split_at(n) if result.validated else 0
    resolution = statistics.median(result.widths) if result.widths else 0.0
    guard = {
        "confidence": confidence,
        "sequences": n,
        "seq_len": calib.seq_len,
        "regimes": list(regimes),
        "target": target,
        "resolution": resolution,
        "selection_sequences": chose,
        "comparisons": result.comparisons,
        "confirmation_confidence": result.confirmation_confidence,
        "tokens_to_resolve": tokens_to_resolve(calib.tokens, resolution, target)
        if resolution > target
        else None,
    }
    notes = (
        f"Profiled by vllm-alloc profile through vLLM (prefix caching off). Requested B: {list(requested)}. "
        f"At B = {result.validated}, the baselines (uniform with and without Alloc-T) and each candidate "
        f"(the protocols' DPs, with and without Alloc-T) ran on the {n} held-out sequences in the regimes "
        f"{list(regimes)} (prefill: scope 'budget'; decode: a lone stream, scope 'token'). The first "
        f"{chose} sequences select one candidate per B; the other {n - chose}, which the selection never "
        f"saw, confirm it: it ships only where paired per-sequence tests at "
        f"{result.confirmation_confidence:.4%} confidence ({confidence:.0%} for the file's "
        f"{result.comparisons} comparisons together) put it below both baselines in every regime where "
        "they differ; otherwise the B runs uniform, with Alloc-T where the confirmation puts that below "
        "uniform without it. "
        + (
            f"Candidates ' + carry' carry each lone decode token's request balance (pool {carry_pool}, "
            f"alpha {carry_alpha}; theta calibrated on the profile split), measured in decode order (one "
            f"token per sequence per pass); served, decode tokens carry in groups of up to {carry_group}. "
            if carry_alpha is not None
            else ""
        )
        + "Every other B runs uniform: no allocation that was not measured is shipped. B = A runs all K "
        "(the stock model)."
    )
    if guard["tokens_to_resolve"] is not None:
        notes += (
            f" WARNING: the confirmation resolves ±{resolution:.3%}, coarser than the {target:.2%} "
            f"target; about {guard['tokens_to_resolve']} calibration tokens would resolve it. Smaller "
            "gains than the resolution ship as uniform."
        )
    if full_heldout is not None:
        notes += f" Held-out perplexity at b = 1.0: {full_heldout:.6g}."
    data = {
        "format_version": 1,
        "model": model.model_dump(),
        "k_base": result.k_base,
        "sensitivities": sensitivities,
        "allocations": result.allocations,
        "guard": guard if result.validated else None,
        "notes": notes,
    }
    if carry_alpha is not None:
        data["carry_alpha"] = carry_alpha
        data["carry_pool"] = carry_pool
        data["carry_group"] = carry_group
    return parse_budget_file(data)


def write_atomically(budget_file: BudgetFile, out: Path) -> None:
    """Write next to `out`, check it loads, then rename over it: readers see the old file or the new."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        budget_file.dump(tmp)
        load_budget_file(tmp)  # what serving will do with it
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def profile_to_file(
    evaluate: Evaluate,
    validate: Validate,
    model: ModelFingerprint,
    calib: CalibrationData,
    budgets: Sequence[float],
    out: Path,
    *,
    protocols: Sequence[str] = PROTOCOLS,
    k_base: int = 1,
    all_budgets_up_to: int = 32,
    confidence: float = CONFIDENCE,
    target: float = TARGET,
    progress: bool = True,
    thresholds: Callable[[Sequence[int]], list[float | None]] | None = None,
    carry_alpha: float | None = None,
    carry_pool: str = CARRY_POOL,
    carry_group: int = CARRY_GROUP,
    cap_tests_per_budget: int = 0,
    dump_heldout: Path | None = None,
) -> tuple[BudgetFile, int]:
    """Profile with `evaluate` (profile split) and `validate` (held-out split, the guard), write `out`;
    returns the file and the number of model runs. With `thresholds` the guard also tries carrying the
    balance (`runner.profile`), at `carry_alpha` in `carry_pool`, written with `carry_group`. The cap
    stage's comparisons to come, `cap_tests_per_budget` at each requested B below A
    (`guard.cap_comparisons`), count in the confirmation's correction. `dump_heldout`: where to write
    every held-out run (`dump_runs`)."""
    from tqdm import tqdm

    from vllm_alloc.budget import uniform_budget_file

    probe = uniform_budget_file(model, k_base=k_base)  # for absolute_budget(): B = floor(b·A), checked
    try:
        requested = sorted({probe.absolute_budget(b) for b in budgets})
    except ValueError as exc:
        raise ProfileError(f"--budgets: {exc}") from None
    L, K = model.num_moe_layers, model.top_k
    weight = {"profile": len(calib.profile), "heldout": len(calib.heldout)}  # sequences per run
    planned = planned_profile_runs(L, K, [B for B in requested if B < L * K], protocols, k_base)
    bar = tqdm(
        total=planned * weight["profile"],
        unit="seq",
        desc="profile",
        disable=not progress,
        dynamic_ncols=True,
    )

    def step(n: int, what: str) -> None:
        bar.update(n)
        bar.set_postfix(runs=memo.runs + validations.runs, last=what)

    def timed(ks: Sequence[int], split: str) -> float:
        value = evaluate(ks, split)
        step(weight[split], f"{value:.4g}")
        return value

    def timed_validate(ks: Sequence[int], alloc_t: bool, regime: str, carry: bool) -> Sequence[float]:
        values = validate(ks, alloc_t, regime, carry)
        step(weight["heldout"], f"held-out B={sum(ks)} {regime}{' carry' if carry else ''}")
        return values

    memo = Memo(timed)
    validations = Validations(timed_validate)

    def on_plan(n: int) -> None:
        bar.total = bar.n + (n + 1) * weight["heldout"]  # + the b = 1.0 reference
        bar.refresh()

    try:
        result = profile(
            memo,
            L,
            K,
            requested,
            protocols,
            k_base=k_base,
            all_budgets_up_to=all_budgets_up_to,
            on_plan=on_plan,
            validate=validations,
            confidence=confidence,
            thresholds=thresholds,
            cap_tests=cap_tests_per_budget * sum(1 for B in requested if B < L * K),
        )
        full = math.exp(float(validations([K] * L, True, "prefill").mean()))
    finally:
        bar.close()
    budget_file = build_budget_file(
        model,
        result,
        calib,
        requested=requested,
        confidence=confidence,
        target=target,
        full_heldout=full,
        carry_alpha=carry_alpha if thresholds is not None else None,
        carry_pool=carry_pool,
        carry_group=carry_group,
    )
    write_atomically(budget_file, out)
    if dump_heldout is not None:
        dump_runs(validations, dump_heldout)
    return budget_file, memo.runs + validations.runs


def dump_runs(validations: Validations, path: Path) -> None:
    """Every held-out run's per-sequence mean NLL as a numpy .npz: one array per run, named
    `K=2,1,1,1|alloc_t=1|prefill|carry=0` (the run's `Validations.key`)."""
    import numpy as np

    arrays = {
        f"K={','.join(map(str, ks))}|alloc_t={int(on)}|{regime}|carry={int(carry)}": values
        for (ks, on, regime, carry), values in validations.cache.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]  # (numpy types allow_pickle as a kwarg)


def tokens_to_resolve(tokens: int, resolution: float, target: float) -> int:
    """Calibration tokens (at the same held-out fraction) that would bring `resolution` to `target`: a
    half-width falls as one over the square root of the sequences."""
    return math.ceil(tokens * (resolution / target) ** 2)


def resolution_warning(budget_file: BudgetFile) -> str | None:
    """A line saying the held-out split cannot resolve the target difference, and what would; or None."""
    guard = budget_file.guard
    if guard is None or guard.resolved:
        return None
    if guard.confirms:
        what = (
            f"the {guard.sequences - (guard.selection_sequences or 0)} confirmation sequences resolve "
            f"±{guard.resolution:.3%} (median half-width of the paired intervals at "
            f"{guard.confirmation_confidence:.4%}, {guard.confidence:.0%} for the file's "
            f"{guard.comparisons} comparisons together)"
        )
    else:
        what = (
            f"the {guard.sequences} held-out sequences resolve ±{guard.resolution:.3%} (median half-width "
            f"of the paired intervals at {guard.confidence:.0%})"
        )
    tokens = guard.tokens_to_resolve
    if tokens is None and budget_file.sensitivities:  # a file from before tokens_to_resolve
        calibrated = budget_file.sensitivities[0].calibration.tokens
        tokens = tokens_to_resolve(calibrated, guard.resolution, guard.target)
    more = f"about {tokens} calibration tokens" if tokens else "more held-out sequences"
    return (
        f"{what}, coarser than the {guard.target:.2%} target: {more} would resolve it (raise --tokens or "
        "--heldout). Gains smaller than that ship as uniform."
    )
