"""The profiler's choice of the distinct-expert cap (`guard.choose_cap`, `cap_stage.add_caps`)
with fake measurements (no vLLM): the rule, the file it writes, and the loader's check of it."""

from __future__ import annotations

import numpy as np
import pytest

from tests.profiler.test_profile import additive, calibration, fingerprint, paired
from vllm_alloc.budget import load_budget_file
from vllm_alloc.profiler import guard
from vllm_alloc.profiler.build import profile_to_file
from vllm_alloc.profiler.cap_stage import add_caps
from vllm_alloc.profiler.cli import parse_cap_options
from vllm_alloc.profiler.errors import ProfileError
from vllm_alloc.profiler.guard import choose_cap
from vllm_alloc.profiler.show import summary

RNG = np.random.default_rng(0)
NOISE = RNG.normal(0.0, 0.002, 48)  # per-sequence noise, the same in every run (paired)
BASE = 3.0 + RNG.normal(0.0, 0.05, 48)  # uniform without Alloc-T: the baseline


class FakeCaps:
    """Mean NLL per sequence: the served configuration gains `gain` over the baseline; a cap at share ρ
    loses `loss(ρ, N)` of that gain. Records every run."""

    def __init__(self, loss: dict[int, dict[float, float]], gain: float = 0.05) -> None:
        self.loss, self.gain = loss, gain
        self.runs: list[tuple[int, float | None, int]] = []

    def baseline(self, B: int) -> np.ndarray:
        return BASE

    def __call__(self, B: int, share: float | None, streams: int) -> np.ndarray:
        self.runs.append((B, share, streams))
        lost = 0.0 if share is None else self.loss[streams][share]
        return BASE - self.gain * (1.0 - lost) + NOISE


SHARES = (0.75, 0.5, 0.25)


def test_the_smallest_share_before_the_first_failure_ships() -> None:
    # At N = 8, ρ = 0.25 keeps only 30 % of the gain (< 50 %); at N = 64 every share keeps enough.
    fake = FakeCaps({8: {0.75: 0.1, 0.5: 0.4, 0.25: 0.7}, 64: {0.75: 0.0, 0.5: 0.1, 0.25: 0.2}})
    cap, tests = choose_cap(8, 4, fake, BASE, (8, 64), SHARES, keep=0.5)
    assert cap == [0.5] * 4
    # Served at each N, then shares largest first, N = 8 first; 0.25 fails at N = 8, so N = 64 is not run.
    assert fake.runs == [
        (8, None, 8), (8, None, 64), (8, 0.75, 8), (8, 0.75, 64), (8, 0.5, 8), (8, 0.5, 64), (8, 0.25, 8)
    ]  # fmt: skip
    kept = {(t["share"], t["streams"]): t["kept"] for t in tests}
    assert kept[(0.5, 8)] == pytest.approx(0.6, abs=0.01) and kept[(0.25, 8)] == pytest.approx(0.3, abs=0.01)
    assert all(t["high"] < 0 for t in tests), "every capped run is still better than the baseline"


def test_no_cap_where_the_largest_share_fails_or_nothing_is_gained() -> None:
    fake = FakeCaps({8: dict.fromkeys(SHARES, 0.6), 64: dict.fromkeys(SHARES, 0.0)})
    assert choose_cap(5, 4, fake, BASE, (8, 64), SHARES)[0] is None
    # The served configuration no better than the baseline (only noise): the capped run is not better
    # with confidence either, so no cap.
    fake = FakeCaps({8: dict.fromkeys(SHARES, 0.0), 64: dict.fromkeys(SHARES, 0.0)}, gain=0.0)
    cap, tests = choose_cap(5, 4, fake, BASE, (8, 64), SHARES)
    assert cap is None and len(tests) == 1 and tests[0]["low"] < 0.0 < tests[0]["high"]
    # A served run worse than the baseline has no gain to keep: `kept` is 0.
    assert guard.cap_test(BASE + 0.01, BASE + 0.01, BASE)["kept"] == 0.0


def test_a_chosen_cap_ships_only_if_the_confirmation_passes_it() -> None:
    """The search runs on the first half of the held-out sequences; the share it chose is tested again
    on the second half, at the corrected confidence, from the same runs."""
    fake = FakeCaps({8: {0.75: 0.1, 0.5: 0.4, 0.25: 0.7}, 64: {0.75: 0.0, 0.5: 0.1, 0.25: 0.2}})
    cap, tests = choose_cap(8, 4, fake, BASE, (8, 64), SHARES, keep=0.5)
    confirmation = [t for t in tests if t["split"] == "confirmation"]
    assert cap == [0.5] * 4 and [(t["share"], t["streams"]) for t in confirmation] == [(0.5, 8), (0.5, 64)]
    assert len(fake.runs) == len(set(fake.runs)), "the confirmation reuses the search's runs"
    wider = guard.corrected(guard.CONFIDENCE, guard.cap_comparisons(1, len(SHARES), 2))
    assert wider == pytest.approx(1 - 0.05 / 6)
    cut = guard.split_at(BASE.size)  # the first quarter selects, the rest confirms
    assert cut == 12
    redone = guard.cap_test(fake(8, 0.5, 8)[cut:], fake(8, None, 8)[cut:], BASE[cut:], wider)
    assert {k: confirmation[0][k] for k in redone} == pytest.approx(redone)

    class SecondHalfWorse(FakeCaps):
        """The shares' gains hold on the first half only: luck the confirmation does not repeat."""

        def __call__(self, B: int, share: float | None, streams: int) -> np.ndarray:
            values = super().__call__(B, share, streams).copy()
            if share is not None:
                values[12:] = BASE[12:] + 0.01
            return values

    lucky = SecondHalfWorse({8: {0.75: 0.1, 0.5: 0.4, 0.25: 0.7}, 64: {0.75: 0.0, 0.5: 0.1, 0.25: 0.2}})
    cap, tests = choose_cap(8, 4, lucky, BASE, (8, 64), SHARES, keep=0.5)
    assert cap is None and [t["split"] for t in tests][-1] == "confirmation"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep": 1.5}, "keep = 1.5 is outside"),
        ({"shares": (1.0,)}, "must be in \\[0.001, 1\\)"),
        ({"streams": (1, 8)}, "at least 2"),
    ],
)
def test_bad_rule_arguments_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        choose_cap(8, 4, FakeCaps({}), BASE, **kwargs)


def test_add_caps_writes_caps_the_loader_accepts(tmp_path) -> None:
    w = [8.0, 1.0, 1.0, 1.0]
    out = tmp_path / "f.json"
    bf, _ = profile_to_file(
        additive(w), paired(w), fingerprint(), calibration(), [0.5, 0.75], out, progress=False
    )
    fake = FakeCaps({8: {0.75: 0.1, 0.5: 0.7, 0.25: 0.9}, 64: dict.fromkeys(SHARES, 0.0)})
    capped = add_caps(bf, fake, [8, 12, 16], streams=(8, 64), shares=SHARES, progress=False)
    capped.dump(out)
    loaded = load_budget_file(out)
    assert loaded.guard is not None and loaded.guard.cap_streams == [8, 64] and loaded.guard.cap_keep == 0.5
    caps = {a.budget: a.cap for a in loaded.allocations}
    assert caps[8] == caps[12] == [0.75] * 4, "B = 16 = A is never capped"
    assert all(c is None for B, c in caps.items() if B not in (8, 12))
    assert {t.share for t in loaded.allocations[8 - 4].cap_tests} == {0.75, 0.5}
    assert "Distinct-expert caps: at B = [8, 12]" in loaded.notes and "B = 8: ρ = 0.75" in loaded.notes
    text = summary(loaded, [0.5])  # `vllm-alloc show`: the cap column and the tests, passing ones starred
    assert "b = 0.5 (B = 8): distinct-expert cap, N streams decoding (shipped ρ: 0.75,0.75,0.75,0.75)" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "distinct-expert cap, N streams" in line) + 3
    rows = [line.split() for line in lines[start : start + 3]]  # after the title, the head and its rule
    assert [(r[0], r[1], r[-1] == "*") for r in rows] == [
        ("0.75", "8", True),
        ("0.75", "64", True),
        ("0.5", "8", False),
    ]
    # Choosing again replaces the caps (and the notes' sentence), it does not stack them.
    again = add_caps(
        loaded,
        FakeCaps({8: dict.fromkeys(SHARES, 0.9), 64: {}}),
        [8],
        streams=(8, 64),
        shares=SHARES,
        progress=False,
    )
    assert all(a.cap is None for a in again.allocations) and again.notes.count("Distinct-expert caps") == 1


def test_cap_options_are_checked() -> None:
    assert parse_cap_options("8,64", "0.75,0.5", 0.5) == ([8, 64], [0.75, 0.5])
    assert parse_cap_options("none", "0.5", 0.5) == ([], [])
    assert parse_cap_options("64,8,8", "0.5", 0.5)[0] == [8, 64]
    for args, match in [
        (("1", "0.5", 0.5), "--cap-streams '1'"),
        (("8", "1.0", 0.5), "--cap-shares '1.0'"),
        (("8", "0.5", 2.0), "--cap-keep 2.0"),
        (("x", "0.5", 0.5), "expected integers N >= 2"),
        (("8", "0.9996", 0.5), "--cap-shares '0.9996'"),  # rounds to 1: no cap
    ]:
        with pytest.raises(ProfileError, match=match):
            parse_cap_options(*args)


def test_the_cap_stage_runs_as_caps_only_with_the_same_flags(tmp_path) -> None:
    """After the guard, the caps are chosen by `vllm-alloc profile ... --caps-only` in a child process,
    with this run's calibration and cap flags; --caps-only refuses a file validated on other sequences."""
    import argparse

    from vllm_alloc.profiler.cap_stage import file_to_cap
    from vllm_alloc.profiler.cli import _caps_command

    args = argparse.Namespace(
        model="m", calib="c.npy", tokens=4096, seq_len=64, heldout=0.5, budgets="0.5", cap_streams="2,4",
        cap_shares="0.5", cap_keep=0.5, dtype="float32", out=tmp_path / "f.json", no_progress=True,
    )  # fmt: skip
    cmd = _caps_command(args)
    assert cmd[1:6] == ["-m", "vllm_alloc.cli", "profile", "m", "--caps-only"] and cmd[-1] == "--no-progress"
    flags = dict(zip(cmd[6:-1:2], cmd[7:-1:2], strict=True))
    assert flags == {
        "--calib": "c.npy", "--tokens": "4096", "--seq-len": "64", "--heldout": "0.5", "--budgets": "0.5",
        "--cap-streams": "2,4", "--cap-shares": "0.5", "--cap-keep": "0.5", "--dtype": "float32",
        "--out": str(tmp_path / "f.json"),
    }  # fmt: skip
    w = [8.0, 1.0, 1.0, 1.0]
    profile_to_file(additive(w), paired(w), fingerprint(), calibration(), [0.5], args.out, progress=False)
    assert file_to_cap(args.out, calibration()).guard is not None
    with pytest.raises(ProfileError, match=r"validated on 48 × 8 held-out sequences .* give 40 × 8"):
        file_to_cap(args.out, calibration(n_heldout=40))
