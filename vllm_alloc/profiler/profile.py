"""`vllm-alloc profile`: measure Alloc-L sensitivities through the served model and write a budget file.

    vllm-alloc profile MODEL [--calib FILE] [--tokens N] [--seq-len S] [--budgets 0.33,0.5,0.75]
                       [--protocols isolating,operating-point] --out configs/NAME.json

Every measurement runs through the serving path: the model is loaded in vLLM offline with the plugin,
an arbitrary per-layer vector K is installed as the live allocation row of B = Σ K_l
(`vllm_alloc_set_allocation`), and calibration sequences are sent with a budget b whose floor(b·A) is B.
The metric is perplexity, exp(mean NLL of each actual next token) from vLLM's prompt logprobs. Prefix
caching is off (a repeated sequence would otherwise be scored once, under one allocation) and scope is
"request" (calibration sequences batched together do not trade experts).

The protocols, the guard and the rule for which budgets are validated are in `profile_protocols`
(module docstring); this module is the CLI, the vLLM evaluator and the file writer. The output appears
only when everything is done (temporary file + os.replace), so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vllm_alloc.budget import (
    BudgetFile,
    BudgetFileError,
    ModelFingerprint,
    load_budget_file,
    parse_budget_file,
)
from vllm_alloc.profiler import protocols as pp
from vllm_alloc.profiler.calibration import CalibrationData, CalibrationError, load_calibration, nll_sum
from vllm_alloc.routing.carry import CARRY_POOLS
from vllm_alloc.values import BudgetError, caps, parse_budget

METRIC = "perplexity: exp(mean NLL of the next token) over the calibration split, vLLM prompt logprobs"
# The scope each guard regime is served under: prefill steps pool a budget's tokens; a lone decode
# stream's groups are one token each.
REGIME_SCOPES = {"prefill": "budget", "decode": "token"}
# The carried balance's calibration (docs/design.md): θ_l keeps K_l − K_base − CARRY_OFFSET extras per
# token on average, and the bar falls by exp(−α·β); both measured best on two models (lever_sim.py).
# One bank for all of a request's layers moves L times as often as a layer's balance, so its α is lower.
CARRY_OFFSET = 0.4
CARRY_ALPHA = {"layer": 0.05, "request": 0.025}
CARRY_POOL = "request"
# Decode tokens carry where at most this many share an Alloc-T group (BENCHMARKS.md, default model, b =
# 0.5: at N = 8 streams carrying recovers 51 % of top-2's loss against Alloc-T's 49 %; at N = 64 Alloc-T
# is ahead, 54 %).
CARRY_GROUP = 8
_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")


class ProfileError(ValueError):
    """A problem the user can fix (model, arguments); printed without a traceback."""


# -- model ---------------------------------------------------------------------------------------------
def read_moe_config(model: str | Path) -> dict[str, Any]:
    """config.json of a local HF checkpoint, refusing non-MoE models before vLLM is started."""
    path = Path(model).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ProfileError(f"MODEL {path}: no config.json there; pass a local HF-format checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"MODEL {path}: cannot read config.json ({exc})") from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**text, **config}  # multimodal wrappers keep the language model's fields in text_config
    if not any(isinstance(merged.get(k), int) and merged[k] > 1 for k in _EXPERT_COUNT_KEYS):
        raise ProfileError(
            f"MODEL {path} is not a Mixture-of-Experts model: its config.json has none of "
            f"{', '.join(_EXPERT_COUNT_KEYS)} (> 1); Alloc-L profiles routed experts"
        )
    return merged


def fingerprint(config: dict[str, Any], counters: dict[str, Any]) -> ModelFingerprint:
    """The fingerprint as the integration computes it at load: layers and K from the worker's counters,
    E, H, I and the architecture from config.json (the fields vLLM builds the MoE layers from)."""
    E = next(config[k] for k in _EXPERT_COUNT_KEYS if isinstance(config.get(k), int))
    I = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if not isinstance(I, int):
        raise ProfileError(f"config.json has no moe_intermediate_size / intermediate_size (got {I!r})")
    K = int(counters["K"])
    if config.get("num_experts_per_tok") not in (None, K):
        raise RuntimeError(f"config.json says top-k {config['num_experts_per_tok']}, the loaded model {K}")
    return ModelFingerprint(
        architecture=(config.get("architectures") or ["unknown"])[0],
        moe_layers=list(counters["layers"]),
        num_experts=int(E),
        top_k=K,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(I),
    )


# -- evaluation through vLLM ----------------------------------------------------------------------------
class VllmEvaluator:
    """evaluate(K, split) -> perplexity, measured by the served model with K as the live row of Σ K_l
    (scope `request`); `validate(K, alloc_t, regime)` -> the mean NLL of each held-out sequence in a
    regime the guard validates (`profile_protocols`): prefill under scope `budget`, the decode of a lone
    stream under scope `token`."""

    def __init__(
        self,
        llm: Any,
        calib: CalibrationData,
        model: ModelFingerprint,
        k_base: int = 1,
        carry_offset: float = CARRY_OFFSET,
    ) -> None:
        from vllm_alloc.budget import uniform_budget_file

        self.llm, self.calib, self.model = llm, calib, model
        self.carry_offset = carry_offset
        self._thresholds: dict[tuple[int, ...], list[float | None]] = {}
        self._budgets = uniform_budget_file(model, k_base=k_base)  # only for absolute_budget()

    def request_budget(self, B: int) -> float:
        return request_budget(self._budgets, B)

    def __call__(self, ks: Sequence[int], split: str) -> float:
        nll = self._run(ks, True, "request", split)
        return math.exp(sum(nll) / sum(len(ids) - 1 for ids in self.calib.split_sequences(split)))

    def validate(self, ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> list[float]:
        # A lone stream that carries its balance runs in decode order (`decode_order`): one token per
        # sequence per pass, each its own group, exactly the steps a decoding request takes.
        in_order = carry and regime == "decode"
        with decode_order(self.llm, in_order):
            nll = self._run(ks, alloc_t, REGIME_SCOPES[regime], "heldout", carry)
        return [v / (len(ids) - 1) for v, ids in zip(nll, self.calib.heldout, strict=True)]

    def calibrate_carry(self) -> None:
        """Record the router scores of the full model on the profile split, for `thresholds`."""
        self.llm.collective_rpc("vllm_alloc_record_scores", args=(True,))
        try:
            self._run([self.model.top_k] * self.model.num_moe_layers, True, "request", "profile")
        finally:
            self.llm.collective_rpc("vllm_alloc_record_scores", args=(False,))

    def thresholds(self, ks: Sequence[int]) -> list[float | None]:
        """θ per layer of the carried balance at K = ks (`carry.threshold_for`, K_l − K_base − offset
        extras per token); None where it is +inf (the budget file's JSON has no infinity)."""
        key = tuple(int(k) for k in ks)
        if key not in self._thresholds:
            B = sum(key)
            got = self.llm.collective_rpc(
                "vllm_alloc_carry_thresholds", args=({B: list(key)}, self.carry_offset)
            )
            self._thresholds[key] = [None if v == math.inf else float(v) for v in got[0][B]]
        return self._thresholds[key]

    def _run(
        self, ks: Sequence[int], alloc_t: bool, scope: str, split: str, carry: bool = False
    ) -> list[float]:
        """NLL sum of each sequence of `split` with K = ks as the live row of B = Σ ks."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        B = sum(ks)
        self.llm.collective_rpc("vllm_alloc_set_allocation", args=({B: list(ks)}, {B: bool(alloc_t)}))
        theta = [math.inf if v is None else v for v in self.thresholds(ks)] if carry else None
        self.llm.collective_rpc("vllm_alloc_set_carry", args=({B: theta},))
        self.llm.collective_rpc("vllm_alloc_set_scope", args=(scope,))
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, extra_args={"activation_budget": self.request_budget(B)}
        )
        sequences = self.calib.split_sequences(split)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, sequences, strict=True)]


def request_budget(budget_file: BudgetFile, B: int) -> float:
    """A b with floor(b·A) == B: the middle of B's interval, so float rounding cannot slip a step."""
    A = budget_file.model.full_activations
    b = 1.0 if B == A else (B + 0.5) / A
    if budget_file.absolute_budget(b) != B:
        raise RuntimeError(f"b = {b} maps to B = {budget_file.absolute_budget(b)}, not {B}")
    return b


class CapEvaluator:
    """The distinct-expert cap's measurements (`profile_protocols.choose_cap`), in an engine serving the
    budget file being capped: `self(B, share, N)` -> the mean NLL of each held-out sequence, the file's
    configuration at B (its K(B), Alloc-T, carried balance) with N streams decoding together as served.
    Where B carries and N <= carry_group, N sequences per call run in decode order under scope `budget`
    (each pass: one token of each of the N streams, one Alloc-T and cap group); elsewhere N sequences
    per call prefill in one pass under scope `position` (a group: the N streams' tokens at one
    position, equal to N decode streams: tests/e2e). The held-out sequences are cut into calls of equal
    size, at most N each (360 sequences at N = 64: 6 calls of 60). `baseline(B)`: uniform K_l without
    Alloc-T. `runs` counts the measurements."""

    def __init__(self, llm: Any, calib: CalibrationData, budget_file: BudgetFile) -> None:
        self.llm, self.calib, self.bf = llm, calib, budget_file
        self.L = budget_file.model.num_moe_layers
        self.runs = 0

    def baseline(self, B: int) -> list[float]:
        from vllm_alloc.budget.alloc_l import uniform

        ks = uniform(self.L, self.bf.model.top_k, B, k_min=self.bf.k_base)
        self.llm.collective_rpc("vllm_alloc_set_allocation", args=({B: ks}, {B: False}))
        self.llm.collective_rpc("vllm_alloc_set_carry", args=({B: None},))
        self.llm.collective_rpc("vllm_alloc_set_cap", args=({B: None},))
        try:
            return self._run(B, "token", len(self.calib.heldout), in_order=False)
        finally:
            self.llm.collective_rpc("vllm_alloc_reset_allocation")

    def __call__(self, B: int, share: float | None, streams: int) -> list[float]:
        self.llm.collective_rpc("vllm_alloc_reset_allocation")
        self.llm.collective_rpc(
            "vllm_alloc_set_cap", args=({B: None if share is None else [share] * self.L},)
        )
        in_order = self.bf.carrying()[B] and streams <= self.bf.carry_group
        try:
            return self._run(B, "budget" if in_order else "position", streams, in_order)
        finally:
            self.llm.collective_rpc("vllm_alloc_reset_allocation")

    def _run(self, B: int, scope: str, streams: int, in_order: bool) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.llm.collective_rpc("vllm_alloc_set_scope", args=(scope,))
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, extra_args={"activation_budget": request_budget(self.bf, B)}
        )
        seqs = self.calib.heldout
        if len(seqs) < streams:
            raise ProfileError(
                f"--cap-streams {streams}: only {len(seqs)} held-out sequences; N must be at most that"
            )
        calls = -(-len(seqs) // streams)
        bounds = [len(seqs) * i // calls for i in range(calls + 1)]  # equal calls of at most N
        nll: list[float] = []
        with decode_order(self.llm, in_order):
            for lo, hi in itertools.pairwise(bounds):
                call = [TokensPrompt(prompt_token_ids=ids) for ids in seqs[lo:hi]]
                outputs = self.llm.generate(call, params, use_tqdm=False)
                nll += [nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, seqs[lo:hi], strict=True)]
        self.runs += 1
        return [v / (len(ids) - 1) for v, ids in zip(nll, seqs, strict=True)]


def add_caps(
    budget_file: BudgetFile,
    evaluator: CapEvaluator | Any,
    budgets: Sequence[int],
    *,
    streams: Sequence[int] = pp.CAP_STREAMS,
    shares: Sequence[float] = pp.CAP_SHARES,
    keep: float = pp.CAP_KEEP,
    progress: bool = True,
) -> BudgetFile:
    """The budget file with a distinct-expert cap chosen at each B of `budgets` (below A) by
    `profile_protocols.choose_cap`, measured through `evaluator` (`CapEvaluator`'s interface); every
    other B keeps no cap. Caps already in the file are replaced."""
    from tqdm import tqdm

    guard = budget_file.guard
    if guard is None:
        raise ProfileError("the budget file has no guard (nothing was validated), so no cap can be chosen")
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
            cap, tests = pp.choose_cap(B, L, measured, baseline, streams, shares, keep, guard.confidence)
            data["allocations"][B - lo].update(cap=cap, cap_tests=tests)
    finally:
        bar.close()
    data["guard"].update(cap_streams=sorted(streams), cap_keep=keep)
    chosen = {B: data["allocations"][B - lo]["cap"] for B in capped}
    data["notes"] = data["notes"].split(" Distinct-expert caps:")[0] + (
        f" Distinct-expert caps: at B = {capped}, shares ρ = {sorted(shares, reverse=True)} were tried "
        f"largest first, the file's configuration decoding N = {sorted(streams)} streams together as "
        f"served, on the held-out sequences; a share ships where at every N it is better than uniform "
        f"without Alloc-T with {guard.confidence:.0%} confidence and keeps at least {keep:.0%} of the "
        f"uncapped configuration's gain over it (the smallest such share before the first that fails). "
        f"Chosen: "
        + ", ".join(f"B = {B}: {'none' if c is None else f'ρ = {c[0]:g}'}" for B, c in chosen.items())
        + "."
    )
    return parse_budget_file(data)


@contextlib.contextmanager
def decode_order(llm: Any, on: bool = True) -> Iterator[None]:
    """Within the block, the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) prefills every prompt
    one token per pass (vLLM's `long_prefill_token_threshold` = 1), so teacher-forced prompts run as
    decoding requests do: each pass computes every layer of one token per sequence, in position order.
    That is what a request balance spanning layers needs (scope `stream`, one pass per sequence, runs
    layer by layer). Prompt logprobs are the same as in one pass (bf16 noise aside). Needs chunked
    prefill; sequences decode together up to max_num_seqs."""
    if not on:
        yield
        return
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    config = getattr(scheduler, "scheduler_config", None)
    if config is None or not config.enable_chunked_prefill:
        raise RuntimeError(
            "vllm-alloc: decode-order evaluation needs the engine core in this process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0) with chunked prefill on"
        )
    before = config.long_prefill_token_threshold
    config.long_prefill_token_threshold = 1
    try:
        yield
    finally:
        config.long_prefill_token_threshold = before


def start_llm(
    model: str, seq_len: int, dtype: str, max_num_seqs: int, budget_file: Path | None = None
) -> Any:
    """The profiler's engine; with `budget_file`, one serving that file for the cap's measurements
    (`CapEvaluator`), whose steps hold max_num_seqs whole sequences (scope `position`'s N streams)."""
    # The engine core in this process: `generate` queues every sequence before the first step, so every
    # configuration's prefill steps hold the same sequences (scope `budget`'s pools are those steps).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    plugin: dict[str, Any] = {"scope": "request"}
    if budget_file is not None:
        plugin["budget_file"] = str(budget_file)
    return LLM(
        model=str(model),
        dtype=dtype,  # type: ignore[arg-type]  # the CLI passes vLLM's own choices through
        max_model_len=seq_len + 1,  # the prompt plus the one token vLLM insists on generating
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(seq_len + 1, 2048, max_num_seqs * (seq_len + 1) if budget_file else 0),
        gpu_memory_utilization=0.3 if _on_cpu() else 0.85,
        enforce_eager=True,  # each configuration runs once; compiling or graph capture would not pay
        enable_prefix_caching=False,
        additional_config={"vllm_alloc": plugin},
    )


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def shutdown_llm(llm: Any) -> None:
    """Stop the engine now (not at garbage collection), so no second engine ever overlaps this one."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


# -- writing the file -------------------------------------------------------------------------------------
def build_budget_file(
    model: ModelFingerprint,
    result: pp.ProfileResult,
    calib: CalibrationData,
    *,
    requested: Sequence[int],
    regimes: Sequence[str] = pp.REGIMES,
    confidence: float = pp.CONFIDENCE,
    target: float = pp.TARGET,
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
    widths = pp.half_widths(result.allocations)
    guard = {
        "confidence": confidence,
        "sequences": len(calib.heldout),
        "seq_len": calib.seq_len,
        "regimes": list(regimes),
        "target": target,
        "resolution": statistics.median(widths) if widths else 0.0,
    }
    notes = (
        f"Profiled by vllm-alloc profile through vLLM (prefix caching off). Requested B: {list(requested)}. "
        f"At B = {result.validated}, the baselines (uniform with and without Alloc-T) and each candidate "
        f"(the protocols' DPs, with and without Alloc-T) ran on the {len(calib.heldout)} held-out "
        f"sequences in the regimes {list(regimes)} (prefill: scope 'budget'; decode: a lone stream, scope "
        f"'token'). A candidate ships only where a paired per-sequence test at {confidence:.0%} confidence "
        "puts it below both baselines in every regime where they differ; otherwise the B runs uniform "
        "with Alloc-T. "
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
    evaluate: pp.Evaluate,
    validate: pp.Validate,
    model: ModelFingerprint,
    calib: CalibrationData,
    budgets: Sequence[float],
    out: Path,
    *,
    protocols: Sequence[str] = pp.PROTOCOLS,
    k_base: int = 1,
    all_budgets_up_to: int = 32,
    confidence: float = pp.CONFIDENCE,
    target: float = pp.TARGET,
    progress: bool = True,
    thresholds: Callable[[Sequence[int]], list[float | None]] | None = None,
    carry_alpha: float | None = None,
    carry_pool: str = CARRY_POOL,
    carry_group: int = CARRY_GROUP,
) -> tuple[BudgetFile, int]:
    """Profile with `evaluate` (profile split) and `validate` (held-out split, the guard), write `out`;
    returns the file and the number of model runs. With `thresholds` the guard also tries carrying the
    balance (`profile_protocols.profile`), at `carry_alpha` in `carry_pool`, written with `carry_group`."""
    from tqdm import tqdm

    from vllm_alloc.budget import uniform_budget_file

    probe = uniform_budget_file(model, k_base=k_base)  # for absolute_budget(): B = floor(b·A), checked
    try:
        requested = sorted({probe.absolute_budget(b) for b in budgets})
    except ValueError as exc:
        raise ProfileError(f"--budgets: {exc}") from None
    L, K = model.num_moe_layers, model.top_k
    weight = {"profile": len(calib.profile), "heldout": len(calib.heldout)}  # sequences per run
    planned = pp.planned_profile_runs(L, K, [B for B in requested if B < L * K], protocols, k_base)
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

    memo = pp.Memo(timed)
    validations = pp.Validations(timed_validate)

    def on_plan(n: int) -> None:
        bar.total = bar.n + (n + 1) * weight["heldout"]  # + the b = 1.0 reference
        bar.refresh()

    try:
        result = pp.profile(
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
    return budget_file, memo.runs + validations.runs


def resolution_warning(budget_file: BudgetFile) -> str | None:
    """A line saying the held-out split cannot resolve the target difference, and what would; or None."""
    guard = budget_file.guard
    if guard is None or guard.resolution <= guard.target:
        return None
    needed = math.ceil(guard.sequences * (guard.resolution / guard.target) ** 2)
    return (
        f"the {guard.sequences} held-out sequences resolve ±{guard.resolution:.3%} (median half-width of "
        f"the paired intervals at {guard.confidence:.0%}), coarser than the {guard.target:.2%} target: "
        f"about {needed} held-out sequences would resolve it (raise --tokens or --heldout)"
    )


# -- CLI ----------------------------------------------------------------------------------------------------
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
    p.add_argument("--protocols", default=",".join(pp.PROTOCOLS), help="default: isolating,operating-point")
    p.add_argument("--heldout", type=float, default=0.5, help="held-out fraction of the sequences (0.5)")
    p.add_argument("--k-base", type=int, default=1, help="K_base, the smallest K_l (default 1)")
    p.add_argument(
        "--confidence",
        type=float,
        default=pp.CONFIDENCE,
        help=f"confidence of the guard's paired intervals (default {pp.CONFIDENCE})",
    )
    p.add_argument(
        "--resolve",
        type=float,
        default=pp.TARGET,
        help=f"relative perplexity difference the held-out split should resolve (default {pp.TARGET})",
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
        default=",".join(map(str, pp.CAP_STREAMS)),
        help="decode streams N the distinct-expert cap is measured at, at each requested budget (default "
        f"{','.join(map(str, pp.CAP_STREAMS))}; 'none': choose no cap)",
    )
    p.add_argument(
        "--cap-shares",
        default=",".join(map(str, pp.CAP_SHARES)),
        help=f"cap shares ρ to try, largest first (default {','.join(map(str, pp.CAP_SHARES))})",
    )
    p.add_argument(
        "--cap-keep",
        type=float,
        default=pp.CAP_KEEP,
        help="least share of the uncapped configuration's gain over uniform without Alloc-T that a cap "
        f"keeps (default {pp.CAP_KEEP})",
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name = "vllm-alloc profile"
    llm = None
    stamp = _stamp(args.out)  # what --out was before this run, to say what an interrupt left
    try:
        budgets = parse_budgets(args.budgets)
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        if not protocols or any(p not in pp.PROTOCOLS for p in protocols):
            raise ProfileError(f"--protocols {args.protocols!r} is not valid; choose from {pp.PROTOCOLS}")
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
        print(
            f"{name}: {len(calib.profile)} profile + {len(calib.heldout)} held-out sequences of "
            f"{calib.seq_len} tokens from {calib.source}",
            file=sys.stderr,
        )
        start = time.monotonic()
        runs, what = 0, "evaluations"
        if args.caps_only:
            budget_file = _file_to_cap(args.out, calib)
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
            budget_file, runs, llm = _profile(args, config, calib, budgets, protocols)
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
        print(f"{name}: warning: {warning}", file=sys.stderr)
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


def _file_to_cap(path: Path, calib: CalibrationData) -> BudgetFile:
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


def _profile(
    args: argparse.Namespace,
    config: dict[str, Any],
    calib: CalibrationData,
    budgets: list[float],
    protocols: list[str],
) -> tuple[BudgetFile, int, Any]:
    """The protocols and the guard in one engine, writing args.out: (the file, model runs, the engine)."""
    # Decode-order validation (`decode_order`) runs every held-out sequence at once: a pass per position.
    llm = start_llm(args.model, calib.seq_len, args.dtype, max(args.max_num_seqs, len(calib.heldout)))
    try:
        model = fingerprint(config, llm.collective_rpc("vllm_alloc_counters")[0])
        evaluator = VllmEvaluator(llm, calib, model, args.k_base, args.carry_offset)
        # The carried balance is validated on the CPU host path only so far (the device path's carry is
        # covered by unit and CUDA-graph tests, not yet profiled on a GPU).
        carry = not args.no_carry and _on_cpu()
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
            )
        finally:
            llm.collective_rpc("vllm_alloc_reset_allocation")
    except BaseException:
        shutdown_llm(llm)
        raise
    return budget_file, runs, llm
