"""Quality benchmark: perplexity of the default model on its held-out TEST split through vLLM.

    python benchmarks/quality.py [--seqs 256] [--model models/default] [--budget-file configs/default.json]
                                 [--png docs/quality.png] [--out build/quality/results.json]
                                 [--only ENGINES] [--expert-cap ρ]

Everything is measured by the served model (vLLM offline, prompt logprobs, prefix caching off), on the
same fixed 256-token windows of the manifest's test split for every configuration (the split no
training, model selection or profiling saw). Rows, at b ∈ {1.0, 0.75, 0.5, 0.33}:

  full model               vLLM without the plugin (VLLM_ALLOC_DISABLE=1), b = 1.0
  uniform top-⌊b·K⌋        vLLM without the plugin, hf_overrides num_experts_per_tok = ⌊b·K⌋: what a
                           smaller top-k in the config does (the model renormalises, norm_topk_prob)
  uniform same-B           plugin, no budget file (uniform K_l), scope "token" (Alloc-T off); weights
                           "topk" and "kept". At b = 0.33, B = ⌊b·A⌋ = 5 > ⌊b·K⌋·L = 4, so this is the
                           fair baseline there.
  Alloc-L only             scope "token" with K(B) from: the shipped file, its isolating DP candidate,
                           its operating-point DP candidate
  Alloc-T only             uniform K_l, scope "budget" / "request"
  Alloc-L + Alloc-T        the shipped file under scope "budget" (the server default: the SHIPPED
                           configuration) and "request" (what the profiler measures with), plus each
                           protocol's candidate, and the levers (weights "kept", K_base = 2, a profile
                           from 1/8 of the calibration tokens)
  carried balance          a lone decode stream in decode order (below): the shipped file as it is
                           (`L+T shipped (decode N=1)`: its tokens carry where the file ships the
                           balance), and uniform K_l carrying it (the file's pool and α) with θ
                           calibrated in the engine from the full model's router scores on 64
                           validation windows (`uniform + carry`)

Each engine-level setting (plugin on/off, hf_overrides, budget file, scope, weights) is one engine in a
child process (`--engine SPEC OUT`), started once and run one after another; within an engine the
allocation rows of B = ⌊b·A⌋ are installed live, with Alloc-T on and not carrying unless a row asks
(`vllm_alloc_set_allocation`, `vllm_alloc_set_carry`: the profiler's mechanism), or restored from the
loaded file with its Alloc-T flags and θ (`vllm_alloc_reset_allocation`), and budgets go per request.
Each budget is its own `generate` call, so a batch never mixes budgets and every configuration sees the
same batches. The candidate ranking score of Alloc-T is the router's own score in every row (not varied).

Regimes. Alloc-T's groups depend on how tokens share a forward pass, so the rows above (scope `budget`,
2048-token steps of whole windows) measure the prefill regime. The decode regime, N concurrent
same-budget streams, is measured by teacher forcing too, with groups made exactly as N streams' decode
steps make them: N = 1 is scope `token` (one token per group; the `(token)` rows) or, where a B carries
the request balance, decode order (`vllm_alloc.profiler.engine.decode_order`: every window prefilled one
token
per pass, all 256 together, each token its own group, so each window takes exactly a lone decoding
request's steps, with its balance carried across positions and layers), and N = 8, 64. Where the file
lets groups of N decode tokens carry (`carry_group` >= N), its row at N runs in decode order too, N
windows per call under the serving scope `budget` (engine `decode N=… in order`); otherwise, and for
every row that does not carry, the engines `decode N=…` run scope `position` with N windows per
`generate` call, all N prefilled in one step, so a group is the N tokens at one position (tests/e2e:
equal to a real decode loop). Rows without
Alloc-T (the uniforms, `(token)`) are the same in every regime. Where the file caps distinct experts
(`vllm_alloc.routing.cap`, decode groups of two or more tokens), its served rows at N = 8 and 64 are capped,
and
the same rows without its caps run too (`L+T shipped, no cap`, engines `decode N=… no cap`); with
`--expert-cap ρ`, also under that share (`L+T shipped, cap ρ=…`). `regime_tables` prints one table per
regime. Every engine keeps its engine core in-process, so every configuration sees the same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_default_budget import MODEL, SCRATCH, SHIPPED, split_ids  # noqa: E402  (after sys.path)

from vllm_alloc.profiler.carry_defaults import CARRY_OFFSET  # noqa: E402
from vllm_alloc.profiler.engine import decode_order  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5, 0.33)
SEQ_LEN = 256
SHIPPED_ROW = "L+T shipped (budget, topk)"  # the configuration `--budget-config default` serves
# ... and the same file for lone decode streams, teacher-forced in decode order: their tokens carry the
# request balance where the file ships it, exactly as decoding requests do.
SHIPPED_N1 = "L+T shipped (decode N=1)"
# Decode regime: N concurrent same-budget streams. N = 1 is scope `token` (a group of one token), so its
# rows are the `(token)` rows; N > 1 teacher-forces N windows per pass under scope `position`.
DECODE_STREAMS = (1, 8, 64)
CALIB_WINDOWS = 64  # validation windows whose router scores calibrate the carried balance's θ
# Each regime's rows, as (what the row is, the result label in that regime).
REGIMES: dict[str, list[tuple[str, str]]] = {
    "prefill (scope budget, 2048-token steps)": [
        ("T only (uniform K_l)", "T only (budget)"),
        ("L+T shipped (served)", SHIPPED_ROW),
        ("L+T isolating DP", "L+T isolating DP (budget)"),
        ("L+T operating-point DP", "L+T operating-point DP (budget)"),
    ],
    "decode N = 1 (a lone stream: groups of one token, Alloc-T idle; the carried balance where it ships)": [
        ("T only (uniform K_l)", "uniform same-B (token, topk)"),
        ("L+T shipped (served)", SHIPPED_N1),
        ("uniform + carry (θ calibrated here)", "uniform + carry (decode N=1)"),
        ("L only, shipped vector, no carry", "L only: shipped (token)"),
        ("L+T isolating DP", "L only: isolating DP (token)"),
        ("L+T operating-point DP", "L only: operating-point DP (token)"),
    ],
    **{
        f"decode N = {n} (groups: the {n} streams' tokens at one position)": [
            ("T only (uniform K_l)", f"T only (decode N={n})"),
            ("L+T shipped (served)", f"L+T shipped (decode N={n})"),
            ("L+T isolating DP", f"L+T isolating DP (decode N={n})"),
            ("L+T operating-point DP", f"L+T operating-point DP (decode N={n})"),
        ]
        for n in DECODE_STREAMS[1:]
    },
}


# -- one engine (child process) ------------------------------------------------------------------------
def run_engine(spec: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{"ppl": {label: {b: perplexity}}, "nll": {label: {b: [mean NLL of each window]}}}."""
    os.environ["VLLM_ALLOC_DISABLE"] = "0" if spec["plugin"] else "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_alloc.profiler.calibration import nll_sum

    # The engine core in this process: `generate` queues every sequence before the first step, so every
    # configuration sees the same batches (with the core in a process of its own, the first step can
    # start before the last sequence arrives, and scope `budget`'s groups then vary from run to run).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Decode regime (scope `position`): N windows per `generate` call, all N prefilled in one step, so a
    # position's group is exactly those N streams' tokens there.
    streams = spec.get("streams")
    in_order = bool(spec.get("decode_order"))
    kwargs: dict[str, Any] = dict(
        model=spec["model"],
        dtype="bfloat16",
        max_model_len=SEQ_LEN + 1,
        max_num_seqs=max(64, streams or 0, len(spec["seqs"]) if in_order and not streams else 0),
        max_num_batched_tokens=max(2048, (streams or 0) * SEQ_LEN),
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
    )
    if spec.get("hf_overrides"):
        kwargs["hf_overrides"] = spec["hf_overrides"]
    if spec.get("additional_config"):
        kwargs["additional_config"] = spec["additional_config"]
    llm = LLM(**kwargs)
    seqs: list[list[int]] = spec["seqs"]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in seqs]
    if any(ev.get("carry") for ev in spec["evals"]):
        # The carried balance's θ, calibrated as the profiler does: the full model's router scores on the
        # validation windows (not the test windows measured here).
        llm.collective_rpc("vllm_alloc_record_scores", args=(True,))
        calib = [TokensPrompt(prompt_token_ids=ids) for ids in spec["calib_seqs"]]
        llm.generate(
            calib, SamplingParams(max_tokens=1, extra_args={"activation_budget": 1.0}), use_tqdm=False
        )
        llm.collective_rpc("vllm_alloc_record_scores", args=(False,))
    out: dict[str, dict[str, float]] = {}
    per_seq: dict[str, dict[str, list[float]]] = {}
    for ev in spec["evals"]:
        if spec["plugin"]:
            if ev.get("rows"):
                rows = {int(B): ks for B, ks in ev["rows"].items()}
                # Installed rows run with Alloc-T (the scope decides what it does), whatever the file's
                # flag at that B.
                llm.collective_rpc("vllm_alloc_set_allocation", args=(rows, dict.fromkeys(rows, True)))
                theta: dict[int, Any] = dict.fromkeys(rows)  # installed rows do not carry, unless asked
                if ev.get("carry"):
                    theta = llm.collective_rpc("vllm_alloc_carry_thresholds", args=(rows, CARRY_OFFSET))[0]
                llm.collective_rpc("vllm_alloc_set_carry", args=(theta,))  # the file's pool and α
                # Installed rows are the levers' ablations: no distinct-expert cap (the served rows,
                # restored from the file, keep the file's caps).
                llm.collective_rpc("vllm_alloc_set_cap", args=(dict.fromkeys(rows),))
            else:
                llm.collective_rpc("vllm_alloc_reset_allocation")
        out[ev["label"]], per_seq[ev["label"]] = {}, {}
        for b in ev["budgets"]:
            extra = {"activation_budget": b} if spec["plugin"] else None
            params = SamplingParams(max_tokens=1, prompt_logprobs=0, extra_args=extra)
            t0 = time.monotonic()
            calls = (
                [prompts[i : i + streams] for i in range(0, len(prompts), streams)] if streams else [prompts]
            )
            with decode_order(llm, in_order):
                outputs = [o for call in calls for o in llm.generate(call, params, use_tqdm=False)]
            nlls = [nll_sum(o.prompt_logprobs, ids) for o, ids in zip(outputs, seqs, strict=True)]
            ppl = math.exp(sum(nlls) / sum(len(ids) - 1 for ids in seqs))
            out[ev["label"]][str(b)] = ppl
            per_seq[ev["label"]][str(b)] = [v / (len(ids) - 1) for v, ids in zip(nlls, seqs, strict=True)]
            print(f"  {ev['label']:<40} b={b:<5} ppl {ppl:.4f}  ({time.monotonic() - t0:.1f} s)", flush=True)
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    return {"ppl": out, "nll": per_seq}


# -- the plan ---------------------------------------------------------------------------------------------
def rows_for(bf: Any, pick: str) -> dict[int, list[int]]:
    """K(B) at the benchmark's budgets from one source: 'uniform', 'chosen' (what the file ships) or a
    candidate protocol's DP vector as the profiler measured it ('isolating', 'operating-point')."""
    from vllm_alloc.budget.alloc_l import uniform

    L, K = bf.model.num_moe_layers, bf.model.top_k
    rows: dict[int, list[int]] = {}
    for b in BUDGETS[1:]:
        B = bf.absolute_budget(b)
        alloc = bf.allocations[B - L * bf.k_base]
        if pick == "uniform":
            rows[B] = uniform(L, K, B, k_min=bf.k_base)
        elif pick == "chosen":
            rows[B] = list(alloc.k)
        else:
            found = [c.allocation for c in (alloc.candidates or []) if c.name == pick]
            rows[B] = list(found[0]) if found else uniform(L, K, B, k_min=bf.k_base)
    return rows


CAP_ROW = "L+T shipped, "  # rows of the served configuration under another cap setting (`cap_label`)


def cap_name(share: float) -> str:
    return "no cap" if share >= 1.0 else f"cap ρ={share:g}"


def cap_label(share: float, n: int) -> str:
    """The served configuration at N = n with expert_cap = share over the file's caps (1: none)."""
    return f"{CAP_ROW}{cap_name(share)} (decode N={n})"


def plan(shipped: Path, scratch: Path, expert_cap: float | None = None) -> list[dict[str, Any]]:
    from vllm_alloc.budget import load_budget_file

    bf = load_budget_file(shipped)
    K = bf.model.top_k
    low = list(BUDGETS[1:])
    src = {p: rows_for(bf, p) for p in ("uniform", "chosen", "isolating", "operating-point")}
    # Where the file caps distinct experts, its served rows at N = 8 and 64 are capped; the same rows
    # without its caps (expert_cap 1) show what the caps cost. --expert-cap adds one more share.
    shares = [1.0] if any(a.cap is not None for a in bf.allocations) else []
    shares += [] if expert_cap is None else [expert_cap]
    small = scratch / "small-calib.json"
    kbase2 = scratch / "kbase2.json"

    def ev(
        label: str, rows: dict[int, list[int]] | None, budgets: list[float] = low, carry: bool = False
    ) -> dict[str, Any]:
        return {"label": label, "rows": rows, "budgets": budgets, "carry": carry}

    def plugin(name: str, cfg: dict[str, Any], evals: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "plugin": True, "additional_config": {"vllm_alloc": cfg}, "evals": evals}

    engines: list[dict[str, Any]] = [
        {"name": "stock", "plugin": False, "evals": [ev("full model", None, [1.0])]}
    ]
    for b in low:
        k = max(1, math.floor(b * K))
        engines.append(
            {
                "name": f"stock top-{k}",
                "plugin": False,
                "hf_overrides": {"num_experts_per_tok": k},
                "evals": [ev(f"uniform top-⌊bK⌋ @{b}", None, [1.0])],
            }
        )
    engines += [
        plugin(
            "token/topk",
            {"scope": "token", "weights": "topk"},
            [
                ev("uniform same-B (token, topk)", src["uniform"]),
                ev("L only: shipped (token)", src["chosen"]),
                ev("L only: isolating DP (token)", src["isolating"]),
                ev("L only: operating-point DP (token)", src["operating-point"]),
            ],
        ),
        plugin(
            "token/kept",
            {"scope": "token", "weights": "kept"},
            [
                ev("uniform same-B (token, kept)", src["uniform"]),
                ev("L only: shipped (token, kept)", src["chosen"]),
            ],
        ),
        plugin(
            "decode N=1",  # lone decode streams: the shipped file, and the uniform allocation carrying
            {"budget_file": str(shipped), "scope": "token"},
            [ev(SHIPPED_N1, None), ev("uniform + carry (decode N=1)", src["uniform"], carry=True)],
        )
        | {"decode_order": True},
        plugin(
            "default",  # exactly what `--budget-config default` serves
            {"budget_file": str(shipped)},
            [
                ev(SHIPPED_ROW, None, list(BUDGETS)),
                ev("T only (budget)", src["uniform"]),
                ev("L+T isolating DP (budget)", src["isolating"]),
                ev("L+T operating-point DP (budget)", src["operating-point"]),
            ],
        ),
        plugin(
            "default/request",
            {"budget_file": str(shipped), "scope": "request"},
            [
                ev("L+T shipped (request)", None),
                ev("T only (request)", src["uniform"]),
                ev("L+T isolating DP (request)", src["isolating"]),
                ev("L+T operating-point DP (request)", src["operating-point"]),
            ],
        ),
        plugin(
            "default/kept",
            {"budget_file": str(shipped), "weights": "kept"},
            [ev("L+T shipped (budget, kept)", None), ev("T only (budget, kept)", src["uniform"])],
        ),
    ]
    for n in DECODE_STREAMS[1:]:
        # Where the file lets groups of n decode tokens carry (carry_group), the shipped row runs in decode
        # order, n streams per call under the serving scope `budget`: a group is the n streams' tokens at
        # one step, and they carry across steps and layers. Elsewhere nothing carries, and the rows
        # teacher-force n windows per pass under scope `position`.
        carries = any(bf.carrying()) and n <= bf.carry_group
        if carries:
            engines.append(
                plugin(
                    f"decode N={n} in order",
                    {"budget_file": str(shipped), "scope": "budget"},
                    [ev(f"L+T shipped (decode N={n})", None)],
                )
                | {"streams": n, "decode_order": True}
            )
        engines.append(
            plugin(
                f"decode N={n}",
                {"budget_file": str(shipped), "scope": "position"},
                [
                    *([] if carries else [ev(f"L+T shipped (decode N={n})", None)]),
                    ev(f"T only (decode N={n})", src["uniform"]),
                    ev(f"L+T isolating DP (decode N={n})", src["isolating"]),
                    ev(f"L+T operating-point DP (decode N={n})", src["operating-point"]),
                ],
            )
            | {"streams": n}
        )
        for share in shares:
            # The served configuration under another distinct-expert cap setting: the n streams' decode
            # tokens at one step are one cap group (a position under scope `position`, the pass's decode
            # tokens at one B in decode order).
            cfg = {"budget_file": str(shipped), "scope": "budget" if carries else "position"}
            engines.append(
                plugin(f"decode N={n} {cap_name(share)}", cfg | {"expert_cap": share},
                       [ev(cap_label(share, n), None)])
                | {"streams": n} | ({"decode_order": True} if carries else {})
            )  # fmt: skip
    if small.is_file():
        engines.append(
            plugin("small-calib", {"budget_file": str(small)}, [ev("L+T small calib (budget)", None)])
        )
    large = scratch / "large-calib.json"
    if large.is_file():
        engines.append(
            plugin("large-calib", {"budget_file": str(large)}, [ev("L+T 2x calib, isolating (budget)", None)])
        )
    if kbase2.is_file():
        # K_base = 2 makes B < L·2 = 8 invalid: b = 0.33 (B = 5) is below this file's minimum budget.
        engines.append(
            plugin("kbase2", {"budget_file": str(kbase2)}, [ev("L+T K_base=2 (budget)", None, [0.75, 0.5])])
        )
    return engines


def run_all(
    engines: list[dict[str, Any]],
    seqs: list[list[int]],
    work: Path,
    model: Path = MODEL,
    calib_seqs: list[list[int]] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Every engine in turn: perplexities, and each window's mean NLL (for paired intervals)."""
    results: dict[str, dict[str, float]] = {}
    nll: dict[str, dict[str, list[float]]] = {}
    for engine in engines:
        spec_path, out_path = (
            work / f"engine-{engine['name'].replace('/', '-')}.json",
            work / "engine-out.json",
        )
        spec = {**engine, "seqs": seqs, "model": str(model), "calib_seqs": calib_seqs or []}
        spec_path.write_text(json.dumps(spec))
        out_path.unlink(missing_ok=True)
        t0 = time.monotonic()
        print(f"engine {engine['name']}", flush=True)
        log = work / "engine.log"
        with log.open("w") as f:
            rc = subprocess.run(
                [sys.executable, __file__, "--engine", str(spec_path), str(out_path)],
                stdout=f,
                stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0 or not out_path.exists():
            raise RuntimeError(
                f"engine {engine['name']} failed ({rc}); see {log}:\n{log.read_text()[-3000:]}"
            )
        for line in log.read_text().splitlines():
            if line.startswith("  ") and "ppl" in line:
                print(line, flush=True)
        out = json.loads(out_path.read_text())
        results.update(out["ppl"])
        nll.update(out["nll"])
        print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    return results, nll


# -- report -------------------------------------------------------------------------------------------------
# The rows the tables and the hard target read in every run (the others appear where measured).
TABLE_NEEDS = (
    "full model",
    *(f"uniform top-⌊bK⌋ @{b}" for b in BUDGETS[1:]),
    "uniform same-B (token, topk)",
    SHIPPED_ROW,
)


def engines_for(labels: list[str], engines: list[dict[str, Any]]) -> list[str]:
    """The names of the planned engines that measure these rows (`--only` takes them)."""
    return sorted({e["name"] for e in engines for ev in e["evals"] if ev["label"] in labels})


def uniform_row(results: dict[str, dict[str, float]]) -> dict[str, float]:
    row = {"1.0": results["full model"]["1.0"]}
    for b in BUDGETS[1:]:
        row[str(b)] = results[f"uniform top-⌊bK⌋ @{b}"]["1.0"]
    return row


def recovery(ppl: float | None, base: float, full: float) -> str:
    """Share of a uniform's perplexity loss (base − full) that `ppl` recovers; — where there is none."""
    return "—" if ppl is None or base <= full else f"{100 * (base - ppl) / (base - full):+.0f}%"


def table(results: dict[str, dict[str, float]]) -> tuple[list[tuple[str, dict[str, float]]], str]:
    full = results["full model"]["1.0"]
    rows: list[tuple[str, dict[str, float]]] = [("full model", {"1.0": full})]
    rows.append(("uniform top-⌊bK⌋ (config top-k, no plugin)", uniform_row(results)))
    rows += [(k, v) for k, v in results.items() if k != "full model" and not k.startswith("uniform top-")]
    uni = uniform_row(results)
    same_b = results["uniform same-B (token, topk)"]

    head = (
        "| configuration | "
        + " | ".join(f"b = {b}" for b in BUDGETS)
        + " | recovery @0.5 vs top-⌊bK⌋ | vs same-B |"
    )
    lines = [head, "|---|" + "---:|" * (len(BUDGETS) + 2)]
    for name, row in rows:
        cells = []
        for b in BUDGETS:
            v = row.get(str(b))
            cells.append(
                "—" if v is None else f"{v:.3f} ({100 * (v / full - 1):+.1f}%)" if b != 1.0 else f"{v:.3f}"
            )
        mid = row.get("0.5")
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {recovery(mid, uni['0.5'], full)} | {recovery(mid, same_b['0.5'], full)} |"
        )
    return rows, "\n".join(lines)


def served_verdict(
    served: str, results: dict[str, dict[str, float]], nll: dict[str, dict[str, list[float]]]
) -> str:
    """The served configuration against both uniforms at every b < 1: the paired 95 % interval of the
    change in perplexity over the test windows, and whether it is worse with that confidence."""
    from vllm_alloc.profiler.guard import paired_test

    parts, worse = [], []
    for b in (str(b) for b in BUDGETS[1:]):
        for name, base in (
            ("top-⌊bK⌋", nll.get(f"uniform top-⌊bK⌋ @{b}", {}).get("1.0")),
            ("same B", nll.get("uniform same-B (token, topk)", {}).get(b)),
        ):
            ours = nll.get(served, {}).get(b)
            if ours is None or base is None:
                continue
            t = paired_test(ours, base)
            parts.append(f"b = {b} vs {name}: {t['delta']:+.3%} [{t['low']:+.3%}, {t['high']:+.3%}]")
            if t["low"] > 0:
                worse.append(f"b = {b} vs {name}")
    if not parts:
        return "no per-window numbers (rerun the engines)"
    head = (
        "worse with 95 % confidence at " + ", ".join(worse) if worse else "never worse with 95 % confidence"
    )
    return head + "; paired intervals: " + "; ".join(parts)


def regime_tables(
    results: dict[str, dict[str, float]], nll: dict[str, dict[str, list[float]]] | None = None
) -> str:
    """One table per regime: each configuration against the two uniforms (vLLM's top-⌊bK⌋, and the
    plugin without a budget file and without Alloc-T, same B), recovery at b = 0.5, every (b) where the
    served configuration measures worse than either uniform, and (with `nll`) the paired intervals."""
    full = results["full model"]["1.0"]
    uni, same_b = uniform_row(results), results["uniform same-B (token, topk)"]
    low = [str(b) for b in BUDGETS[1:]]

    out = []
    for regime, rows in REGIMES.items():
        lines = [
            f"**{regime}**",
            "",
            "| configuration | "
            + " | ".join(f"b = {b}" for b in low)
            + " | recovery @0.5 vs top-⌊bK⌋ | vs same-B |",
            "|---|" + "---:|" * (len(low) + 2),
        ]
        n = re.search(r"decode N = (\d+)", regime)
        capped = sorted(
            label
            for label in results
            if n and label.startswith(CAP_ROW) and label.endswith(f"(decode N={n[1]})")
        )
        shown = [
            ("uniform top-⌊bK⌋ (vLLM config top-k)", uni),
            ("uniform same B, no Alloc-T (plugin, no file)", same_b),
            *((name, results[label]) for name, label in rows if label in results),
            *((label.rsplit(" (", 1)[0], results[label]) for label in capped),
        ]
        for name, row in shown:
            cells = [f"{row[b]:.3f} ({100 * (row[b] / full - 1):+.2f}%)" if b in row else "—" for b in low]
            mid = row.get("0.5")
            rec = f"{recovery(mid, uni['0.5'], full)} | {recovery(mid, same_b['0.5'], full)}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {rec} |")
        served = dict(rows)["L+T shipped (served)"]
        if served in results:
            worse = [
                f"b = {b} ({100 * (results[served][b] / min(uni[b], same_b[b]) - 1):+.3f}%)"
                for b in low
                if results[served][b] > min(uni[b], same_b[b])
            ]
            verdict = (
                "never worse than either uniform"
                if not worse
                else "worse than a uniform at " + ", ".join(worse)
            )
            lines += ["", f"Served configuration: {verdict}."]
            if nll is not None:
                lines += ["", f"Paired over the test windows: {served_verdict(served, results, nll)}."]
        for label in capped if nll is not None else []:
            lines += ["", f"{label.rsplit(' (', 1)[0]}, paired: {served_verdict(label, results, nll)}."]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def hard_target(results: dict[str, dict[str, float]], shipped_file: Path) -> list[str]:
    """The shipped configuration against uniform at every budget, against two baselines."""
    from vllm_alloc.budget import load_budget_file

    bf = load_budget_file(shipped_file)
    L, K = bf.model.num_moe_layers, bf.model.top_k
    shipped, uni = results[SHIPPED_ROW], uniform_row(results)
    same_b = results["uniform same-B (token, topk)"]
    baselines = (
        # The target's baseline: uniform top-⌊bK⌋, or uniform at the same B where ⌊bK⌋·L < B (b = 0.33).
        (
            "uniform top-⌊bK⌋ (same B where ⌊bK⌋·L < B)",
            {
                b: uni[str(b)] if math.floor(b * K) * L == bf.absolute_budget(b) else same_b[str(b)]
                for b in BUDGETS[1:]
            },
        ),
        # Stricter: the plugin's own uniform at the same B with Alloc-T off and the full model's weights.
        ("uniform same-B (token, topk)", {b: same_b[str(b)] for b in BUDGETS[1:]}),
    )
    lines = []
    for name, base in baselines:
        worse = {
            b: f"{100 * (shipped[str(b)] / base[b] - 1):+.3f}%" for b in base if shipped[str(b)] > base[b]
        }
        verdict = "MET" if not worse else f"NOT met at {worse}"
        lines.append(f"hard target, shipped never worse than {name}: {verdict}")
    return lines


def plot(
    rows: list[tuple[str, dict[str, float]]], full: float, png: Path, title: str = "Default model"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = (
        "uniform top-⌊bK⌋ (config top-k, no plugin)",
        "uniform same-B (token, topk)",
        "uniform same-B (token, kept)",
        "L only: shipped (token)",
        "T only (budget)",
        "T only (request)",
        SHIPPED_ROW,
        SHIPPED_N1,
        "L+T shipped (decode N=8)",
        "L+T shipped (decode N=64)",
        "L+T shipped (request)",
        "L+T shipped (budget, kept)",
        "L+T K_base=2 (budget)",
        "L+T small calib (budget)",
        "L+T 2x calib, isolating (budget)",
    )
    # % above the full model: room for every row but vLLM's top-⌊bK⌋, whose top-1 (b = 0.33) is far above
    # and is clipped with a label.
    top = max(
        [5.0]
        + [
            1.1 * 100 * (v / full - 1)
            for name, row in rows
            if name in keep and not name.startswith("uniform top-")
            for v in row.values()
        ]
    )
    fig, ax = plt.subplots(figsize=(8.5, 5.4))
    for name, row in rows:
        if name not in keep:
            continue
        bs = [b for b in BUDGETS if str(b) in row or b == 1.0]
        ys = [100 * (row.get(str(b), full) / full - 1) for b in bs]
        style = dict(lw=2.8, color="black", zorder=5) if name == SHIPPED_ROW else dict(lw=1.3)
        dashed = "--" if name.startswith("uniform") else "-"
        if name.startswith("L+T shipped (decode"):  # the shipped configuration in the decode regime
            grey = {"N=1": "magenta", "N=8": "dimgray"}
            color = next((c for n, c in grey.items() if n in name), "black")
            style, dashed = dict(lw=1.8, color=color, zorder=4), ":"
        label = {SHIPPED_ROW: name + " ★ shipped, prefill"}.get(name, name)
        ax.plot(bs, [min(y, top) for y in ys], dashed, marker="o", ms=4, label=label, **style)
        for b, y in zip(bs, ys, strict=True):
            if y > top:
                ax.annotate(
                    f"{y:+.1f}% (top-1)", (b, top), textcoords="offset points", xytext=(-70, -12), fontsize=8
                )
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("budget b (fraction of the full L·K routed activations)")
    ax.set_ylabel(f"perplexity vs the full model ({full:.2f}), % (lower is better)")
    ax.set_title(f"{title} on its test split, through vLLM + vllm-alloc")
    ax.set_xticks(list(BUDGETS))
    ax.set_ylim(-0.4, top + 0.2)
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--engine"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(argv[2]).write_text(json.dumps(run_engine(spec)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=256, help="test-split windows of 256 tokens (default 256)")
    p.add_argument(
        "--model",
        type=Path,
        default=MODEL,
        help=f"a model from train_default_model.py (default {MODEL})",
    )
    p.add_argument("--budget-file", type=Path, default=SHIPPED, help="the shipped budget file")
    p.add_argument("--scratch", type=Path, default=SCRATCH, help="variant budget files (make_default_budget)")
    p.add_argument("--out", type=Path, default=SCRATCH / "results.json")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "quality.png")
    p.add_argument("--only", help="comma-separated engine names to run (results merge into --out)")
    p.add_argument(
        "--expert-cap",
        type=float,
        help="also measure the served configuration with expert_cap ρ (a share in [0.001, 1); over the "
        "file's caps) at N = 8 and 64",
    )
    args = p.parse_args(argv)

    ids = split_ids("test", args.model)
    seqs = [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(min(args.seqs, len(ids) // SEQ_LEN))]
    args.scratch.mkdir(parents=True, exist_ok=True)
    if args.expert_cap is not None and not 0.001 <= args.expert_cap < 1:
        p.error(f"--expert-cap {args.expert_cap}: must be in [0.001, 1) (the file's caps: leave it out)")
    planned = plan(args.budget_file, args.scratch, args.expert_cap)
    previous = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}
    engines = [e for e in planned if not args.only or e["name"] in args.only.split(",")]
    t0 = time.monotonic()
    val = split_ids("validation", args.model)
    calib_seqs = [
        val[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(min(CALIB_WINDOWS, len(val) // SEQ_LEN))
    ]
    ran, ran_nll = run_all(engines, seqs, args.scratch, args.model, calib_seqs)
    results = {**previous.get("results", {}), **ran}
    nll = {**previous.get("nll", {}), **ran_nll}
    args.out.write_text(
        json.dumps(
            {
                "results": results,
                "nll": nll,
                "seqs": len(seqs),
                "seq_len": SEQ_LEN,
                "machine": platform.platform(),
            },
            indent=1,
        )
    )
    print(f"\n{len(seqs)} test windows × {SEQ_LEN} tokens; {time.monotonic() - t0:.0f} s\n")
    missing = [label for label in TABLE_NEEDS if label not in results]
    if missing:  # an --only run without the baselines: its rows are saved, the tables need the rest
        for label, ppl in ran.items():
            print(f"  {label}: " + ", ".join(f"b={b} ppl {v:.3f}" for b, v in ppl.items()))
        print(
            f"\nresults written to {args.out}; the tables need rows {missing}: run "
            f"--only {','.join(engines_for(missing, planned))!r} with the same --out"
        )
        return 0
    rows, text = table(results)
    print(text)
    from vllm_alloc.budget import load_budget_file

    m = load_budget_file(args.budget_file).model
    name = "Default model" if args.model.resolve() == MODEL.resolve() else f"{args.model.name}"
    title = f"{name} (Qwen3-MoE, L={m.num_moe_layers}, E={m.num_experts}, K={m.top_k})"
    plot(rows, results["full model"]["1.0"], args.png, title)
    for line in hard_target(results, args.budget_file):
        print(line)
    print("\nBy regime (full model " + f"{results['full model']['1.0']:.3f}):\n")
    print(regime_tables(results, nll))
    print(f"plot: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
