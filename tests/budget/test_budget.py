"""Budget files (vllm_alloc.budget): round trip, every validator's message, budgets b -> B, lookup."""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_alloc.budget import (
    BudgetFileError,
    Calibration,
    ModelFingerprint,
    Sensitivity,
    from_sensitivity,
    load_budget_file,
    parse_budget_file,
    uniform_budget_file,
)
from vllm_alloc.budget import load as budget_load  # where CONFIGS_DIR is looked up
from vllm_alloc.budget.alloc_l import solve
from vllm_alloc.profiler.show import summary


def fingerprint(L: int = 26, K: int = 6, E: int = 64) -> ModelFingerprint:
    # Default: DeepSeek-V2-Lite's shape (layer 0 is dense, so the MoE layers are 1..26; A = 156).
    return ModelFingerprint(
        architecture="DeepseekV2ForCausalLM",
        moe_layers=list(range(1, L + 1)),
        num_experts=E,
        top_k=K,
        hidden_size=2048,
        intermediate_size=1408,
    )


def sensitivity(L: int, K: int, protocol: str = "isolating", B: int | None = None) -> Sensitivity:
    # Shallow layers more sensitive, every row decreasing in k.
    matrix = [[10.0 + (L - l) * (K - k) ** 2 for k in range(1, K + 1)] for l in range(L)]
    calibration = Calibration(source="wikitext-2 test", tokens=4096, seq_len=512, split="profile 0-80%")
    return Sensitivity(
        protocol=protocol, metric="perplexity", matrix=matrix, budget=B, calibration=calibration
    )


SMALL = fingerprint(L=4, K=3, E=8)  # A = 12: small enough to read every allocation in a failure


def small_file_dict() -> dict[str, Any]:
    return from_sensitivity(SMALL, sensitivity(4, 3)).model_dump(mode="json")


def test_round_trip(tmp_path: Path) -> None:
    original = from_sensitivity(fingerprint(), sensitivity(26, 6), default_budget=0.5, notes="ünïcode ok")
    path = tmp_path / "deepseek.json"
    original.dump(path)
    loaded = load_budget_file(path)
    assert loaded == original
    assert loaded.fingerprint_hash() == original.fingerprint_hash()
    assert json.loads(path.read_text())["format_version"] == 1
    assert len(loaded.allocations) == 156 - 26 + 1


def test_fingerprint_hash_changes_with_content() -> None:
    a = uniform_budget_file(SMALL)
    b = uniform_budget_file(SMALL, scope="request")
    assert len(a.fingerprint_hash()) == 16
    assert a.fingerprint_hash() == uniform_budget_file(SMALL).fingerprint_hash()
    assert a.fingerprint_hash() != b.fingerprint_hash()


def test_uniform_budget_file() -> None:
    bf = uniform_budget_file(fingerprint(), k_base=2, weights="kept")
    assert bf.k_base == 2 and bf.weights == "kept" and bf.sensitivities == []
    assert [a.budget for a in bf.allocations] == list(range(52, 157))
    assert all(a.chosen == "uniform" and sum(a.k) == a.budget for a in bf.allocations)
    assert bf.k_vector(0.5) == [3] * 26


def test_from_sensitivity_matches_solve() -> None:
    s = sensitivity(4, 3, protocol="operating-point", B=8)
    bf = from_sensitivity(SMALL, s)
    solved = solve(s.matrix)
    assert {a.budget: a.k for a in bf.allocations} == solved
    assert all(a.chosen == "operating-point" for a in bf.allocations)
    assert bf.sensitivities == [s]


def test_from_sensitivity_pins_full_budget_to_all_k() -> None:
    s = sensitivity(4, 3)
    s.matrix[3] = [0.0, 5.0, 5.0]  # layer 3 measured best at k = 1: the DP would leave B = A unspent
    assert solve(s.matrix)[12] == [3, 3, 3, 1]
    assert from_sensitivity(SMALL, s).k_vector(1.0) == [3, 3, 3, 3]


def test_from_sensitivity_wrong_shape() -> None:
    with pytest.raises(BudgetFileError, match=r"field 'sensitivities\[0\].matrix': has 26 rows.*L = 4"):
        from_sensitivity(SMALL, sensitivity(26, 3))


# --- broken files: every validator names the field and a fix -------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        for part in path[:-1]:
            d = d[part]
        d[path[-1]] = value

    return edit


def _delete_allocation(i: int) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["allocations"].pop(i)


def _swap_allocations(d: dict[str, Any]) -> None:
    d["allocations"][2], d["allocations"][3] = d["allocations"][3], d["allocations"][2]


def _duplicate_allocation(d: dict[str, Any]) -> None:
    d["allocations"][3] = copy.deepcopy(d["allocations"][2])


def _add_candidates(chosen: str, uniform_ppl: float) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        a = d["allocations"][4]  # B = 8
        a["chosen"] = chosen
        a["candidates"] = [
            {"name": "uniform", "allocation": [2, 2, 2, 2], "measured": uniform_ppl},
            {"name": "isolating", "allocation": a["k"], "measured": 11.0},
        ]

    return edit


BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    # (id, edit, field named, regex the message must match)
    ("missing-B", _delete_allocation(3), r"allocations[3].budget", r"B = 8 comes where B = 7 is expected"),
    ("missing-tail", _delete_allocation(-1), "allocations", r"'allocations': B = 12 missing"),
    ("duplicate-B", _duplicate_allocation, r"allocations[3].budget", r"B = 6 appears twice"),
    ("unsorted", _swap_allocations, r"allocations[2].budget", r"missing or out of order"),
    ("B-out-of-range", _set(("allocations", 0, "budget"), 3), "allocations[0].budget", r"\[4, 12\]"),
    ("wrong-length", _set(("allocations", 3, "k"), [1, 1, 1]), "allocations[3].k", r"3 entries.*L = 4"),
    (
        "K_l>K",
        _set(("allocations", 5, "k"), [4, 1, 2, 1]),
        "allocations[5].k",
        r"K_0 = 4.*\[k_base = 1, K = 3\]",
    ),
    ("K_l<k_base", _set(("allocations", 5, "k"), [0, 3, 3, 3]), "allocations[5].k", r"K_0 = 0 is outside"),
    ("sum>B", _set(("allocations", 1, "k"), [2, 2, 1, 1]), "allocations[1].k", r"Σ K_l = 6 exceeds .* B = 5"),
    ("full-not-K", _set(("allocations", 8, "k"), [3, 3, 3, 2]), "allocations[8].k", r"must run K = 3"),
    ("k_base-0", _set(("k_base",), 0), "k_base", r"k_base = 0 is outside the valid range \[1, K = 3\]"),
    ("k_base>K", _set(("k_base",), 4), "k_base", r"k_base = 4 is outside the valid range \[1, K = 3\]"),
    (
        "default-1.5",
        _set(("default_budget",), 1.5),
        "default_budget",
        r"1.5 is outside the valid range \[0.333334, 1\]",
    ),
    ("default-0.3", _set(("default_budget",), 0.3), "default_budget", r"valid range \[0.333334, 1\]"),
    ("unknown-key", _set(("wieghts",), "topk"), "wieghts", r"unknown key"),
    ("nested-unknown", _set(("model", "topk"), 3), "model.topk", r"unknown key"),
    ("missing-field", lambda d: d["model"].pop("top_k"), "model.top_k", r"required field is missing"),
    ("bad-literal", _set(("weights",), "renorm"), "weights", r"'topk', 'kept' or 'raw'.*'renorm'"),
    ("version-2", _set(("format_version",), 2), "format_version", r"format_version 2 is not supported"),
    ("top_k>E", _set(("model", "num_experts"), 2), "model.top_k", r"top_k \(K\) = 3 .* \[1, E = 2\]"),
    (
        "layers-unsorted",
        _set(("model", "moe_layers"), [3, 1, 2, 4]),
        "model.moe_layers",
        r"sorted and unique",
    ),
    (
        "matrix-rows",
        _set(("sensitivities", 0, "matrix"), [[1.0, 2.0, 3.0]]),
        "sensitivities[0].matrix",
        r"1 rows",
    ),
    ("matrix-cols", _set(("sensitivities", 0, "matrix", 2), [1.0]), "sensitivities[0].matrix[2]", r"K = 3"),
    (
        "matrix-nan",
        _set(("sensitivities", 0, "matrix", 1, 1), math.nan),
        "sensitivities[0].matrix[1][1]",
        r"finite",
    ),
    (
        "op-no-budget",
        _set(("sensitivities", 0, "protocol"), "operating-point"),
        "sensitivities[0].budget",
        r"needs",
    ),
    ("chosen-unknown", _add_candidates("operating-point", 12.0), "allocations[4].chosen", r"not one of"),
    # Strict types: a budget file is read as written, nothing is converted.
    ("B-as-text", _set(("allocations", 0, "budget"), "4"), "allocations[0].budget", r'JSON integer.*got "4"'),
    ("k-bool", _set(("allocations", 0, "k"), [True, 1, 1, 1]), "allocations[0].k[0]", r"integer.*got true"),
    ("k-float", _set(("allocations", 0, "k", 1), 1.0), "allocations[0].k[1]", r"JSON integer.*got 1.0"),
    ("default-as-text", _set(("default_budget",), "1.0"), "default_budget", r'JSON number.*got "1.0"'),
    ("default-bool", _set(("default_budget",), True), "default_budget", r"JSON number.*got true"),
    ("K-as-text", _set(("model", "top_k"), "3"), "model.top_k", r'JSON integer.*got "3"'),
    ("model-not-object", _set(("model",), 3), "model", r"JSON object.*got 3"),
    ("layers-not-array", _set(("model", "moe_layers"), "0-3"), "model.moe_layers", r"JSON array"),
    ("notes-not-text", _set(("notes",), 7), "notes", r"string in double quotes.*got 7"),
    ("version-true", _set(("format_version",), True), "format_version", r"format_version True is not"),
    ("version-float", _set(("format_version",), 1.0), "format_version", r"format_version 1.0 is not"),
    (
        "worse-than-uniform",
        _add_candidates("isolating", 10.5),
        "allocations[4].chosen",
        r"worse than uniform",
    ),
]


@pytest.mark.parametrize(("edit", "field", "match"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_broken_file(tmp_path: Path, edit: Callable[[dict[str, Any]], None], field: str, match: str) -> None:
    data = small_file_dict()
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))  # json.dumps writes NaN, which the loader must still refuse
    with pytest.raises(BudgetFileError, match=match) as info:
        load_budget_file(path)
    err = info.value
    assert err.path == str(path) and err.field == field
    assert str(err).startswith(f"budget file {path}: field '{field}': ")
    assert "Fix: " in str(err) and err.fix
    assert "pydantic" not in str(err)


@pytest.mark.parametrize(
    "edit",
    [_set(("allocations", 0, "budget"), "4"), _set(("allocations", 0, "k"), [True, 1, 1, 1])],
    ids=["B-as-text", "k-bool"],
)
def test_strict_type_errors_say_how_to_fix(edit: Callable[[dict[str, Any]], None]) -> None:
    data = small_file_dict()
    edit(data)
    with pytest.raises(BudgetFileError) as info:
        parse_budget_file(data, "b.json")
    assert "Fix: write the value with that JSON type (budget files are read strictly)" in str(info.value)


def test_shipped_budget_files_load() -> None:
    shipped = sorted(budget_load.CONFIGS_DIR.glob("*.json"))
    assert shipped, f"no budget files in {budget_load.CONFIGS_DIR}"
    for path in shipped:
        assert load_budget_file(path).format_version == 1
    assert load_budget_file("default") == load_budget_file(budget_load.CONFIGS_DIR / "default.json")


def _candidates(chosen: str, *rows: tuple[str, list[int], float]) -> Callable[[dict[str, Any]], None]:
    """Candidates at B = 8 of SMALL (L = 4, K = 3), whose uniform allocation is [2, 2, 2, 2]."""

    def edit(d: dict[str, Any]) -> None:
        a = d["allocations"][4]
        a["candidates"] = [{"name": n, "allocation": ks, "measured": m} for n, ks, m in rows]
        a["chosen"] = chosen
        a["k"] = next(ks for n, ks, _ in rows if n == chosen)

    return edit


UNI, OTHER = [2, 2, 2, 2], [3, 2, 2, 1]


@pytest.mark.parametrize(
    ("edit", "field", "match"),
    [
        # The uniform vector under another name is the baseline: a worse choice is refused.
        (_candidates("isolating", ("op", UNI, 10.0), ("isolating", OTHER, 10.5)), "chosen", "worse than"),
        # Measured twice (a hand edit): the choice must beat the better of the two.
        (
            _candidates("isolating", ("uniform", UNI, 10.6), ("op", UNI, 10.0), ("isolating", OTHER, 10.5)),
            "chosen",
            r"measured 10.0 \(lower",
        ),
        # A candidate called uniform that is not the uniform vector would pose as the baseline.
        (
            _candidates("isolating", ("uniform", OTHER, 10.6), ("isolating", OTHER, 10.5)),
            "candidates[0].allocation",
            r"named 'uniform' has allocation \[3, 2, 2, 1\], but the uniform allocation for B = 8 is \[2, 2",
        ),
    ],
    ids=["uniform-vector-renamed", "best-uniform-binds", "mislabelled-uniform"],
)
def test_never_worse_than_uniform_goes_by_vector(
    edit: Callable[[dict[str, Any]], None], field: str, match: str
) -> None:
    data = small_file_dict()
    edit(data)
    with pytest.raises(BudgetFileError, match=match) as info:
        parse_budget_file(data)
    assert info.value.field == f"allocations[4].{field}"


@pytest.mark.parametrize(
    "edit",
    [
        # Chosen under another name but the uniform vector itself: uniform, whatever it measured.
        _candidates("isolating", ("uniform", UNI, 10.0), ("isolating", UNI, 10.2)),
        # No measurement of the uniform vector: nothing to compare against.
        _candidates("isolating", ("op", OTHER[::-1], 10.0), ("isolating", OTHER, 10.5)),
        # Better than the uniform vector measured under another name.
        _candidates("isolating", ("op", UNI, 10.6), ("isolating", OTHER, 10.5)),
    ],
    ids=["chosen-is-uniform-vector", "uniform-unmeasured", "better-than-renamed-uniform"],
)
def test_never_worse_than_uniform_passes(edit: Callable[[dict[str, Any]], None]) -> None:
    data = small_file_dict()
    edit(data)
    parse_budget_file(data)


def test_candidates_that_pass() -> None:
    data = small_file_dict()
    _add_candidates("isolating", 12.0)(data)
    bf = parse_budget_file(data)
    assert [c.name for c in bf.allocations[4].candidates] == ["uniform", "isolating"]


def _tested(chosen: str, alloc_t: bool, *highs: float) -> Callable[[dict[str, Any]], None]:
    """At B = 8 of SMALL: the two baselines and an "isolating" candidate whose paired tests have these
    upper bounds (0.0 = the same run); `chosen` ships, with `alloc_t`."""

    def edit(d: dict[str, Any]) -> None:
        tests = [
            {"regime": r, "baseline": b, "delta": h - 0.001 if h else 0.0, "low": h - 0.002 if h else 0.0}
            | {"high": h}
            for (b, r), h in zip(
                [(b, r) for b in ("uniform", "uniform (no Alloc-T)") for r in ("prefill", "decode")],
                highs,
                strict=True,
            )
        ]
        a = d["allocations"][4]
        a["candidates"] = [
            {"name": "uniform", "allocation": UNI, "measured": 10.0},
            {"name": "uniform (no Alloc-T)", "allocation": UNI, "measured": 10.1, "alloc_t": False},
            {"name": "isolating", "allocation": OTHER, "measured": 9.0, "alloc_t": alloc_t, "tests": tests},
        ]
        a["chosen"], a["alloc_t"] = chosen, alloc_t
        a["k"] = OTHER if chosen == "isolating" else UNI

    return edit


def test_a_chosen_candidate_must_pass_its_paired_tests() -> None:
    data = small_file_dict()
    _tested("isolating", True, -0.001, -0.002, -0.001, -0.003)(data)
    assert parse_budget_file(data).allocations[4].chosen == "isolating"
    data = small_file_dict()
    _tested("isolating", False, -0.001, 0.0, -0.001, 0.0)(data)  # decode: the same run as both baselines
    bf = parse_budget_file(data)
    assert bf.reallocating()[8] is False and bf.reallocating().count(False) == 1
    assert len(bf.reallocating()) == bf.model.full_activations + 1
    for highs in [(-0.001, 0.0005, -0.001, -0.001), (0.0, 0.0, 0.0, 0.0)]:
        data = small_file_dict()
        _tested("isolating", True, *highs)(data)
        with pytest.raises(BudgetFileError, match="not better than the baselines") as info:
            parse_budget_file(data)
        assert info.value.field == "allocations[4].chosen"
    data = small_file_dict()
    _tested("isolating", True, -0.001, -0.002, -0.001, -0.003)(data)
    data["allocations"][4]["alloc_t"] = False
    with pytest.raises(BudgetFileError, match="alloc_t = False differs from the chosen candidate's True"):
        parse_budget_file(data)
    data = small_file_dict()
    _tested("uniform", True, 0.5, 0.5, 0.5, 0.5)(data)  # the baseline ships whatever the others measured
    data["allocations"][4]["candidates"][0]["alloc_t"] = False
    data["allocations"][4]["alloc_t"] = False
    with pytest.raises(BudgetFileError, match="runs without Alloc-T or carries the balance"):
        parse_budget_file(data)


def test_carried_balance_fields() -> None:
    """allocations[i].carry holds θ per layer where the chosen candidate carries, and nowhere else."""
    data = small_file_dict()
    _tested("isolating", True, -0.001, -0.002, -0.001, -0.003)(data)
    a = data["allocations"][4]
    a["candidates"][2]["carry"] = True
    with pytest.raises(
        BudgetFileError, match="chosen candidate carries, but carry has no thresholds"
    ) as info:
        parse_budget_file(data)
    assert info.value.field == "allocations[4].carry"
    a["carry"] = [0.25, None, 0.5, 0.125]
    bf = parse_budget_file(data)
    L = bf.model.num_moe_layers
    assert bf.carrying()[a["budget"]] and sum(bf.carrying()) == 1
    assert bf.carry_table()[a["budget"]].tolist() == [0.25, math.inf, 0.5, 0.125]
    assert bf.carry_table()[a["budget"] + 1].tolist() == [math.inf] * L
    text = summary(bf, [a["budget"] / bf.model.full_activations])
    assert "carried balance (decode streams): pool layer (per layer), α = 0.05, decode tokens" in text
    assert "carry in groups of up to 1;" in text
    assert "(0.25, —, 0.5, 0.125)" in text
    data["carry_pool"], data["carry_alpha"] = "request", 0.025
    bf = parse_budget_file(data)
    assert (
        bf.carry_pool == "request"
        and "pool request (one bank per request for all its layers), α = 0.025"
        in (summary(bf, [a["budget"] / bf.model.full_activations]))
    )
    data["carry_pool"] = "bank"
    with pytest.raises(BudgetFileError, match="carry_pool"):
        parse_budget_file(data)
    data["carry_pool"], data["carry_group"] = "layer", 0
    with pytest.raises(BudgetFileError, match="carry_group"):
        parse_budget_file(data)
    data["carry_group"] = 8
    assert parse_budget_file(data).carry_group == 8
    a["carry"] = [0.25]
    with pytest.raises(BudgetFileError, match="has 1 thresholds; it needs one per layer"):
        parse_budget_file(data)
    a["carry"], a["candidates"][2]["carry"] = [0.25, None, 0.5, 0.125], False
    with pytest.raises(BudgetFileError, match="does not carry, but carry has thresholds"):
        parse_budget_file(data)
    data = small_file_dict()
    data["allocations"][-1]["carry"] = [0.1] * L
    with pytest.raises(BudgetFileError, match="never carries"):
        parse_budget_file(data)
    data = small_file_dict()
    data["carry_alpha"] = -0.5
    with pytest.raises(BudgetFileError, match="carry_alpha"):
        parse_budget_file(data)


def test_paired_test_interval_must_hold_its_delta() -> None:
    data = small_file_dict()
    _tested("isolating", True, -0.001, -0.002, -0.001, -0.003)(data)
    data["allocations"][4]["candidates"][2]["tests"][0]["delta"] = 0.5
    with pytest.raises(BudgetFileError, match=r"does not contain delta = 0.5") as info:
        parse_budget_file(data)
    assert info.value.field == "allocations[4].candidates[2].tests[0].delta"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"format_version": 1,\n  "model": }', r"invalid JSON at line 2 column 12"),
        ("[1, 2]", r"top level is a list, not a JSON object"),
        ("", r"invalid JSON at line 1 column 1"),
    ],
)
def test_unparseable_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BudgetFileError, match=match) as info:
        load_budget_file(path)
    assert info.value.path == str(path) and "Fix: " in str(info.value)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(BudgetFileError, match=r"no such file.*Fix: pass the path") as info:
        load_budget_file(tmp_path / "nope.json")
    assert info.value.path == str(tmp_path / "nope.json")


def test_unreadable_path(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(BudgetFileError, match=r"cannot read it"):
        load_budget_file(path)


def test_shipped_name_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_load, "CONFIGS_DIR", tmp_path)
    uniform_budget_file(SMALL).dump(tmp_path / "tiny-moe.json")
    monkeypatch.chdir(tmp_path.parent)  # so the bare name is not also a path relative to the cwd
    assert load_budget_file("tiny-moe") == uniform_budget_file(SMALL)
    assert load_budget_file("tiny-moe.json").model.top_k == 3
    with pytest.raises(BudgetFileError, match=r"no shipped budget file.*\(shipped: tiny-moe\)"):
        load_budget_file("other-moe")


def test_pydantic_errors_from_builders_are_budget_file_errors() -> None:
    with pytest.raises(BudgetFileError, match=r"field 'default_budget'"):
        uniform_budget_file(SMALL, default_budget=0.0)
    with pytest.raises(BudgetFileError, match=r"field 'k_base': k_base = 0"):
        uniform_budget_file(SMALL, k_base=0)
    with pytest.raises(BudgetFileError, match=r"field 'scope'"):
        uniform_budget_file(SMALL, scope="global")


def test_error_pickles() -> None:
    err = BudgetFileError("configs/x.json", "allocations[3].k", "too long", "shorten it")
    again = pickle.loads(pickle.dumps(err))
    assert (
        str(again)
        == str(err)
        == "budget file configs/x.json: field 'allocations[3].k': too long. Fix: shorten it"
    )


# --- b -> B ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("b", "B"),
    [
        (1.0, 156),  # full budget
        (1, 156),  # an int is a number too
        (0.5, 78),  # the paper's headline budget
        (0.75, 117),
        (0.9, 140),  # floor(140.4)
        (1 / 6, 26),  # min_budget itself: (1/6)·156 = 25.999999999999996 in floats
        (0.166667, 26),
        ("0.5", 78),  # text, as a header or vllm_xargs carries it: requests.parse_budget reads it
    ],
)
def test_absolute_budget(b: float, B: int) -> None:
    assert uniform_budget_file(fingerprint()).absolute_budget(b) == B


@pytest.mark.parametrize(
    "b",
    [
        *(
            0.0,
            -0.5,
            1.0000001,
            2.0,
            math.nan,
            math.inf,
            -math.inf,
            1 / 6 - 1e-6,
            0.166666,
            "abc",
            None,
            True,
        ),
        pytest.param(10**400, id="10**400"),  # no float holds it: a budget error, not OverflowError
    ],
)
def test_absolute_budget_rejects(b: Any) -> None:
    bf = uniform_budget_file(fingerprint())
    with pytest.raises(ValueError, match=r"valid range \[0.166667, 1\]"):
        bf.absolute_budget(b)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 16), st.data())
def test_min_budget_is_valid(L: int, K: int, data: st.DataObject) -> None:
    k_base = data.draw(st.integers(1, K))
    bf = uniform_budget_file(fingerprint(L=L, K=K, E=K), k_base=k_base)
    assert bf.absolute_budget(bf.min_budget) == L * k_base
    printed = bf._range_text().split(",")[0].lstrip("[")
    assert bf.absolute_budget(float(printed)) == L * k_base  # the range a message prints is valid
    b = data.draw(st.floats(bf.min_budget, 1.0))
    assert L * k_base <= bf.absolute_budget(b) <= L * K
    assert sum(bf.k_vector(b)) <= bf.absolute_budget(b)


def test_k_vector_is_a_copy() -> None:
    bf = uniform_budget_file(SMALL)
    bf.k_vector(1.0)[0] = 99
    assert bf.k_vector(1.0) == [3, 3, 3, 3]


def test_allocation_table() -> None:
    bf = from_sensitivity(SMALL, sensitivity(4, 3), k_base=2)
    table = bf.allocation_table()
    assert table.shape == (13, 4) and table.dtype == torch.int32
    assert table[:8].eq(0).all()  # row 0 = padding; rows below L·k_base = 8 are never a valid B
    for a in bf.allocations:
        assert table[a.budget].tolist() == a.k
    assert table[12].tolist() == [3, 3, 3, 3]


# --- validate_against -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field", "ours", "theirs"),
    [
        ({"architecture": "Qwen3MoeForCausalLM"}, "model.architecture", "'DeepseekV2ForCausalLM'", "'Qwen3"),
        ({"moe_layers": list(range(0, 26))}, "model.moe_layers", "[1, 2", "[0, 1"),
        ({"num_experts": 128}, "model.num_experts", "64", "128"),
        ({"top_k": 8}, "model.top_k", "6", "8"),
        ({"hidden_size": 4096}, "model.hidden_size", "2048", "4096"),
        ({"intermediate_size": 768}, "model.intermediate_size", "1408", "768"),
    ],
)
def test_validate_against_mismatch(
    tmp_path: Path, change: dict[str, Any], field: str, ours: str, theirs: str
) -> None:
    path = tmp_path / "ds.json"
    uniform_budget_file(fingerprint()).dump(path)
    bf = load_budget_file(path)
    bf.validate_against(fingerprint())  # the same model: no error
    other = fingerprint().model_copy(update=change)
    with pytest.raises(BudgetFileError) as info:
        bf.validate_against(other)
    err = info.value
    assert err.field == field and err.path == str(path)  # the loaded file's path by default
    assert ours in err.message and theirs in err.message
    assert "re-run `vllm-alloc profile` for this model" in str(err)
    with pytest.raises(BudgetFileError, match=r"^budget file configs/ds.json: "):
        bf.validate_against(other, path="configs/ds.json")


def test_fingerprint_properties() -> None:
    fp = fingerprint()
    assert fp.num_moe_layers == 26 and fp.full_activations == 156
