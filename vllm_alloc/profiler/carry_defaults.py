"""Defaults of the carried balance the profiler calibrates and writes into the budget file (θ's offset,
the bar's α per pool, the pool, the largest Alloc-T group that carries); the CLI's flags override them."""

from __future__ import annotations

# The carried balance's calibration (docs/design.md): θ_l keeps K_l − K_base − CARRY_OFFSET extras per
# token on average, and the bar falls by exp(−α·β); both measured best on two models (lever_sim.py).
# One bank for all of a request's layers moves L times as often as a layer's balance, so its α is lower.
CARRY_OFFSET = 0.4
CARRY_ALPHA = {"layer": 0.05, "request": 0.025}
CARRY_POOL = "request"
# Decode tokens carry where at most this many share an Alloc-T group (BENCHMARKS.md, default model, b =
# 0.5: at N = 8 streams carrying recovers 51 % of top-2's loss against Alloc-T's 49 %; at N = 64 Alloc-T
# is ahead, 54 %).
CARRY_GROUP = 8
