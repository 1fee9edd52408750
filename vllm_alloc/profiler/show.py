"""`vllm-alloc show FILE [--budgets 0.33,0.5,0.75,1.0] [--png OUT]`: read a budget file as a person.

Prints the model, the calibration provenance and, for each chosen budget b, K(floor(b·A)) with the
held-out numbers of every candidate and the winner. `--png` draws the sensitivity matrices (one heatmap
per protocol: the metric's increase over k = K in the same row, which is what the DP trades; a per-row
offset does not change the allocation) and the per-layer allocation at each chosen budget against
uniform. matplotlib is imported only for `--png` (Agg backend, no display needed).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_alloc.budget import (
    UNIFORM,
    Allocation,
    BudgetFile,
    BudgetFileError,
    Candidate,
    CapTest,
    PairedTest,
    load_budget_file,
)
from vllm_alloc.budget.alloc_l import uniform
from vllm_alloc.profiler.build import resolution_warning
from vllm_alloc.profiler.guard import NO_ALLOC_T, REGIMES
from vllm_alloc.values import BudgetError, parse_budget

DEFAULT_BUDGETS = (0.33, 0.5, 0.75, 1.0)


def _vec(ks: Sequence[int] | Sequence[float]) -> str:
    return ",".join(map(str, ks))


def _allocation(bf: BudgetFile, b: float) -> Allocation:
    B = bf.absolute_budget(b)
    return bf.allocations[B - bf.model.num_moe_layers * bf.k_base]


def _interval(t: PairedTest | None) -> str:
    if t is None:
        return "—"
    if t.same:
        return "same run"
    return _span(t)


def _span(t: PairedTest | CapTest) -> str:
    return f"{t.delta:+.2%} [{t.low:+.2%}, {t.high:+.2%}]"


def _test(c: Candidate, baseline: str, regime: str, confirmation: bool = False) -> PairedTest | None:
    tests = c.confirmation if confirmation else c.tests
    return next((t for t in tests if t.baseline == baseline and t.regime == regime), None)


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    return [text[0], "-" * len(text[0]), *text[1:]]


def summary(bf: BudgetFile, budgets: Sequence[float] = DEFAULT_BUDGETS) -> str:
    """The text `show` prints: header, provenance, the allocation table for `budgets`, and each validated
    budget's candidates with their held-out numbers and the guard's paired intervals."""
    m = bf.model
    lines = [
        f"model {m.architecture}: L = {m.num_moe_layers} MoE layers {m.moe_layers}, E = {m.num_experts}, "
        f"K = {m.top_k}, H = {m.hidden_size}, I = {m.intermediate_size}; A = {m.full_activations}, "
        f"k_base = {bf.k_base}, weights {bf.weights}, scope {bf.scope}, default b = {bf.default_budget}",
    ]
    for s in bf.sensitivities:
        at = f" at B = {s.budget}" if s.budget is not None else ""
        cal = s.calibration
        lines.append(
            f"sensitivity {s.protocol}{at}: {cal.tokens} tokens × seq_len {cal.seq_len} from {cal.source}"
        )
    if bf.sensitivities and bf.sensitivities[0].calibration.split:
        lines.append(f"split: {bf.sensitivities[0].calibration.split}")
    g = bf.guard
    if g is not None:
        verdict = "resolves" if g.resolved else "does NOT resolve"
        if g.confirms:
            lines.append(
                f"guard: {g.sequences} held-out sequences × {g.seq_len} tokens, regimes "
                f"{', '.join(g.regimes)}: the first {g.selection_sequences} select (paired "
                f"{g.confidence:.0%} intervals), the other {g.sequences - (g.selection_sequences or 0)} "
                f"confirm (paired {g.confirmation_confidence:.4%} intervals: {g.confidence:.0%} for the "
                f"file's {g.comparisons} comparisons together); resolution ±{g.resolution:.3%} (median "
                f"half-width of the confirmation's), which {verdict} the {g.target:.2%} target"
            )
        else:
            lines.append(
                f"guard: {g.sequences} held-out sequences × {g.seq_len} tokens, regimes "
                f"{', '.join(g.regimes)}, paired {g.confidence:.0%} intervals of the change in "
                f"perplexity; resolution ±{g.resolution:.3%} (median half-width), which {verdict} the "
                f"{g.target:.2%} target"
            )
        warning = resolution_warning(bf)
        if warning:
            lines.append(f"WARNING: {warning}")
        if bf.unconfirmed():
            lines.append(
                f"WARNING: profiled before the guard's confirmation split: B = {bf.unconfirmed()} ship "
                "candidates chosen and certified on the same held-out sequences; profile again"
            )
    if any(bf.carrying()):
        lines.append(
            f"carried balance (decode streams): pool {bf.carry_pool} ("
            + ("one bank per request for all its layers" if bf.carry_pool == "request" else "per layer")
            + f"), α = {bf.carry_alpha:g}, decode tokens carry in groups of up to {bf.carry_group}; θ per "
            "layer where a B carries "
            "(— : +inf, the layer keeps K_base and banks the rest)"
        )
    capping = any(a.cap is not None for a in bf.allocations)
    if capping:
        lines.append(
            "distinct-expert cap: the decode tokens at one B (two or more in a pass) share at most ⌈ρ_l·D⌉ "
            "experts per layer and pass, D the experts they would touch (beyond those other tokens of "
            "the pass use, and their own top-K_base)"
        )
    head = ["b", "B", "K(B)", "Alloc-T", "carry θ", *(["cap ρ"] if capping else [])]
    table = [[*head, "chosen", "vs uniform: prefill", "decode (N = 1)"]]
    for b in budgets:
        a = _allocation(bf, b)
        chosen = next((c for c in a.candidates if c.name == a.chosen), None)
        if chosen is None:
            name = a.chosen if a.budget == m.full_activations else f"{a.chosen} (unmeasured)"
            cells = ["—", "—"]
        elif chosen.name in (UNIFORM, UNIFORM + NO_ALLOC_T):
            name, cells = a.chosen, ["baseline", "baseline"]
        else:
            name = a.chosen
            base = next((c for c in a.candidates if c.name == UNIFORM), None)
            if not chosen.tests and base is not None:  # a file from before the guard's paired tests
                cells = [f"{chosen.measured / base.measured - 1:+.2%}", "—"]
            else:  # the confirmation's intervals where the file has them
                confirms = g is not None and g.confirms
                cells = [_interval(_test(chosen, UNIFORM, r, confirms)) for r in REGIMES]
        theta = (
            "off"
            if a.carry is None
            else "(" + ", ".join("—" if v is None else f"{v:.3g}" for v in a.carry) + ")"
        )
        cap = [_vec(a.cap) if a.cap is not None else "off"] if capping else []
        table.append(
            [f"{b:g}", str(a.budget), _vec(a.k), "on" if a.alloc_t else "off", theta, *cap, name, *cells]
        )
    lines += ["", *_table(table, {0, 1})]
    for b in budgets:
        a = _allocation(bf, b)
        if not a.candidates:
            continue
        rows = [
            [
                "candidate",
                "K",
                "Alloc-T",
                "prefill ppl",
                "decode ppl",
                "vs uniform: prefill",
                "decode",
                "vs uniform (no Alloc-T): prefill",
                "decode",
            ]
        ]
        for c in a.candidates:
            rows.append(
                [
                    c.name + (" *" if c.name == a.chosen else ""),
                    _vec(c.allocation),
                    "on" if c.alloc_t else "off",
                    f"{c.measured:.6g}",
                    "—" if c.decode is None else f"{c.decode:.6g}",
                    *(
                        _interval(_test(c, baseline, r))
                        for baseline in (UNIFORM, UNIFORM + NO_ALLOC_T)
                        for r in REGIMES
                    ),
                ]
            )
        where = "the selection's" if g is not None and g.confirms else "the"
        lines += ["", f"b = {b:g} (B = {a.budget}): {where} held-out candidates", *_table(rows, {3, 4})]
        confirmed = [c for c in a.candidates if c.confirmation]
        if confirmed and g is not None:
            rows = [
                ["confirmed", *(f"vs {x}: {r}" for x in (UNIFORM, UNIFORM + NO_ALLOC_T) for r in REGIMES)]
            ]
            rows += [
                [
                    c.name + (" *" if c.name == a.chosen else ""),
                    *(
                        _interval(_test(c, x, r, True))
                        for x in (UNIFORM, UNIFORM + NO_ALLOC_T)
                        for r in REGIMES
                    ),
                ]
                for c in confirmed
            ]
            n = g.sequences - (g.selection_sequences or 0)
            title = (
                f"b = {b:g} (B = {a.budget}): confirmation on the {n} sequences the selection never saw, "
                f"at {g.confirmation_confidence:.4%}"
            )
            lines += ["", title, *_table(rows, set())]
        if a.cap_tests:
            keep = bf.guard.cap_keep if bf.guard is not None else None
            caps = [["cap ρ", "streams", "split", "vs uniform (no Alloc-T)", "gain kept"]]
            caps += [
                [
                    f"{t.share:g}",
                    str(t.streams),
                    t.split,
                    _span(t),
                    f"{t.kept:.0%}" + (" *" if keep is not None and t.passes(keep) else ""),
                ]
                for t in a.cap_tests
            ]
            shipped = "none" if a.cap is None else _vec(a.cap)
            title = (
                f"b = {b:g} (B = {a.budget}): distinct-expert cap, N streams decoding (shipped ρ: {shipped})"
            )
            lines += ["", title, *_table(caps, {1, 4})]
    lines.append(
        "(* = chosen; ppl = held-out perplexity, lower is better; intervals: change in perplexity against "
        "the baseline, paired over the held-out sequences; a candidate ships only with every "
        + ("confirmation " if g is not None and g.confirms else "")
        + "interval below zero where the runs differ)"
    )
    wins = sum(1 for a in bf.allocations if a.chosen not in (UNIFORM, UNIFORM + NO_ALLOC_T))
    off = sum(1 for a in bf.allocations if a.chosen == UNIFORM + NO_ALLOC_T)
    validated = sum(1 for a in bf.allocations if a.candidates)
    lines.append(
        f"{validated} of {len(bf.allocations)} budgets validated on held-out data; {wins} ship a challenger "
        f"of uniform, {off} uniform without Alloc-T"
    )
    if bf.notes:
        lines.append(f"notes: {bf.notes}")
    return "\n".join(lines)


def draw(bf: BudgetFile, out: Path, budgets: Sequence[float] = DEFAULT_BUDGETS) -> None:
    """Sensitivity heatmaps (top row) and per-layer allocations at `budgets` (bottom row) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    m = bf.model
    L, K = m.num_moe_layers, m.top_k
    sens = bf.sensitivities
    cols = max(len(sens), len(budgets), 1)
    rows = 2 if sens else 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.2 * rows + 0.12 * L), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for j, s in enumerate(sens):
        ax = axes[0][j]
        ax.set_visible(True)
        S = np.asarray(s.matrix, dtype=float)
        delta = S - S[:, K - 1 : K]  # increase over k = K in the same row
        delta[:, : bf.k_base - 1] = np.nan  # k < k_base was never run
        image = ax.imshow(delta, aspect="auto", cmap="magma_r", origin="upper")
        ax.set_xticks(range(K), [str(k) for k in range(1, K + 1)])
        ax.set_yticks(range(L), [str(x) for x in m.moe_layers])
        ax.set_xlabel("k (experts in the layer)")
        ax.set_ylabel("MoE layer")
        at = f", B = {s.budget}" if s.budget is not None else ""
        ax.set_title(f"{s.protocol}{at}\nΔ metric vs k = K", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.85)
    for j, b in enumerate(budgets):
        ax = axes[rows - 1][j]
        ax.set_visible(True)
        a = _allocation(bf, b)
        x = np.arange(L)
        profiled = a.chosen not in (UNIFORM, UNIFORM + NO_ALLOC_T)
        ax.bar(x, a.k, color="tab:blue" if profiled else "tab:gray", label=f"K(B) ({a.chosen})")
        ax.hlines(uniform(L, K, a.budget, k_min=bf.k_base), x - 0.45, x + 0.45, colors="k", linestyles="--")
        ax.plot([], [], "k--", label="uniform")  # one legend entry for the per-layer segments
        ax.set_ylim(0, K + 0.8)
        ax.set_xticks(x, [str(i) for i in m.moe_layers], fontsize=7 if L > 16 else 9)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("K_l")
        ax.set_title(f"b = {b:g} (B = {a.budget} of {m.full_activations})", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{m.architecture}: Alloc-L budget file", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "show", help="print a budget file's allocations and candidates; optionally draw them"
    )
    p.add_argument("file", metavar="FILE", help="budget file (path, or the name of a shipped one)")
    p.add_argument(
        "--budgets",
        help=f"b values to show (default {','.join(map(str, DEFAULT_BUDGETS))}, those the file allows)",
    )
    p.add_argument("--png", type=Path, metavar="OUT", help="also draw heatmaps and allocations into OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        with warnings.catch_warnings():  # an unconfirmed file's warning is a line of the summary
            warnings.simplefilter("ignore", UserWarning)
            bf = load_budget_file(args.file)
        if args.budgets:
            budgets = [
                parse_budget(x, min_budget=bf.min_budget, source="--budgets") for x in args.budgets.split(",")
            ]
        else:  # the defaults this file allows (a K_base = 2 file starts at b = 0.5)
            budgets = [b for b in DEFAULT_BUDGETS if b >= bf.min_budget]
    except (BudgetFileError, BudgetError) as exc:
        print(f"vllm-alloc show: error: {exc}", file=sys.stderr)
        return 2
    print(summary(bf, budgets))
    if args.png is not None:
        draw(bf, args.png, budgets)
        print(f"wrote {args.png}")
    return 0
