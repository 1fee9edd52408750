"""Alloc-T (`vllm_alloc.routing.alloc_t.reallocate`): invariants, a loop oracle, named edge cases, compile.

Letters as in DESIGN.md §1: T tokens, K the model's top-k, E experts, K_base the per-token floor.
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

# Each example is a few ms; the oracle is a Python loop over at most 40·8 candidates.
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Case:
    keys: torch.Tensor  # [T, K] float32
    weights: torch.Tensor  # [T, K] float32 / bf16 / fp16
    ids: torch.Tensor  # [T, K] int32 / int64, distinct per row, in [0, E)
    k_tok: torch.Tensor  # [T] int64, 0 = padding
    group: torch.Tensor  # [T] int64 in [0, T)
    k_base: int

    def run(self, weights: str = "topk") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return reallocate(self.keys, self.weights, self.ids, self.k_tok, self.group, self.k_base, weights)


def make_case(
    keys: list[float], K: int, E: int, k_tok: list[int], group: list[int], k_base: int, seed: int = 0
) -> Case:
    T = len(k_tok)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]  # K distinct experts per token
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=1)
    return Case(
        keys=torch.tensor(keys, dtype=torch.float32).reshape(T, K),
        weights=w,
        ids=ids,
        k_tok=torch.tensor(k_tok, dtype=torch.int64),
        group=torch.tensor(group, dtype=torch.int64),
        k_base=k_base,
    )


@st.composite
def cases(draw: st.DrawFn, max_T: int = 40) -> Case:
    T = draw(st.integers(1, max_T))
    K = draw(st.integers(1, 8))
    E = draw(st.integers(K, K + 16))
    k_base = draw(st.integers(1, K))
    ties = draw(st.sampled_from([1, 2, 3, None]))  # None: continuous keys, otherwise many exact ties
    key_st = st.floats(-8, 8, width=32) if ties is None else st.integers(0, ties - 1).map(float)
    keys = draw(st.lists(key_st, min_size=T * K, max_size=T * K))
    k_tok = draw(st.lists(st.one_of(st.just(0), st.integers(k_base, K)), min_size=T, max_size=T))
    # Group ids drawn from a random subset of [0, T): unused ids are empty groups.
    used = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T, unique=True))
    group = draw(st.lists(st.sampled_from(used), min_size=T, max_size=T))
    case = make_case(keys, K, E, k_tok, group, k_base, seed=draw(st.integers(0, 2**16)))
    case.ids = case.ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    case.weights = case.weights.to(draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])))
    return case


def ranking(keys_row: list[float]) -> list[int]:
    """A token's own ranking: key descending, ties to the lower input column."""
    return sorted(range(len(keys_row)), key=lambda c: (-keys_row[c], c))


def oracle(case: Case) -> torch.Tensor:
    """Slow, obviously-right Alloc-T: per group, floor first, then greedy over the extra candidates.

    Greedy order is (key desc, column rank asc, token asc), the tie-break `reallocate` documents.
    """
    keys, k_tok, group = case.keys.tolist(), case.k_tok.tolist(), case.group.tolist()
    T, K = case.keys.shape
    kb = min(case.k_base, K)
    kept = [[False] * K for _ in range(T)]
    for g in set(group):
        toks = [t for t in range(T) if group[t] == g and k_tok[t] > 0]
        extra = sum(k_tok[t] - kb for t in toks)
        cands = []
        for t in toks:
            r = ranking(keys[t])
            for j in range(K):
                if j < kb:
                    kept[t][r[j]] = True
                else:
                    cands.append((-keys[t][r[j]], j, t, r[j]))
        for _, _, t, c in sorted(cands)[: max(extra, 0)]:
            kept[t][c] = True
    return torch.tensor(kept, dtype=torch.bool).reshape(T, K)


def check_invariants(case: Case, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    w, ids, kept = out
    T, K = case.keys.shape
    kb = min(case.k_base, K)
    assert w.shape == ids.shape == kept.shape == (T, K)
    assert (w.dtype, ids.dtype, kept.dtype) == (torch.float32, torch.int32, torch.bool)
    # Kept pairs carry the input id; pruned pairs are id -1 with weight 0.
    assert torch.equal(ids, torch.where(kept, case.ids.to(torch.int32), -1))
    assert torch.equal(w[~kept], torch.zeros_like(w[~kept]))

    n = kept.sum(dim=1)
    valid = case.k_tok > 0
    assert torch.all(n[~valid] == 0), "padding rows keep nothing"
    assert torch.all((n[valid] >= kb) & (n[valid] <= K)), "K_base <= k_t <= K"

    keys = case.keys.tolist()
    for t in range(T):  # kept set = prefix of the token's own ranking
        ranked = kept[t, ranking(keys[t])].tolist()
        assert ranked == sorted(ranked, reverse=True), f"token {t}: {ranked} is not a prefix"

    for g in case.group.unique().tolist():  # pool: never exceeded, used exactly when candidates suffice
        in_g = (case.group == g) & valid
        pool = int(case.k_tok[in_g].sum())
        used = int(n[in_g].sum())
        assert used == min(pool, K * int(in_g.sum())), f"group {g}: used {used} of pool {pool}"


@SETTINGS
@given(case=cases())
def test_random_cases_match_oracle_and_invariants(case: Case) -> None:
    out = case.run("topk")
    check_invariants(case, out)
    assert torch.equal(out[2], oracle(case))
    # "topk": kept pairs keep their input weight bit for bit.
    w_in = case.weights.float()
    assert torch.equal(out[0], torch.where(out[2], w_in, 0.0))


@SETTINGS
@given(case=cases())
def test_kept_mode_rescales_to_input_sum(case: Case) -> None:
    w_topk, ids_topk, kept_topk = case.run("topk")
    w, ids, kept = case.run("kept")
    assert torch.equal(kept, kept_topk) and torch.equal(ids, ids_topk), "the mode changes weights only"
    valid = case.k_tok > 0
    # fp32 sums of <= 8 terms, rescaled once: a few ulp.
    torch.testing.assert_close(w.sum(1)[valid], case.weights.float().sum(1)[valid], rtol=1e-5, atol=1e-6)
    assert torch.all(w[~valid] == 0)
    all_kept = kept.all(dim=1)
    assert torch.equal(w[all_kept], w_topk[all_kept]), "all-kept rows must not be rescaled at all"


@SETTINGS
@given(case=cases(), weights=st.sampled_from(["topk", "kept"]))
def test_full_budget_is_stock_routing_bit_for_bit(case: Case, weights: str) -> None:
    # b = 1.0: every token at K_l = K reproduces the stock router's ids and weights exactly.
    K = case.keys.shape[1]
    case.k_tok = torch.full_like(case.k_tok, K)
    w, ids, kept = case.run(weights)
    assert kept.all()
    assert torch.equal(ids, case.ids.to(torch.int32))
    assert torch.equal(w, case.weights.to(torch.float32))


@SETTINGS
@given(a=cases(max_T=20), b=cases(max_T=20), weights=st.sampled_from(["topk", "kept"]))
def test_request_scope_is_batch_invariant(a: Case, b: Case, weights: str) -> None:
    # Scope `request`: groups are requests, so a request's routing must not depend on its batch-mates.
    K = min(a.keys.shape[1], b.keys.shape[1])
    k_base = min(a.k_base, b.k_base)
    for c in (a, b):  # the two batches must share K and K_base to be concatenated
        c.keys, c.weights, c.ids = c.keys[:, :K], c.weights[:, :K].float(), c.ids[:, :K].long()
        c.k_tok = torch.where(c.k_tok > 0, c.k_tok.clamp(k_base, K), 0)
        c.k_base = k_base

    def cat(x: Case, y: Case) -> Case:
        Tx = x.keys.shape[0]
        return Case(
            keys=torch.cat([x.keys, y.keys]),
            weights=torch.cat([x.weights, y.weights]),
            ids=torch.cat([x.ids, y.ids]),
            k_tok=torch.cat([x.k_tok, y.k_tok]),
            group=torch.cat([x.group, y.group + Tx]),  # y's requests stay distinct from x's
            k_base=k_base,
        )

    Ta, Tb = a.keys.shape[0], b.keys.shape[0]
    alone_a, alone_b = a.run(weights), b.run(weights)
    ab, ba = cat(a, b).run(weights), cat(b, a).run(weights)
    for alone, joined in ((alone_a, ab), (alone_b, ba)):  # first in the batch
        assert all(torch.equal(x, y[: x.shape[0]]) for x, y in zip(alone, joined, strict=True))
    for alone, joined, offset in ((alone_b, ab, Ta), (alone_a, ba, Tb)):  # second in the batch
        assert all(torch.equal(x, y[offset:]) for x, y in zip(alone, joined, strict=True))


# ---------------------------------------------------------------------------------------------------
# Named edge cases


def run_named(case: Case) -> torch.Tensor:
    out = case.run()
    check_invariants(case, out)
    kept = out[2]
    assert torch.equal(kept, oracle(case))
    return kept


def test_single_token() -> None:
    # T = 1: Alloc-T degenerates to plain top-K_l of that token.
    case = make_case([0.1, 0.9, 0.5, 0.3], K=4, E=8, k_tok=[2], group=[0], k_base=1)
    assert run_named(case).tolist() == [[False, True, True, False]]


def test_empty_groups() -> None:
    # Empty groups: ids 0, 1, 2, 4, 5 are unused; only 3 and 6 hold tokens.
    keys = torch.rand(6, 4, generator=torch.Generator().manual_seed(1)).flatten().tolist()
    case = make_case(keys, K=4, E=8, k_tok=[2, 2, 3, 1, 2, 0], group=[3, 6, 3, 6, 3, 6], k_base=1)
    run_named(case)


def test_all_tokens_same_scores() -> None:
    # All tokens same scores: ties go column rank first, then token, so identical tokens share the extras
    # round-robin and the result is uniform top-K_l, each on the lowest input columns.
    T, K, k_l = 7, 6, 3
    case = make_case([0.5] * (T * K), K=K, E=16, k_tok=[k_l] * T, group=[0] * T, k_base=1)
    kept = run_named(case)
    assert torch.equal(kept, torch.arange(K).expand(T, K) < k_l)


def test_K_equals_E() -> None:
    # K = E: every expert is a candidate of every token.
    keys = torch.randn(5, 4, generator=torch.Generator().manual_seed(2)).flatten().tolist()
    case = make_case(keys, K=4, E=4, k_tok=[1, 4, 2, 3, 2], group=[0, 0, 1, 1, 0], k_base=1)
    run_named(case)


def test_every_token_at_k_base() -> None:
    # Every token at K_base: no extra slots, each token keeps exactly its top-K_base.
    keys = torch.randn(6, 5, generator=torch.Generator().manual_seed(3))
    case = make_case(keys.flatten().tolist(), K=5, E=9, k_tok=[2] * 6, group=[0, 0, 0, 1, 1, 2], k_base=2)
    kept = run_named(case)
    top2 = torch.zeros(6, 5, dtype=torch.bool).scatter(1, keys.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)


def test_one_group_covers_all_tokens() -> None:
    # One group covering all tokens: the paper's global top-(K_l·T) over the whole pass.
    keys = torch.randn(9, 8, generator=torch.Generator().manual_seed(4)).flatten().tolist()
    case = make_case(keys, K=8, E=64, k_tok=[4] * 9, group=[5] * 9, k_base=1)
    kept = run_named(case)
    assert int(kept.sum()) == 36


def test_k_base_equals_K() -> None:
    # K_base = K: the floor is the whole top-K; nothing is left to reallocate (no extra-candidate sort).
    keys = torch.randn(4, 3, generator=torch.Generator().manual_seed(5)).flatten().tolist()
    case = make_case(keys, K=3, E=8, k_tok=[3, 3, 0, 3], group=[0, 1, 0, 1], k_base=3)
    assert torch.equal(run_named(case), torch.tensor([True, True, False, True])[:, None].expand(4, 3))


def test_k_base_above_K_is_capped() -> None:
    # K_base > K (a model with a small top-k under a global floor setting) means K_base = K.
    case = make_case([0.2, 0.1, 0.3, 0.4], K=2, E=4, k_tok=[2, 2], group=[0, 0], k_base=5)
    _, ids, kept = case.run()
    assert kept.all() and torch.equal(ids, case.ids.to(torch.int32))


def test_floor_wins_over_a_short_pool() -> None:
    # k_tok < K_base (a budget file whose K_l is below the floor): the floor is kept, and the token's
    # deficit is paid from its group's extras, so the group exceeds its pool only by what the floor forces.
    keys = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    case = make_case(keys, K=3, E=6, k_tok=[1, 3, 2], group=[0, 0, 0], k_base=2)
    kept = case.run()[2]
    assert kept.sum(1).tolist() == [2, 2, 2]  # pool 6, floor 6: nothing extra for token 1


def test_empty_batch() -> None:
    # T = 0 (an empty dummy batch): shapes stay [0, K].
    case = make_case([], K=4, E=8, k_tok=[], group=[], k_base=1)
    w, ids, kept = case.run("kept")
    assert w.shape == ids.shape == kept.shape == (0, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_base": 0}, "k_base=0"),  # floor below 1
        ({"k_base": 1.5}, "k_base=1.5"),  # not an int
        ({"weights": "raw"}, "weights='raw'"),  # `raw` is not an Alloc-T mode
        ({"rank_keys": torch.rand(3, 4, 1)}, "2-D"),  # wrong rank
        ({"topk_ids": torch.zeros(3, 5, dtype=torch.int64)}, "topk_ids has shape"),  # K mismatch
        ({"k_tok": torch.zeros(4, dtype=torch.int64)}, "k_tok has shape"),  # T mismatch
        ({"group": torch.zeros(3, dtype=torch.float32)}, "group has dtype"),  # float group ids
        ({"rank_keys": torch.zeros(3, 4, dtype=torch.int64)}, "rank_keys has dtype"),  # integer keys
    ],
)
def test_bad_arguments_name_value_and_range(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "rank_keys": torch.rand(3, 4),
        "topk_weights": torch.rand(3, 4),
        "topk_ids": torch.zeros(3, 4, dtype=torch.int64),
        "k_tok": torch.ones(3, dtype=torch.int64),
        "group": torch.zeros(3, dtype=torch.int64),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        reallocate(**args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# torch.compile


def both_modes(
    keys: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, k_tok: torch.Tensor, group: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    # Both weight modes in one graph: one compile instead of two (compiling is most of this file's time).
    return reallocate(keys, w, ids, k_tok, group, 2, "topk"), reallocate(
        keys, w, ids, k_tok, group, 2, "kept"
    )


def check_compiles_fullgraph_with_dynamic_T() -> None:
    """Compiled == eager, one graph for all T. Called in a subprocess per ISA (see the test below)."""
    # Inductor on CPU needs a C++ compiler; without one, aot_eager still proves the graph traces in full
    # (no graph breaks, no host sync, no data-dependent shapes), which is what vLLM's compile relies on.
    backend = "inductor" if shutil.which("g++") or shutil.which("c++") else "aot_eager"
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(both_modes, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(6)
    for T in (6, 17):  # T = K on purpose: T is dynamic, K static, and they must not be unified
        K = 6
        args = (
            torch.randint(0, 4, (T, K), generator=gen).float(),  # keys with ties
            torch.softmax(torch.randn(T, K, generator=gen), dim=1),
            torch.rand(T, 32, generator=gen).argsort(1)[:, :K],
            torch.randint(2, K + 1, (T,), generator=gen) * (torch.arange(T) % 5 != 4),  # some padding
            torch.randint(0, 3, (T,), generator=gen),
        )
        for a in args:  # as vLLM compiles: the token dim dynamic (sizes >= 2), everything else static
            torch._dynamo.mark_dynamic(a, 0)
        (w, ids, kept), (w_kept, ids_kept, kept_kept) = compiled(*args)
        (w_ref, ids_ref, kept_ref), (w_kept_ref, _, _) = both_modes(*args)
        assert torch.equal(kept, kept_ref) and torch.equal(ids, ids_ref) and torch.equal(w, w_ref)
        assert torch.equal(kept_kept, kept_ref) and torch.equal(ids_kept, ids_ref)
        # Inductor may fuse the "kept" rescale differently (e.g. via a reciprocal): 1 ulp in fp32.
        torch.testing.assert_close(w_kept, w_kept_ref, rtol=2e-7, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "T must not recompile"


@pytest.mark.parametrize("capability", ["avx2", "avx512"])  # Inductor writes different vector code for each
def test_compiles_fullgraph_with_dynamic_T(capability: str, tmp_path: Path) -> None:
    # 30-60 s per ISA on 2 cores, nearly all of it the C++ build (each subprocess starts with no cache).
    run_under_capability(
        capability, "tests.routing.test_alloc_t", "check_compiles_fullgraph_with_dynamic_T", tmp_path
    )
