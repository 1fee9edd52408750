"""`vllm-alloc profile`: measure Alloc-L sensitivities through the served model and write a budget file.

    vllm-alloc profile MODEL [--calib FILE] [--tokens N] [--seq-len S] [--budgets 0.33,0.5,0.75]
                       [--protocols isolating,operating-point] --out configs/NAME.json

Every measurement runs through the serving path: the model is loaded in vLLM offline with the plugin,
an arbitrary per-layer vector K is installed as the live allocation row of B = Σ K_l
(`vllm_alloc_set_allocation`), and calibration sequences are sent with a budget b whose floor(b·A) is B.
The metric is perplexity, exp(mean NLL of each actual next token) from vLLM's prompt logprobs. Prefix
caching is off (a repeated sequence would otherwise be scored once, under one allocation) and scope is
"request" (calibration sequences batched together do not trade experts).

The protocols are `profiler.protocols`, the guard and the rule for which budgets are validated
`profiler.guard` (module docstrings), the run over both `profiler.runner`. This module is the CLI: it
starts the engine (`profiler.engine`), measures through it (`profiler.evaluator`), writes the file
(`profiler.build`), then chooses the distinct-expert caps in a second engine (`profiler.cap_stage`).
The output appears only when everything is done (temporary file + os.replace), so an interrupted run
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vllm_alloc.budget import BudgetFile, BudgetFileError, load_budget_file
from vllm_alloc.profiler.build import profile_to_file, resolution_warning, write_atomically
from vllm_alloc.profiler.calibration import CalibrationData, CalibrationError, load_calibration
from vllm_alloc.profiler.cap_stage import add_caps, file_to_cap
from vllm_alloc.profiler.carry_defaults import CARRY_ALPHA, CARRY_GROUP, CARRY_OFFSET, CARRY_POOL
from vllm_alloc.profiler.engine import fingerprint, on_cpu, read_moe_config, shutdown_llm, start_llm
from vllm_alloc.profiler.errors import ProfileError
from vllm_alloc.profiler.evaluator import CapEvaluator, VllmEvaluator
from vllm_alloc.profiler.guard import CAP_KEEP, CAP_SHARES, CAP_STREAMS, CONFIDENCE, TARGET, cap_comparisons
from vllm_alloc.profiler.protocols import PROTOCOLS
from vllm_alloc.routing.carry import CARRY_POOLS
from vllm_alloc.values import BudgetError, caps, parse_budget


def parse_budgets(text: str) -> list[float]:
    """'0.33,0.5,0.75' -> [0.33, 0.5, 0.75]; each in (0, 1] (the model's minimum is checked later)."""
    try:
        return [parse_budget(part, source="--budgets") for part in text.split(",") if part.strip()]
    except BudgetError as exc:
        raise ProfileError(str(exc)) from None


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure Alloc-L sensitivities through vLLM and write a budget file",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("model", metavar="MODEL", help="local HF-format MoE checkpoint folder")
    p.add_argument(
        "--calib",
        metavar="FILE",
        help="calibration data: .txt, .jsonl ('text' field), "
        ".npy/.pt (1-D token ids) or .tokens (whitespace-separated ids); default: Python stdlib",
    )
    # Sized for the guard: on the default model a 0.2 % difference needed about 90 k held-out tokens.
    p.add_argument("--tokens", type=int, default=196608, help="calibration tokens in all (default 196608)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--budgets", default="0.33,0.5,0.75", help="requested budgets b (default 0.33,0.5,0.75)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="default: isolating,operating-point")
    p.add_argument("--heldout", type=float, default=0.5, help="held-out fraction of the sequences (0.5)")
    p.add_argument("--k-base", type=int, default=1, help="K_base, the smallest K_l (default 1)")
    p.add_argument(
        "--confidence",
        type=float,
        default=CONFIDENCE,
        help=f"confidence of the guard's paired intervals (default {CONFIDENCE})",
    )
    p.add_argument(
        "--resolve",
        type=float,
        default=TARGET,
        help=f"relative perplexity difference the held-out split should resolve (default {TARGET})",
    )
    p.add_argument(
        "--all-budgets-up-to",
        type=int,
        default=32,
        help="validate every B when there are at most this many budgets (default 32)",
    )
    p.add_argument(
        "--no-carry",
        action="store_true",
        help="do not try carrying each lone decode stream's balance (candidates ' + carry'); CPU only",
    )
    p.add_argument(
        "--carry-pool",
        choices=CARRY_POOLS,
        default=CARRY_POOL,
        help="where a request banks what its tokens save: a balance per MoE layer, or one bank for all "
        f"its layers (default {CARRY_POOL})",
    )
    p.add_argument(
        "--carry-group",
        type=int,
        default=CARRY_GROUP,
        help="decode tokens carry where at most this many share an Alloc-T group; above it Alloc-T works "
        f"with the group (default {CARRY_GROUP})",
    )
    p.add_argument(
        "--carry-alpha",
        type=float,
        default=None,
        help="how fast the carried balance's bar falls as it grows (default "
        + ", ".join(f"{a} for pool {p}" for p, a in CARRY_ALPHA.items())
        + ")",
    )
    p.add_argument(
        "--carry-offset",
        type=float,
        default=CARRY_OFFSET,
        help=f"θ keeps K_l - K_base - this many extras per token on average (default {CARRY_OFFSET})",
    )
    p.add_argument(
        "--cap-streams",
        default=",".join(map(str, CAP_STREAMS)),
        help="decode streams N the distinct-expert cap is measured at, at each requested budget (default "
        f"{','.join(map(str, CAP_STREAMS))}; 'none': choose no cap)",
    )
    p.add_argument(
        "--cap-shares",
        default=",".join(map(str, CAP_SHARES)),
        help=f"cap shares ρ to try, largest first (default {','.join(map(str, CAP_SHARES))})",
    )
    p.add_argument(
        "--cap-keep",
        type=float,
        default=CAP_KEEP,
        help="least share of the uncapped configuration's gain over uniform without Alloc-T that a cap "
        f"keeps (default {CAP_KEEP})",
    )
    p.add_argument(
        "--caps-only",
        action="store_true",
        help="keep the allocations of the existing --out file (profiled with the same calibration "
        "flags) and only choose its distinct-expert caps",
    )
    p.add_argument("--dtype", default="auto", help="vLLM dtype (default auto)")
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="vLLM batch size (default 64; at least the held-out sequences, which decode together)",
    )
    p.add_argument("--out", required=True, type=Path, help="budget file to write (e.g. configs/NAME.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--dump-heldout",
        type=Path,
        metavar="NPZ",
        help="also write every held-out run's per-sequence mean NLL (numpy .npz, one array per "
        "configuration and regime), to audit or re-analyse the guard",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name = "vllm-alloc profile"
    llm = None
    stamp = _stamp(args.out)  # what --out was before this run, to say what an interrupt left
    try:
        budgets = parse_budgets(args.budgets)
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        if not protocols or any(p not in PROTOCOLS for p in protocols):
            raise ProfileError(f"--protocols {args.protocols!r} is not valid; choose from {PROTOCOLS}")
        if not 0.0 < args.confidence < 1.0:
            raise ProfileError(f"--confidence {args.confidence} is outside the valid range (0, 1)")
        if not 0.0 < args.resolve < 1.0:
            raise ProfileError(f"--resolve {args.resolve} is outside the valid range (0, 1)")
        if args.carry_group < 1:
            raise ProfileError(f"--carry-group {args.carry_group} is outside the valid range [1, inf)")
        if args.carry_alpha is None:
            args.carry_alpha = CARRY_ALPHA[args.carry_pool]
        if not (math.isfinite(args.carry_alpha) and args.carry_alpha >= 0):
            raise ProfileError(f"--carry-alpha {args.carry_alpha} is outside the valid range [0, inf)")
        if not (math.isfinite(args.carry_offset) and 0 <= args.carry_offset < 1):
            raise ProfileError(f"--carry-offset {args.carry_offset} is outside the valid range [0, 1)")
        cap_streams, cap_shares = parse_cap_options(args.cap_streams, args.cap_shares, args.cap_keep)
        if args.caps_only and not cap_streams:
            raise ProfileError("--caps-only with --cap-streams none has nothing to do")
        config = read_moe_config(args.model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(args.model).expanduser()))
        calib = load_calibration(
            args.calib,
            tokenizer,
            tokens=args.tokens,
            seq_len=args.seq_len,
            vocab_size=int(config.get("vocab_size") or len(tokenizer)),
            profile_fraction=1.0 - args.heldout,
        )
        if len(calib.heldout) < 4:
            raise ProfileError(
                f"--tokens {args.tokens} with --seq-len {args.seq_len} and --heldout {args.heldout} gives "
                f"{len(calib.heldout)} held-out sequences; the guard needs at least 4 (2 to select, 2 to "
                "confirm): raise --tokens or --heldout"
            )
        print(
            f"{name}: {len(calib.profile)} profile + {len(calib.heldout)} held-out sequences of "
            f"{calib.seq_len} tokens from {calib.source}",
            file=sys.stderr,
        )
        start = time.monotonic()
        runs, what = 0, "evaluations"
        if args.caps_only:
            budget_file = file_to_cap(args.out, calib)
            try:
                requested = [budget_file.absolute_budget(b) for b in budgets]
            except ValueError as exc:
                raise ProfileError(f"--budgets: {exc}") from None
            llm = start_llm(args.model, calib.seq_len, args.dtype, max(cap_streams), budget_file=args.out)
            evaluator = CapEvaluator(llm, calib, budget_file)
            budget_file = add_caps(
                budget_file,
                evaluator,
                requested,
                streams=cap_streams,
                shares=cap_shares,
                keep=args.cap_keep,
                progress=not args.no_progress,
            )
            write_atomically(budget_file, args.out)
            runs, what = evaluator.runs, "cap measurements"
        else:
            per_budget = cap_comparisons(1, len(set(cap_shares)), len(cap_streams))
            budget_file, runs, llm = _profile(args, config, calib, budgets, protocols, per_budget)
            shutdown_llm(llm)
            llm = None
            if cap_streams:
                # A second engine cannot start in this process once the first loaded numba (vLLM's CPU
                # worker start-up trips over its modules), so the caps are chosen in a child process.
                _release_device_memory()
                print(f"{name}: choosing the distinct-expert caps in a new engine", file=sys.stderr)
                code = subprocess.run(_caps_command(args), check=False).returncode
                if code:
                    raise ProfileError(f"choosing the caps failed (exit {code}); {args.out} has none")
                budget_file = load_budget_file(args.out)
                what = "evaluations, then the caps"
    except KeyboardInterrupt:
        left = "left as it was" if _stamp(args.out) == stamp else "written without distinct-expert caps"
        print(f"\n{name}: interrupted; {args.out} was {left}", file=sys.stderr)
        return 130
    except (ProfileError, CalibrationError, BudgetFileError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if llm is not None:
            shutdown_llm(llm)
    print(f"{name}: {runs} {what} in {time.monotonic() - start:.0f} s; wrote {args.out}", file=sys.stderr)
    from vllm_alloc.profiler.show import summary

    print(summary(budget_file, budgets))
    warning = resolution_warning(budget_file)
    if warning:
        print(f"\n{name}: WARNING: {warning}\n", file=sys.stderr)
    return 0


def _stamp(path: Path) -> tuple[int, int] | None:
    """(size, mtime) of a file, None where there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _release_device_memory() -> None:
    """Return the first engine's cached GPU memory before the cap stage's engine (a child process)
    asks for its share of the device. Untested on a GPU so far (docs/profiling.md)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _caps_command(args: argparse.Namespace) -> list[str]:
    """`vllm-alloc profile ... --caps-only` with this run's model, calibration and cap flags."""
    cmd = [sys.executable, "-m", "vllm_alloc.cli", "profile", str(args.model), "--caps-only"]
    if args.calib is not None:
        cmd += ["--calib", str(args.calib)]
    for flag in (
        "tokens",
        "seq_len",
        "heldout",
        "budgets",
        "cap_streams",
        "cap_shares",
        "cap_keep",
        "dtype",
        "out",
    ):
        cmd += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return cmd + (["--no-progress"] if args.no_progress else [])


def parse_cap_options(streams: str, shares: str, keep: float) -> tuple[list[int], list[float]]:
    """--cap-streams, --cap-shares and --cap-keep, checked (ProfileError names the value and range)."""
    if streams.strip().lower() == "none":
        return [], []
    try:
        ns = [int(x) for x in streams.split(",") if x.strip()]
        rhos = [float(x) for x in shares.split(",") if x.strip()]
    except ValueError:
        raise ProfileError(
            f"--cap-streams {streams!r} / --cap-shares {shares!r}: expected integers N >= 2 (or 'none') / "
            "shares ρ in [0.001, 1)"
        ) from None
    ns = sorted(set(ns))
    if not ns or any(n < 2 for n in ns):
        raise ProfileError(f"--cap-streams {streams!r}: each N must be an integer >= 2, or 'none'")
    if not rhos or not all(caps(r) for r in rhos):
        raise ProfileError(f"--cap-shares {shares!r}: each ρ must be in [0.001, 1)")
    if not 0.0 <= keep <= 1.0:
        raise ProfileError(f"--cap-keep {keep} is outside the valid range [0, 1]")
    return ns, rhos


def _profile(
    args: argparse.Namespace,
    config: dict[str, Any],
    calib: CalibrationData,
    budgets: list[float],
    protocols: list[str],
    cap_tests_per_budget: int,
) -> tuple[BudgetFile, int, Any]:
    """The protocols and the guard in one engine, writing args.out: (the file, model runs, the engine).
    `cap_tests_per_budget`: the cap stage's comparisons at each requested B, for the correction."""
    # Decode-order validation (`decode_order`) runs every held-out sequence at once: a pass per position.
    llm = start_llm(args.model, calib.seq_len, args.dtype, max(args.max_num_seqs, len(calib.heldout)))
    try:
        model = fingerprint(config, llm.collective_rpc("vllm_alloc_counters")[0])
        evaluator = VllmEvaluator(llm, calib, model, args.k_base, args.carry_offset)
        # The carried balance is validated on the CPU host path only so far (the device path's carry is
        # covered by unit and CUDA-graph tests, not yet profiled on a GPU).
        carry = not args.no_carry and on_cpu()
        if carry:
            llm.collective_rpc("vllm_alloc_set_carry", args=({}, args.carry_alpha, args.carry_pool))
            evaluator.calibrate_carry()
        try:
            budget_file, runs = profile_to_file(
                evaluator,
                evaluator.validate,
                model,
                calib,
                budgets,
                args.out,
                protocols=protocols,
                k_base=args.k_base,
                all_budgets_up_to=args.all_budgets_up_to,
                confidence=args.confidence,
                target=args.resolve,
                progress=not args.no_progress,
                thresholds=evaluator.thresholds if carry else None,
                carry_alpha=args.carry_alpha,
                carry_pool=args.carry_pool,
                carry_group=args.carry_group,
                cap_tests_per_budget=cap_tests_per_budget,
                dump_heldout=args.dump_heldout,
            )
        finally:
            llm.collective_rpc("vllm_alloc_reset_allocation")
    except BaseException:
        shutdown_llm(llm)
        raise
    return budget_file, runs, llm
