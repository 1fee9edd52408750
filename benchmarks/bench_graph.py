"""Cost of the budget path under CUDA-graph replay, per MoE layer, at decode batch sizes (GPU only).

For the layer shapes of DeepSeek-V2-Lite and Qwen3-30B-A3B, at T tokens, one CUDA graph per variant holds
LAYERS MoE layers (each its own weights, so weight reads are not served by L2) and is timed by replay:

  kernel b=1        the expert kernel on the stock routing (no budget path): the reference cost
  routing           Alloc-T from the persistent buffers alone (`device_budget.layer_routing`)
  routing P C       the routing alone by path P (torch: the reference, 50-190 kernels; fused: the one
                    Triton launch, `kernels/routing.py`) in configuration C: plain, carry (the carried
                    balance, one request per token, as at decode), cap (ρ = 0.9, one cap group), or
                    carry+cap. `*` marks the path `layer_routing` takes on CUDA at this shape
  routing+kernel b  the whole budget path with every token at budget b (b = 1.0: nothing pruned)
  kernel b          the expert kernel alone on routing pruned to budget b outside the graph
  conditional b     both paths behind CUDA-graph conditional nodes on a device flag, as the plugin
                    captures them (`device_budget.stock_or_budget`): b = 1.0 runs the kernel alone
  vLLM stock        with `--vllm-ref PATH`: vLLM 0.32's own Triton `fused_moe_kernel`, extracted from a
                    copy of its source and launched as its `fused_experts_impl` does, with vLLM's config
                    for this device and T (tuned table where vLLM has one, else its default) and one-launch
                    stand-ins for its CUDA helper ops (`vllm_ref.py`); `× vLLM` is every row over it
  vLLM align        the stand-in for vLLM's moe_align_block_size alone (part of `vLLM stock`; absent
                    where vLLM takes its naive path, T·K·4 ≤ E, which needs no align)

`routing` is what a pass at b = 1.0 pays on top of the stock expert call when the budget path is always
captured. Every graph is checked against the eager run of the same layers first, and vLLM stock also
against the fp32 oracle. Needs only torch and Triton (`vllm_alloc.kernels`), plus for the vLLM rows a copy
made by `benchmarks/copy_vllm_ref.py` where vllm is installed (the GPU machine needs no vLLM).

    python benchmarks/bench_graph.py --out BENCH_GRAPH.md
    python benchmarks/bench_graph.py --vllm-ref vllm-ref --out BENCH_GRAPH.md
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_kernel import MODELS, TOLERANCE, LayerShape
from vllm_ref import VllmRef, load_vllm_ref, stock_config, uses_naive_assignment, vllm_stock_moe
from vllm_stand_ins import align_stand_in

from vllm_alloc.routing.device_budget import (
    Cap,
    Carry,
    conditional_nodes_available,
    fused_fits,
    fused_layer_routing,
    layer_routing,
    stock_or_budget,
    torch_layer_routing,
)
from vllm_alloc.routing.reference import moe_forward

LAYERS = 8
ROUTING_CONFIGS = ("plain", "carry", "cap", "carry+cap")
CAP_SHARE = 900  # ρ = 0.9 in thousandths (`cap.SCALE`), the share the shipped budget files cap at


def row(shape: LayerShape, T: int, graph: str, us: float, base_us: float, vllm_us: float | None) -> str:
    """One table row: µs per layer, × over `kernel b=1`, × over `vLLM stock` (— without --vllm-ref)."""
    over_vllm = "—" if vllm_us is None else f"{us / vllm_us:.2f}"
    return f"| {shape.name} | {T} | {graph} | {us / LAYERS:.1f} | {us / base_us:.2f} | {over_vllm} |"


def uniform_table(L: int, K: int, device: torch.device) -> torch.Tensor:
    """K_l(B) [A + 1, L] int32 for A = L·K: uniform, ceil(B / L) capped at K; rows below L (one expert per
    layer) are padding (0)."""
    rows = [[0 if B < L else min(K, math.ceil(B / L))] * L for B in range(L * K + 1)]
    return torch.tensor(rows, dtype=torch.int32, device=device)


def absolute_budget(b: float, L: int, K: int) -> int:
    """B = floor(b·A), at least L (one expert per layer: the table's first real row)."""
    return max(L, math.floor(b * (L * K)))


def graph_time_us(
    fn: Callable[..., torch.Tensor], replays: int, with_graph: bool = False
) -> tuple[float, torch.Tensor]:
    """Median µs of one replay of fn captured in a CUDA graph, and the graph's output. with_graph: fn
    takes the graph being captured (None when not capturing)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(None) if with_graph else fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(graph) if with_graph else fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times), out


@dataclass
class Pass:
    """One decode step of LAYERS layers at T tokens: inputs, stock routing per layer, budget buffers."""

    x: torch.Tensor  # [T, H]
    weights: torch.Tensor  # [LAYERS, T, K] stock routing weights (also the ranking keys)
    ids: torch.Tensor  # [LAYERS, T, K] int32
    table: torch.Tensor  # [A + 1, LAYERS] int32, K_l(B)
    token_budget: torch.Tensor  # [T] int64
    token_group: torch.Tensor  # [T] int64
    used: torch.Tensor  # [LAYERS, A + 1] float64

    def stock(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weights[layer], self.ids[layer]

    def routing(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_routing(
            self.weights[layer],
            self.weights[layer],
            self.ids[layer],
            table=self.table,
            token_budget=self.token_budget,
            token_group=self.token_group,
            used=self.used,
            column=layer,
            k_base=1,
        )


Layers = list[tuple[torch.Tensor, torch.Tensor]]
Routing = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> (weights, ids)


def residual(p: Pass, layers: Layers, route: Routing) -> torch.Tensor:
    """The layers on a residual stream (y += experts(y)), each routed by `route(layer)`."""
    from vllm_alloc.kernels import fused_moe

    y = p.x
    for layer, (w13, w2) in enumerate(layers):
        weights, ids = route(layer)
        y = y + fused_moe(y, w13, w2, ids, weights)
    return y


def kernel_only(p: Pass, layers: Layers) -> torch.Tensor:
    return residual(p, layers, p.stock)


def kernel_pruned(p: Pass, layers: Layers, routed: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The expert kernel alone on routing pruned beforehand (outside the graph)."""
    return residual(p, layers, routed.__getitem__)


def routing_only(p: Pass, layers: Layers) -> torch.Tensor:
    return torch.stack([p.routing(layer)[1] for layer in range(len(layers))])


def budget_path(p: Pass, layers: Layers) -> torch.Tensor:
    return residual(p, layers, p.routing)


def routing_variant(p: Pass, E: int, config: str, fused: bool) -> Callable[[], torch.Tensor]:
    """One pass's routing over every layer, by one path in one configuration (ROUTING_CONFIGS), on buffers
    of its own (the counters and the balance are written in place at every call). Decode: each token is
    its own request, so a carried token has its own balance row; the cap holds all tokens in one group."""
    T = p.x.shape[0]
    A1, device = p.table.shape[0], p.x.device
    carry = cap = None
    if "carry" in config:
        carry = Carry(
            token_slot=torch.arange(1, T + 1, device=device),
            balance=torch.zeros(T + 1, LAYERS, dtype=torch.int64, device=device),
            theta=torch.full((A1, LAYERS), 0.5, dtype=torch.float64, device=device),
            alpha=0.5,
        )
    if "cap" in config:
        cap = Cap(
            token_cap=torch.ones(T, dtype=torch.int64, device=device),
            table=torch.full((A1, LAYERS), CAP_SHARE, dtype=torch.int64, device=device),
            num_experts=E,
            dropped=torch.zeros(LAYERS, A1, dtype=torch.float64, device=device),
            distinct=torch.zeros(LAYERS, E + 1, dtype=torch.float64, device=device),
        )
    used = torch.zeros_like(p.used)
    route = fused_layer_routing if fused else torch_layer_routing

    def run() -> torch.Tensor:
        ids = []
        for layer in range(LAYERS):
            out = route(
                p.weights[layer], p.weights[layer], p.ids[layer], table=p.table, token_budget=p.token_budget,
                token_group=p.token_group, used=used, column=layer, k_base=1, carry=carry, cap=cap,
            )  # fmt: skip
            ids.append(out[1])
        return torch.stack(ids)

    return run


def routing_rows(
    shape: LayerShape, T: int, p: Pass, replays: int, base_us: float, vllm_us: float | None
) -> list[str]:
    """`routing P C` rows: each configuration by both paths, checked equal on one eager call first."""
    from vllm_alloc.kernels import MAX_TILE, fused_routing_fits

    rows = []
    taken = "fused" if fused_fits(p.weights[0], p.weights[0], shape.E) else "torch"
    for config in ROUTING_CONFIGS:
        paths = ["torch"] + (["fused"] if fused_routing_fits(T, shape.K, shape.E, MAX_TILE) else [])
        outs = {path: routing_variant(p, shape.E, config, path == "fused")() for path in paths}
        if len(outs) == 2 and not torch.equal(outs["torch"], outs["fused"]):
            raise AssertionError(f"{shape.name} T={T} {config}: the fused routing keeps other experts")
        for path in paths:
            us, _ = graph_time_us(routing_variant(p, shape.E, config, path == "fused"), replays)
            graph = f"routing {path}{'*' if path == taken else ''} {config}"
            rows.append(row(shape, T, graph, us, base_us, vllm_us))
    return rows


def conditional(
    full: torch.Tensor, not_full: torch.Tensor, p: Pass, layers: Layers, graph: torch.cuda.CUDAGraph | None
) -> torch.Tensor:
    """Both paths behind conditional nodes per layer (what the plugin captures): stock at b = 1.0."""
    from vllm_alloc.kernels import fused_moe

    y = p.x
    for layer, (w13, w2) in enumerate(layers):

        def body(route: Routing, y: torch.Tensor = y, layer: int = layer, w13=w13, w2=w2) -> torch.Tensor:
            weights, ids = route(layer)
            return fused_moe(y, w13, w2, ids, weights)

        if graph is None:  # eager warm-up: the host knows the pass
            y = y + body(p.stock if bool(full) else p.routing)
        else:
            y = y + stock_or_budget(
                full,
                functools.partial(body, p.stock),
                functools.partial(body, p.routing),
                graph,
                not_full=not_full,  # written beside `full`, as the plugin's host does
            )
    return y


def vllm_layers(p: Pass, layers: Layers, ref: VllmRef, config: dict) -> torch.Tensor:
    """The layers on the residual stream by vLLM's stock kernel (`vllm_ref.vllm_stock_moe`), stock routing."""
    y = p.x
    for layer, (w13, w2) in enumerate(layers):
        weights, ids = p.stock(layer)
        y = y + vllm_stock_moe(y, w13, w2, weights, ids, ref=ref, config=config)
    return y


def vllm_rows(
    shape: LayerShape, T: int, p: Pass, layers: Layers, ref: VllmRef, replays: int, base_us: float
) -> tuple[float, list[str]]:
    """(µs of the vLLM stock graph, its rows): checked against the oracle on layer 0 and against its own
    eager run, then timed; its align stand-in is also timed alone where vLLM aligns."""
    config, source = stock_config(ref, T, shape.E, shape.I, p.x.dtype, torch.cuda.get_device_name())
    weights, ids = p.stock(0)
    w13, w2 = layers[0]
    got = vllm_stock_moe(p.x, w13, w2, weights, ids, ref=ref, config=config).float()
    want = moe_forward(p.x, w13, w2, weights, ids)
    rtol, atol = TOLERANCE[p.x.dtype]
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{shape.name} T={T}: vLLM stock differs from the oracle (max |err| {err:.3g})")
    us, out = graph_time_us(functools.partial(vllm_layers, p, layers, ref, config), replays)
    if not torch.equal(out, vllm_layers(p, layers, ref, config)):
        raise AssertionError(f"{shape.name} T={T}: vLLM stock graph differs from eager")
    naive = uses_naive_assignment(T, shape.K, shape.E)
    rows = [row(shape, T, f"vLLM stock ({source} config{', naive' if naive else ''})", us, base_us, us)]
    if not naive:
        block_m = config["BLOCK_SIZE_M"]

        def aligns() -> torch.Tensor:
            return torch.cat([align_stand_in(p.ids[layer], shape.E, block_m)[0] for layer in range(LAYERS)])

        align_us, _ = graph_time_us(aligns, replays)
        rows.append(row(shape, T, "vLLM align", align_us, base_us, us))
    return us, rows


def bench_shape(
    shape: LayerShape, Ts: list[int], budgets: list[float], replays: int, ref: VllmRef | None = None
) -> list[str]:
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    layers = [
        (
            torch.randn(shape.E, 2 * shape.I, shape.H, device="cuda", generator=g, dtype=dtype)
            * shape.H**-0.5,
            torch.randn(shape.E, shape.H, shape.I, device="cuda", generator=g, dtype=dtype) * shape.I**-0.5,
        )
        for _ in range(LAYERS)
    ]
    A = LAYERS * shape.K
    table = uniform_table(LAYERS, shape.K, torch.device("cuda"))
    rows = []
    for T in Ts:
        logits = torch.randn(LAYERS, T, shape.E, device="cuda", generator=g)
        weights, ids = logits.softmax(dim=-1).topk(shape.K, dim=-1)
        p = Pass(
            x=torch.randn(T, shape.H, device="cuda", dtype=dtype),
            weights=weights,
            ids=ids.int(),
            table=table,
            token_budget=torch.full((T,), A, dtype=torch.int64, device="cuda"),
            token_group=torch.zeros(T, dtype=torch.int64, device="cuda"),
            used=torch.zeros(LAYERS, A + 1, dtype=torch.float64, device="cuda"),
        )
        base_us, base_out = graph_time_us(functools.partial(kernel_only, p, layers), replays)
        if not torch.equal(base_out, kernel_only(p, layers)):
            raise AssertionError(f"{shape.name} T={T}: kernel graph differs from eager")
        route_us, _ = graph_time_us(functools.partial(routing_only, p, layers), replays)
        vllm_us, stock = vllm_rows(shape, T, p, layers, ref, replays, base_us) if ref else (None, [])
        new = [
            row(shape, T, "kernel b=1", base_us, base_us, vllm_us),
            *stock,
            row(shape, T, "routing", route_us, base_us, vllm_us),
        ]
        p.token_budget.fill_(absolute_budget(0.5, LAYERS, shape.K))  # the routing rows at b = 0.5
        new += routing_rows(shape, T, p, replays, base_us, vllm_us)
        full = torch.ones((), dtype=torch.bool, device="cuda")
        not_full = torch.zeros((), dtype=torch.bool, device="cuda")
        for b in budgets:
            p.token_budget.fill_(absolute_budget(b, LAYERS, shape.K))
            if b < 1.0:
                routed = [p.routing(layer) for layer in range(LAYERS)]
                us, out = graph_time_us(functools.partial(kernel_pruned, p, layers, routed), replays)
                if not torch.equal(out, budget_path(p, layers)):
                    raise AssertionError(
                        f"{shape.name} T={T} b={b}: pruned kernel differs from the budget path"
                    )
                new.append(row(shape, T, f"kernel b={b}", us, base_us, vllm_us))
            us, out = graph_time_us(functools.partial(budget_path, p, layers), replays)
            if not torch.equal(out, budget_path(p, layers)):
                raise AssertionError(f"{shape.name} T={T} b={b}: budget-path graph differs from eager")
            if b == 1.0 and not torch.equal(out, base_out):
                raise AssertionError(
                    f"{shape.name} T={T}: budget path at b=1.0 differs from the kernel alone"
                )
            new.append(row(shape, T, f"routing+kernel b={b}", us, base_us, vllm_us))
            if not conditional_nodes_available():
                continue  # this torch cannot capture conditional nodes
            full.fill_(b == 1.0)
            not_full.fill_(b != 1.0)
            us, out = graph_time_us(
                functools.partial(conditional, full, not_full, p, layers), replays, with_graph=True
            )
            if not torch.equal(out, (kernel_only if b == 1.0 else budget_path)(p, layers)):
                raise AssertionError(f"{shape.name} T={T} b={b}: conditional graph took the wrong body")
            new.append(row(shape, T, f"conditional b={b}", us, base_us, vllm_us))
        print("\n".join(new), flush=True)
        rows += new
    return rows


def add_vllm_ref_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vllm-ref",
        type=Path,
        metavar="PATH",
        help="a copy of vLLM 0.32's fused_moe.py and configs/ (benchmarks/copy_vllm_ref.py): adds vLLM rows",
    )


def vllm_note(path: Path | None, rows: str) -> str:
    """The header's sentence on the vLLM yardstick (the rows named `rows`): what × vLLM is over, or why
    there is none."""
    if path:
        return f" × vLLM = over `{rows}` (vLLM 0.32's kernel from {path}, same T)."
    return (
        f" No `{rows}` rows and no × vLLM (—): run with `--vllm-ref PATH`, a copy made by "
        "`benchmarks/copy_vllm_ref.py`."
    )


def write_table(out: Path | None, header: list[str], rows: list[str]) -> None:
    """The markdown table (header, then rows) to out, where one was asked for."""
    if out:
        out.write_text("\n".join([*header, *rows]) + "\n")
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["deepseek-v2-lite", "qwen3-30b-a3b"],
        default=["deepseek-v2-lite", "qwen3-30b-a3b"],
    )
    parser.add_argument("--T", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--budgets", nargs="+", type=float, default=[1.0, 0.5])
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--out", type=Path, help="also write the markdown table to this file")
    add_vllm_ref_argument(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_graph.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.")
        return 2
    ref = load_vllm_ref(args.vllm_ref) if args.vllm_ref else None
    header = [
        f"# Budget path under CUDA-graph replay on {torch.cuda.get_device_name()}, bfloat16, "
        f"torch {torch.__version__}",
        "",
        f"µs per MoE layer = median replay of a {LAYERS}-layer graph / {LAYERS} ({args.replays} replays); "
        "× = over `kernel b=1` (the expert kernel alone on the stock routing, same T). `kernel b`: the "
        "kernel alone on routing pruned to budget b beforehand."
        + (
            ""
            if conditional_nodes_available()
            else " No `conditional` rows: this torch lacks CUDA-graph conditional nodes."
        )
        + vllm_note(args.vllm_ref, "vLLM stock"),
        "",
        "| model | T | graph | µs / layer | × | × vLLM |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(header), flush=True)
    rows: list[str] = []
    for key in args.models:
        rows += bench_shape(MODELS[key], args.T, args.budgets, args.replays, ref)
        torch.cuda.empty_cache()
    write_table(args.out, header, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
