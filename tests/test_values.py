"""Budget values shared by every entry point (header, body, SamplingParams, worker): parsing, and the
prefix-cache salt per budget."""

from __future__ import annotations

import math

import pytest

from vllm_alloc.values import (
    MAX_BUDGET_TEXT,
    BudgetError,
    budget_from_extra_args,
    cache_salt,
    parse_budget,
    range_text,
    shown,
)


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
        # A JSON integer no float holds (float() raises OverflowError), and one past Python's int-to-text
        # limit (repr() raises): both shown by their size.
        pytest.param(10**400, "out of range", id="10**400"),
        pytest.param(-(10**400), "out of range", id="-10**400"),
        pytest.param(10**5000, "about 5001 digits", id="10**5000"),
        (2, "out of range"),
        (b"0.5\xc3\xa9", "non-ASCII"),  # UTF-8 header bytes
        ("٠.٥", "non-ASCII"),  # Arabic-Indic digits: float() would read 0.5
    ],
)
def test_invalid_budgets_name_the_range(raw: object, fragment: str) -> None:
    with pytest.raises(BudgetError, match=fragment) as info:
        parse_budget(raw)
    assert "(0, 1]" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"0.5\xc3\xa9", r"b'0.5\xc3\xa9'"),  # the bytes, escaped: never decoded as latin-1 ("0.5Ã©")
        ("0.5é", r"'0.5\xe9'"),
        ("\u202e5.0", r"'\u202e5.0'"),  # a right-to-left override cannot reorder the message
    ],
)
def test_non_ascii_values_are_shown_escaped(raw: object, expected: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budget(raw, source="X-Activation-Budget header")
    message = str(info.value)
    assert f"X-Activation-Budget header={expected} is not a number" in message
    assert message.isascii()


def test_huge_integers_are_budget_errors_at_every_minimum() -> None:
    for min_budget in (None, 0.25):
        with pytest.raises(BudgetError, match=r"<an integer of about 401 digits> is out of range"):
            parse_budget(10**400, min_budget=min_budget, source="vllm_xargs.activation_budget")


def test_shown_is_short_ascii() -> None:
    assert shown("abc") == "'abc'"
    assert shown([0.5]) == "[0.5]"
    assert len(shown("x" * 1000)) == 40 and shown("x" * 1000).endswith("…")
    assert shown(10**5000) == "<an integer of about 5001 digits>"


@pytest.mark.parametrize(
    ("min_budget", "text"),
    [
        (None, "(0, 1]"),
        (0.25, "[0.25, 1]"),
        (1 / 3, "[0.333334, 1]"),  # rounded up: 0.333333 would be below the minimum
        (0.3, "[0.3, 1]"),  # 0.3·1e6 is 300000.00000000006 in floats: not 0.300001
        (1 / 6, "[0.166667, 1]"),
    ],
)
def test_range_text_prints_a_valid_minimum(min_budget: float | None, text: str) -> None:
    assert range_text(min_budget) == text
    if min_budget is not None:
        printed = float(text[1:].split(",")[0])
        assert parse_budget(printed, min_budget=min_budget) == printed


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


def test_cache_salt_edges() -> None:
    assert cache_salt(None, 0.5) != cache_salt(None, 0.25)
    long = "s" * 128  # the longest salt vLLM accepts: combined, it is hashed to stay within 128
    assert len(cache_salt(long, 0.5)) <= 128
    assert cache_salt(long, 0.5) != cache_salt("t" * 128, 0.5)
    assert cache_salt("", 0.5) == ""  # malformed: vLLM refuses it with its own message
    assert cache_salt(7, 0.5) == 7
    # Idempotent: the engine's front end salts again what the middleware salted.
    for client in (None, "tenant", long):
        once = cache_salt(client, 0.5)
        assert cache_salt(once, 0.5) == once
    assert cache_salt(cache_salt(None, 0.5), 0.25) != cache_salt(None, 0.25)  # another b: salted on top
