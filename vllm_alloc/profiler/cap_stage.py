"""The cap stage of `vllm-alloc profile`: the distinct-expert cap of each requested B, chosen by the
guard's rule (`guard.choose_cap`) from measurements in an engine serving the finished budget file
(`evaluator.CapEvaluator`), written into that file (`add_caps`); and the file a `--caps-only` run
starts from (`file_to_cap`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_alloc.budget import BudgetFile, load_budget_file, parse_budget_file
from vllm_alloc.profiler.calibration import CalibrationData
from vllm_alloc.profiler.errors import ProfileError
from vllm_alloc.profiler.evaluator import CapEvaluator
from vllm_alloc.profiler.guard import CAP_KEEP, CAP_SHARES, CAP_STREAMS, choose_cap


def add_caps(
    budget_file: BudgetFile,
    evaluator: CapEvaluator | Any,
    budgets: Sequence[int],
    *,
    streams: Sequence[int] = CAP_STREAMS,
    shares: Sequence[float] = CAP_SHARES,
    keep: float = CAP_KEEP,
    progress: bool = True,
) -> BudgetFile:
    """The budget file with a distinct-expert cap chosen at each B of `budgets` (below A) by
    `guard.choose_cap`, measured through `evaluator` (`CapEvaluator`'s interface); every other B keeps no
    cap. Caps already in the file are replaced."""
    from tqdm import tqdm

    guard = budget_file.guard
    if guard is None:
        raise ProfileError("the budget file has no guard (nothing was validated), so no cap can be chosen")
    if not guard.confirms:
        raise ProfileError(
            "the budget file was profiled before the guard's confirmation split, so a cap cannot be "
            "confirmed on sequences its choice never saw; profile the model again (without --caps-only)"
        )
    L, A = budget_file.model.num_moe_layers, budget_file.model.full_activations
    lo = L * budget_file.k_base
    data = budget_file.model_dump(mode="json")
    for a in data["allocations"]:
        a["cap"], a["cap_tests"] = None, []
    capped = sorted({B for B in budgets if B < A})
    # Runs at most: per B the baseline, and the served configuration and every share at each N (the
    # search stops at the first share that fails, so the bar may end early).
    most = len(capped) * (1 + len(streams) * (1 + len(set(shares))))
    bar = tqdm(total=most, unit="run", desc="cap", disable=not progress, dynamic_ncols=True)

    def measured(B: int, share: float | None, n: int) -> Sequence[float]:
        values = evaluator(B, share, n)
        bar.update(1)
        bar.set_postfix(B=B, share="none" if share is None else share, N=n)
        return values

    try:
        for B in capped:
            baseline = evaluator.baseline(B)
            bar.update(1)
            cap, tests = choose_cap(
                B,
                L,
                measured,
                baseline,
                streams,
                shares,
                keep,
                guard.confidence,
                confirmation_confidence=guard.confirmation_confidence,
                selection=guard.selection_sequences,
            )
            data["allocations"][B - lo].update(cap=cap, cap_tests=tests)
    finally:
        bar.close()
    data["guard"].update(cap_streams=sorted(streams), cap_keep=keep)
    chosen = {B: data["allocations"][B - lo]["cap"] for B in capped}
    data["notes"] = data["notes"].split(" Distinct-expert caps:")[0] + (
        f" Distinct-expert caps: at B = {capped}, shares ρ = {sorted(shares, reverse=True)} were tried "
        f"largest first, the file's configuration decoding N = {sorted(streams)} streams together as "
        f"served, on the selection's held-out sequences; a share passes where at every N it is better "
        f"than uniform without Alloc-T with {guard.confidence:.0%} confidence and keeps at least "
        f"{keep:.0%} of the uncapped configuration's gain over it, and the smallest such share before "
        f"the first that fails ships only if it passes again on the confirmation's sequences, at "
        f"{guard.confirmation_confidence:.4%}. Chosen: "
        + ", ".join(f"B = {B}: {'none' if c is None else f'ρ = {c[0]:g}'}" for B, c in chosen.items())
        + "."
    )
    return parse_budget_file(data)


def file_to_cap(path: Path, calib: CalibrationData) -> BudgetFile:
    """--caps-only: the existing file, refused unless its guard ran on as many held-out sequences of this
    length as this calibration gives (their content is not recorded in the file, so not checked)."""
    budget_file = load_budget_file(path)
    guard = budget_file.guard
    if guard is None or (guard.sequences, guard.seq_len) != (len(calib.heldout), calib.seq_len):
        have = None if guard is None else f"{guard.sequences} × {guard.seq_len}"
        raise ProfileError(
            f"--caps-only: {path} was validated on {have} held-out sequences (count × tokens), these "
            f"calibration flags give {len(calib.heldout)} × {calib.seq_len}; pass the flags it was "
            "profiled with"
        )
    return budget_file
