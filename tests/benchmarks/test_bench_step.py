"""bench_step.py on CPU: its quick mode end to end (tiny layers, eager, the Triton kernels in the
interpreter; the CUDA graphs are timed on a GPU only, `make gpu-check`), and its KV-cache attention step
against plain causal attention over the whole sequence."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_step

BENCH_STEP = Path(bench_step.__file__)
COLUMNS = "| model | T | step | ms / step | MoE ms | MoE share | × stock | × vLLM |"
MODELS = [f"{shape.moe.name} (tiny)" for shape in bench_step.STEP_MODELS.values()]
MOE_STEPS = ("stock b=1", "budget b=0.5 (fused routing)")  # every quick-mode pass fits the fused routing


@pytest.mark.parametrize(
    "heads, kv_heads",
    [
        (4, 4),  # one query head per KV head (MHA)
        (8, 2),  # GQA: four query heads read each KV head, as the query rows of one SDPA call
    ],
)
def test_cached_attention_is_causal_attention_at_the_last_position(heads: int, kv_heads: int) -> None:
    T, S, D = 3, 10, 8
    pos = torch.tensor([9, 4, 0])  # the cache's last slot; its middle (a masked tail); its first
    gen = torch.Generator().manual_seed(0)
    q_seq = torch.randn(T, S, heads, D, generator=gen)
    k_seq, v_seq = torch.randn(2, T, S, kv_heads, D, generator=gen)
    # Positions after pos hold large garbage: attending to any of them would move the result far.
    k_cache, v_cache = 1e3 * torch.randn(2, T, kv_heads, S, D, generator=gen)
    for t in range(T):
        k_cache[t, :, : pos[t]] = k_seq[t, : pos[t]].transpose(0, 1)
        v_cache[t, :, : pos[t]] = v_seq[t, : pos[t]].transpose(0, 1)
    rows = torch.arange(T)
    got = bench_step.cached_attention(
        q_seq[rows, pos], k_seq[rows, pos], v_seq[rows, pos], k_cache, v_cache, pos
    )
    assert torch.equal(k_cache[rows, :, pos], k_seq[rows, pos])  # the new K/V written in place
    assert torch.equal(v_cache[rows, :, pos], v_seq[rows, pos])
    group = heads // kv_heads
    for t in range(T):
        n = int(pos[t]) + 1
        q = q_seq[t, :n].transpose(0, 1)  # [heads, n, D]
        k = k_seq[t, :n].transpose(0, 1).repeat_interleave(group, dim=0)  # head h reads KV head h // group
        v = v_seq[t, :n].transpose(0, 1).repeat_interleave(group, dim=0)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, -1]
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)  # float32


def test_quick_mode_reports_every_row(tmp_path: Path) -> None:
    """`--quick` as CI runs it: a fresh process (TRITON_INTERPRET is read when the kernels are decorated),
    exit status 0, and a table with a row per model, T and step, its numbers finite and positive."""
    out = tmp_path / "bench_step.md"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(BENCH_STEP), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = out.read_text()
    assert COLUMNS in result.stdout and COLUMNS in report
    assert "No `vLLM b=1` rows and no × vLLM (—): run with `--vllm-ref PATH`" in report
    cells = [line.split("|")[1:-1] for line in report.splitlines()[report.splitlines().index(COLUMNS) + 2 :]]
    table = {(c[0].strip(), int(c[1]), c[2].strip()): [x.strip() for x in c[3:]] for c in cells}
    assert set(table) == {(m, T, s) for m in MODELS for T in (1, 8) for s in ("no MoE", *MOE_STEPS)}
    for (model, T, step), (ms, moe_ms, share, over_stock, over_vllm) in table.items():
        assert math.isfinite(float(ms)) and float(ms) > 0, (model, T, step, ms)
        assert over_vllm == "—"
        if step == "no MoE":  # × stock rounds to 0.00 here: the interpreter's MoE dwarfs the rest
            assert moe_ms == share == "—" and float(over_stock) >= 0
            continue
        assert float(over_stock) > 0
        assert math.isfinite(float(moe_ms)) and float(moe_ms) > 0, (model, T, step, moe_ms)
        assert 0 < float(share) <= 1, (model, T, step, share)
        assert float(moe_ms) <= float(ms)
    for model in MODELS:
        for T in (1, 8):
            assert table[model, T, "stock b=1"][3] == "1.00"
