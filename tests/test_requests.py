"""Budget parsing shared by every entry point (header, body, SamplingParams, worker)."""

from __future__ import annotations

import math

import pytest

from vllm_alloc.requests import MAX_BUDGET_TEXT, BudgetError, budget_from_extra_args, parse_budget


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.5", 0.5),  # header text
        (b" 0.25 ", 0.25),  # raw header bytes with spaces
        (1, 1.0),  # JSON integer
        (1.0, 1.0),  # full budget
        ("1e-1", 0.1),  # scientific notation is a number
    ],
)
def test_valid_budgets(raw: object, expected: float) -> None:
    assert parse_budget(raw) == expected


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("abc", "is not a number"),
        ("", "is not a number"),
        (True, "is not a number"),  # bool is an int in Python, never a budget
        (None, "has type NoneType"),
        ([0.5], "has type list"),
        ("nan", "is not finite"),
        (math.inf, "is not finite"),
        ("-inf", "is not finite"),
        (0, "out of range"),
        (-0.5, "out of range"),
        ("1.0000001", "out of range"),
        ("0." + "1" * MAX_BUDGET_TEXT, "characters long"),  # oversized header
    ],
)
def test_invalid_budgets_name_the_range(raw: object, fragment: str) -> None:
    with pytest.raises(BudgetError, match=fragment) as info:
        parse_budget(raw)
    assert "(0, 1]" in str(info.value)


def test_model_minimum_is_checked_and_printed_as_a_valid_value() -> None:
    with pytest.raises(BudgetError, match="below this model's minimum") as info:
        parse_budget("0.3", min_budget=1 / 3)
    assert "[0.333334, 1]" in str(info.value)  # rounded up: the printed bound is itself valid
    assert parse_budget("0.333334", min_budget=1 / 3) == pytest.approx(0.333334)
    assert parse_budget(0.25, min_budget=0.25) == 0.25  # the minimum itself is valid


def test_budget_from_extra_args() -> None:
    assert budget_from_extra_args(None) is None
    assert budget_from_extra_args({}) is None
    assert budget_from_extra_args({"activation_budget": "0.5"}) == "0.5"
