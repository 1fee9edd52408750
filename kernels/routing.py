"""One MoE layer's budget routing in one launch: `device_budget.layer_routing`'s torch path, fused.

The torch path (K_l lookup, carried balance, Alloc-T, distinct-expert cap, counters) launches 50–190 small
kernels per layer under CUDA graphs (research notes §1); this kernel is one program that computes the same
bits. No sorts: every rank is a count, in the reference's own order (notes §4):

- a token's own ranking j[t, c] = #{c' : key[t, c'] before key[t, c]}, "before" being a stable descending
  `torch.sort` (ties to the lower column; NaN above everything, NaNs tied, as torch orders them);
- Alloc-T's rank of an extra candidate (j >= K_base) inside its group counts the group's extra candidates
  before it in (key desc, j asc, t asc): the order `alloc_t.reallocate`'s two stable sorts produce;
- the cap ranks a group's experts by counting over [E, E] (ties to the lower expert id).

With block_m > 0 the same program also aligns the kept pairs for the expert kernel, bit for bit as
`align_pairs` (notes §4.3 step 7), so a layer's budget body is 4 launches: this, gate_up, down, combine.

Counters (`used`, `dropped`, `distinct`) are read-modify-written by the one program (a barrier between read
and write): the first row of each budget B adds B's total, so no atomics and no order dependence.

Exactness: every output is the torch path's, bit for bit (tests/kernels/test_fused_routing.py), with two
limits. The cap's demand, a float64 sum of float32 keys, is added in (t, j) order by torch on CPU (with
atomics on CUDA) and as a tree here: equal whenever the sums are exact (keys of one expert within
2^(29 − log2 T) of each other in magnitude). The carried bar θ·exp(−αβ) uses float64 `exp`, which may differ
from torch's in the last bit: only a float32 key exactly on the bar can then differ (α = 0 or β = 0: exp = 1).

Size: one program holds [T_PAD·K_PAD, T_CHUNK·K_PAD] rank tiles and, where it counts, caps or aligns
experts, [T_PAD, K_PAD, E_PAD] one-hot tiles. The launcher takes T_PAD·K_PAD <= MAX_PAIRS and tiles up to
MAX_TILE (what the CPU tests cover: T = 64, K = 8, E = 128); `layer_routing` picks the kernel only up to
REGISTER_TILE, where one CTA's tiles should stay near registers, and the torch path above. REGISTER_TILE is
a guess until a GPU profiles the kernel (registers, spills: notes §4.4-4.5).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from vllm_alloc.values import CAP_SCALE

from .align import FILL, SCAN_TILE, AlignedPairs

MAX_PAIRS = 512  # T_PAD·K_PAD the launcher takes: T <= 64 at K = 6 or 8
MAX_TILE = 65536  # T_PAD·K_PAD·E_PAD the launcher takes where experts are counted, capped or aligned
REGISTER_TILE = 16384  # ... up to which `layer_routing` prefers the kernel: T <= 16 at K = 8, E = 128
RANK_TILE = 4096  # elements of one [T_PAD·K_PAD, chunk] compare tile of the Alloc-T rank
LOWEST = tl.constexpr(-1.7976931348623157e308)  # float64 min: experts no kept pair of a group is on


@triton.jit
def _before(a, b):
    """a sorts before b in a descending torch.sort: greater, NaN above all numbers."""
    return (a > b) | ((a != a) & (b == b))


@triton.jit
def _tied(a, b):
    return (a == b) | ((a != a) & (b != b))


@triton.jit
def _own_rank(key2, K: tl.constexpr, K_PAD: tl.constexpr):
    """[R, K_PAD] keys -> [R, K_PAD] int32: each candidate's place in its token's stable descending sort."""
    c = tl.arange(0, K_PAD)
    other = key2[:, None, :]
    mine = key2[:, :, None]
    ahead = _before(other, mine) | (_tied(other, mine) & (c[None, None, :] < c[None, :, None]))
    ahead = ahead & (c[None, None, :] < K)
    return tl.sum(ahead.to(tl.int32), axis=2)


@triton.jit
def _per_budget_add(
    counter_ptr,  # [A + 1] row of a counter (float64), read-modify-written
    budget,  # [T_PAD] int64, B_t (0 for padding and masked rows)
    x,  # [T_PAD] int32, what token t adds at B_t
    t_in,  # [T_PAD] bool, t < T
    stride,
    T_PAD: tl.constexpr,
):
    """counter[B_t] += x_t for every row, as `index_add_` does: the first row of each B writes the total."""
    same = (budget[:, None] == budget[None, :]) & t_in[None, :]
    total = tl.sum(tl.where(same, x[None, :], 0), axis=1)
    t = tl.arange(0, T_PAD)
    first = tl.sum((same & (t[None, :] < t[:, None])).to(tl.int32), axis=1) == 0
    ptrs = counter_ptr + budget * stride
    old = tl.load(ptrs, mask=t_in & first, other=0)
    tl.debug_barrier()  # every thread holding a copy has read `old` before one of them writes
    tl.store(ptrs, old + total.to(old.dtype), mask=t_in & first)


@triton.jit
def _budget_routing_kernel(
    keys_ptr,  # [T, K] float32, the router's ranking keys (higher = better)
    w_ptr,  # [T, K] float32, the candidates' input weights
    ids_ptr,  # [T, K] int32/int64, expert ids in [0, E)
    token_budget_ptr,  # [>= T] int64, B_t; 0 = padding row
    token_group_ptr,  # [>= T] int64, Alloc-T group in [0, T)
    table_ptr,  # [A + 1, L] int32, K_l(B)
    used_ptr,  # [L, A + 1] float64, in/out: activations per layer and B
    kept_w_ptr,  # [T, K] float32, out: kept weights, 0 = pruned
    kept_ids_ptr,  # [T, K] dtype of ids, out: kept ids, -1 = pruned
    token_slot_ptr,  # [>= T] int64, carried balance row (0 = not carried); HAS_CARRY only
    balance_ptr,  # [S + 1, L] int64, in/out: carried balance; HAS_CARRY only
    theta_ptr,  # [A + 1, L] float64, θ_l(B); HAS_CARRY only
    token_cap_ptr,  # [>= T] int64, cap group + 1 (0 = not capped); CAP_ON only
    cap_table_ptr,  # [A + 1, L] int64, share ρ_l(B) in thousandths; CAP_ON only
    dropped_ptr,  # [L, A + 1] float64, in/out: pairs the cap dropped; CAP_ON only
    distinct_ptr,  # [L, E + 1] float64, in/out: calls by distinct experts touched; HAS_CAP only
    sorted_pair_ids_ptr,  # [max_blocks*BLOCK_M] int32, out: as `align_pairs`; BLOCK_M > 0 only
    block_expert_ids_ptr,  # [max_blocks] int32, out: expert of each block, -1 = unused
    num_blocks_ptr,  # [1] int32, out: blocks in use
    expert_counts_ptr,  # [E] int32, out: kept pairs per expert
    T,
    column,
    bank,  # balance column: `column`, or 0 for the one-bank pool
    alpha_bits,  # the float64 bits of α (a float argument would be rounded to float32)
    table_s0,
    table_s1,
    used_s0,
    used_s1,
    balance_s0,
    balance_s1,
    theta_s0,
    theta_s1,
    cap_s0,
    cap_s1,
    dropped_s0,
    dropped_s1,
    distinct_s0,
    distinct_s1,
    max_blocks,
    K: tl.constexpr,
    KB: tl.constexpr,  # min(K_base, K)
    E: tl.constexpr,
    T_PAD: tl.constexpr,
    K_PAD: tl.constexpr,
    E_PAD: tl.constexpr,
    T_CHUNK: tl.constexpr,  # tokens per rank tile (power of two <= T_PAD)
    SCALE: tl.constexpr,
    SINGLETON: tl.constexpr,
    HAS_CARRY: tl.constexpr,
    HAS_CAP: tl.constexpr,
    CAP_ON: tl.constexpr,
    BLOCK_M: tl.constexpr,  # > 0: also align the kept pairs for the expert kernel (kernels/align.py)
    ROWS: tl.constexpr,  # block ids written per step of the alignment
    FILL: tl.constexpr,  # sentinel slots written per step of the alignment
):
    """Grid (1,); the one program owns all T rows: their kept pairs, their balance rows, and this layer's
    entries of the counters."""
    t = tl.arange(0, T_PAD)
    c = tl.arange(0, K_PAD)
    t_in = t < T
    in2 = t_in[:, None] & (c < K)[None, :]
    budget = tl.load(token_budget_ptr + t, mask=t_in, other=0).to(tl.int64)
    k_tok = tl.load(table_ptr + budget * table_s0 + column * table_s1, mask=t_in, other=0).to(tl.int64)
    valid = t_in & (k_tok > 0)
    pair = t[:, None] * K + c[None, :]
    key2 = tl.load(keys_ptr + pair, mask=in2, other=0.0)
    j2 = _own_rank(key2, K, K_PAD)

    # Alloc-T in ranked positions j: the floor, then the group's pool by rank.
    keep2 = valid[:, None] & (j2 < KB)
    if KB < K:
        if SINGLETON:
            n_prefix = tl.where(valid, tl.minimum(tl.maximum(k_tok, KB), K), 0)
            keep2 = j2 < n_prefix[:, None]
        else:
            group = tl.load(token_group_ptr + t, mask=t_in, other=0).to(tl.int64)
            same = (group[:, None] == group[None, :]) & valid[None, :]
            pool = tl.sum(tl.where(same, k_tok[None, :] - KB, 0), axis=1)  # unclamped, as the reference
            # Rank of each extra candidate among its group's extras, against T_CHUNK tokens at a time.
            M: tl.constexpr = T_PAD * K_PAD
            key_f = tl.reshape(key2, [M])
            j_f = tl.reshape(j2, [M])
            t_f = tl.reshape(tl.broadcast_to(t[:, None], [T_PAD, K_PAD]), [M])
            g_f = tl.reshape(tl.broadcast_to(group[:, None], [T_PAD, K_PAD]), [M])
            rank = tl.zeros([M], dtype=tl.int32)
            CM: tl.constexpr = T_CHUNK * K_PAD
            for t0 in range(0, T, T_CHUNK):
                to = t0 + tl.arange(0, T_CHUNK)
                to_in = to < T
                b_o = tl.load(token_budget_ptr + to, mask=to_in, other=0).to(tl.int64)
                k_o = tl.load(table_ptr + b_o * table_s0 + column * table_s1, mask=to_in, other=0)
                g_o = tl.load(token_group_ptr + to, mask=to_in, other=0).to(tl.int64)
                key_o2 = tl.load(
                    keys_ptr + to[:, None] * K + c[None, :], mask=to_in[:, None] & (c < K)[None, :]
                )
                j_o2 = _own_rank(key_o2, K, K_PAD)
                extra_o2 = (to_in & (k_o > 0))[:, None] & (j_o2 >= KB) & (c < K)[None, :]
                key_o = tl.reshape(key_o2, [CM])
                j_o = tl.reshape(j_o2, [CM])
                extra_o = tl.reshape(extra_o2, [CM])
                t_o = tl.reshape(tl.broadcast_to(to[:, None], [T_CHUNK, K_PAD]), [CM])
                g_o_f = tl.reshape(tl.broadcast_to(g_o[:, None], [T_CHUNK, K_PAD]), [CM])
                later = (j_o[None, :] < j_f[:, None]) | (
                    (j_o[None, :] == j_f[:, None]) & (t_o[None, :] < t_f[:, None])
                )
                ahead = _before(key_o[None, :], key_f[:, None]) | (
                    _tied(key_o[None, :], key_f[:, None]) & later
                )
                ahead = ahead & extra_o[None, :] & (g_o_f[None, :] == g_f[:, None])
                rank += tl.sum(ahead.to(tl.int32), axis=1)
            rank2 = tl.reshape(rank, [T_PAD, K_PAD])
            keep2 = keep2 | (valid[:, None] & (j2 >= KB) & (rank2 < pool[:, None]))
    else:
        keep2 = valid[:, None] & (j2 < K)

    if HAS_CARRY:
        # carry.carry_counts, in float64 as there; only carried rows (slot > 0) write their balance.
        slot = tl.load(token_slot_ptr + t, mask=t_in, other=0).to(tl.int64)
        beta = tl.load(balance_ptr + slot * balance_s0 + bank * balance_s1, mask=t_in, other=0).to(tl.int64)
        theta = tl.load(theta_ptr + budget * theta_s0 + column * theta_s1, mask=t_in, other=0.0)
        alpha = alpha_bits.to(tl.int64).to(tl.float64, bitcast=True)
        bar = theta.to(tl.float64) * tl.exp(-alpha * beta.to(tl.float64))
        clear = (key2.to(tl.float64) >= bar[:, None]) & (c < K)[None, :]
        want = tl.maximum(tl.sum(clear.to(tl.int64), axis=1), KB)
        n = tl.maximum(tl.minimum(want, tl.minimum(k_tok + beta, K)), KB)
        n = tl.where(valid, n, 0)
        carried = t_in & (slot > 0)
        keep2 = tl.where(carried[:, None], j2 < n[:, None], keep2)
        after = tl.where(valid, beta + k_tok - n, beta)
        tl.debug_barrier()  # all warps have read β (and decided with it) before any writes it back
        tl.store(balance_ptr + slot * balance_s0 + bank * balance_s1, after, mask=carried)
    keep2 = keep2 & in2

    ids2 = tl.load(ids_ptr + pair, mask=in2, other=-1)
    if HAS_CAP:
        e = tl.arange(0, E_PAD)
        onehot = (ids2[:, :, None] == e[None, None, :]) & (e < E)[None, None, :]  # [T_PAD, K_PAD, E_PAD]
        if CAP_ON:
            n_tok = tl.sum(keep2.to(tl.int64), axis=1)
            tcap = tl.load(token_cap_ptr + t, mask=t_in, other=0).to(tl.int64)
            q_tab = tl.load(cap_table_ptr + budget * cap_s0 + column * cap_s1, mask=t_in, other=SCALE)
            q = tl.where(tcap > 0, q_tab.to(tl.int64), SCALE)
            capped = t_in & (q < SCALE) & (n_tok > 0)
            cgroup = tl.where(capped, tl.maximum(tcap - 1, 0), T)
            mates = (cgroup[:, None] == cgroup[None, :]) & capped[None, :]
            capped = capped & (tl.sum(mates.to(tl.int32), axis=1) > 1)  # a group of one is not capped
            cgroup = tl.where(capped, cgroup, T)
            # Free experts: kept by the pass's uncapped tokens.
            free_pair = keep2 & (~capped)[:, None]
            free = tl.sum((onehot & free_pair[:, :, None]).to(tl.int32), axis=1)
            free = tl.sum(free, axis=0) > 0
            key64 = key2.to(tl.float64)
            floor_pos = j2 < KB
            ok = tl.zeros([T_PAD, K_PAD], dtype=tl.int1)
            for g in range(0, T):
                members = capped & (cgroup == g)
                if tl.sum(members.to(tl.int32), axis=0) > 0:
                    mine = onehot & (keep2 & members[:, None])[:, :, None]
                    wants = tl.sum(tl.sum(mine.to(tl.int32), axis=1), axis=0)
                    demand = tl.sum(tl.sum(tl.where(mine, key64[:, :, None], 0.0), axis=1), axis=0)
                    floor = tl.sum(tl.sum((mine & floor_pos[:, :, None]).to(tl.int32), axis=1), axis=0)
                    floor_e = (floor > 0) & ~free
                    order = tl.where(wants > 0, demand, tl.full([E_PAD], LOWEST, tl.float64))
                    order = tl.where(floor_e, float("inf"), order)
                    order = tl.where(free, float("-inf"), order)
                    ahead = _before(order[None, :], order[:, None]) | (
                        _tied(order[None, :], order[:, None]) & (e[None, :] < e[:, None])
                    )
                    e_rank = tl.sum((ahead & (e < E)[None, :]).to(tl.int32), axis=1)
                    wanted = tl.sum(((wants > 0) & ~free).to(tl.int64), axis=0)  # D_g
                    share = tl.minimum(tl.min(tl.where(members, q, SCALE), axis=0), SCALE)
                    cap = tl.where(share < SCALE, (share * wanted + SCALE - 1) // SCALE, E)
                    limit = tl.maximum(cap, tl.sum(floor_e.to(tl.int64), axis=0))
                    allowed = free | (e_rank < limit)
                    hit = tl.sum((onehot & allowed[None, None, :]).to(tl.int32), axis=2) > 0
                    ok = tl.where(members[:, None], hit, ok)
            # Each capped token: its floor, then allowed candidates in rank order, up to n_t pairs.
            ok = (ok | floor_pos) & in2
            upto = ok[:, None, :] & (j2[:, None, :] <= j2[:, :, None])
            take = ok & (tl.sum(upto.to(tl.int64), axis=2) <= n_tok[:, None])
            keep2 = tl.where(capped[:, None], take, keep2)
            lost = (n_tok - tl.sum(keep2.to(tl.int64), axis=1)).to(tl.int32)
            _per_budget_add(dropped_ptr + column * dropped_s0, budget, lost, t_in, dropped_s1, T_PAD)
        touched = tl.sum(tl.sum((onehot & keep2[:, :, None]).to(tl.int32), axis=1), axis=0) > 0
        distinct = tl.sum(touched.to(tl.int32), axis=0)
        d_ptr = distinct_ptr + column * distinct_s0 + distinct * distinct_s1
        d_old = tl.load(d_ptr, mask=distinct > 0, other=0)
        tl.debug_barrier()
        tl.store(d_ptr, d_old + 1, mask=distinct > 0)  # a padding-only call touches none, counts none

    _per_budget_add(
        used_ptr + column * used_s0, budget, tl.sum(keep2.to(tl.int32), axis=1), t_in, used_s1, T_PAD
    )
    w2 = tl.load(w_ptr + pair, mask=in2, other=0.0)
    tl.store(kept_w_ptr + pair, tl.where(keep2, w2, 0.0), mask=in2)
    tl.store(kept_ids_ptr + pair, tl.where(keep2, ids2, -1), mask=in2)

    if BLOCK_M > 0:
        # `align_pairs`' three launches, here: per-expert counts, blocks, block owners, then each kept pair
        # p = t·K + k at its expert's segment, in increasing p (the flat index t·K_PAD + c keeps that order).
        MA: tl.constexpr = T_PAD * K_PAD
        ex = tl.arange(0, E_PAD)
        ex_in = ex < E
        hot = (ids2[:, :, None] == ex[None, None, :]) & ex_in[None, None, :] & keep2[:, :, None]
        hot_f = tl.reshape(hot.to(tl.int32), [MA, E_PAD])
        counts = tl.sum(hot_f, axis=0)
        blocks = (counts + BLOCK_M - 1) // BLOCK_M
        block_end = tl.cumsum(blocks, axis=0)
        total = tl.sum(blocks, axis=0)
        tl.store(expert_counts_ptr + ex, counts, mask=ex_in)
        tl.store(num_blocks_ptr, total)
        for b0 in range(0, max_blocks, ROWS):
            offs_b = b0 + tl.arange(0, ROWS)
            ended = (block_end[None, :] <= offs_b[:, None]) & ex_in[None, :]
            owner = tl.where(offs_b < total, tl.sum(ended.to(tl.int32), axis=1), -1)
            tl.store(block_expert_ids_ptr + offs_b, owner, mask=offs_b < max_blocks)
        for s0 in range(0, max_blocks * BLOCK_M, FILL):
            offs_s = s0 + tl.arange(0, FILL)
            sentinel = tl.full([FILL], 0, tl.int32) + T * K
            tl.store(sorted_pair_ids_ptr + offs_s, sentinel, mask=offs_s < max_blocks * BLOCK_M)
        tl.debug_barrier()  # the sentinel fill lands before the pairs overwrite their slots
        rank_e = tl.sum(tl.where(hot_f > 0, tl.cumsum(hot_f, axis=0) - 1, 0), axis=1)
        start = (block_end - blocks) * BLOCK_M
        base = tl.sum(tl.where(hot_f > 0, start[None, :], 0), axis=1)
        placed = tl.sum(hot_f, axis=1) > 0  # kept, with an id in [0, E)
        tl.store(sorted_pair_ids_ptr + base + rank_e, tl.reshape(pair, [MA]), mask=placed)


def fused_routing_fits(T: int, K: int, E: int = 0, tile: int = MAX_TILE) -> bool:
    """Whether `budget_routing` takes T rows of K candidates over E experts (E = 0: no expert is counted,
    capped or aligned), with its [T_PAD, K_PAD, E_PAD] tiles at most `tile` elements."""
    pairs = triton.next_power_of_2(T) * triton.next_power_of_2(K)
    return T >= 1 and pairs <= MAX_PAIRS and (E == 0 or pairs * triton.next_power_of_2(E) <= tile)


def budget_routing(
    keys: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    token_budget: torch.Tensor,
    token_group: torch.Tensor,
    table: torch.Tensor,
    used: torch.Tensor,
    column: int,
    k_base: int,
    singleton_groups: bool = False,
    token_slot: torch.Tensor | None = None,
    balance: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    alpha: float = 0.0,
    one_bank: bool = False,
    num_experts: int = 0,
    token_cap: torch.Tensor | None = None,
    cap_table: torch.Tensor | None = None,
    dropped: torch.Tensor | None = None,
    distinct: torch.Tensor | None = None,
    block_m: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, AlignedPairs | None]:
    """`layer_routing`'s routing in one launch: (kept weights [T, K] float32, kept ids [T, K] in ids'
    dtype, −1 = pruned, aligned), with `used`, `balance`, `dropped` and `distinct` updated in place.

    block_m > 0 (a power of two >= 16, with num_experts = E): `aligned` is `align_pairs(kept ids, E,
    block_m)`, bit for bit, from the same launch, for the expert kernel; else None.

    Carry: token_slot, balance and theta all given (alpha, one_bank as `device_budget.Carry`). Counting
    distinct experts: distinct given (with num_experts = E); the cap as well: token_cap, cap_table and
    dropped given. keys and weights float32 (what vLLM's router gives; `layer_routing` keeps the torch
    path for other dtypes). Index buffers are not checked on device: an id or B out of range is undefined.
    """
    same = keys.dim() == 2 and weights.shape == keys.shape == ids.shape
    floats = {keys.dtype, weights.dtype} == {torch.float32}
    if not (same and floats and ids.dtype in (torch.int32, torch.int64)):
        raise ValueError(
            f"keys, weights [T, K] float32 and ids [T, K] int32/int64; got {keys.dtype} {tuple(keys.shape)}, "
            f"{weights.dtype} {tuple(weights.shape)}, {ids.dtype} {tuple(ids.shape)}"
        )
    T, K = keys.shape
    E = num_experts if distinct is not None or block_m else 0
    if not fused_routing_fits(T, K, E):
        raise ValueError(
            f"T={T}, K={K}, E={E}: next_pow2(T)·next_pow2(K) must be in [1, {MAX_PAIRS}], and times "
            f"next_pow2(E) at most {MAX_TILE}"
        )
    if isinstance(k_base, bool) or not isinstance(k_base, int) or k_base < 1:
        raise ValueError(f"k_base={k_base!r}: must be an int >= 1")
    has_carry = token_slot is not None
    if has_carry != (balance is not None) or has_carry != (theta is not None):
        raise ValueError("carry needs token_slot, balance and theta together")
    cap_on = token_cap is not None
    if cap_on != (cap_table is not None) or cap_on != (dropped is not None) or (cap_on and distinct is None):
        raise ValueError("the cap needs token_cap, cap_table, dropped and distinct together")
    has_cap = distinct is not None
    if (has_cap or block_m) and num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1 where experts are counted or aligned")
    if block_m and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m={block_m} must be 0 or a power of two >= 16")
    keys, weights, ids = keys.contiguous(), weights.contiguous(), ids.contiguous()
    kept_w, kept_ids = torch.empty_like(weights), torch.empty_like(ids)
    t_pad, k_pad = triton.next_power_of_2(T), triton.next_power_of_2(K)
    e_pad = triton.next_power_of_2(max(num_experts, 1))
    n_blocks = min(T * K, triton.cdiv(T * K, block_m) + num_experts) if block_m else 0  # as align_pairs
    dev = keys.device
    sorted_pair_ids = torch.empty(n_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=dev)
    num_blocks = torch.empty(1 if block_m else 0, dtype=torch.int32, device=dev)
    expert_counts = torch.empty(num_experts if block_m else 0, dtype=torch.int32, device=dev)
    # `used` stands for absent buffers (never read where their flag is off).
    bal, th, dr, di = (b if b is not None else used for b in (balance, theta, dropped, distinct))
    ct = cap_table if cap_table is not None else table
    _budget_routing_kernel[(1,)](
        keys, weights, ids, token_budget, token_group, table, used, kept_w, kept_ids,
        token_slot if token_slot is not None else token_budget, bal, th,
        token_cap if token_cap is not None else token_budget, ct, dr, di,
        sorted_pair_ids, block_expert_ids, num_blocks, expert_counts,
        T, column, 0 if one_bank else column, struct.unpack("<q", struct.pack("<d", float(alpha)))[0],
        table.stride(0), table.stride(1), used.stride(0), used.stride(1), bal.stride(0), bal.stride(1),
        th.stride(0), th.stride(1), ct.stride(0), ct.stride(1), dr.stride(0), dr.stride(1),
        di.stride(0), di.stride(1), n_blocks,
        K=K, KB=min(k_base, K), E=max(num_experts, 1), T_PAD=t_pad, K_PAD=k_pad, E_PAD=e_pad,
        T_CHUNK=min(t_pad, max(1, RANK_TILE // (t_pad * k_pad * k_pad))), SCALE=CAP_SCALE,
        SINGLETON=singleton_groups, HAS_CARRY=has_carry, HAS_CAP=has_cap, CAP_ON=cap_on,
        BLOCK_M=block_m, ROWS=max(1, SCAN_TILE // e_pad), FILL=FILL, num_warps=8,
    )  # fmt: skip
    aligned = AlignedPairs(sorted_pair_ids, block_expert_ids, num_blocks, expert_counts, block_m)
    return kept_w, kept_ids, aligned if block_m else None
