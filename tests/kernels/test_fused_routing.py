"""The fused routing kernel (`vllm_alloc::budget_routing`, kernels/routing.py) against the torch path it
replaces, `device_budget.layer_routing`: kept weights, kept ids, `used`, the carried balance, `dropped` and
`distinct`, all compared with torch.equal, each path on its own clones of the buffers.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py): every tensor here is float32, float64 or
an integer, which the interpreter computes exactly. Keys sit on a dyadic grid (k·2⁻¹⁰) where the cap's
float64 demand sums are exact in any order (kernels/routing.py, "Exactness"); a named case checks a
non-dyadic router as well.

Letters as in DESIGN.md §1: T tokens, K the model's top-k, E experts, K_base the floor, A = L·K the largest
budget; S carried slots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vllm_alloc.kernels import MAX_PAIRS, align_pairs, fused_routing_fits

from tests.kernels.moe_cases import DEVICE, ON_CUDA
from vllm_alloc.routing.cap import SCALE
from vllm_alloc.routing.device_budget import Cap, Carry, fused_fits, fused_layer_routing, torch_layer_routing

L, COLUMN = 3, 1
SHARES = (1, 250, 500, 750, SCALE)
CARRY_MODES = (None, "layer", "request")
CAP_MODES = (None, "count", "cap")  # no cap; distinct experts counted only; capped


@dataclass
class Case:
    """One layer call: the router's [T, K] output, the runner hook's buffers for it, and the options."""

    keys: torch.Tensor  # [T, K] float32
    weights: torch.Tensor  # [T, K] float32
    ids: torch.Tensor  # [T, K] int32 or int64, distinct per row, in [0, E)
    table: torch.Tensor  # [A + 1, L] int32, K_l(B); row 0 zero
    token_budget: torch.Tensor  # [N >= T] int64
    token_group: torch.Tensor  # [N] int64, each group named by its first token
    token_slot: torch.Tensor  # [N] int64, 0 = not carried
    balance: torch.Tensor  # [S + 1, L] int64
    theta: torch.Tensor  # [A + 1, L] float64
    token_cap: torch.Tensor  # [N] int64, cap group + 1
    cap_table: torch.Tensor  # [A + 1, L] int64, thousandths
    E: int
    k_base: int
    alpha: float = 0.05
    carry: str | None = None
    cap: str | None = None
    weights_mode: str = "topk"
    singleton: bool = False
    block_m: int = 16  # the fused path also aligns the kept pairs for the expert kernel

    def counters(self) -> dict[str, torch.Tensor]:
        A = self.table.shape[0] - 1
        gen = torch.Generator().manual_seed(3)  # nonzero starting counts: the kernel adds, never overwrites
        return {
            "used": torch.randint(0, 5, (L, A + 1), generator=gen).double().to(DEVICE),
            "dropped": torch.randint(0, 5, (L, A + 1), generator=gen).double().to(DEVICE),
            "distinct": torch.randint(0, 5, (L, self.E + 1), generator=gen).double().to(DEVICE),
            "balance": self.balance.clone(),
        }


def run(case: Case, fused: bool) -> tuple[torch.Tensor, ...]:
    """(kept weights, kept ids, used, dropped, distinct, balance) of one path, on fresh buffers; the
    fused path's alignment (`AlignedPairs`' tensors) follows."""
    c = case.counters()
    carry = None
    if case.carry is not None:
        carry = Carry(case.token_slot, c["balance"], case.theta, case.alpha, case.carry == "request")
    cap = None
    if case.cap is not None:
        cap = Cap(case.token_cap, case.cap_table, case.E, c["dropped"], c["distinct"], case.cap == "cap")
    args = (case.keys.clone(), case.weights.clone(), case.ids.clone())
    kwargs = dict(
        table=case.table, token_budget=case.token_budget, token_group=case.token_group, used=c["used"],
        column=COLUMN, k_base=case.k_base, weights=case.weights_mode, singleton_groups=case.singleton,
        carry=carry, cap=cap,
    )  # fmt: skip
    aligned: tuple[torch.Tensor, ...] = ()
    if fused:
        w, ids, pairs = fused_layer_routing(*args, **kwargs, num_experts=case.E, block_m=case.block_m)  # type: ignore[arg-type]
        assert pairs is not None
        aligned = tuple(pairs[:4])
    else:
        w, ids = torch_layer_routing(*args, **kwargs)  # type: ignore[arg-type]
    return w, ids, c["used"], c["dropped"], c["distinct"], c["balance"], *aligned


NAMES = ("weights", "ids", "used", "dropped", "distinct", "balance")
ALIGNED = ("sorted_pair_ids", "block_expert_ids", "num_blocks", "expert_counts")  # vs kernels.align_pairs


def check(case: Case) -> tuple[torch.Tensor, ...]:
    assert fused_routing_fits(*case.keys.shape)
    want = run(case, fused=False)
    got = run(case, fused=True)
    want_aligned = align_pairs(want[1], case.E, case.block_m)[:4]
    for name, g, w in zip(NAMES + ALIGNED, got, want + tuple(want_aligned), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs from the torch path:\nfused {g}\ntorch {w}"
    return got


def make_case(
    T: int,
    K: int,
    E: int,
    k_base: int,
    seed: int,
    *,
    n_real: int | None = None,
    groups: int = 2,
    ties: int | None = None,
    carried: float = 0.5,
    capped: float = 0.8,
    cap_groups: int = 2,
    dyadic: bool = True,
    **options: object,
) -> Case:
    """A random layer call. n_real: rows past it are padding (B = 0). groups / cap_groups: labels drawn per
    token, each group named by its first token (as the host writes them). ties: keys drawn from that many
    values (exact ties), None = a continuous router. carried: share of tokens in their own group with a
    balance slot."""
    gen = torch.Generator().manual_seed(seed)
    n_real = T if n_real is None else n_real
    A = L * K
    N = T + 3  # the buffers are longer than the pass, as the plugin's are
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    if ties is None:
        keys = torch.rand(T, K, generator=gen)
    else:
        keys = torch.randint(0, ties, (T, K), generator=gen).float() / ties
    if dyadic:
        keys = (keys * 1024).floor() / 1024
    table = torch.zeros(A + 1, L, dtype=torch.int32)
    table[1:] = torch.randint(1, K + 1, (A, L), generator=gen, dtype=torch.int32)  # k_t < K_base included
    budget = torch.randint(1, A + 1, (N,), generator=gen)
    budget[n_real:] = 0
    label = torch.randint(0, groups, (N,), generator=gen)
    slot = torch.zeros(N, dtype=torch.int64)
    lone = torch.rand(N, generator=gen) < carried
    lone[n_real:] = False
    label = torch.where(lone, groups + torch.arange(N), label)  # a carried token is alone in its group
    first = (label[:, None] == label[None, :]).long().argmax(dim=1)
    slot[lone] = torch.randperm(int(lone.sum()) + 2, generator=gen)[: int(lone.sum())] + 1
    S = N + 2  # fixed by the shapes, so that every seed's buffers fit one trace
    theta = torch.rand(A + 1, L, generator=gen, dtype=torch.float64)
    theta[torch.rand(A + 1, L, generator=gen) < 0.15] = torch.inf
    theta[torch.rand(A + 1, L, generator=gen) < 0.15] = -torch.inf
    cap_label = torch.randint(0, cap_groups, (N,), generator=gen)
    cap_first = (cap_label[:, None] == cap_label[None, :]).long().argmax(dim=1)
    token_cap = torch.where(torch.rand(N, generator=gen) < capped, cap_first + 1, 0)
    cap_table = torch.tensor(SHARES)[torch.randint(len(SHARES), (A + 1, L), generator=gen)]
    fields = dict(
        keys=keys, weights=keys.clone(), ids=ids, table=table, token_budget=budget.long(),
        token_group=first.long(), token_slot=slot, balance=torch.randint(0, 4, (S + 1, L), generator=gen),
        theta=theta, token_cap=token_cap.long(), cap_table=cap_table.long(),
    )  # fmt: skip
    tensors = {n: t.to(DEVICE) for n, t in fields.items()}
    return Case(**tensors, E=E, k_base=k_base, **options)  # type: ignore[arg-type]


ALL_MODES = [(carry, cap) for carry in CARRY_MODES for cap in CAP_MODES]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    T=st.integers(1, 64),
    K=st.sampled_from([2, 6, 8]),
    E=st.sampled_from([8, 60, 64, 128]),
    k_base=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
    padding=st.integers(0, 3),
    modes=st.sampled_from(ALL_MODES),
    weights_mode=st.sampled_from(["topk", "kept"]),
    ties=st.sampled_from([None, 2, 5]),
    alpha=st.sampled_from([0.0, 0.05, 0.7]),
    block_m=st.sampled_from([16, 64]),
)
def test_matches_layer_routing(T, K, E, k_base, seed, padding, modes, weights_mode, ties, alpha, block_m):
    carry, cap = modes
    check(
        make_case(
            T, K, E, k_base, seed, n_real=max(T - padding, 0), ties=ties, groups=1 + seed % 4,
            cap_groups=1 + seed % 3, carry=carry, cap=cap, weights_mode=weights_mode, alpha=alpha,
            block_m=block_m,
        )
    )  # fmt: skip


# Named edges: (T, K, E, k_base, options), each saying what it covers.
EDGES = {
    "padding rows keep and count nothing": (8, 6, 64, 1, dict(n_real=3, carry="layer", cap="cap")),
    "all rows padding": (5, 8, 60, 2, dict(n_real=0, carry="request", cap="cap")),
    "T = 1": (1, 8, 128, 1, dict(carry="layer", cap="cap")),
    "one group of every token": (17, 6, 64, 1, dict(groups=1, carried=0.0)),
    "one group, k_t < K_base pays from the pool": (13, 8, 64, 2, dict(groups=1, carried=0.0)),
    "K = K_base: no extras": (6, 2, 8, 2, dict(carry="layer", cap="cap")),
    "flat router: every key tied": (24, 8, 64, 1, dict(ties=1, groups=2, cap="cap")),
    "repeated rows": (16, 6, 60, 1, dict(ties=3, groups=1, carried=0.0, cap="cap", cap_groups=1)),
    "cap groups of one token are never capped": (9, 6, 64, 1, dict(cap_groups=64, cap="cap", carried=0.0)),
    "free experts: a few uncapped tokens": (20, 8, 8, 1, dict(capped=0.6, cap="cap", cap_groups=1)),
    "non-dyadic keys": (12, 6, 64, 1, dict(dyadic=False, cap="cap", carry="layer")),
    "weights 'kept' with the cap": (20, 8, 64, 2, dict(cap="cap", weights_mode="kept", carry="request")),
    "largest pass": (64, 8, 128, 1, dict(cap="cap", carry="layer", groups=3)),
}


@pytest.mark.parametrize("name", list(EDGES))
def test_named_edges(name):
    T, K, E, k_base, options = EDGES[name]
    check(make_case(T, K, E, k_base, seed=len(name), **options))  # type: ignore[arg-type]


def test_b_one_rows_route_as_stock():
    """Rows at b = 1.0 (K_l = K) keep every candidate with its input weight, bits and dtype unchanged."""
    case = make_case(11, 6, 64, 1, seed=5, carried=0.0, cap="cap")
    case.table[1:] = 6
    case.cap_table.fill_(SCALE)  # b = 1.0 is never capped
    w, ids, *_ = check(case)
    assert torch.equal(w, case.weights) and torch.equal(ids, case.ids)


@pytest.mark.parametrize("alpha", [0.0, 0.3])
@pytest.mark.parametrize("theta", [float("inf"), float("-inf")])
@pytest.mark.parametrize("pool", ["layer", "request"])
def test_carried_tokens_at_infinite_bars(alpha, theta, pool):
    """θ = +inf keeps K_base and banks the rest; θ = −inf spends what the bank allows; α = 0: a fixed bar."""
    case = make_case(10, 8, 64, 2, seed=9, carried=1.0, carry=pool, alpha=alpha)
    case.theta.fill_(theta)
    check(case)


def test_singleton_groups_closed_form():
    """singleton_groups=True (lone decode tokens) uses the closed form in both paths."""
    check(make_case(12, 6, 64, 1, seed=4, carried=1.0, singleton=True))
    check(make_case(12, 6, 64, 1, seed=4, carried=1.0, singleton=True, carry="layer", cap="count"))


def test_nan_keys_rank_as_torch_sort():
    """NaN keys (not a router's output) are ranked as torch.sort ranks them: above +inf, NaNs tied; the
    result then still equals the torch path, the cap's NaN demands included (kernels/routing.py)."""
    case = make_case(9, 6, 64, 1, seed=2, groups=1, carried=0.0, cap="cap", cap_groups=1)
    case.keys[0, 2] = float("nan")
    case.keys[3, :2] = float("nan")
    case.keys[5, 1] = float("inf")
    check(case)


def test_int64_ids_and_refusals():
    case = make_case(7, 6, 64, 1, seed=1, cap="cap")
    check(dataclasses.replace(case, ids=case.ids.long()))
    assert not fused_fits(torch.zeros(7, 6, dtype=torch.float16), torch.zeros(7, 6))  # torch path
    # The launcher's bounds (what these tests cover) and layer_routing's narrower choice on CUDA.
    assert fused_routing_fits(64, 8, 128) and not fused_routing_fits(64, 8, 129)
    assert (
        not fused_routing_fits(MAX_PAIRS, 2)
        and not fused_routing_fits(65, 8)
        and not fused_routing_fits(0, 8)
    )
    assert fused_fits(torch.zeros(16, 8), torch.zeros(16, 8), 128)
    assert not fused_fits(torch.zeros(17, 8), torch.zeros(17, 8), 128) and fused_fits(
        *[torch.zeros(64, 8)] * 2
    )
    with pytest.raises(ValueError, match="alpha"):
        run(dataclasses.replace(case, carry="layer", alpha=-1.0), fused=True)


def test_cap_ties_go_to_the_lower_expert():
    """Four capped tokens, a flat router: the cap allows the 4 floor experts and 2 of the 4 wanted ones, all
    at one demand, so the tie-break (lower expert id, as the stable sort) decides which."""
    case = make_case(4, 2, 16, 1, seed=0, groups=1, carried=0.0, capped=1.0, cap_groups=1, cap="cap")
    case.keys.fill_(0.5)
    case.ids.copy_(torch.tensor([[t, 8 + t] for t in range(4)]))
    case.table[1:] = 2
    case.cap_table.fill_(750)  # C = ⌈0.75 · 8⌉ = 6
    _, ids, *_ = check(case)
    assert ids.tolist() == [[0, 8], [1, 9], [2, -1], [3, -1]]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA (make gpu-check)")
def test_cuda_compiled_kernel_matches_and_is_stable():
    """The compiled kernel over many random passes, every mode: equal to the torch path, and the same bits
    on every run (a result that moves between runs is a race: the interpreter cannot see one)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(400):
        T = int(torch.randint(1, 65, (), generator=gen))
        K = (2, 6, 8)[i % 3]
        E = (8, 60, 64, 128)[i % 4]
        carry, cap = ALL_MODES[i % len(ALL_MODES)]
        case = make_case(
            T, K, E, 1 + i % 2, seed=i, n_real=max(T - i % 4, 0), ties=(None, 2, 5)[i % 3], groups=1 + i % 4,
            carry=carry, cap=cap, weights_mode=("topk", "kept")[i % 2], alpha=(0.0, 0.05, 0.7)[i % 3],
        )  # fmt: skip
        first = check(case)
        for _ in range(2):
            again = run(case, fused=True)
            for name, a, b in zip(NAMES + ALIGNED, again, first, strict=True):
                assert torch.equal(a, b), f"case {i}: {name} moved between runs"


@pytest.mark.parametrize(("carry", "cap", "block_m"), [("layer", "cap", 16), (None, None, 0)])
def test_opcheck(carry, cap, block_m):
    """torch.library.opcheck of `vllm_alloc::budget_routing`: the schema (exactly the declared buffers are
    mutated), the fake implementation's shapes against the real ones, and dispatch through aot_autograd."""
    case = make_case(6, 6, 60, 1, seed=3, carry=carry, cap=cap)
    c = case.counters()
    args = (
        case.keys, case.weights, case.ids, case.token_budget, case.token_group, case.table, c["used"], COLUMN,
        case.k_base, False, case.token_slot if carry else None, c["balance"] if carry else None,
        case.theta if carry else None, 0.05, False, case.E, case.token_cap if cap else None,
        case.cap_table if cap else None, c["dropped"] if cap else None, c["distinct"] if cap else None,
        block_m,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.vllm_alloc.budget_routing.default, args)
