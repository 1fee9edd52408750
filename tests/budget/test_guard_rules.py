"""The loader's side of the guard's confirmation split (#32): which chosen candidates a file may ship, the
guard record's split, and files profiled before it (loaded under the old rule, with a warning)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.profiler.test_profile import additive, calibration, fingerprint, paired
from vllm_alloc.budget import BudgetFileError, load_budget_file, parse_budget_file
from vllm_alloc.profiler.build import profile_to_file
from vllm_alloc.profiler.cap_stage import add_caps
from vllm_alloc.profiler.errors import ProfileError

W = [8.0, 1.0, 1.0, 1.0]  # layer 0 matters: the DPs beat uniform by far more than the noise


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("guard") / "f.json"
    profile_to_file(
        additive(W), paired(W, alloc_t_cost=-0.01), fingerprint(), calibration(), [0.5], out, progress=False
    )
    return json.loads(out.read_text())


def at(data: dict[str, Any], B: int) -> dict[str, Any]:
    return data["allocations"][B - 4]


def test_a_profiled_file_records_the_split_and_confirms_its_winners(profiled: dict[str, Any]) -> None:
    bf = parse_budget_file(profiled)
    g = bf.guard
    assert g is not None and g.confirms and g.sequences == 48 and g.selection_sequences == 12
    assert g.comparisons is not None and g.confirmation_confidence == pytest.approx(1 - 0.05 / g.comparisons)
    a = bf.allocations[8 - 4]
    chosen = next(c for c in a.candidates if c.name == a.chosen)
    assert a.chosen not in ("uniform", "uniform (no Alloc-T)") and chosen.confirmed()
    assert {t.baseline for t in chosen.confirmation} == {"uniform", "uniform (no Alloc-T)"}
    assert bf.unconfirmed() == []


def test_a_winner_whose_confirmation_fails_is_refused(profiled: dict[str, Any]) -> None:
    data = copy.deepcopy(profiled)
    a = at(data, 8)
    chosen = next(c for c in a["candidates"] if c["name"] == a["chosen"])
    chosen["confirmation"][0].update(delta=-0.001, low=-0.004, high=0.002)  # straddles zero
    with pytest.raises(BudgetFileError, match=r"not better than the baselines .* not below zero"):
        parse_budget_file(data)
    chosen["confirmation"] = []  # passing selection tests alone do not ship it
    assert any(t["high"] < 0 for t in chosen["tests"])
    with pytest.raises(BudgetFileError, match="its confirmation ran nothing that differs from a baseline"):
        parse_budget_file(data)


def test_uniform_without_alloc_t_ships_without_a_test_where_the_file_confirms(
    profiled: dict[str, Any],
) -> None:
    """The guard's fallback where Alloc-T was not confirmed better: a baseline, no proof needed. In a file
    from before the split it had to beat uniform with Alloc-T, as every challenger did."""
    data = copy.deepcopy(profiled)
    a = at(data, 8)
    twin = next(c for c in a["candidates"] if c["name"] == "uniform (no Alloc-T)")
    a.update(chosen=twin["name"], k=twin["allocation"], alloc_t=False)
    a.pop("carry", None)
    parse_budget_file(data)
    for key in ("selection_sequences", "comparisons", "confirmation_confidence"):
        del data["guard"][key]
    with pytest.raises(BudgetFileError, match="not better than the baselines"):
        parse_budget_file(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"selection_sequences": None}, "come together"),
        ({"selection_sequences": 48}, r"48 is outside the valid range \[1, sequences - 1 = 47\]"),
        ({"confirmation_confidence": 1.0}, "less than 1"),
    ],
)
def test_the_split_is_checked(profiled: dict[str, Any], change: dict[str, Any], message: str) -> None:
    data = copy.deepcopy(profiled)
    data["guard"].update(change)
    with pytest.raises(BudgetFileError, match=message):
        parse_budget_file(data)


def test_a_file_from_before_the_split_loads_with_a_warning(tmp_path: Path, profiled: dict[str, Any]) -> None:
    data = copy.deepcopy(profiled)
    for key in ("selection_sequences", "comparisons", "confirmation_confidence", "tokens_to_resolve"):
        data["guard"].pop(key, None)
    for a in data["allocations"]:
        for c in a.get("candidates", []):
            c.pop("confirmation", None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"B = \[.*8.*\] ship allocations chosen and certified on the same"):
        bf = load_budget_file(path)
    assert not bf.guard.confirms and 8 in bf.unconfirmed()
    # --caps-only cannot confirm a cap on such a file.
    with pytest.raises(ProfileError, match="profiled before the guard's confirmation split"):
        add_caps(bf, object(), [8], progress=False)
    # The file the profiler writes now loads silently.
    fresh = tmp_path / "new.json"
    fresh.write_text(json.dumps(profiled))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_budget_file(fresh)
