"""Grouped GEMM 1: gate/up projection with the gated activation fused, per aligned block of pairs.

inter[p] = act(x[t] · w1[e]ᵀ) * (x[t] · w3[e]ᵀ) for every valid pair p = t·K + k of expert e, where
w13[e] stacks w1 (rows 0..I-1) on w3 (rows I..2I-1). One program computes both halves of the same
[BLOCK_M, BLOCK_N] output tile, so the gate and up tiles of x are loaded once and the [pairs, 2I]
pre-activation never reaches memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align import AlignedPairs, block_tile

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """act(gate) in fp32: 0 = SiLU, 1 = exact (erf) GELU, 2 = tanh-approximated GELU (as vLLM's)."""
    if ACTIVATION == 0:
        return g * tl.sigmoid(g)
    elif ACTIVATION == 1:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        # tanh(z) = 2·sigmoid(2z) − 1: tl has no portable tanh across backends and the interpreter.
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * z)


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, H] fp16/bf16/fp32
    w13_ptr,  # [E, 2I, H] dtype of x; rows 0..I-1 gate (w1), rows I..2I-1 up (w3)
    inter_ptr,  # [T*K, I] dtype of x, out: act(gate)*up per pair; rows of pruned pairs are never written
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, p = t*K + k; sentinel T*K = padding
    block_expert_ids_ptr,  # [max_blocks] int32, -1 = unused block
    num_pairs,  # T*K
    K,  # top-k: pair p belongs to token p // K
    H,
    I,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wh,
    stride_it,
    ACTIVATION: tl.constexpr,
    FP32_IEEE: tl.constexpr,  # fp32 inputs: full-precision products, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (max_blocks·cdiv(I, BLOCK_N),); program (m, n) = `block_tile(pid)` owns the BLOCK_M pairs of
    aligned block m and intermediate columns [n·BLOCK_N, (n+1)·BLOCK_N). The N-tile runs fastest, so the
    used blocks' programs come first (align.py). An unused block (expert −1) returns before any load of x
    or weights: pruned pairs and experts nobody kept cost one int32 load per program, nothing else.
    """
    pid_m, pid_n = block_tile(tl.program_id(0), I, BLOCK_N)
    e = tl.load(block_expert_ids_ptr + pid_m)
    if e == -1:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    token = (pair // K).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + token[:, None] * stride_xt + offs_k[None, :] * stride_xh
    # int64 expert offset: E·2I·H overflows int32 for large models.
    g_ptrs = w13_ptr + e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wh
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        k_mask = offs_k < H - kb * BLOCK_K  # H need not be a multiple of BLOCK_K
        a = tl.load(x_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        g = tl.load(g_ptrs, mask=w_mask, other=0.0)
        u = tl.load(u_ptrs, mask=w_mask, other=0.0)
        if FP32_IEEE:
            acc_g = tl.dot(a, g, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, u, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, g, acc_g)
            acc_u = tl.dot(a, u, acc_u)
        x_ptrs += BLOCK_K * stride_xh
        g_ptrs += BLOCK_K * stride_wh
        u_ptrs += BLOCK_K * stride_wh
    h = _activation(acc_g, ACTIVATION) * acc_u
    out_ptrs = inter_ptr + pair.to(tl.int64)[:, None] * stride_it + offs_n[None, :]
    tl.store(out_ptrs, h.to(inter_ptr.dtype.element_ty), mask=valid[:, None] & n_mask[None, :])


def grouped_gate_up(
    x: torch.Tensor,
    w13: torch.Tensor,
    aligned: AlignedPairs,
    K: int,
    *,
    activation: str,
    config: dict[str, int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(gate)·up for every valid pair → [T·K, I] in x's dtype (rows of pruned pairs left unwritten)."""
    if activation not in ACTIVATION_CODES:
        raise ValueError(
            f"activation={activation!r} is not supported; expected one of {list(ACTIVATION_CODES)}"
        )
    T, H = x.shape
    I = w13.shape[1] // 2
    if out is None:
        out = torch.empty((T * K, I), dtype=x.dtype, device=x.device)
    if tuple(out.shape) != (T * K, I) or out.stride(1) != 1:
        raise ValueError(f"out must be a row-major [T*K, I] = {(T * K, I)} tensor; got {tuple(out.shape)}")
    grid = (aligned.block_expert_ids.shape[0] * triton.cdiv(I, config["BLOCK_N"]),)
    _gate_up_kernel[grid](
        x,
        w13,
        out,
        aligned.sorted_pair_ids,
        aligned.block_expert_ids,
        T * K,
        K,
        H,
        I,
        x.stride(0),
        x.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        out.stride(0),
        ACTIVATION=ACTIVATION_CODES[activation],
        # fp32 inputs: full-precision products (TF32 would miss the fp32 oracle's tolerance).
        FP32_IEEE=x.dtype == torch.float32,
        BLOCK_M=aligned.block_m,
        BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    return out
