"""The distinct-expert cap (`vllm_alloc.cap.cap_experts`): a loop oracle, invariants, named edge cases.

Letters as in DESIGN.md §1: T tokens, K the model's top-k, E experts, K_base the floor, C the cap.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cpu_isa import run_under_capability
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_alloc.alloc_t import reallocate
from vllm_alloc.cap import cap_experts

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    keys: torch.Tensor  # [T, K] float32
    ids: torch.Tensor  # [T, K] int64, distinct per row, in [0, E)
    kept: torch.Tensor  # [T, K] bool: Alloc-T's choice (a prefix of each token's ranking, >= K_base)
    cap_group: torch.Tensor  # [T] int64 in [0, T)
    c_tok: torch.Tensor  # [T] int64: C of the token's group (>= E: not capped)
    E: int
    k_base: int

    def run(self) -> tuple[torch.Tensor, int, int]:
        r = cap_experts(self.keys, self.ids, self.kept, self.cap_group, self.c_tok, self.E, self.k_base)
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
    # Groups are named by one of their tokens (as Alloc-T's); each group has one C, E or more = uncapped.
    names = draw(st.lists(st.integers(0, T - 1), min_size=G, max_size=G))
    group = torch.tensor([names[i] for i in draw(st.lists(st.integers(0, G - 1), min_size=T, max_size=T))])
    caps = draw(st.lists(st.integers(1, E + 1), min_size=G, max_size=G))
    c_tok = torch.tensor([caps[names.index(int(g))] for g in group])
    return Case(keys, ids, kept, group, c_tok, E, k_base)


def oracle(case: Case) -> tuple[torch.Tensor, int, int]:
    """The rule written as loops (module docstring of vllm_alloc.cap)."""
    T, K = case.keys.shape
    kb = min(case.k_base, K)
    keys, ids, kept = case.keys.tolist(), case.ids.tolist(), case.kept.tolist()
    group, c_tok = case.cap_group.tolist(), case.c_tok.tolist()
    capped = [c_tok[t] < case.E and sum(kept[t]) > 0 for t in range(T)]
    cap = {group[t]: c_tok[t] for t in range(T)}
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
        allowed[g] = free | set(ranked[: max(cap[g], len(floor))])
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
    capped = (case.c_tok < case.E) & case.kept.any(dim=1)
    # Uncapped tokens (b = 1.0, no cap at their B, padding) are untouched.
    assert torch.equal(got[~capped], case.kept[~capped])
    # A capped token keeps at most what Alloc-T gave it, only pairs among its own candidates, and always
    # its top-K_base (the floor); the pool therefore still holds.
    n_before, n_after = case.kept.sum(1), got.sum(1)
    assert (n_after <= n_before).all() and dropped == int((n_before - n_after).sum()) >= 0
    top = torch.sort(case.keys, dim=1, descending=True, stable=True).indices[:, :kb]
    has_floor = got.gather(1, top).all(dim=1)
    assert has_floor[n_before > 0].all()
    # Per capped group, the experts its tokens touch beyond those uncapped tokens keep: at most
    # max(C, the group's floor experts).
    free = set(case.ids[case.kept & ~capped[:, None]].tolist())
    for g in set(case.cap_group[capped].tolist()):
        rows = capped & (case.cap_group == g)
        touched = set(case.ids[rows][got[rows]].tolist()) - free
        floor = set(case.ids[rows].gather(1, top[rows]).reshape(-1).tolist()) - free
        C = int(case.c_tok[rows][0])
        assert len(touched) <= max(C, len(floor))


@SETTINGS
@given(case=cases())
def test_a_cap_that_fits_changes_nothing(case: Case) -> None:
    """C at least the experts the capped tokens want: nothing is cut."""
    wanted = len(set(case.ids[case.kept].tolist()))
    case.c_tok = torch.where(case.c_tok < case.E, torch.clamp(case.c_tok, min=wanted), case.c_tok)
    got, _, dropped = case.run()
    assert torch.equal(got, case.kept) and dropped == 0


def edge(keys: list[list[float]], ids: list[list[int]], k_tok: list[int], C: int, E: int, k_base: int = 1):
    keys_t = torch.tensor(keys, dtype=torch.float32)
    ids_t = torch.tensor(ids)
    T = keys_t.shape[0]
    kept = alloc_t_kept(keys_t, ids_t, k_tok, k_base)
    case = Case(keys_t, ids_t, kept, torch.zeros(T, dtype=torch.int64), torch.full((T,), C), E, k_base)
    return case, *case.run()


def test_every_token_wants_the_same_expert() -> None:
    # Expert 7 is everybody's first choice: it is the floor, and C = 1 leaves nothing else.
    keys = [[0.9, 0.5, 0.1]] * 4
    ids = [[7, t, t + 8] for t in range(4)]
    _case, got, distinct, dropped = edge(keys, ids, [3, 3, 3, 3], C=1, E=12)
    assert got[:, 0].all() and not got[:, 1:].any()
    assert distinct == 1 and dropped == 8


def test_all_tokens_at_k_base() -> None:
    # Every token keeps only its floor: the cap cannot cut below it, even past C.
    keys = [[0.9, 0.1]] * 3
    ids = [[t, t + 3] for t in range(3)]
    case, got, distinct, dropped = edge(keys, ids, [1, 1, 1], C=1, E=6)
    assert torch.equal(got, case.kept) and distinct == 3 and dropped == 0


def test_cap_at_or_above_E_is_no_cap() -> None:
    keys = [[0.9, 0.5], [0.8, 0.6]]
    ids = [[0, 1], [2, 3]]
    for C in (4, 5):
        case, got, distinct, dropped = edge(keys, ids, [2, 2], C=C, E=4)
        assert torch.equal(got, case.kept) and distinct == 4 and dropped == 0


def test_single_token() -> None:
    # T = 1, K = 4 kept 3, C = 2: its floor and its next best pair; the third goes.
    _case, got, distinct, dropped = edge([[0.4, 0.3, 0.2, 0.1]], [[5, 6, 7, 8]], [3], C=2, E=9)
    assert got.tolist() == [[True, True, False, False]] and distinct == 2 and dropped == 1


def test_a_cut_pair_is_replaced_by_an_allowed_candidate() -> None:
    # Alloc-T keeps experts 0, 1 for token 0 and 2, 0 for token 1. C = 2 allows the floors {0, 2}:
    # token 0 loses expert 1 and takes its third candidate, expert 2, instead; no pair is dropped.
    keys = [[0.9, 0.5, 0.2], [0.9, 0.6, 0.1]]
    ids = [[0, 1, 2], [2, 0, 1]]
    _case, got, distinct, dropped = edge(keys, ids, [2, 2], C=2, E=4)
    assert got.tolist() == [[True, False, True], [True, True, False]]
    assert distinct == 2 and dropped == 0


def test_free_experts_do_not_count() -> None:
    # Token 0 is at b = 1.0 (group 0): its experts 4 and 5 are read anyway, so token 1 (C = 1) keeps
    # them besides its floor expert 0; expert 1 is cut.
    keys = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.8, 0.7]])
    ids = torch.tensor([[4, 5, 6], [0, 1, 5]])
    kept = torch.tensor([[True, True, True], [True, True, True]])
    case = Case(keys, ids, kept, torch.tensor([0, 1]), torch.tensor([7, 1]), 7, 1)
    got, distinct, dropped = case.run()
    assert got.tolist() == [[True, True, True], [True, False, True]]
    assert distinct == 4 and dropped == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kept": torch.ones(2, 3, dtype=torch.bool)}, "one \\[T, K\\] shape"),
        ({"cap_group": torch.zeros(3, dtype=torch.int64)}, "cap_group has shape"),
        ({"c_tok": torch.zeros(1, dtype=torch.int64)}, "c_tok has shape"),
        ({"k_base": 0}, "k_base=0"),
    ],
)
def test_bad_arguments_name_value_and_range(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "rank_keys": torch.rand(2, 2),
        "topk_ids": torch.tensor([[0, 1], [1, 2]]),
        "kept": torch.ones(2, 2, dtype=torch.bool),
        "cap_group": torch.zeros(2, dtype=torch.int64),
        "c_tok": torch.tensor([1, 1]),
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
        c_tok = torch.where(group == 0, 3, E)  # group 0 capped at 3, group 1 not capped
        args = (keys, ids, kept, group, c_tok)
        for a in args:  # as vLLM compiles: the token dim dynamic, everything else static
            torch._dynamo.mark_dynamic(a, 0)
        got, want = compiled(*args), cap_experts(*args, E, 1)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "T must not recompile"


@pytest.mark.parametrize("capability", ["avx2", "avx512"])  # Inductor writes different vector code for each
def test_compiles_fullgraph_with_dynamic_T(capability: str, tmp_path: Path) -> None:
    run_under_capability(capability, "test_cap", "check_compiles_fullgraph_with_dynamic_T", tmp_path)


def test_bench_kernel_caps_its_pruned_routing() -> None:
    """benchmarks/bench_kernel.py --caps: the pruned routing it times (a suffix of each row at −1) under
    the cap, on CPU: pruned slots stay pruned, kept pairs are a subset, and few experts remain."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_kernel

    gen = torch.Generator().manual_seed(0)
    T, E, K = 32, 64, 8
    weights, ids = torch.softmax(torch.randn(T, E, generator=gen), dim=-1).topk(K, dim=-1)
    pruned = torch.arange(K) >= 4
    ids, weights = ids.int().masked_fill(pruned, -1), weights.masked_fill(pruned, 0.0)
    capped_ids, capped_w = bench_kernel.cap_routing(ids, weights, 8, E)
    kept = capped_ids >= 0
    assert (kept <= (ids >= 0)).all() and torch.equal(capped_ids[kept], ids[kept])
    assert torch.equal(capped_w[kept], weights[kept]) and (capped_w[~kept] == 0).all()
    top1 = len(set(ids[:, 0].tolist()))
    assert kept[:, 0].all() and len(set(capped_ids[kept].tolist())) <= max(8, top1)
