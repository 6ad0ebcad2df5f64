"""Triton kernels of the grouped (sorted-by-expert) MoE-LoRA path (host code and dataflow: grouped.py).

Shape letters:
  T  tokens        K  experts per token     P = T * K  (token, slot) pairs, p = t * K + j
  E  experts       R  rank                  D  a model width (D_in for x, D_out for y)
  P_pad  rows of the sorted pair list, each expert's segment padded to a multiple of BLOCK_M

Every block of BLOCK_M sorted rows belongs to one expert (routing_meta.group_by_expert), so each program
multiplies one expert's [R, D] matrix with a block of gathered rows. Padding rows are -1 and masked out.
Expert weights are addressed as W[e][r, d] through three strides (s_w_e, s_w_r, s_w_d), whichever of
[E, R, D] or [E, D, R] they are stored as. Reductions over pairs run in a fixed order inside one program
(one program per expert and D tile for weight gradients): deterministic, no atomics. Weights of any float dtype
are cast to DOT_DTYPE per tile; blocks past the last segment exit at once.
"""

import triton
import triton.language as tl

from ._launch import dropout_scale


@triton.jit
def _grouped_fwd_kernel(
    x_ptr,  # [T, D_in] activations
    mask_ptr,  # [T, D_in] dropout mask (HAS_MASK)
    seed_ptr,  # int64 Philox seed (HAS_DROPOUT)
    a_ptr,  # lora_A, A[e][r, d] through (s_a_e, s_a_r, s_a_d)
    b_ptr,  # lora_B, B[e][o, r] through (s_b_e, s_b_o, s_b_r)
    coef_ptr,  # [P] float32 routing weight * the expert's scaling
    pair_ptr,  # [P_pad] int32 sorted pairs, -1 = padding
    block_expert_ptr,  # [P_pad / BLOCK_M] int32 expert of each block, -1 = past the end
    h_ptr,  # [P, R] float32 h = x~ A^T, kept for backward
    out_ptr,  # [P, D_out] per-pair outputs (the host sums each token's K rows)
    D_IN,
    D_OUT,
    R,
    K,
    s_x_t,
    s_x_d,
    s_m_t,
    s_m_d,
    s_a_e,
    s_a_r,
    s_a_d,
    s_b_e,
    s_b_o,
    s_b_r,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The whole forward of one block of an expert's pairs: h = x~ A^T, hw = h * coef, out = hw B^T."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # a block past the last segment: padding only
        return
    pairs = tl.load(pair_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs >= 0
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    rows = tl.where(valid, pairs // K, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    e64 = expert.to(tl.int64)

    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D_IN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D_IN
        tile = valid[:, None] & in_d[None, :]
        xt = tl.load(x_ptr + rows[:, None] * s_x_t + offs_d[None, :] * s_x_d, mask=tile, other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_m_t + offs_d[None, :] * s_m_d, mask=tile, other=0.0)
            xt = xt.to(tl.float32) * m.to(tl.float32)
        if HAS_DROPOUT:
            xt = xt.to(tl.float32) * dropout_scale(seed_ptr, rows, offs_d, D_IN, p_drop)
        w = tl.load(
            a_ptr + e64 * s_a_e + offs_r[None, :] * s_a_r + offs_d[:, None] * s_a_d,
            mask=in_d[:, None] & in_r[None, :],
            other=0.0,
        )
        h = tl.dot(xt.to(DOT_DTYPE), w.to(DOT_DTYPE), h, input_precision=DOT_PRECISION)

    rank_tile = valid[:, None] & in_r[None, :]
    tl.store(h_ptr + safe_pairs[:, None] * R + offs_r[None, :], h, mask=rank_tile)
    coef = tl.load(coef_ptr + safe_pairs, mask=valid, other=0.0)
    hw = (h * coef[:, None]).to(DOT_DTYPE)
    for o0 in range(0, D_OUT, BLOCK_D):
        offs_o = o0 + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        w = tl.load(
            b_ptr + e64 * s_b_e + offs_r[:, None] * s_b_r + offs_o[None, :] * s_b_o,
            mask=in_r[:, None] & in_o[None, :],
            other=0.0,
        )
        out = tl.dot(hw, w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        tile = valid[:, None] & in_o[None, :]
        tl.store(out_ptr + safe_pairs[:, None] * D_OUT + offs_o[None, :], out.to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _grouped_dy_kernel(
    dy_ptr,  # [T, D_out] upstream gradient
    mask_ptr,  # [T, D_in] dropout mask (HAS_MASK)
    seed_ptr,  # int64 Philox seed (HAS_DROPOUT)
    a_ptr,  # lora_A, A[e][r, d]
    b_ptr,  # lora_B, B[e][o, r]
    coef_ptr,  # [P] float32
    pair_ptr,  # [P_pad] int32 sorted pairs
    block_expert_ptr,  # [P_pad / BLOCK_M] int32
    h_ptr,  # [P, R] float32 h from the forward
    uw_ptr,  # [P, R] float32 uw = (dy B) * coef, for dA
    dcoef_ptr,  # [P] float32 gradient of coef: sum_r h * u
    dx_ptr,  # [P, D_in] per-pair input gradients (COMPUTE_DX; the host sums each token's K rows)
    D_IN,
    D_OUT,
    R,
    K,
    s_dy_t,
    s_dy_o,
    s_m_t,
    s_m_d,
    s_a_e,
    s_a_r,
    s_a_d,
    s_b_e,
    s_b_o,
    s_b_r,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The dy pass of one block: u = dy B, dcoef = sum_r h * u, uw = u * coef, dx_pairs = (uw A) * mask."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # a block past the last segment: padding only
        return
    pairs = tl.load(pair_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs >= 0
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    rows = tl.where(valid, pairs // K, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    e64 = expert.to(tl.int64)

    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_D):
        offs_o = o0 + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        dy = tl.load(
            dy_ptr + rows[:, None] * s_dy_t + offs_o[None, :] * s_dy_o, mask=valid[:, None] & in_o[None, :], other=0.0
        )
        w = tl.load(
            b_ptr + e64 * s_b_e + offs_o[:, None] * s_b_o + offs_r[None, :] * s_b_r,
            mask=in_o[:, None] & in_r[None, :],
            other=0.0,
        )
        u = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), u, input_precision=DOT_PRECISION)

    rank_tile = valid[:, None] & in_r[None, :]
    h = tl.load(h_ptr + safe_pairs[:, None] * R + offs_r[None, :], mask=rank_tile, other=0.0)
    tl.store(dcoef_ptr + safe_pairs, tl.sum(h * u, axis=1), mask=valid)
    coef = tl.load(coef_ptr + safe_pairs, mask=valid, other=0.0)
    uw = u * coef[:, None]
    tl.store(uw_ptr + safe_pairs[:, None] * R + offs_r[None, :], uw, mask=rank_tile)
    if COMPUTE_DX:
        uw_dot = uw.to(DOT_DTYPE)
        for d0 in range(0, D_IN, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D_IN
            w = tl.load(
                a_ptr + e64 * s_a_e + offs_r[:, None] * s_a_r + offs_d[None, :] * s_a_d,
                mask=in_r[:, None] & in_d[None, :],
                other=0.0,
            )
            dx = tl.dot(uw_dot, w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            tile = valid[:, None] & in_d[None, :]
            if HAS_MASK:
                m = tl.load(mask_ptr + rows[:, None] * s_m_t + offs_d[None, :] * s_m_d, mask=tile, other=0.0)
                dx = dx * m.to(tl.float32)
            if HAS_DROPOUT:
                dx = dx * dropout_scale(seed_ptr, rows, offs_d, D_IN, p_drop)
            tl.store(dx_ptr + safe_pairs[:, None] * D_IN + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _grouped_weights_kernel(
    x_ptr,  # [T, D_in]
    mask_ptr,  # [T, D_in] dropout mask (HAS_MASK)
    seed_ptr,  # int64 Philox seed (HAS_DROPOUT)
    dy_ptr,  # [T, D_out]
    uw_ptr,  # [P, R] float32 from the dy pass
    h_ptr,  # [P, R] float32 from the forward
    coef_ptr,  # [P] float32
    pair_ptr,  # [P_pad] int32 sorted pairs
    offsets_ptr,  # [E + 1] int32 first padded row of each expert
    da_ptr,  # dA float32 through (s_da_e, s_da_r, s_da_d)
    db_ptr,  # dB float32 through (s_db_e, s_db_o, s_db_r)
    D_IN,
    D_OUT,
    R,
    K,
    N_IN_TILES,
    s_x_t,
    s_x_d,
    s_m_t,
    s_m_d,
    s_dy_t,
    s_dy_o,
    s_da_e,
    s_da_r,
    s_da_d,
    s_db_e,
    s_db_o,
    s_db_r,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Both weight gradients in one launch, one program per (expert, D tile), pairs in sorted order:
    D_in tiles: dA[e] = sum_p uw^T x~; D_out tiles: dB[e] = sum_p dy^T (h * coef)."""
    expert = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    e64 = expert.to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    if pid_d < N_IN_TILES:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs_d < D_IN
        for row0 in range(start, end, BLOCK_M):
            pairs = tl.load(pair_ptr + row0 + tl.arange(0, BLOCK_M))
            valid = pairs >= 0
            safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
            rows = tl.where(valid, pairs // K, 0).to(tl.int64)
            uw = tl.load(
                uw_ptr + safe_pairs[:, None] * R + offs_r[None, :], mask=valid[:, None] & in_r[None, :], other=0.0
            )
            tile = valid[:, None] & in_d[None, :]
            xt = tl.load(x_ptr + rows[:, None] * s_x_t + offs_d[None, :] * s_x_d, mask=tile, other=0.0)
            if HAS_MASK:
                m = tl.load(mask_ptr + rows[:, None] * s_m_t + offs_d[None, :] * s_m_d, mask=tile, other=0.0)
                xt = xt.to(tl.float32) * m.to(tl.float32)
            if HAS_DROPOUT:
                xt = xt.to(tl.float32) * dropout_scale(seed_ptr, rows, offs_d, D_IN, p_drop)
            acc = tl.dot(tl.trans(uw.to(DOT_DTYPE)), xt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        out = da_ptr + e64 * s_da_e + offs_r[:, None] * s_da_r + offs_d[None, :] * s_da_d
        tl.store(out, acc, mask=in_r[:, None] & in_d[None, :])
    else:
        offs_o = (pid_d - N_IN_TILES) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        for row0 in range(start, end, BLOCK_M):
            pairs = tl.load(pair_ptr + row0 + tl.arange(0, BLOCK_M))
            valid = pairs >= 0
            safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
            rows = tl.where(valid, pairs // K, 0).to(tl.int64)
            h = tl.load(
                h_ptr + safe_pairs[:, None] * R + offs_r[None, :], mask=valid[:, None] & in_r[None, :], other=0.0
            )
            coef = tl.load(coef_ptr + safe_pairs, mask=valid, other=0.0)
            hw = (h * coef[:, None]).to(DOT_DTYPE)
            dy = tl.load(
                dy_ptr + rows[:, None] * s_dy_t + offs_o[None, :] * s_dy_o,
                mask=valid[:, None] & in_o[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(hw), dy.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        out = db_ptr + e64 * s_db_e + offs_r[:, None] * s_db_r + offs_o[None, :] * s_db_o
        tl.store(out, acc, mask=in_r[:, None] & in_o[None, :])
