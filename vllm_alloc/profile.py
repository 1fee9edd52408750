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
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_alloc import profile_protocols as pp
from vllm_alloc.budget import (
    BudgetFile,
    BudgetFileError,
    ModelFingerprint,
    load_budget_file,
    parse_budget_file,
)
from vllm_alloc.calibration import CalibrationData, CalibrationError, load_calibration, nll_sum
from vllm_alloc.requests import BudgetError, parse_budget

METRIC = "perplexity: exp(mean NLL of the next token) over the calibration split, vLLM prompt logprobs"
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
    """evaluate(K, split) -> perplexity, measured by the served model with K as the live row of Σ K_l."""

    def __init__(self, llm: Any, calib: CalibrationData, model: ModelFingerprint, k_base: int = 1) -> None:
        from vllm_alloc.budget import uniform_budget_file

        self.llm, self.calib, self.model = llm, calib, model
        self._budgets = uniform_budget_file(model, k_base=k_base)  # only for absolute_budget()

    def request_budget(self, B: int) -> float:
        """A b with floor(b·A) == B: the middle of B's interval, so float rounding cannot slip a step."""
        A = self.model.full_activations
        b = 1.0 if B == A else (B + 0.5) / A
        if self._budgets.absolute_budget(b) != B:
            raise RuntimeError(f"b = {b} maps to B = {self._budgets.absolute_budget(b)}, not {B}")
        return b

    def __call__(self, ks: Sequence[int], split: str) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        B = sum(ks)
        self.llm.collective_rpc("vllm_alloc_set_allocation", args=({B: list(ks)},))
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, extra_args={"activation_budget": self.request_budget(B)}
        )
        sequences = self.calib.split_sequences(split)
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in sequences]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        nll = sum(nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, sequences, strict=True))
        return math.exp(nll / sum(len(ids) - 1 for ids in sequences))


def start_llm(model: str, seq_len: int, dtype: str, max_num_seqs: int) -> Any:
    from vllm import LLM

    return LLM(
        model=str(model),
        dtype=dtype,  # type: ignore[arg-type]  # the CLI passes vLLM's own choices through
        max_model_len=seq_len + 1,  # the prompt plus the one token vLLM insists on generating
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(seq_len + 1, 2048),
        gpu_memory_utilization=0.3 if _on_cpu() else 0.85,
        enforce_eager=True,  # each configuration runs once; compiling or graph capture would not pay
        enable_prefix_caching=False,
        additional_config={"vllm_alloc": {"scope": "request"}},
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
    full_heldout: float | None = None,
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
    notes = (
        f"Profiled by vllm-alloc profile through vLLM (scope 'request', prefix caching off). Requested B: "
        f"{list(requested)}. Candidates (uniform, isolating DP, operating-point DP at requested B) were "
        f"measured on the held-out split at B = {result.validated}; the lowest won, ties to uniform, so no "
        "allocation measured worse than uniform is shipped. Every other B runs uniform: no allocation that "
        "was not measured is shipped. B = A runs all K (the stock model)."
    )
    if full_heldout is not None:
        notes += f" Held-out perplexity at b = 1.0: {full_heldout:.6g}."
    data = {
        "format_version": 1,
        "model": model.model_dump(),
        "k_base": result.k_base,
        "sensitivities": sensitivities,
        "allocations": result.allocations,
        "notes": notes,
    }
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
    model: ModelFingerprint,
    calib: CalibrationData,
    budgets: Sequence[float],
    out: Path,
    *,
    protocols: Sequence[str] = pp.PROTOCOLS,
    k_base: int = 1,
    all_budgets_up_to: int = 32,
    progress: bool = True,
) -> tuple[BudgetFile, int]:
    """Profile with `evaluate`, write `out`; returns the file and the number of model evaluations run."""
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
        total=planned * weight["profile"] + weight["heldout"],  # + the b = 1.0 reference
        unit="seq",
        desc="profile",
        disable=not progress,
        dynamic_ncols=True,
    )
    runs = {"n": 0}

    def timed(ks: Sequence[int], split: str) -> float:
        value = evaluate(ks, split)
        runs["n"] += 1
        bar.update(weight[split])
        bar.set_postfix(runs=runs["n"], last=f"{value:.4g}")
        return value

    memo = pp.Memo(timed)

    def on_plan(n: int) -> None:
        bar.total = bar.n + n * weight["heldout"] + weight["heldout"]
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
        )
        full = memo([K] * L, "heldout")
    finally:
        bar.close()
    budget_file = build_budget_file(model, result, calib, requested=requested, full_heldout=full)
    write_atomically(budget_file, out)
    return budget_file, memo.runs


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
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens in all (default 16384)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    p.add_argument("--budgets", default="0.33,0.5,0.75", help="requested budgets b (default 0.33,0.5,0.75)")
    p.add_argument("--protocols", default=",".join(pp.PROTOCOLS), help="default: isolating,operating-point")
    p.add_argument("--heldout", type=float, default=0.25, help="held-out fraction of the sequences (0.25)")
    p.add_argument("--k-base", type=int, default=1, help="K_base, the smallest K_l (default 1)")
    p.add_argument(
        "--all-budgets-up-to",
        type=int,
        default=32,
        help="validate every B when there are at most this many budgets (default 32)",
    )
    p.add_argument("--dtype", default="auto", help="vLLM dtype (default auto)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="vLLM batch size (default 64)")
    p.add_argument("--out", required=True, type=Path, help="budget file to write (e.g. configs/NAME.json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    name = "vllm-alloc profile"
    llm = None
    try:
        budgets = parse_budgets(args.budgets)
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
        if not protocols or any(p not in pp.PROTOCOLS for p in protocols):
            raise ProfileError(f"--protocols {args.protocols!r} is not valid; choose from {pp.PROTOCOLS}")
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
        llm = start_llm(args.model, calib.seq_len, args.dtype, args.max_num_seqs)
        model = fingerprint(config, llm.collective_rpc("vllm_alloc_counters")[0])
        try:
            budget_file, runs = profile_to_file(
                VllmEvaluator(llm, calib, model, args.k_base),
                model,
                calib,
                budgets,
                args.out,
                protocols=protocols,
                k_base=args.k_base,
                all_budgets_up_to=args.all_budgets_up_to,
                progress=not args.no_progress,
            )
        finally:
            llm.collective_rpc("vllm_alloc_reset_allocation")
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    except (ProfileError, CalibrationError, BudgetFileError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if llm is not None:
            shutdown_llm(llm)
    print(
        f"{name}: {runs} evaluations in {time.monotonic() - start:.0f} s; wrote {args.out}", file=sys.stderr
    )
    from vllm_alloc.show import summary

    print(summary(budget_file, budgets))
    return 0
