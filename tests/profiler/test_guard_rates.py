"""The guard's false-winner rate and power, tested (#32): the whole guard (`runner.profile`, then
`guard.choose_cap`) on synthetic held-out runs whose noise is fitted to a real profile
(`benchmarks/guard_noise.json`; the simulation is `benchmarks/guard_rates.py`, which docs/profiling.md
runs with more seeds)."""

from __future__ import annotations

import pytest

from benchmarks import guard_rates
from vllm_alloc.profiler import guard, runner

SEEDS = 200  # per size: at a true rate of 1 %, the upper bound below stays under 5 % unless 5+ hit


@pytest.fixture(scope="module")
def noise() -> guard_rates.NoiseModel:
    return guard_rates.NoiseModel.load()


def test_the_noise_model_is_a_real_fit(noise: guard_rates.NoiseModel) -> None:
    # Fitted to a profile's held-out runs: both regimes, a deviation per validated B, finite tails.
    assert set(noise.sd) == {"prefill", "decode"} and noise.seq_len == 256
    for regime, sds in noise.sd.items():
        assert len(sds) >= 10 and all(0.001 < sd < 0.2 for sd in sds.values()), (regime, sds)
        assert 2.0 < noise.df[regime] < 1000.0


@pytest.mark.parametrize("size", sorted(guard_rates.SIZES))
def test_a_file_of_equal_candidates_ships_none_of_them(noise: guard_rates.NoiseModel, size: str) -> None:
    """Every candidate is in truth equal to uniform: the rate of files that ship any challenger or cap at
    any B stays below 5 % (one-sided 95 % upper bound), per file, not per comparison."""
    n, seq_len = guard_rates.SIZES[size]
    r = guard_rates.rates(noise, SEEDS, n, seq_len, gain=False)
    assert guard_rates.upper95(r["wrong"], SEEDS) < 1 - guard.CONFIDENCE, r


@pytest.mark.parametrize("size", guard_rates.POWER_SIZES)
def test_a_real_one_percent_gain_still_ships(noise: guard_rates.NoiseModel, size: str) -> None:
    n, seq_len = guard_rates.SIZES[size]
    r = guard_rates.rates(noise, 60, n, seq_len, gain=True, first_seed=10_000)
    assert r["gain_shipped"] >= 0.9 and r["wrong"] <= 0.05, r


def test_the_rate_test_catches_a_guard_without_the_correction(
    noise: guard_rates.NoiseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same simulation with the confirmation at 50 % confidence (no correction, and a loose level):
    files ship false winners well above 5 % of the time, so the test above can fail."""
    monkeypatch.setattr(runner, "corrected", lambda confidence, m: 0.5)
    n, seq_len = guard_rates.SIZES["shipped profile"]
    r = guard_rates.rates(noise, 40, n, seq_len, gain=False)
    assert r["wrong"] > 2 * (1 - guard.CONFIDENCE), r
