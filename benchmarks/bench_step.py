"""One decode step of a small transformer stack under CUDA-graph replay, at T decode streams (GPU only; a
CPU quick mode checks that it runs).

bench_graph.py times MoE layers alone; this times what a whole decode step pays for them. For the layer
shapes of DeepSeek-V2-Lite and Qwen3-30B-A3B (bench_kernel.MODELS), a stack of `--layers` layers (each its
own weights and KV cache), each:

  RMSNorm → attention of each stream's new token over a fixed-length KV cache (the token's K/V written in
  place at the stream's position, a device buffer; later positions masked; torch SDPA) → residual →
  RMSNorm → shared experts (a dense SwiGLU MLP) + the MoE layer (router: gate GEMM, softmax, top-K; then
  the MoE body) → residual.

One CUDA graph per step, timed by replay (`bench_graph.graph_time_us`):

  no MoE            the stack with its MoE layers (router and body) left out: the rest of the step
  stock b=1         the MoE body is the expert kernel on the stock routing (bench_graph's `kernel b=1`)
  vLLM b=1          with `--vllm-ref PATH`: vLLM 0.32's own Triton kernel as the body (`vllm_ref.py`)
  budget b=0.5 (P)  every token at b = 0.5: the budget routing as the plugin runs it on CUDA
                    (`integration.cuda.budget_experts`: the fused routing kernel, which also aligns the
                    kept pairs, where `device_budget.fused_fits`; else the torch path; P says which),
                    then the expert kernel on the kept pairs

MoE ms = a step's time − `no MoE`'s; MoE share = MoE ms / the step's time; × stock and × vLLM are over the
`stock b=1` and `vLLM b=1` steps of the same run. Before anything is timed, the budget step at b = 1.0 must
equal the stock step bit for bit, each MoE body (on layer 0's weights) match the fp32 oracle, b = 0.5
prune, and each graph match its eager run.

The attention is a stand-in: no RoPE, no q/k norm. Qwen3-30B-A3B's 32 query heads over 4 KV heads of 128
are its own; DeepSeek-V2-Lite's MLA is read as 16 query heads over 2 KV heads of 128 (512 cached values per
token and layer; its latent caches 576). Qwen3-30B-A3B has no shared experts; DeepSeek-V2-Lite has two
(one MLP of width 2·I). The cache holds `--context` positions and every stream decodes the last one.

`--quick` (automatic without CUDA): tiny layers with the models' E and K, 2 layers, T = 1 and 8, a
16-position cache, float32, eager steps timed by the host clock, the Triton kernels in the interpreter:
it checks that the benchmark runs and prints its table (tests/benchmarks/test_bench_step.py); its times
are no GPU's.

    python benchmarks/bench_step.py --out BENCH_STEP.md
    python benchmarks/bench_step.py --vllm-ref vllm-ref --out BENCH_STEP.md
    python benchmarks/bench_step.py --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The quick mode runs the kernels in Triton's interpreter, which is chosen when `triton.jit` decorates a
# kernel (the imports below decorate vllm_ref's stand-ins): a script run sets it first, an importer itself.
if __name__ == "__main__" and ("--quick" in sys.argv[1:] or not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_graph import (
    absolute_budget,
    add_vllm_ref_argument,
    graph_time_us,
    uniform_table,
    vllm_note,
    write_table,
)
from bench_kernel import CHECK_ROWS, MODELS, TOLERANCE, LayerShape
from vllm_ref import VllmRef, load_vllm_ref, stock_config, vllm_stock_moe

from vllm_alloc.routing.device_budget import fused_fits, fused_layer_routing, torch_layer_routing
from vllm_alloc.routing.reference import moe_forward

BUDGET = 0.5
EPS = 1e-6  # RMSNorm
# (rtol, atol) of a MoE body against the fp32 oracle; float32 is the quick mode's (the interpreter).
CHECK_TOLERANCE = {**TOLERANCE, torch.float32: (1e-4, 1e-4)}


@dataclass(frozen=True)
class StepShape:
    """One layer of the stack: its MoE layer (bench_kernel.MODELS), attention and shared experts."""

    moe: LayerShape
    heads: int
    kv_heads: int
    head_dim: int
    shared_I: int  # the shared experts' SwiGLU width; 0: none


STEP_MODELS = {
    # MLA read as GQA: 2 KV heads of 128 cache 512 values per token and layer (its latent: 576); two shared
    # experts of width I.
    "deepseek-v2-lite": StepShape(MODELS["deepseek-v2-lite"], 16, 2, head_dim=128, shared_I=2 * 1408),
    "qwen3-30b-a3b": StepShape(MODELS["qwen3-30b-a3b"], 32, 4, head_dim=128, shared_I=0),  # no shared
}


def tiny(shape: StepShape) -> StepShape:
    """The quick mode's layer: the model's E, K and query heads per KV head (what the routing and the
    attention's grouping see), small widths."""
    group = shape.heads // shape.kv_heads
    moe = dataclasses.replace(shape.moe, name=f"{shape.moe.name} (tiny)", H=64, I=32)
    return StepShape(moe, 2 * group, kv_heads=2, head_dim=16, shared_I=64 if shape.shared_I else 0)


@dataclass
class Layer:
    """One layer's weights (its KV cache is the Decode's)."""

    attn_norm: torch.Tensor  # [H]
    wq: torch.Tensor  # [heads·D, H]
    wkv: torch.Tensor  # [2·kv_heads·D, H]: K rows, then V rows
    wo: torch.Tensor  # [H, heads·D]
    ffn_norm: torch.Tensor  # [H]
    shared_w13: torch.Tensor | None  # [2·Is, H]: gate rows, then up rows (reference.moe_forward's layout)
    shared_w2: torch.Tensor | None  # [H, Is]
    gate: torch.Tensor  # [E, H], the router
    w13: torch.Tensor  # [E, 2I, H]
    w2: torch.Tensor  # [E, H, I]


@dataclass
class Decode:
    """What one step at T streams reads and writes besides the weights."""

    x: torch.Tensor  # [T, H], the new tokens' hidden states
    pos: torch.Tensor  # [T] int64, each stream's position: the cache slot its new K/V go to
    k_cache: list[torch.Tensor]  # per layer [T, kv_heads, S, D]
    v_cache: list[torch.Tensor]  # per layer [T, kv_heads, S, D]


def make_layers(shape: StepShape, L: int, device: torch.device, dtype: torch.dtype) -> list[Layer]:
    """L layers of random weights scaled by 1/sqrt(fan-in), so every output is O(1)."""
    g = torch.Generator(device=device).manual_seed(0)
    H, E, I, Is = shape.moe.H, shape.moe.E, shape.moe.I, shape.shared_I
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=dtype, generator=g) * size[-1] ** -0.5

    return [
        Layer(
            attn_norm=torch.ones(H, device=device, dtype=dtype),
            wq=rand(q_dim, H),
            wkv=rand(2 * kv_dim, H),
            wo=rand(H, q_dim),
            ffn_norm=torch.ones(H, device=device, dtype=dtype),
            shared_w13=rand(2 * Is, H) if Is else None,
            shared_w2=rand(H, Is) if Is else None,
            gate=rand(E, H),
            w13=rand(E, 2 * I, H),
            w2=rand(E, H, I),
        )
        for _ in range(L)
    ]


def make_decode(shape: StepShape, T: int, L: int, S: int, device: torch.device, dtype: torch.dtype) -> Decode:
    """T streams at the cache's last position, the earlier positions random."""
    g = torch.Generator(device=device).manual_seed(T)
    cache = (T, shape.kv_heads, S, shape.head_dim)
    return Decode(
        x=torch.randn(T, shape.moe.H, device=device, dtype=dtype, generator=g),
        pos=torch.full((T,), S - 1, dtype=torch.int64, device=device),
        k_cache=[torch.randn(cache, device=device, dtype=dtype, generator=g) for _ in range(L)],
        v_cache=[torch.randn(cache, device=device, dtype=dtype, generator=g) for _ in range(L)],
    )


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: torch.Tensor,
) -> torch.Tensor:
    """Attention of one new token per stream over its cache, the token's own K/V written into it first.

    q [T, heads, D]; k, v [T, kv_heads, D]; k_cache, v_cache [T, kv_heads, S, D], written at [t, :, pos[t]];
    pos [T] int64. Positions after pos[t] are masked, so they may hold anything finite. Returns
    [T, heads, D]. Graph-capturable: pos is read on the device and every shape is fixed by S.
    """
    T, heads, D = q.shape
    kv_heads, S = k_cache.shape[1], k_cache.shape[2]
    rows = torch.arange(T, device=q.device)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    visible = torch.arange(S, device=q.device)[None, :] <= pos[:, None]  # [T, S]
    # One query per stream: the query heads that share a KV head are that head's query rows (GQA without
    # repeating the cache), and nothing is causal between them.
    out = F.scaled_dot_product_attention(
        q.view(T, kv_heads, heads // kv_heads, D), k_cache, v_cache, attn_mask=visible[:, None, None, :]
    )
    return out.reshape(T, heads, D)


def swiglu(h: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = (h @ w13.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


def router(h: torch.Tensor, gate: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock routing: weights float32 [T, K] (softmax over E, top-K, ranked) and ids int32 [T, K]."""
    weights, ids = (h @ gate.T).float().softmax(dim=-1).topk(K, dim=-1)
    return weights, ids.int()


# A MoE body: (layer, its column l, h [T, H], stock weights [T, K], stock ids [T, K]) -> [T, H].
Body = Callable[[Layer, int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_step(d: Decode, layers: list[Layer], shape: StepShape, body: Body | None) -> torch.Tensor:
    """The stack's hidden states [T, H] after one decode step; body None leaves the MoE layers out."""
    x = d.x
    T, H = x.shape
    for column, layer in enumerate(layers):
        h = F.rms_norm(x, (H,), layer.attn_norm, EPS)
        q = (h @ layer.wq.T).view(T, shape.heads, shape.head_dim)
        k, v = (h @ layer.wkv.T).view(T, 2, shape.kv_heads, shape.head_dim).unbind(1)
        x = (
            x
            + cached_attention(q, k, v, d.k_cache[column], d.v_cache[column], d.pos).view(T, -1) @ layer.wo.T
        )
        h = F.rms_norm(x, (H,), layer.ffn_norm, EPS)
        y = x
        if layer.shared_w13 is not None and layer.shared_w2 is not None:
            y = y + swiglu(h, layer.shared_w13, layer.shared_w2)
        if body is not None:
            y = y + body(layer, column, h, *router(h, layer.gate, shape.moe.K))
        x = y
    return x


def stock_body(
    layer: Layer, column: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    from vllm_alloc.kernels import fused_moe

    return fused_moe(h, layer.w13, layer.w2, ids, weights)


def vllm_body(
    layer: Layer,
    column: int,
    h: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    *,
    ref: VllmRef,
    config: dict,
) -> torch.Tensor:
    return vllm_stock_moe(h, layer.w13, layer.w2, weights, ids, ref=ref, config=config)


@dataclass
class Budget:
    """The plugin's persistent budget buffers for one T (`integration.plan.Plan`): all tokens one group."""

    table: torch.Tensor  # [A + 1, L] int32, K_l(B)
    token_budget: torch.Tensor  # [T] int64, B of each token
    token_group: torch.Tensor  # [T] int64
    used: torch.Tensor  # [L, A + 1] float64, activations performed

    def routing(
        self, column: int, weights: torch.Tensor, ids: torch.Tensor, E: int, block_m: int
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(kept weights, kept ids, aligned pairs or None): `layer_routing_aligned` as it runs on CUDA,
        taken on any device (where the tensors are on CPU it would take the torch path), so that the quick
        mode runs the fused kernel, in Triton's interpreter, where a GPU runs it."""
        buffers: dict[str, Any] = dict(
            table=self.table, token_budget=self.token_budget, token_group=self.token_group, used=self.used,
            column=column, k_base=1,
        )  # fmt: skip
        if fused_fits(weights, weights, E):
            return fused_layer_routing(weights, weights, ids, **buffers, num_experts=E, block_m=block_m)
        return (*torch_layer_routing(weights, weights, ids, **buffers), None)

    def body(
        self, layer: Layer, column: int, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """`integration.cuda.budget_experts`: the routing, then the expert kernel on the kept pairs."""
        from vllm_alloc.kernels import fused_moe, pick_config

        T, K = ids.shape
        E, I = layer.w13.shape[0], layer.w13.shape[1] // 2
        config = dict(pick_config(T, K, E, h.shape[1], I, h.dtype, h.device))
        kept_w, kept_ids, aligned = self.routing(column, weights, ids, E, config["BLOCK_M"])
        return fused_moe(h, layer.w13, layer.w2, kept_ids, kept_w, config=config, aligned=aligned)


def check(shape: StepShape, d: Decode, layers: list[Layer], budget: Budget, bodies: dict[str, Body]) -> None:
    """The checks before timing (module docstring); leaves every token at b = 0.5."""
    L, T, K = len(layers), d.x.shape[0], shape.moe.K
    name = f"{shape.moe.name} T={T}"
    budget.token_budget.fill_(L * K)
    stock = decode_step(d, layers, shape, stock_body)
    if not torch.equal(decode_step(d, layers, shape, budget.body), stock):
        raise AssertionError(f"{name}: the budget step at b = 1.0 differs from the stock step")
    budget.token_budget.fill_(absolute_budget(BUDGET, L, K))
    rows = slice(0, CHECK_ROWS)  # the oracle loops over pairs in Python
    h = F.rms_norm(d.x[rows], (shape.moe.H,), layers[0].ffn_norm, EPS)
    weights, ids = router(h, layers[0].gate, K)
    kept_w, kept_ids, _ = budget.routing(0, weights, ids, shape.moe.E, 0)
    if int((kept_ids >= 0).sum()) >= ids.numel():
        raise AssertionError(f"{name}: b = {BUDGET} kept every pair; the budget rows would time no pruning")
    rtol, atol = CHECK_TOLERANCE[d.x.dtype]
    cases = [(label, body, weights, ids) for label, body in bodies.items()]
    cases.append((f"budget b={BUDGET}", budget.body, kept_w, kept_ids))
    for label, body, w, i in cases:
        # The budget body reroutes the stock routing it is given; the oracle takes what it kept.
        got = body(layers[0], 0, h, weights, ids).float()
        want = moe_forward(h, layers[0].w13, layers[0].w2, w, i)
        if not torch.allclose(got, want, rtol=rtol, atol=atol):
            err = (got - want).abs().max().item()
            raise AssertionError(
                f"{name}: the {label} MoE body differs from the oracle (max |err| {err:.3g})"
            )


Timer = Callable[[str, Callable[[], torch.Tensor]], float]  # (what, step) -> ms per step


def graph_ms(replays: int, what: str, step: Callable[[], torch.Tensor]) -> float:
    """Median ms of one replay of the step's CUDA graph, whose output must match the eager step's: to the
    dtype's tolerance, not bit for bit, since cuBLAS may pick another GEMM algorithm on the capture stream
    (a graph replaying stale buffers is off by far more)."""
    us, out = graph_time_us(step, replays)
    eager = step()
    rtol, atol = CHECK_TOLERANCE[eager.dtype]
    if not torch.allclose(out.float(), eager.float(), rtol=rtol, atol=atol):
        err = (out.float() - eager.float()).abs().max().item()
        raise AssertionError(f"{what}: the graph differs from the eager step (max |err| {err:.3g})")
    return us / 1e3


def eager_ms(iters: int, what: str, step: Callable[[], torch.Tensor]) -> float:
    """Median ms of the eager step by the host clock (the quick mode: the checks ran it already, and the
    interpreter compiles nothing, so there is no warm-up)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def row(
    name: str, T: int, step: str, ms: float, rest_ms: float | None, stock_ms: float, vllm_ms: float | None
) -> str:
    """One table row; rest_ms None: the `no MoE` row itself."""
    moe = "— | —" if rest_ms is None else f"{ms - rest_ms:.3f} | {(ms - rest_ms) / ms:.3f}"
    over_vllm = "—" if vllm_ms is None else f"{ms / vllm_ms:.2f}"
    return f"| {name} | {T} | {step} | {ms:.3f} | {moe} | {ms / stock_ms:.2f} | {over_vllm} |"


def bench_shape(
    shape: StepShape, Ts: list[int], L: int, S: int, timer: Timer, device: torch.device,
    dtype: torch.dtype, ref: VllmRef | None,
) -> list[str]:  # fmt: skip
    layers = make_layers(shape, L, device, dtype)
    table = uniform_table(L, shape.moe.K, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for T in Ts:
        d = make_decode(shape, T, L, S, device, dtype)
        budget = Budget(
            table=table,
            token_budget=torch.zeros(T, dtype=torch.int64, device=device),
            token_group=torch.zeros(T, dtype=torch.int64, device=device),
            used=torch.zeros(L, L * shape.moe.K + 1, dtype=torch.float64, device=device),
        )
        bodies: dict[str, Body] = {"stock b=1": stock_body}
        if ref is not None:
            config, source = stock_config(ref, T, shape.moe.E, shape.moe.I, dtype, device_name)
            bodies[f"vLLM b=1 ({source} config)"] = functools.partial(vllm_body, ref=ref, config=config)
        check(shape, d, layers, budget, bodies)
        keys = torch.empty(T, shape.moe.K)  # float32, as the router's: only shapes and dtypes decide
        path = "fused" if fused_fits(keys, keys, shape.moe.E) else "torch"
        bodies[f"budget b={BUDGET} ({path} routing)"] = budget.body

        def time_step(label: str, body: Body | None, T: int = T, d: Decode = d) -> float:
            return timer(
                f"{shape.moe.name} T={T} {label}", functools.partial(decode_step, d, layers, shape, body)
            )

        rest_ms = time_step("no MoE", None)
        ms = {label: time_step(label, body) for label, body in bodies.items()}
        stock_ms = ms["stock b=1"]
        vllm_ms = next((v for label, v in ms.items() if label.startswith("vLLM")), None)
        new = [row(shape.moe.name, T, "no MoE", rest_ms, None, stock_ms, vllm_ms)]
        new += [row(shape.moe.name, T, label, v, rest_ms, stock_ms, vllm_ms) for label, v in ms.items()]
        print("\n".join(new), flush=True)
        rows += new
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(STEP_MODELS), default=list(STEP_MODELS))
    parser.add_argument("--T", nargs="+", type=int, help="decode streams (default 1 8 32 64; quick: 1 8)")
    parser.add_argument("--layers", type=int, help="layers in the stack (default 4; quick: 2)")
    parser.add_argument("--context", type=int, help="KV-cache positions (default 1024; quick: 16)")
    parser.add_argument("--replays", type=int, help="timed replays (default 50; quick: eager steps, 1)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny layers on CPU, eager (automatic without CUDA)"
    )
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    add_vllm_ref_argument(parser)
    args = parser.parse_args(argv)
    quick = args.quick or not torch.cuda.is_available()
    if quick and os.environ.get("TRITON_INTERPRET") != "1":
        print("the quick mode runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1 (the script")
        print("sets it when run as a script; an importer must set it before importing the kernels)")
        return 2
    Ts = args.T or ([1, 8] if quick else [1, 8, 32, 64])
    L = args.layers or (2 if quick else 4)
    S = args.context or (16 if quick else 1024)
    replays = args.replays or (1 if quick else 50)
    for flag, value in (("--T", min(Ts)), ("--layers", L), ("--context", S), ("--replays", replays)):
        if value < 1:
            parser.error(f"{flag} must be at least 1; got {value}")
    device = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    ref = load_vllm_ref(args.vllm_ref) if args.vllm_ref else None
    if quick:
        title = (
            f"Decode step, quick mode on CPU (eager, Triton interpreter), float32, torch {torch.__version__}"
        )
        timing = (
            f"ms / step = median of {replays} eager step(s) by the host clock, tiny layers (H = 64, I = 32, "
            "the models' E and K, 2 KV heads of 16): these times show the benchmark runs, they are no GPU's."
        )
        timer: Timer = functools.partial(eager_ms, replays)
    else:
        title = (
            f"Decode step under CUDA-graph replay on {torch.cuda.get_device_name()}, bfloat16, "
            f"torch {torch.__version__}"
        )
        timing = f"ms / step = median of {replays} replays of the step's CUDA graph."
        timer = functools.partial(graph_ms, replays)
    header = [
        f"# {title}",
        "",
        f"A {L}-layer stack (per layer: RMSNorm, attention over a {S}-position KV cache, shared experts, "
        f"MoE layer; benchmarks/bench_step.py), T decode streams. {timing} MoE ms = the step − `no MoE` (the "
        "same stack with its MoE layers, router included, left out, timed the same way); MoE share = "
        "MoE ms / the step. × stock = over `stock b=1` (the expert kernel on the stock routing). "
        f"`budget b={BUDGET} (P routing)`: every token at b = {BUDGET}, routed by path P as the plugin "
        "routes on CUDA (fused: one Triton launch; torch: above the fused kernel's size)."
        + vllm_note(args.vllm_ref, "vLLM b=1"),
        "",
        "| model | T | step | ms / step | MoE ms | MoE share | × stock | × vLLM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    for key in args.models:
        shape = tiny(STEP_MODELS[key]) if quick else STEP_MODELS[key]
        rows += bench_shape(shape, Ts, L, S, timer, device, dtype, ref)
        if not quick:
            torch.cuda.empty_cache()
    write_table(args.out, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
