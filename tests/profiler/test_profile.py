"""Alloc-L profiling: the protocols and the guard with fake evaluators (fast), then one real profiling
run through vLLM on a tiny checkpoint whose first MoE layer was made to matter more (e2e)."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from vllm_alloc.budget import ModelFingerprint, load_budget_file
from vllm_alloc.budget.alloc_l import uniform
from vllm_alloc.cli import main as cli_main
from vllm_alloc.profiler import guard, protocols, runner
from vllm_alloc.profiler.build import build_budget_file, profile_to_file
from vllm_alloc.profiler.calibration import CalibrationData, load_calibration
from vllm_alloc.profiler.engine import decode_order


def additive(weights: Sequence[float]) -> protocols.Evaluate:
    """Fake metric: Σ_l w_l / K_l (layer l hurts w_l-times more when starved), same on both splits."""

    def evaluate(ks: Sequence[int], split: str) -> float:
        return 1.0 + sum(w / k for w, k in zip(weights, ks, strict=True))

    return evaluate


def paired(
    weights: Sequence[float],
    n: int = 48,
    noise: float = 1e-3,
    alloc_t_cost: float = 0.0,
    calls: list[tuple[tuple[int, ...], bool, str]] | None = None,
    carry_gain: float = 0.0,
) -> guard.Validate:
    """Fake held-out runs: per-sequence mean NLL = the sequence's own difficulty (shared by every
    configuration, so pairing cancels it) + log of the additive metric + independent noise per run;
    Alloc-T adds `alloc_t_cost` in prefill, carrying the balance `-carry_gain` in decode."""
    difficulty = np.random.default_rng(0).normal(3.0, 0.5, n)

    def validate(ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> list[float]:
        if calls is not None:
            calls.append((tuple(ks), alloc_t, regime))
        key = (tuple(ks), alloc_t, regime) + (("carry",) if carry else ())
        rng = np.random.default_rng(zlib.crc32(repr(key).encode()))
        cost = alloc_t_cost if alloc_t and regime == "prefill" else 0.0
        cost -= carry_gain if carry else 0.0
        metric = math.log(additive(weights)(ks, "heldout"))
        return list(difficulty + metric + cost + rng.normal(0.0, noise, n))

    return validate


class Counting:
    def __init__(self, inner: protocols.Evaluate) -> None:
        self.inner = inner
        self.calls: list[tuple[tuple[int, ...], str]] = []

    def __call__(self, ks: Sequence[int], split: str) -> float:
        self.calls.append((tuple(ks), split))
        return self.inner(ks, split)


@pytest.mark.parametrize(
    "L, K, k_base",
    [
        (1, 1, 1),  # a single layer at K = 1: only the all-K run
        (2, 4, 1),  # the tiny qwen3_moe
        (4, 4, 1),
        (3, 6, 2),  # K_base > 1: the sweep stops at K_base, deeper layers sit at K_base
        (26, 6, 1),  # DeepSeek-V2-Lite's shape
    ],
)
def test_isolating_runs_exactly_L_times_K_minus_1_plus_1(L: int, K: int, k_base: int) -> None:
    ev = Counting(additive([1.0] * L))
    S = protocols.isolating_sensitivity(ev, L, K, k_base)
    assert len(ev.calls) == L * (K - k_base) + 1
    assert len(set(ev.calls)) == len(ev.calls)  # no configuration twice
    assert all(split == "profile" for _, split in ev.calls)
    assert all(math.isfinite(v) for row in S for v in row)
    # Deep to shallow: the first run is all K, the last one has layer 0 at K_base.
    assert ev.calls[0][0] == (K,) * L
    assert ev.calls[-1][0][0] == k_base
    # The shared configuration: S[l][K] is the run of S[l+1][K_base].
    for l in range(L - 1):
        assert S[l][K - 1] == S[l + 1][k_base - 1]


def test_isolating_matrix_is_the_paper_definition() -> None:
    L, K = 3, 4
    ev = additive([3.0, 1.0, 2.0])
    S = protocols.isolating_sensitivity(ev, L, K)
    for l in range(L):
        for k in range(1, K + 1):
            assert S[l][k - 1] == ev([K] * l + [k] + [1] * (L - l - 1), "profile")


def test_operating_point_sweeps_one_layer_around_uniform() -> None:
    L, K, B = 4, 4, 8
    ev = Counting(additive([1.0, 2.0, 3.0, 4.0]))
    S = protocols.operating_point_sensitivity(ev, L, K, B)
    assert len(ev.calls) == L * (K - 1) + 1
    base = uniform(L, K, B)
    for l in range(L):
        for k in range(1, K + 1):
            assert S[l][k - 1] == ev.inner([*base[:l], k, *base[l + 1 :]], "profile")


def test_unequal_layers_get_more_experts_where_they_matter() -> None:
    L, K = 4, 4
    B = L * K // 2
    w = [8.0, 1.0, 1.0, 1.0]
    result = runner.profile(additive(w), L, K, budgets=[B], validate=paired(w))
    alloc = result.allocations[B - L]
    # A DP ships; in this fake Alloc-T changes nothing, so with or without it is the selection's noise.
    assert alloc["chosen"].removesuffix(" (no Alloc-T)") in ("isolating", "operating-point")
    assert alloc["k"][0] > max(alloc["k"][1:])
    assert alloc["k"][0] == K


def fake_thresholds(ks: Sequence[int]) -> list[float | None]:
    return [None if k == 1 else 0.1 * k for k in ks]


@pytest.mark.parametrize(("gain", "ships"), [(0.02, True), (-0.02, False), (0.0, False)])
def test_guard_ships_the_carried_balance_only_where_decode_improves(gain: float, ships: bool) -> None:
    """Carrying changes only the decode regime: its candidates share prefill runs with their twins, and
    ship (with their θ) only where decode is better with confidence against both uniforms."""
    L, K = 4, 4
    w = [1.0] * 4  # equal layers: the DPs land on uniform, so only carrying can beat the baselines
    calls: list[tuple[tuple[int, ...], bool, str]] = []
    validate = paired(w, alloc_t_cost=-0.01, carry_gain=gain, calls=calls)
    result = runner.profile(additive(w), L, K, budgets=[8], validate=validate, thresholds=fake_thresholds)
    a = result.allocations[8 - L]
    assert [c["name"] for c in a["candidates"]][-1] == "operating-point + carry"
    if ships:
        assert a["chosen"].endswith(" + carry") and a["carry"] == fake_thresholds(a["k"])
    else:
        assert "carry" not in a and not a["chosen"].endswith(" + carry")
    # Prefill of a carrying candidate is its twin's run: one prefill run per (vector, Alloc-T).
    prefill = [c for c in calls if c[2] == "prefill"]
    assert len(prefill) == len(set(prefill))
    bf = build_budget_file(
        fingerprint(L, K),
        result,
        CalibrationData(profile=[[1, 2]] * 2, heldout=[[1, 2]] * 48, source="fake", seq_len=2, split="fake"),
        requested=[8],
        carry_alpha=0.05,
    )
    assert bf.carrying()[8] is ships and bf.carry_alpha == 0.05
    if ships:
        assert bf.carry_table()[8].tolist() == [0.2 if k == 2 else math.inf for k in a["k"]]


def test_carrying_needs_its_thresholds() -> None:
    w = [1.0] * 2
    cands = [("uniform", [2, 2], True, False), ("uniform (no Alloc-T)", [2, 2], False, False)]
    with pytest.raises(ValueError, match="need thresholds"):
        guard.select([*cands, ("uniform + carry", [2, 2], True, True)], guard.Validations(paired(w)))
    with pytest.raises(ValueError, match="neither carrying"):
        guard.select(
            [(*cands[0][:3], True), cands[1]], guard.Validations(paired(w)), thresholds=fake_thresholds
        )


def test_guard_picks_uniform_when_candidates_measure_worse() -> None:
    # The profile split says layer 0 matters; the held-out split says the opposite. Every non-uniform
    # candidate then measures worse than uniform on held-out data, and must not ship.
    # Alloc-T helps in prefill (1 %), so the fallback is uniform with Alloc-T.
    L, K = 4, 4
    result = runner.profile(
        additive([8.0, 1.0, 1.0, 1.0]),
        L,
        K,
        budgets=[6, 8, 12],
        validate=paired([1.0, 8.0, 8.0, 8.0], alloc_t_cost=-0.01),
    )
    for a in result.allocations:
        assert a["k"] == uniform(L, K, a["budget"]) and a["chosen"] == "uniform" and a["alloc_t"], a
        for c in a.get("candidates", [])[2:]:  # B = A has none
            if c["allocation"] != a["k"]:  # a DP away from uniform: worse on the held-out split
                assert c["measured"] > a["candidates"][0]["measured"]
                assert max(t["delta"] for t in c["tests"] if t["baseline"] == "uniform") > 0
    at8 = result.allocations[8 - L]
    assert [c["name"] for c in at8["candidates"]] == [
        "uniform",
        "uniform (no Alloc-T)",
        "isolating",
        "isolating (no Alloc-T)",
        "operating-point",
        "operating-point (no Alloc-T)",
    ]
    assert any(c["allocation"] != at8["k"] for c in at8["candidates"])  # there was something to refuse


def test_a_gain_inside_the_noise_does_not_ship() -> None:
    # The same true gains, measured with little and with much per-sequence noise: the guard ships the
    # candidates only where the paired intervals exclude zero.
    # Uniform gives spare experts to the first layers, the DPs to the last, which matters most here.
    L, K, w = 4, 4, [1.0, 1.0, 1.0, 2.0]
    quiet = runner.profile(additive(w), L, K, budgets=[8], validate=paired(w, noise=1e-4))
    noisy = runner.profile(additive(w), L, K, budgets=[8], validate=paired(w, noise=1.0))
    assert any(a["k"] != uniform(L, K, a["budget"]) for a in quiet.allocations)
    for a in noisy.allocations:  # a baseline: uniform, with Alloc-T only where that was confirmed
        assert a["k"] == uniform(L, K, a["budget"]) and a["chosen"].startswith("uniform") and "carry" not in a
    assert noisy.widths and min(noisy.widths) > max(quiet.widths)


def test_alloc_t_is_turned_off_where_it_loses() -> None:
    # Equal layers (the DPs land on uniform) and Alloc-T 1 % worse in prefill: every validated B runs the
    # uniform vector without Alloc-T, and decode, where Alloc-T has nothing to move, is one run for both.
    L, K, w = 4, 4, [1.0] * 4
    calls: list[tuple[tuple[int, ...], bool, str]] = []
    result = runner.profile(
        additive(w), L, K, budgets=[8], validate=paired(w, alloc_t_cost=0.01, calls=calls)
    )
    for a in result.allocations[:-1]:
        assert a["chosen"] == "uniform (no Alloc-T)" and not a["alloc_t"], a
        assert a["k"] == uniform(L, K, a["budget"])
        twin = a["candidates"][1]
        by = {(t["baseline"], t["regime"]): t for t in twin["tests"]}
        assert by["uniform", "decode"] == {
            "regime": "decode",
            "baseline": "uniform",
            "delta": 0.0,
            "low": 0.0,
            "high": 0.0,
        }
        assert by["uniform", "prefill"]["high"] < 0
    assert len(calls) == len(set(calls))  # every run once
    assert all(on for _, on, regime in calls if regime == "decode")


def test_a_challenger_that_is_a_baseline_does_not_ship_under_its_own_name() -> None:
    # A DP that lands on the uniform vector, with Alloc-T, is the "uniform" baseline: better than the
    # baseline without Alloc-T, but it must not ship as "isolating".
    w = [1.0] * 4
    validations = guard.Validations(paired(w, alloc_t_cost=-0.01))  # Alloc-T helps in prefill
    cands = [
        ("uniform", [2] * 4, True, False),
        ("uniform (no Alloc-T)", [2] * 4, False, False),
        ("isolating", [2] * 4, True, False),
    ]
    a = guard.select(cands, validations).allocation
    assert a["chosen"] == "uniform" and a["alloc_t"]
    iso = a["candidates"][2]
    assert [t["high"] < 0 for t in iso["tests"] if t["baseline"] != "uniform"] == [True, False]
    assert all(t["low"] == t["high"] == 0.0 for t in iso["tests"] if t["baseline"] == "uniform")


def test_paired_test_is_the_interval_of_the_mean_difference() -> None:
    d = np.array([-0.02, -0.01, 0.0, -0.03, -0.015, -0.025])
    got = guard.paired_test(d + 3.0, np.full(d.size, 3.0), confidence=0.95)
    half = 1.959963984540054 * d.std(ddof=1) / math.sqrt(d.size)
    assert got["delta"] == pytest.approx(math.expm1(d.mean()), rel=1e-9)
    assert got["low"] == pytest.approx(math.expm1(d.mean() - half), rel=1e-9)
    assert got["high"] == pytest.approx(math.expm1(d.mean() + half), rel=1e-9)
    assert got["high"] < 0
    assert guard.paired_test([1.0, 2.0], [1.0, 2.0]) == {"delta": 0.0, "low": 0.0, "high": 0.0}
    with pytest.raises(ValueError, match="≥ 2 sequences"):
        guard.paired_test([1.0], [1.0])
    with pytest.raises(ValueError, match=r"confidence = 1.5 is outside the valid range \(0, 1\)"):
        guard.paired_test([1.0, 2.0], [1.5, 2.0], confidence=1.5)


def test_ties_go_to_uniform_and_equal_configurations_share_one_run() -> None:
    seen: list[tuple[tuple[int, ...], bool, str]] = []

    def validate(ks: Sequence[int], alloc_t: bool, regime: str, carry: bool = False) -> list[float]:
        seen.append((tuple(ks), alloc_t, regime))
        return [5.0, 5.1, 4.9, 5.2]  # everything measures the same

    cands = [
        ("uniform", [2, 2], True, False),
        ("uniform (no Alloc-T)", [2, 2], False, False),
        ("isolating", [3, 1], True, False),
    ]
    cands.append(("operating-point", [2, 2], True, False))
    a = guard.select(cands, guard.Validations(validate)).allocation
    # Nothing differs, so nothing is confirmed, Alloc-T included: uniform without it ships.
    assert a["chosen"] == "uniform (no Alloc-T)" and a["k"] == [2, 2] and not a["alloc_t"]
    assert seen == [
        ((2, 2), True, "prefill"),
        ((2, 2), True, "decode"),
        ((2, 2), False, "prefill"),
        ((3, 1), True, "prefill"),
        ((3, 1), True, "decode"),
    ]
    with pytest.raises(ValueError, match="first candidates must be 'uniform'"):
        guard.select([("isolating", [3, 1], True, False)], guard.Validations(validate))


def test_unmeasured_budgets_keep_uniform() -> None:
    # L·K large enough that only requested budgets and multiples of L are validated.
    L, K = 8, 6
    w = [4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    calls: list[tuple[tuple[int, ...], bool, str]] = []
    result = runner.profile(
        additive(w), L, K, budgets=[21], all_budgets_up_to=8, validate=paired(w, calls=calls)
    )
    assert result.validated == [8, 16, 21, 24, 32, 40]
    for a in result.allocations:
        if a["budget"] not in result.validated:
            assert a["chosen"] == "uniform" and "candidates" not in a
            assert a["k"] == uniform(L, K, a["budget"])
    assert {sum(ks) for ks, _, _ in calls} == set(result.validated)
    assert result.allocations[-1]["k"] == [K] * L


def test_memo_runs_each_configuration_once() -> None:
    ev = Counting(additive([2.0, 1.0]))
    memo = runner.Memo(ev)
    result = runner.profile(memo, 2, 4, budgets=[2, 4, 6], validate=paired([2.0, 1.0]))
    assert memo.runs == len(ev.calls) == len(set(ev.calls))
    profile_runs = sum(1 for _, split in ev.calls if split == "profile")
    assert profile_runs == len(ev.calls) == runner.planned_profile_runs(2, 4, [2, 4, 6], protocols.PROTOCOLS)
    assert sorted(result.operating_point) == [2, 4, 6]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budgets": [1]}, r"B = \[1\] are outside the valid range \[L·K_base = 2, A = 8\]"),
        ({"budgets": [4], "protocols": ["paper"]}, "protocols \\['paper'\\] are not valid"),
        ({"budgets": [4], "k_base": 5}, r"k_base = 5 is outside the valid range \[1, K = 4\]"),
        ({"budgets": [4], "regimes": ["decode N=8"]}, r"regimes \['decode N=8'\] are not valid"),
    ],
)
def test_bad_arguments_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        runner.profile(additive([1.0, 1.0]), 2, 4, validate=paired([1.0, 1.0]), **kwargs)


def test_non_finite_metric_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="gave nan"):
        protocols.isolating_sensitivity(lambda ks, split: math.nan, 2, 2)


# -- files, CLI errors (no vLLM) -----------------------------------------------------------------------------
def fingerprint(L: int = 4, K: int = 4) -> ModelFingerprint:
    return ModelFingerprint(
        architecture="Qwen3MoeForCausalLM",
        moe_layers=list(range(L)),
        num_experts=16,
        top_k=K,
        hidden_size=128,
        intermediate_size=64,
    )


def calibration(n_profile: int = 3, n_heldout: int = 48, seq_len: int = 8) -> CalibrationData:
    seqs = [[i] * seq_len for i in range(n_profile + n_heldout)]
    return CalibrationData(seqs[:n_profile], seqs[n_profile:], "test", seq_len, "first 3 / last 48")


def test_written_file_round_trips_through_the_loader(tmp_path: Path) -> None:
    out = tmp_path / "configs" / "tiny.json"
    w = [8.0, 1.0, 1.0, 1.0]
    calls: list[tuple[tuple[int, ...], bool, str]] = []
    bf, runs = profile_to_file(
        additive(w),
        paired(w, calls=calls),
        fingerprint(),
        calibration(),
        [0.33, 0.5, 0.75],
        out,
        progress=False,
    )
    loaded = load_budget_file(out)
    assert loaded == bf
    assert [s.protocol for s in loaded.sensitivities] == ["isolating"] + ["operating-point"] * 3
    assert [s.budget for s in loaded.sensitivities] == [None, 5, 8, 12]
    assert loaded.sensitivities[0].calibration.split == "first 3 / last 48"
    chosen = loaded.allocations[8 - 4]
    assert loaded.k_vector(0.5)[0] == 4
    assert chosen.chosen.removesuffix(" (no Alloc-T)") in ("isolating", "operating-point")
    winner = next(c for c in chosen.candidates if c.name == chosen.chosen)
    pairs = {(b, r) for b in ("uniform", "uniform (no Alloc-T)") for r in ("prefill", "decode")}
    assert {(t.baseline, t.regime) for t in winner.tests} == pairs
    assert winner.confirmed() and {(t.baseline, t.regime) for t in winner.confirmation} == pairs
    assert loaded.guard is not None and loaded.guard.sequences == 48 and loaded.guard.confidence == 0.95
    assert loaded.guard.regimes == ["prefill", "decode"] and 0 < loaded.guard.resolution < 0.002
    assert "The first 12 sequences select one candidate per B; the other 36" in loaded.notes
    assert "Held-out perplexity at b = 1.0" in loaded.notes
    assert not list(out.parent.glob(".*tmp"))  # the temporary file is gone
    # Every profile-split configuration once, every held-out (configuration, regime) once, b = 1.0 included.
    assert len(calls) == len(set(calls)) and ((4,) * 4, True, "prefill") in calls
    assert runs == len(calls) + runner.planned_profile_runs(4, 4, [5, 8, 12], protocols.PROTOCOLS)


def test_interrupt_leaves_no_file(tmp_path: Path) -> None:
    out = tmp_path / "x.json"
    calls = {"n": 0}

    def evaluate(ks: Sequence[int], split: str) -> float:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        profile_to_file(evaluate, paired([1.0] * 4), fingerprint(), calibration(), [0.5], out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_budget_below_the_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--budgets: activation budget b = 0.1 is outside the valid range"):
        profile_to_file(
            additive([1.0] * 4), paired([1.0] * 4), fingerprint(), calibration(), [0.1], tmp_path / "x.json"
        )


def test_non_moe_model_is_refused_before_vllm_starts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    assert cli_main(["profile", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert "is not a Mixture-of-Experts model" in err and "num_experts" in err
    assert cli_main(["profile", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o.json")]) == 2
    assert "no config.json there" in capsys.readouterr().err


def test_unreadable_calibration_names_the_path(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tiny_model("qwen3_moe")
    missing = tmp_path / "missing.txt"
    assert cli_main(["profile", str(model), "--calib", str(missing), "--out", str(tmp_path / "o.json")]) == 2
    assert f"calibration file {missing}: no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert cli_main(["profile", str(model), "--calib", str(bad), "--out", str(tmp_path / "o.json")]) == 2
    assert 'line 2 has no string field "text"' in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()
    # Too few held-out sequences for the guard's split: refused before vLLM starts, naming the flags.
    args = ["profile", str(model), "--tokens", "768", "--seq-len", "128", "--out", str(tmp_path / "o.json")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--tokens 768 with --seq-len 128 and --heldout 0.5 gives 3 held-out sequences" in err
    assert "the guard needs at least 4 (2 to select, 2 to confirm)" in err
    assert not (tmp_path / "o.json").exists()


def test_calibration_formats_agree(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model("qwen3_moe")))
    text = "def f(x):\n    return x + 1\n" * 40
    ids = tok.encode(text, add_special_tokens=False)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "a.tokens").write_text(" ".join(map(str, ids)))
    np.save(tmp_path / "a.npy", np.asarray(ids, dtype=np.int64))
    torch.save(torch.tensor(ids), tmp_path / "a.pt")
    got = {}
    for name in ("a.txt", "a.jsonl", "a.tokens", "a.npy", "a.pt"):
        c = load_calibration(tmp_path / name, tok, tokens=64, seq_len=16, vocab_size=len(tok))
        got[name] = (c.profile, c.heldout)
        assert len(c.profile) == 3 and len(c.heldout) == 1 and c.tokens == 64
    assert len({json.dumps(v) for v in got.values()}) == 1
    default = load_calibration(None, tok, tokens=256, seq_len=64, vocab_size=len(tok))
    assert "standard library" in default.source and default.tokens == 256
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        (tmp_path / "b.tokens").write_text("1 2 999999")
        load_calibration(tmp_path / "b.tokens", tok, tokens=64, seq_len=1 + 1, vocab_size=len(tok))


# -- e2e: a real profiling run through vLLM ------------------------------------------------------------------
SCALE = 8.0  # layer 0's experts write 8× larger outputs, so cutting them moves the model the most
# Random weights predict almost uniformly (perplexity ≈ vocabulary size), where pruning changes nothing
# measurable; a 20× sharper output head gives peaked predictions, so hidden-state changes show.
HEAD_SCALE = 20.0
SEQ_LEN, N_SEQ = 64, 32  # 2048 calibration tokens: 16 profile + 16 held-out sequences (--heldout 0.5)


def scaled_checkpoint(src: Path, dst: Path, factor: float) -> Path:
    """Copy of `src` whose MoE layer 0 expert down-projections are multiplied by `factor` (and the output
    head by HEAD_SCALE)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in weights:
        if name.startswith("model.layers.0.mlp.experts.") and name.endswith("down_proj.weight"):
            weights[name] = weights[name] * factor
        elif name == "lm_head.weight":
            weights[name] = weights[name] * HEAD_SCALE
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def sample_tokens(model_dir: Path, n: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """n sequences sampled (temperature 1) from the full model itself, flattened. On its own samples the
    full model has the lowest expected perplexity, so a random-weight model still has a well-defined
    'damage' from pruning, largest where the pruned layer matters most."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    start = torch.randint(3, model.config.vocab_size, (n, 1))
    with torch.no_grad():
        out = model.generate(
            start,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=0,
        )
    assert out.shape == (n, seq_len)
    return out.flatten().numpy().astype(np.int64)


@pytest.fixture(scope="module")
def profiled(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    import subprocess
    import sys
    import time

    tmp = tmp_path_factory.mktemp("profile")
    model = scaled_checkpoint(tiny_model("qwen3_moe", num_layers=4), tmp / "model", SCALE)
    np.save(tmp / "calib.npy", sample_tokens(model, N_SEQ, SEQ_LEN))
    out = tmp / "configs" / "tiny.json"
    # --all-budgets-up-to 0: validate only the requested B and multiples of L (4, 8, 12), to keep it short;
    # the distinct-expert cap at one share and 2 and 4 streams (in a child process, `_caps_command`).
    args = (
        f"--tokens {N_SEQ * SEQ_LEN} --seq-len {SEQ_LEN} --budgets 0.5 --all-budgets-up-to 0 --dtype float32 "
        "--cap-streams 2,4 --cap-shares 0.5"
    )
    cmd = [sys.executable, "-m", "vllm_alloc.cli", "profile", str(model), "--calib", str(tmp / "calib.npy")]
    cmd += [*args.split(), "--out", str(out)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"\nprofile CLI: {time.monotonic() - t0:.0f} s\n{proc.stdout}")
    return {
        "model": model,
        "out": out,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "seconds": time.monotonic() - t0,
        "calib": tmp / "calib.npy",
    }


@pytest.mark.e2e
def test_profile_gives_the_scaled_layer_more_experts(profiled: dict) -> None:
    bf = load_budget_file(profiled["out"])  # round-trips through the loader
    assert bf.model.moe_layers == [0, 1, 2, 3] and bf.model.top_k == 4 and bf.model.num_experts == 16
    assert "profile: 100%|" in profiled["stderr"]  # the progress bar ran to the end
    iso = bf.sensitivities[0]
    assert iso.protocol == "isolating" and iso.calibration.tokens == N_SEQ * SEQ_LEN
    # Cutting layer 0 from K to 1 hurts more than cutting any other layer (isolating rows, Δ over k).
    spread = [row[0] - row[-1] for row in iso.matrix]
    assert spread[0] > max(spread[1:]), spread
    a = bf.allocations[bf.absolute_budget(0.5) - 4]
    by_name = {c.name: c for c in a.candidates}
    assert set(by_name) == {
        name + suffix
        for name in ("uniform", "isolating", "operating-point")
        for suffix in ("", " (no Alloc-T)", " + carry")
    }
    for name in ("uniform", "isolating", "operating-point"):  # carrying changes decode only
        carried, twin = by_name[name + " + carry"], by_name[name]
        assert carried.carry and carried.measured == twin.measured and carried.decode != twin.decode
    assert (a.carry is not None) == by_name[a.chosen].carry and (a.carry is None or len(a.carry) == 4)
    for name in ("isolating", "operating-point"):
        ks = by_name[name].allocation
        assert ks[0] >= max(ks[1:]), (name, ks)
    assert a.k[0] >= max(a.k[1:])
    for alloc in bf.allocations:  # the guard held everywhere: a shipped challenger was confirmed
        chosen = next((c for c in alloc.candidates if c.name == alloc.chosen), None)
        if chosen is not None and chosen.name not in ("uniform", "uniform (no Alloc-T)"):
            assert chosen.confirmed() and all(t.high < 0 for t in chosen.confirmation if not t.same)
    g = bf.guard
    assert g is not None and g.sequences == N_SEQ // 2 and g.resolution > 0
    assert g.selection_sequences == N_SEQ // 8 and g.comparisons is not None and g.comparisons > 10
    assert g.confirmation_confidence == pytest.approx(1 - 0.05 / g.comparisons)
    # 12 confirmation sequences cannot resolve 0.2 %: said on stderr, in the file and by `show`.
    assert not g.resolved and g.tokens_to_resolve is not None and g.tokens_to_resolve > N_SEQ * SEQ_LEN
    assert "WARNING: the 12 confirmation sequences resolve" in profiled["stderr"]
    assert f"about {g.tokens_to_resolve} calibration tokens would resolve it" in profiled["stderr"]
    assert "WARNING: the confirmation resolves" in bf.notes
    assert "chosen" in profiled["stdout"] and "operating-point" in profiled["stdout"]  # the summary table
    # The cap was chosen at the requested B only, from its tests (N = 2 first; N = 4 where 2 passed).
    assert bf.guard.cap_streams == [2, 4] and bf.guard.cap_keep == 0.5
    assert "choosing the distinct-expert caps" in profiled["stderr"]
    tests = [(t.share, t.streams) for t in a.cap_tests if t.split == "selection"]
    assert tests in ([(0.5, 2)], [(0.5, 2), (0.5, 4)]), tests
    chose = all(t.passes(0.5) for t in a.cap_tests if t.split == "selection") and len(tests) == 2
    confirmation = [t for t in a.cap_tests if t.split == "confirmation"]
    assert [(t.share, t.streams) for t in confirmation] == ([(0.5, 2), (0.5, 4)] if chose else [])
    assert (a.cap is not None) == (chose and all(t.passes(0.5) for t in confirmation))
    assert all(not x.cap_tests and x.cap is None for x in bf.allocations if x is not a)


@pytest.mark.e2e
def test_served_model_accepts_the_file_and_counts_the_vector(
    profiled: dict,
) -> None:
    # Start the engine with the written budget file: the integration validates it against the model. (Its
    # engine core runs in a process of its own: in-process, the worker would share this test process,
    # where vLLM's worker start-up trips over numba modules other tests loaded.)
    from vllm import LLM

    from vllm_alloc.profiler.calibration import load_calibration
    from vllm_alloc.profiler.engine import fingerprint, read_moe_config, shutdown_llm
    from vllm_alloc.profiler.evaluator import VllmEvaluator

    llm = LLM(
        model=str(profiled["model"]),
        dtype="float32",
        max_model_len=SEQ_LEN + 1,
        max_num_seqs=64,
        max_num_batched_tokens=2048,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        enable_prefix_caching=False,
        additional_config={"vllm_alloc": {"budget_file": str(profiled["out"]), "scope": "request"}},
    )
    try:
        counters = llm.collective_rpc("vllm_alloc_counters")[0]
        bf = load_budget_file(profiled["out"])
        assert fingerprint(read_moe_config(profiled["model"]), counters) == bf.model
        calib = load_calibration(
            profiled["calib"],
            llm.get_tokenizer(),
            tokens=N_SEQ * SEQ_LEN,
            seq_len=SEQ_LEN,
            vocab_size=1024,
            profile_fraction=0.5,  # the profiler's default split
        )
        evaluate = VllmEvaluator(llm, calib, bf.model)
        ks = [4, 2, 1, 1]
        before = np.asarray(counters["used"])
        ppl = evaluate(ks, "heldout")
        after = np.asarray(llm.collective_rpc("vllm_alloc_counters")[0]["used"])
        tokens = len(calib.heldout) * SEQ_LEN
        assert (after - before)[:, sum(ks)].tolist() == [k * tokens for k in ks]  # pool exact per layer
        assert math.isfinite(ppl) and ppl > 1
        # The guard's held-out runs reproduce what the profiler recorded, for the chosen vector at b = 0.5:
        # decode (scope `token`), and prefill without Alloc-T (scope `budget` with the B's flag off). Both
        # are per token, so they do not depend on how this engine's core happens to batch the sequences
        # (its first step may start before the last one arrives; the profiler's core is in-process).
        chosen = bf.allocations[8 - 4]
        by_name = {c.name: c for c in chosen.candidates}
        base_name = chosen.chosen.removesuffix(" (no Alloc-T)")
        winner, twin = by_name[base_name], by_name[base_name + " (no Alloc-T)"]
        assert winner.allocation == twin.allocation == chosen.k
        for regime, alloc_t, recorded in (("decode", True, winner.decode), ("prefill", False, twin.measured)):
            nll = evaluate.validate(chosen.k, alloc_t, regime)
            assert len(nll) == len(calib.heldout)
            assert math.exp(sum(nll) / len(nll)) == pytest.approx(recorded, rel=1e-4), regime
    finally:
        llm.collective_rpc("vllm_alloc_reset_allocation")
        shutdown_llm(llm)


@pytest.mark.e2e
def test_a_served_lone_stream_decodes_as_the_profiler_validated_it(profiled: dict, tmp_path: Path) -> None:
    """Served as a lone stream, the file's configuration at b = 0.5 (its vector, Alloc-T, θ, pool and cap
    as loaded: nothing set by RPC, the file's scope) gives the decode figure the profiler recorded for the
    candidate that ships: each held-out sequence its own request, a token per pass (decode order: equal to
    a real decode loop, tests/integration), in an engine serving the file."""
    from transformers import AutoTokenizer

    from tests.integration.test_engines_e2e import drive
    from vllm_alloc.profiler.calibration import load_calibration
    from vllm_alloc.profiler.evaluator import request_budget

    bf = load_budget_file(profiled["out"])
    calib = load_calibration(
        profiled["calib"],
        AutoTokenizer.from_pretrained(str(profiled["model"])),
        tokens=N_SEQ * SEQ_LEN,
        seq_len=SEQ_LEN,
        vocab_size=1024,
        profile_fraction=0.5,
    )
    b = request_budget(bf, 8)
    runs = [
        {"prompts": [{"prompt_token_ids": ids}], "budgets": [b], "max_tokens": 1, "decode_order": True}
        for ids in calib.heldout
    ]
    engine = {
        "llm_kwargs": {"dtype": "float32"},
        "additional_config": {"vllm_alloc": {"budget_file": str(profiled["out"])}},
        "runs": runs,
    }
    results, _ = drive(tmp_path, profiled["model"], [engine], name="lone")
    served = [-float(np.mean(run["prompt_logprobs"][0])) for run in results[0]["runs"]]
    a = bf.allocations[8 - 4]
    shipped = next(c for c in a.candidates if c.name == a.chosen)
    assert len(served) == len(calib.heldout) and shipped.decode is not None
    # A candidate that carries was validated in decode order too (every held-out sequence in each pass,
    # not one: float32 rounding apart). One that does not was validated in one teacher-forced pass
    # (scope `token`), whose rounding differs from a token per pass by a few 1e-4 (seen: 3.1e-4 on
    # CI), far inside the guard's intervals.
    tolerance = 1e-4 if shipped.carry else 1e-3
    assert math.exp(float(np.mean(served))) == pytest.approx(shipped.decode, rel=tolerance), (
        a.chosen,
        a.carry,
    )


def test_decode_order_sets_and_restores_the_prefill_chunk() -> None:
    """`decode_order` prefills one token per pass inside the block (vLLM's long_prefill_token_threshold),
    restores the engine's value after it, also on an error, and refuses an engine it cannot reach."""
    from types import SimpleNamespace

    config = SimpleNamespace(enable_chunked_prefill=True, long_prefill_token_threshold=0)
    core = SimpleNamespace(engine_core=SimpleNamespace(scheduler=SimpleNamespace(scheduler_config=config)))
    llm = SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core))
    with decode_order(llm):
        assert config.long_prefill_token_threshold == 1
    assert config.long_prefill_token_threshold == 0
    with pytest.raises(KeyError), decode_order(llm):
        raise KeyError("a failed generate")
    assert config.long_prefill_token_threshold == 0
    with decode_order(llm, on=False):
        assert config.long_prefill_token_threshold == 0
    config.enable_chunked_prefill = False
    with pytest.raises(RuntimeError, match="chunked prefill on"), decode_order(llm):
        pass
    bare = SimpleNamespace(llm_engine=SimpleNamespace())
    with pytest.raises(RuntimeError, match="in this process"), decode_order(bare):
        pass
