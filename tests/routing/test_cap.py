"""The distinct-expert cap (`vllm_alloc.routing.cap.cap_experts`): a loop oracle, invariants, named edge
cases.

Letters as in DESIGN.md §1: T tokens, K the model's top-k, E experts, K_base the floor; q the cap's share ρ in
thousandths (`cap.SCALE`), C_g = ⌈ρ·D_g⌉ a group's cap.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cpu_isa import run_under_capability
from vllm_alloc.routing.alloc_t import reallocate
from vllm_alloc.routing.cap import SCALE, cap_experts, group_cap

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    keys: torch.Tensor  # [T, K] float32
    ids: torch.Tensor  # [T, K] int64, distinct per row, in [0, E)
    kept: torch.Tensor  # [T, K] bool: Alloc-T's choice (a prefix of each token's ranking, >= K_base)
    cap_group: torch.Tensor  # [T] int64 in [0, T)
    q_tok: torch.Tensor  # [T] int64: the share of the token's group in thousandths (>= SCALE: not capped)
    E: int
    k_base: int

    def run(self) -> tuple[torch.Tensor, int, int]:
        r = cap_experts(self.keys, self.ids, self.kept, self.cap_group, self.q_tok, self.E, self.k_base)
        return r.kept, int(r.distinct), int(r.dropped)


def alloc_t_kept(keys: torch.Tensor, ids: torch.Tensor, k_tok: list[int], k_base: int) -> torch.Tensor:
    """What Alloc-T keeps with every token in one group (a realistic `kept` to cap)."""
    T = keys.shape[0]
    k = torch.tensor(k_tok, dtype=torch.int64)
    return reallocate(keys, keys, ids, k, torch.zeros(T, dtype=torch.int64), k_base)[2]


@st.composite
def cases(draw: st.DrawFn, max_T: int = 32) -> Case:
    T = draw(st.integers(1, max_T))
    K = draw(st.integers(1, 6))
    E = draw(st.integers(K, K + 12))
    k_base = draw(st.integers(1, K))
    G = draw(st.integers(1, 4))
    ties = draw(st.sampled_from([1, 3, None]))  # None: continuous keys; else many exact ties
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    skew = torch.rand(E, generator=gen) ** 3  # some experts far more popular, as trained routers are
    ids = (torch.rand(T, E, generator=gen) + skew).argsort(dim=1, descending=True)[:, :K]
    keys = torch.rand(T, K, generator=gen) if ties is None else torch.randint(0, ties, (T, K)).float()
    k_tok = draw(st.lists(st.integers(0, K), min_size=T, max_size=T))  # 0: padding
    kept = alloc_t_kept(keys, ids, k_tok, k_base)
    # Groups are named by one of their tokens (as Alloc-T's); each group has one share, SCALE = uncapped.
    names = draw(st.lists(st.integers(0, T - 1), min_size=G, max_size=G))
    group = torch.tensor([names[i] for i in draw(st.lists(st.integers(0, G - 1), min_size=T, max_size=T))])
    shares = draw(st.lists(st.sampled_from([1, 100, 333, 500, 750, 999, SCALE]), min_size=G, max_size=G))
    q_tok = torch.tensor([shares[names.index(int(g))] for g in group])
    return Case(keys, ids, kept, group, q_tok, E, k_base)


def capped_tokens(case: Case) -> torch.Tensor:
    """[T] bool: tokens under a share below 1 that keep pairs, in a group with two or more of them."""
    capped = (case.q_tok < SCALE) & case.kept.any(dim=1)
    members = torch.zeros(case.keys.shape[0] + 1, dtype=torch.int64).index_add_(
        0, case.cap_group, capped.long()
    )
    return capped & (members[case.cap_group] > 1)


def oracle(case: Case) -> tuple[torch.Tensor, int, int]:
    """The rule written as loops (module docstring of vllm_alloc.routing.cap)."""
    T, K = case.keys.shape
    kb = min(case.k_base, K)
    keys, ids, kept = case.keys.tolist(), case.ids.tolist(), case.kept.tolist()
    group, q_tok = case.cap_group.tolist(), case.q_tok.tolist()
    capped = [q_tok[t] < SCALE and sum(kept[t]) > 0 for t in range(T)]
    members = [sum(capped[u] and group[u] == group[t] for u in range(T)) for t in range(T)]
    capped = [capped[t] and members[t] > 1 for t in range(T)]
    share = {group[t]: q_tok[t] for t in range(T)}
    ranking = [sorted(range(K), key=lambda j, t=t: (-keys[t][j], j)) for t in range(T)]
    free = {ids[t][j] for t in range(T) if not capped[t] for j in range(K) if kept[t][j]}
    allowed: dict[int, set[int]] = {}
    for g in {group[t] for t in range(T) if capped[t]}:
        demand = [0.0] * case.E
        wanted: set[int] = set()
        floor: set[int] = set()
        for t in range(T):
            if group[t] == g and capped[t]:
                for r, j in enumerate(ranking[t]):
                    if kept[t][j]:
                        demand[ids[t][j]] += keys[t][j]
                        wanted.add(ids[t][j])
                        if r < kb:
                            floor.add(ids[t][j])
        floor -= free

        def key(
            e: int, floor: set[int] = floor, wanted: set[int] = wanted, demand: list[float] = demand
        ) -> tuple[int, float, int]:
            # (floor first, wanted by demand, unwanted, free last), ties to the lower expert id
            tier = 3 if e in free else 0 if e in floor else 1 if e in wanted else 2
            return (tier, -demand[e] if tier == 1 else 0.0, e)

        ranked = sorted(range(case.E), key=key)
        C = -(-share[g] * len(wanted - free) // SCALE)  # ⌈ρ · D_g⌉
        allowed[g] = free | set(ranked[: max(C, len(floor))])
    out = [row[:] for row in kept]
    for t in range(T):
        if capped[t]:
            n = sum(kept[t])
            out[t] = [False] * K
            for r, j in enumerate(ranking[t]):
                if n and (r < kb or ids[t][j] in allowed[group[t]]):
                    out[t][j] = True
                    n -= 1
    used = {ids[t][j] for t in range(T) for j in range(K) if out[t][j]}
    dropped = sum(map(sum, kept)) - sum(map(sum, out))
    return torch.tensor(out, dtype=torch.bool).reshape(T, K), len(used), dropped


@SETTINGS
@given(case=cases())
def test_random_cases_match_oracle(case: Case) -> None:
    got, distinct, dropped = case.run()
    want, want_distinct, want_dropped = oracle(case)
    assert torch.equal(got, want)
    assert (distinct, dropped) == (want_distinct, want_dropped)


@SETTINGS
@given(case=cases())
def test_invariants(case: Case) -> None:
    got, _, dropped = case.run()
    _T, K = case.keys.shape
    kb = min(case.k_base, K)
    capped = capped_tokens(case)
    # Uncapped tokens (b = 1.0, no cap at their B, padding, alone in their group) are untouched.
    assert torch.equal(got[~capped], case.kept[~capped])
    # A capped token keeps at most what Alloc-T gave it, only pairs among its own candidates, and always
    # its top-K_base (the floor); the pool therefore still holds.
    n_before, n_after = case.kept.sum(1), got.sum(1)
    assert (n_after <= n_before).all() and dropped == int((n_before - n_after).sum()) >= 0
    top = torch.sort(case.keys, dim=1, descending=True, stable=True).indices[:, :kb]
    has_floor = got.gather(1, top).all(dim=1)
    assert has_floor[n_before > 0].all()
    # Per capped group, the experts its tokens touch beyond those uncapped tokens keep: at most
    # max(C_g, the group's floor experts), C_g = ⌈ρ · the experts its kept pairs were on⌉.
    free = set(case.ids[case.kept & ~capped[:, None]].tolist())
    for g in set(case.cap_group[capped].tolist()):
        rows = capped & (case.cap_group == g)
        touched = set(case.ids[rows][got[rows]].tolist()) - free
        floor = set(case.ids[rows].gather(1, top[rows]).reshape(-1).tolist()) - free
        wanted = set(case.ids[rows][case.kept[rows]].tolist()) - free
        C = group_cap(int(case.q_tok[rows][0]), len(wanted))
        assert len(touched) <= max(C, len(floor))


@SETTINGS
@given(case=cases())
def test_a_share_that_rounds_up_to_all_changes_nothing(case: Case) -> None:
    """ρ = 0.999 with fewer than 1000 wanted experts: ⌈ρ·D⌉ = D, nothing is cut."""
    case.q_tok = torch.where(case.q_tok < SCALE, SCALE - 1, case.q_tok)
    got, _, dropped = case.run()
    assert torch.equal(got, case.kept) and dropped == 0


def edge(keys: list[list[float]], ids: list[list[int]], k_tok: list[int], q: int, E: int, k_base: int = 1):
    keys_t = torch.tensor(keys, dtype=torch.float32)
    ids_t = torch.tensor(ids)
    T = keys_t.shape[0]
    kept = alloc_t_kept(keys_t, ids_t, k_tok, k_base)
    case = Case(keys_t, ids_t, kept, torch.zeros(T, dtype=torch.int64), torch.full((T,), q), E, k_base)
    return case, *case.run()


def test_every_token_wants_the_same_expert() -> None:
    # Expert 7 is everybody's first choice: it is the floor, and ρ = 0.001 (C_g = ⌈9/1000⌉ = 1) leaves
    # nothing else.
    keys = [[0.9, 0.5, 0.1]] * 4
    ids = [[7, t, t + 8] for t in range(4)]
    _case, got, distinct, dropped = edge(keys, ids, [3, 3, 3, 3], q=1, E=12)
    assert got[:, 0].all() and not got[:, 1:].any()
    assert distinct == 1 and dropped == 8


def test_all_tokens_at_k_base() -> None:
    # Every token keeps only its floor: the cap cannot cut below it, even past C_g.
    keys = [[0.9, 0.1]] * 3
    ids = [[t, t + 3] for t in range(3)]
    case, got, distinct, dropped = edge(keys, ids, [1, 1, 1], q=1, E=6)
    assert torch.equal(got, case.kept) and distinct == 3 and dropped == 0


def test_a_share_of_one_or_more_is_no_cap() -> None:
    # ρ = 1 leaves every wanted expert, which C >= E did before shares: E = 4 experts, all wanted.
    keys = [[0.9, 0.5], [0.8, 0.6]]
    ids = [[0, 1], [2, 3]]
    for q in (SCALE, SCALE + 1):
        case, got, distinct, dropped = edge(keys, ids, [2, 2], q=q, E=4)
        assert torch.equal(got, case.kept) and distinct == 4 and dropped == 0


def test_a_lone_token_is_not_capped() -> None:
    # T = 1: its distinct experts are its own pairs, which its budget already sets.
    case, got, distinct, dropped = edge([[0.4, 0.3, 0.2, 0.1]], [[5, 6, 7, 8]], [3], q=1, E=9)
    assert torch.equal(got, case.kept) and distinct == 3 and dropped == 0


def test_the_cap_scales_with_what_the_group_wants() -> None:
    # ρ = 0.5: 2 tokens wanting 4 experts keep 2 of them; 4 tokens wanting 8 keep 4 (a fixed C would not).
    for T in (2, 4):
        keys = [[0.9, 0.5]] * T
        ids = [[2 * t, 2 * t + 1] for t in range(T)]
        _case, got, distinct, dropped = edge(keys, ids, [2] * T, q=500, E=8)
        assert distinct == T and dropped == T and got[:, 0].all()


def test_a_cut_pair_is_replaced_by_an_allowed_candidate() -> None:
    # Alloc-T keeps experts 0, 1 for token 0 and 2, 0 for token 1. ρ = 0.6 of those 3 experts is
    # C_g = 2, the floors {0, 2}: token 0 loses expert 1 and takes its third candidate, expert 2,
    # instead; no pair is dropped.
    keys = [[0.9, 0.5, 0.2], [0.9, 0.6, 0.1]]
    ids = [[0, 1, 2], [2, 0, 1]]
    _case, got, distinct, dropped = edge(keys, ids, [2, 2], q=600, E=4)
    assert got.tolist() == [[True, False, True], [True, True, False]]
    assert distinct == 2 and dropped == 0


def test_free_experts_do_not_count() -> None:
    # Token 0 is at b = 1.0 (group 0): its experts 4, 5 and 6 are read anyway, so tokens 1 and 2 (group 1,
    # ρ = 0.001 of the 3 non-free experts they want: C_g = 1) keep expert 5 besides their floor expert 0;
    # experts 1 and 2 are cut.
    keys = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])
    ids = torch.tensor([[4, 5, 6], [0, 1, 5], [0, 2, 5]])
    kept = torch.ones(3, 3, dtype=torch.bool)
    case = Case(keys, ids, kept, torch.tensor([0, 1, 1]), torch.tensor([SCALE, 1, 1]), 7, 1)
    got, distinct, dropped = case.run()
    assert got.tolist() == [[True, True, True], [True, False, True], [True, False, True]]
    assert distinct == 4 and dropped == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kept": torch.ones(2, 3, dtype=torch.bool)}, "one \\[T, K\\] shape"),
        ({"cap_group": torch.zeros(3, dtype=torch.int64)}, "cap_group has shape"),
        ({"q_tok": torch.zeros(1, dtype=torch.int64)}, "q_tok has shape"),
        ({"k_base": 0}, "k_base=0"),
    ],
)
def test_bad_arguments_name_value_and_range(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "rank_keys": torch.rand(2, 2),
        "topk_ids": torch.tensor([[0, 1], [1, 2]]),
        "kept": torch.ones(2, 2, dtype=torch.bool),
        "cap_group": torch.zeros(2, dtype=torch.int64),
        "q_tok": torch.tensor([1, 1]),
        "num_experts": 3,
        "k_base": 1,
    }
    with pytest.raises(ValueError, match=match):
        cap_experts(**{**args, **kwargs})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# torch.compile


def check_compiles_fullgraph_with_dynamic_T() -> None:
    """Compiled == eager, one graph for all T (as test_alloc_t's check; called per ISA below)."""
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    E, K = 16, 4
    compiled = torch.compile(
        lambda keys, ids, kept, group, c: cap_experts(keys, ids, kept, group, c, E, 1),
        fullgraph=True,
        backend=backend,
    )
    gen = torch.Generator().manual_seed(3)
    for T in (5, 19):  # T = E + 3 > E: the [T + 1, E] group table is taller than wide
        keys = torch.randint(0, 4, (T, K), generator=gen).float()  # ties
        ids = torch.rand(T, E, generator=gen).argsort(1)[:, :K]
        kept = alloc_t_kept(keys, ids, torch.randint(0, K + 1, (T,), generator=gen).tolist(), 1)
        group = torch.randint(0, 2, (T,), generator=gen)
        q_tok = torch.where(group == 0, 300, SCALE)  # group 0 capped at ρ = 0.3, group 1 not capped
        args = (keys, ids, kept, group, q_tok)
        for a in args:  # as vLLM compiles: the token dim dynamic, everything else static
            torch._dynamo.mark_dynamic(a, 0)
        got, want = compiled(*args), cap_experts(*args, E, 1)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "T must not recompile"


@pytest.mark.parametrize("capability", ["avx2", "avx512"])  # Inductor writes different vector code for each
def test_compiles_fullgraph_with_dynamic_T(capability: str, tmp_path: Path) -> None:
    run_under_capability(
        capability, "tests.routing.test_cap", "check_compiles_fullgraph_with_dynamic_T", tmp_path
    )


def test_bench_kernel_caps_its_pruned_routing() -> None:
    """benchmarks/bench_kernel.py --caps: the pruned routing it times (a suffix of each row at −1) under
    the cap, on CPU: pruned slots stay pruned, kept pairs are a subset, and few experts remain."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_kernel

    gen = torch.Generator().manual_seed(0)
    T, E, K = 32, 64, 8
    weights, ids = torch.softmax(torch.randn(T, E, generator=gen), dim=-1).topk(K, dim=-1)
    pruned = torch.arange(K) >= 4
    ids, weights = ids.int().masked_fill(pruned, -1), weights.masked_fill(pruned, 0.0)
    capped_ids, capped_w = bench_kernel.cap_routing(ids, weights, 0.25, E)
    kept = capped_ids >= 0
    assert (kept <= (ids >= 0)).all() and torch.equal(capped_ids[kept], ids[kept])
    assert torch.equal(capped_w[kept], weights[kept]) and (capped_w[~kept] == 0).all()
    top1, wanted = len(set(ids[:, 0].tolist())), len(set(ids[ids >= 0].tolist()))
    touched = len(set(capped_ids[kept].tolist()))
    assert kept[:, 0].all() and touched <= max(group_cap(250, wanted), top1) < wanted
