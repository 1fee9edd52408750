"""What the request balance (`vllm_alloc.carry`) buys a lone decode stream: a simulation, not the served path.

    python benchmarks/lever_sim.py [--model models/default] [--b 0.5] [--alpha 0.05] [--offset 0.4]
                                   [--windows 128]

The model runs in Hugging Face transformers (fp32, eager experts) with its router patched; each test
window is one lone stream, teacher-forced. A causal model computes position s of layer l from positions
<= s only, so scanning the positions of each layer in order, with the balance carried from one position
to the next, decides exactly what a real decode loop would. θ_l is calibrated per layer on the validation
split (full model's router scores, `carry.threshold_for` at K_l − K_base − offset extras per token).
Rows at b (uniform K_l = ⌊b·K⌋ in every layer, K_base = 1):

  uniform top-⌊bK⌋ (renormalised)   what a smaller top-k in the config does (vLLM's own)
  uniform same-B (weights topk)     the plugin today for a lone stream (Alloc-T idle)
  carry α=0 / carry α               the balance with a fixed bar / a bar that falls as the bank grows
  bar without balance               a bar calibrated to K_l per token on average, no balance: each
                                    request's spend is only bounded in expectation (no pool)

It exists to choose the lever's form and defaults before it is wired into serving; the served numbers
come from `make bench-quality` (BENCHMARKS.md), which measures vLLM.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_default_budget import MODEL, split_ids  # noqa: E402  (after sys.path)

from vllm_alloc.carry import carry_counts, threshold_for  # noqa: E402

SEQ_LEN = 256
K_BASE = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--b", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--offset", type=float, default=0.4)
    ap.add_argument("--windows", type=int, default=128)
    args = ap.parse_args()

    import transformers.models.qwen3_moe.modeling_qwen3_moe as qwen3
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=torch.float32, experts_implementation="eager"
    ).eval()
    if not isinstance(model.model.layers[0].mlp, qwen3.Qwen3MoeSparseMoeBlock):
        raise SystemExit(f"{args.model}: the simulation patches Qwen3-MoE routers only")
    K, L = model.config.num_experts_per_tok, model.config.num_hidden_layers
    k_l = math.floor(args.b * K)
    if not K_BASE <= k_l <= K:
        raise SystemExit(f"--b {args.b}: ⌊b·K⌋ = {k_l} must lie in [{K_BASE}, {K}]")

    def windows(split: str) -> torch.Tensor:
        ids = split_ids(split, args.model)
        n = min(args.windows, len(ids) // SEQ_LEN)
        return torch.tensor([ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(n)])

    # Each router returns its top-K weights sorted best first (torch.topk), so a kept prefix of length n
    # is `arange(K) < n`, and the weights double as the ranking keys.
    state: dict = {"rule": None, "record": None}
    stock = qwen3.Qwen3MoeTopKRouter.forward

    def routed(self: torch.nn.Module, hidden: torch.Tensor) -> tuple:
        logits, w, idx = stock(self, hidden)
        if state["record"] is not None:
            state["record"][self.layer].append(w[:, K_BASE:].detach().numpy().copy())
        if state["rule"] is not None:
            w = state["rule"](self.layer, w.view(state["streams"], -1, K)).reshape(-1, K)
        return logits, w, idx

    qwen3.Qwen3MoeTopKRouter.forward = routed
    for l, layer in enumerate(model.model.layers):
        layer.mlp.gate.layer = l

    def nll(data: torch.Tensor, rule: object) -> torch.Tensor:
        out = []
        for i in range(0, len(data), 32):
            batch = data[i : i + 32]
            state["rule"], state["streams"] = rule, len(batch)
            with torch.no_grad():
                logits = model(batch).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0]
            out.append(-lp.mean(1))
        return torch.cat(out)

    state["record"] = [[] for _ in range(L)]
    nll(windows("validation"), None)
    extras = [np.concatenate(r) for r in state["record"]]
    state["record"] = None
    theta = [threshold_for(e, k_l - K_BASE - args.offset) for e in extras]
    theta_mean = [threshold_for(e, k_l - K_BASE) for e in extras]  # the bar alone: K_l on average

    def prefix(w: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.arange(K) < n[..., None], w, 0.0)

    def uniform(renorm: bool) -> object:
        def rule(l: int, w: torch.Tensor) -> torch.Tensor:
            kept = prefix(w, torch.full(w.shape[:-1], k_l))
            return kept / kept.sum(-1, keepdim=True) * w.sum(-1, keepdim=True) if renorm else kept

        return rule

    def carried(alpha: float) -> object:
        def rule(l: int, w: torch.Tensor) -> torch.Tensor:
            streams, S, _ = w.shape
            balance = torch.zeros(streams, dtype=torch.int64)
            n = torch.empty(streams, S, dtype=torch.int64)
            for s in range(S):  # one decode step of every stream
                n[:, s], balance = carry_counts(
                    w[:, s], torch.full((streams,), k_l), balance, torch.full((streams,), theta[l]),
                    K_BASE, alpha,
                )  # fmt: skip
            return prefix(w, n)

        return rule

    def bar_only(l: int, w: torch.Tensor) -> torch.Tensor:
        return prefix(w, (w >= theta_mean[l]).sum(-1).clamp(min=K_BASE))

    test = windows("test")
    full = nll(test, None)
    rows = {
        "uniform top-⌊bK⌋ (renormalised)": nll(test, uniform(True)),
        "uniform same-B (weights topk)": nll(test, uniform(False)),
        "carry α=0": nll(test, carried(0.0)),
        f"carry α={args.alpha}": nll(test, carried(args.alpha)),
        "bar without balance": nll(test, bar_only),
    }
    ppl = {name: math.exp(v.mean().item()) for name, v in rows.items()}
    top, same = ppl["uniform top-⌊bK⌋ (renormalised)"], ppl["uniform same-B (weights topk)"]
    f = math.exp(full.mean().item())
    print(f"{args.model.name}: b={args.b} K_l={k_l} of K={K}, {len(test)} test windows x {SEQ_LEN}, "
          f"offset {args.offset}; θ = {[round(t, 4) for t in theta]}; full model {f:.3f}")  # fmt: skip
    head = f"{'row':34s} {'ppl':>8s} {'rec vs top-k':>13s} {'rec vs same-B':>14s}"
    print(f"{head}  paired ΔNLL vs same-B (95%)")
    for name, v in rows.items():
        d = v - rows["uniform same-B (weights topk)"]
        half = 1.96 * d.std().item() / math.sqrt(len(d))
        print(f"{name:34s} {ppl[name]:8.3f} {(top - ppl[name]) / (top - f):+13.0%} "
              f"{(same - ppl[name]) / (same - f):+14.0%}  {d.mean().item():+.5f} ± {half:.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
