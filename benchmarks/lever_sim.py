"""What the request balance (`vllm_alloc.routing.carry`) buys a lone decode stream: a simulation, not the
served path.

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
  carry α, score w·‖e‖              the carried balance ranking by a score calibrated per layer and
                                    expert offline: router weight × the expert's mean output norm on
                                    the validation split (the kept set is then the top by that score)

With --decode-loop, the same test windows decode position by position with a KV cache (teacher-forced),
so a rule may carry state across layers as well as steps:
  carry α (loop)                    the carried balance per (request, layer), as served: must match
                                    `carry α` of the layer-by-layer scan
  carry α, one bank (loop)          one balance per request for all its layers: a layer's savings pay
                                    for another's uncertain token (still β ≥ 0: the request's total
                                    over all layers never exceeds its pool B per token)
  bar without balance (loop)        as above, no pool

With --group N (N streams decoding together, one group per step: the decode regime at N):
  Alloc-T N                         the plugin today: each step's pool N·K_l shared by the N tokens
  group bank N α                    the carried balance of the group as a whole: a step spends the
                                    extras above θ_l·exp(−α·β/N) within N·(K_l − K_base) + β, and
                                    banks the rest in β (≥ 0, so the group never exceeds its pool)
With --group N --cap-shares ρ,... (the distinct-expert cap, `vllm_alloc.routing.cap`, after Alloc-T N; no free
experts here): each step's group keeps its floors and the ⌈ρ·D⌉ experts its kept pairs want most, and
each token keeps as many pairs as Alloc-T gave it, taken
  cap ρ, own top-K                  from its own top-K candidates on allowed experts (the served rule)
  cap ρ, any expert                 from every allowed expert, by its own router probability (XShare's
                                    way: a cut pair may move to an expert outside the token's top-K),
                                    weighted like a top-K expert (its probability over the top-K sum)
With --cap-layers as well, per-layer sensitivity (what a per-layer share could save):
  cap ρ at layer l only             the served rule in layer l, Alloc-T N alone in every other layer

It exists to choose the lever's form and defaults before it is wired into serving; the served numbers
come from `make bench-quality` (BENCHMARKS.md), which measures vLLM.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from make_default_budget import MODEL, split_ids  # noqa: E402  (after sys.path)

from vllm_alloc.routing.cap import group_cap, share_units  # noqa: E402
from vllm_alloc.routing.carry import carry_counts, threshold_for  # noqa: E402

SEQ_LEN = 256
K_BASE = 1
BATCH = 32  # streams per forward pass of the simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--b", type=float, default=0.5)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--offset", type=float, default=0.4)
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--group", type=int, help="N streams per decode group: the N-stream rows only")
    ap.add_argument("--decode-loop", action="store_true", help="the decode-loop rows only (one bank)")
    ap.add_argument(
        "--cap-shares", help="with --group: distinct-expert cap rows at these shares ρ, e.g. 0.75,0.5"
    )
    ap.add_argument(
        "--cap-layers",
        action="store_true",
        help="with --cap-shares: also each share in one layer at a time (the others uncapped)",
    )
    ap.add_argument(
        "--one-bank-sweep",
        metavar="α:offset,...",
        help="with --decode-loop: only the one-bank row, once per (α, offset), e.g. 0.0125:0.4,0.025:0.4",
    )
    args = ap.parse_args()
    if args.group is not None and (args.group < 1 or BATCH % args.group):
        raise SystemExit(f"--group {args.group}: must divide the simulation's batch of {BATCH} streams")

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
    E = model.config.num_experts
    norm_sum, norm_count = torch.zeros(L, E), torch.zeros(L, E)  # expert output norms (calibration)

    def routed(self: torch.nn.Module, hidden: torch.Tensor) -> tuple:
        logits, w, idx = stock(self, hidden)
        if state["record"] is not None:
            state["record"][self.layer].append((w.detach().clone(), idx.clone()))
        if state["rule"] is not None:
            shape = (state["streams"], -1, K)
            state["logits"] = logits.view(state["streams"], -1, logits.shape[-1])
            out = state["rule"](self.layer, w.view(shape), idx.view(shape))
            if isinstance(out, tuple):  # a rule that may move pairs to other experts
                w, idx = out[0].reshape(-1, K), out[1].reshape(-1, K).to(idx.dtype)
            else:
                w = out.reshape(-1, K)
        return logits, w, idx

    stock_experts = qwen3.Qwen3MoeExperts.forward

    def experts(
        self: torch.nn.Module, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        if state["record"] is not None:  # every expert's output norm for the tokens routed to it
            gate, up = torch.einsum("th,ekh->tek", hidden, self.gate_up_proj).chunk(2, dim=-1)
            out = torch.einsum("tei,ehi->teh", self.act_fn(gate) * up, self.down_proj).norm(dim=-1)
            norm_sum[self.layer].index_add_(0, idx.reshape(-1), out.gather(1, idx).reshape(-1))
            norm_count[self.layer].index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
        return stock_experts(self, hidden, idx, w)

    qwen3.Qwen3MoeTopKRouter.forward = routed
    qwen3.Qwen3MoeExperts.forward = experts
    for l, layer in enumerate(model.model.layers):
        layer.mlp.gate.layer = layer.mlp.experts.layer = l

    def nll(data: torch.Tensor, rule: object) -> torch.Tensor:
        out = []
        for i in range(0, len(data), BATCH):
            batch = data[i : i + BATCH]
            state["rule"], state["streams"] = rule, len(batch)
            with torch.no_grad():
                logits = model(batch).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None])[..., 0]
            out.append(-lp.mean(1))
        return torch.cat(out)

    state["record"] = [[] for _ in range(L)]
    nll(windows("validation"), None)
    recorded = [(torch.cat([w for w, _ in r]), torch.cat([i for _, i in r])) for r in state["record"]]
    state["record"] = None
    mean_norm = norm_sum / norm_count.clamp(min=1)

    def router_score(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return w

    def norm_score(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return w * mean_norm[l][idx]

    def bars(score: object, offset: float) -> list[float]:
        """θ per layer for a score: calibration tokens keep K_l − K_base − offset extras on average."""
        out = []
        for l, (w, idx) in enumerate(recorded):
            ranked = torch.sort(score(l, w, idx), dim=-1, descending=True).values  # type: ignore[operator]
            out.append(threshold_for(ranked[:, K_BASE:].numpy(), k_l - K_BASE - offset))
        return out

    def keep_top(score: torch.Tensor, w: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """w where the candidate is among the token's top-n by `score`, else 0."""
        order = torch.argsort(score, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(w, dtype=torch.bool).scatter(-1, order, torch.arange(K) < n[..., None])
        return torch.where(keep, w, 0.0)

    def uniform(renorm: bool) -> object:
        def rule(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            kept = keep_top(w, w, torch.full(w.shape[:-1], k_l))
            return kept / kept.sum(-1, keepdim=True) * w.sum(-1, keepdim=True) if renorm else kept

        return rule

    def carried(alpha: float, score: object = router_score) -> object:
        theta = bars(score, args.offset)

        def rule(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            keys = score(l, w, idx)  # type: ignore[operator]
            streams, S, _ = w.shape
            balance = torch.zeros(streams, dtype=torch.int64)
            n = torch.empty(streams, S, dtype=torch.int64)
            for s in range(S):  # one decode step of every stream
                n[:, s], balance = carry_counts(
                    keys[:, s], torch.full((streams,), k_l), balance, torch.full((streams,), theta[l]),
                    K_BASE, alpha,
                )  # fmt: skip
            return keep_top(keys, w, n)

        return rule

    theta_mean = bars(router_score, 0.0)  # the bar alone: K_l per token on average

    def bar_only(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return keep_top(w, w, (w >= theta_mean[l]).sum(-1).clamp(min=K_BASE))

    def grouped(alpha: float | None) -> object:
        """Each step, the extras of every N consecutive streams' tokens go to the group's best keys:
        N·(K_l − K_base) of them (Alloc-T, alpha None), or, with a bank, those above the bar."""
        theta = bars(router_score, args.offset)
        G = args.group

        def rule(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            streams, S, _ = w.shape
            per_step = G * (k_l - K_BASE)
            bank = torch.zeros(streams // G, dtype=torch.int64)
            n = torch.empty(streams, S, dtype=torch.int64)
            for s in range(S):
                extras = w[:, s, K_BASE:].reshape(streams // G, -1)
                spend = torch.full_like(bank, per_step)
                if alpha is not None:
                    bar = theta[l] * torch.exp(-alpha * bank.double() / G)
                    want = (extras.double() >= bar[:, None]).sum(-1)
                    spend = torch.minimum(want, per_step + bank)
                    bank = bank + per_step - spend
                order = torch.argsort(extras, dim=-1, descending=True, stable=True)
                ranks = torch.arange(extras.shape[1]) < spend[:, None]
                chosen = torch.zeros_like(extras, dtype=torch.bool).scatter(-1, order, ranks)
                n[:, s] = K_BASE + chosen.view(streams, K - K_BASE).sum(-1)
            return keep_top(w, w, n)

        return rule

    def capped(share: float, anywhere: bool) -> object:
        """Alloc-T N, then the distinct-expert cap at share ρ per step and group (module docstring)."""
        alloc_t = grouped(None)
        G = args.group

        def rule(l: int, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kept_w = alloc_t(l, w, idx)  # type: ignore[operator]
            n = (kept_w > 0).sum(-1)  # [streams, S]: Alloc-T's counts (a prefix of each ranking)
            probs = torch.softmax(state["logits"].float(), -1)
            # Every expert's weight on the scale of the top-K weights (`w` may be renormalised).
            scale = w[..., :1] / probs.gather(-1, idx[..., :1].long()).clamp(min=1e-30)
            probs = probs * scale
            out_w, out_idx = torch.zeros_like(w), idx.clone()
            streams, S, _ = w.shape
            for s in range(S):
                for g0 in range(0, streams, G):
                    rows = range(g0, g0 + G)
                    demand: dict[int, float] = {}
                    for t in rows:
                        for j in range(int(n[t, s])):
                            e = int(idx[t, s, j])
                            demand[e] = demand.get(e, 0.0) + float(w[t, s, j])
                    floor = {int(idx[t, s, 0]) for t in rows}
                    limit = max(group_cap(share_units(share), len(demand)), len(floor))
                    rest = sorted((e for e in demand if e not in floor), key=lambda e: -demand[e])
                    allowed = floor | set(rest[: limit - len(floor)])
                    for t in rows:
                        top = [int(e) for e in idx[t, s]]
                        if anywhere:  # the floor, then allowed experts by this token's probability
                            others = sorted(allowed - {top[0]}, key=lambda e, t=t: -float(probs[t, s, e]))
                            pick = [top[0], *others][: int(n[t, s])]
                        else:
                            pick = [e for j, e in enumerate(top) if j == 0 or e in allowed][: int(n[t, s])]
                        for j, e in enumerate(pick):
                            out_idx[t, s, j] = e
                            out_w[t, s, j] = probs[t, s, e]
                        unused = [e for e in top if e not in pick][: K - len(pick)]
                        for j, e in enumerate(unused):  # pruned slots: distinct experts at weight 0
                            out_idx[t, s, len(pick) + j] = e
            return out_w, out_idx

        return rule

    def in_one_layer(layer: int, rule: object, elsewhere: object) -> object:
        """`rule` in one layer, `elsewhere` in the others."""

        def pick(l: int, w: torch.Tensor, idx: torch.Tensor) -> object:
            return (rule if l == layer else elsewhere)(l, w, idx)  # type: ignore[operator]

        return pick

    def decode_nll(data: torch.Tensor, make_rule: object) -> torch.Tensor:
        """Mean NLL per window, decoding each window token by token (KV cache, teacher-forced); a fresh
        rule per batch of streams (`make_rule(streams)`), so its state starts empty per request."""
        from transformers import DynamicCache

        out = []
        for i in range(0, len(data), BATCH):
            batch = data[i : i + BATCH]
            state["rule"] = make_rule(len(batch)) if make_rule is not None else None  # type: ignore[operator]
            state["streams"] = len(batch)
            cache, lps = DynamicCache(), []
            with torch.no_grad():
                for s in range(batch.shape[1] - 1):
                    logits = model(batch[:, s : s + 1], past_key_values=cache, use_cache=True).logits
                    lp = torch.log_softmax(logits[:, -1].float(), -1).gather(-1, batch[:, s + 1, None])
                    lps.append(lp[:, 0])
            out.append(-torch.stack(lps, 1).mean(1))
        return torch.cat(out)

    def loop_carry(alpha: float, one_bank: bool, offset: float = args.offset) -> object:
        theta = bars(router_score, offset)

        def make(streams: int) -> object:
            bank = torch.zeros(1 if one_bank else L, streams, dtype=torch.int64)

            def rule(l: int, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                row = 0 if one_bank else l
                n, bank[row] = carry_counts(
                    w[:, 0], torch.full((streams,), k_l), bank[row], torch.full((streams,), theta[l]),
                    K_BASE, alpha,
                )  # fmt: skip
                return keep_top(w, w, n[:, None])

            return rule

        return make

    test = windows("test")
    if args.decode_loop:
        full_loop = decode_nll(test, None)
        if args.one_bank_sweep:
            sweep = [tuple(float(x) for x in item.split(":")) for item in args.one_bank_sweep.split(",")]
            loop_rows = {
                "uniform top-⌊bK⌋ (renormalised)": decode_nll(test, lambda _: uniform(True)),
                "uniform same-B (weights topk)": decode_nll(test, lambda _: uniform(False)),
            }
            for alpha, offset in sweep:
                loop_rows[f"one bank α={alpha:g} offset {offset:g}"] = decode_nll(
                    test, loop_carry(alpha, True, offset)
                )
            report(args, k_l, K, len(test), full_loop, loop_rows)
            return
        loop_rows = {
            "uniform top-⌊bK⌋ (renormalised)": decode_nll(test, lambda _: uniform(True)),
            "uniform same-B (weights topk)": decode_nll(test, lambda _: uniform(False)),
            f"carry α={args.alpha} (loop)": decode_nll(test, loop_carry(args.alpha, False)),
            f"carry α={args.alpha}, one bank (loop)": decode_nll(test, loop_carry(args.alpha, True)),
            "bar without balance (loop)": decode_nll(test, lambda _: bar_only),
        }
        report(args, k_l, K, len(test), full_loop, loop_rows)
        return
    full = nll(test, None)
    rows = {
        "uniform top-⌊bK⌋ (renormalised)": nll(test, uniform(True)),
        "uniform same-B (weights topk)": nll(test, uniform(False)),
    }
    if args.group is None:
        rows["carry α=0"] = nll(test, carried(0.0))
        rows[f"carry α={args.alpha}"] = nll(test, carried(args.alpha))
        rows["bar without balance"] = nll(test, bar_only)
        rows[f"carry α={args.alpha}, score w·‖e‖"] = nll(test, carried(args.alpha, norm_score))
    else:
        rows[f"Alloc-T N={args.group}"] = nll(test, grouped(None))
        rows[f"group bank N={args.group} α={args.alpha}"] = nll(test, grouped(args.alpha))
        rows[f"group bank N={args.group} α=0"] = nll(test, grouped(0.0))
        for share in [float(x) for x in (args.cap_shares or "").split(",") if x]:
            rows[f"cap ρ={share:g}, own top-K"] = nll(test, capped(share, False))
            rows[f"cap ρ={share:g}, any expert"] = nll(test, capped(share, True))
            for layer in range(L) if args.cap_layers else ():
                rows[f"cap ρ={share:g} at layer {layer} only"] = nll(
                    test, in_one_layer(layer, capped(share, False), grouped(None))
                )
    report(args, k_l, K, len(test), full, rows)


def report(
    args: argparse.Namespace,
    k_l: int,
    K: int,
    windows: int,
    full: torch.Tensor,
    rows: dict[str, torch.Tensor],
) -> None:
    ppl = {name: math.exp(v.mean().item()) for name, v in rows.items()}
    topk, same = ppl["uniform top-⌊bK⌋ (renormalised)"], ppl["uniform same-B (weights topk)"]
    f = math.exp(full.mean().item())
    print(f"{args.model.name}: b={args.b} K_l={k_l} of K={K}, {windows} test windows x {SEQ_LEN}, "
          f"offset {args.offset}; full model {f:.3f}")  # fmt: skip
    head = f"{'row':34s} {'ppl':>8s} {'rec vs top-k':>13s} {'rec vs same-B':>14s}"
    print(f"{head}  paired ΔNLL vs same-B (95%)")
    for name, v in rows.items():
        d = v - rows["uniform same-B (weights topk)"]
        half = 1.96 * d.std().item() / math.sqrt(len(d))
        print(f"{name:34s} {ppl[name]:8.3f} {(topk - ppl[name]) / (topk - f):+13.0%} "
              f"{(same - ppl[name]) / (same - f):+14.0%}  {d.mean().item():+.5f} ± {half:.5f}")  # fmt: skip


if __name__ == "__main__":
    main()
