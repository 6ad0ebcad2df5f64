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
def _grouped_shrink_kernel(
    in_ptr,  # [T, D] activations (x or dy)
    mask_ptr,  # [T, D] dropout mask on the input, or a dummy when HAS_MASK is False
    seed_ptr,  # int64 Philox seed of in-kernel dropout (HAS_DROPOUT)
    w_ptr,  # expert weights, W[e][r, d] through (s_w_e, s_w_r, s_w_d)
    coef_ptr,  # [P] float32 scaling * routing weight of each pair
    pair_ptr,  # [P_pad] int32 sorted pairs, -1 = padding
    block_expert_ptr,  # [P_pad / BLOCK_M] int32 expert of each block, -1 = past the end
    out_ptr,  # [P, R] float32 rank-space activations (h or u)
    gated_ptr,  # [P, R] out * coef in the activation dtype
    D,
    R,
    K,
    s_in_t,
    s_in_d,
    s_mask_t,
    s_mask_d,
    s_w_e,
    s_w_r,
    s_w_d,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[p, r] = sum_d in[t_p, d] * mask[t_p, d] * W[e_p][r, d]; gated[p, r] = out[p, r] * coef[p]."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # a block past the last segment: padding only
        return
    pairs = tl.load(pair_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs >= 0  # blocks past the end (expert -1) hold only padding rows
    rows = tl.where(valid, pairs // K, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    w_base = w_ptr + tl.maximum(expert, 0).to(tl.int64) * s_w_e + offs_r * s_w_r

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        tile_mask = valid[:, None] & in_d[None, :]
        a = tl.load(in_ptr + rows[:, None] * s_in_t + offs_d[None, :] * s_in_d, mask=tile_mask, other=0.0)
        w = tl.load(w_base[None, :] + offs_d[:, None] * s_w_d, mask=in_d[:, None] & in_r[None, :], other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=tile_mask, other=0.0)
            a = a.to(tl.float32) * m.to(tl.float32)
        if HAS_DROPOUT:
            a = a.to(tl.float32) * dropout_scale(seed_ptr, rows, offs_d, D, p_drop)
        acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    out_mask = valid[:, None] & in_r[None, :]
    tile = safe_pairs[:, None] * R + offs_r[None, :]
    tl.store(out_ptr + tile, acc, mask=out_mask)
    coef = tl.load(coef_ptr + safe_pairs, mask=valid, other=0.0)
    tl.store(gated_ptr + tile, (acc * coef[:, None]).to(gated_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_expand_kernel(
    in_ptr,  # [P, R] gated rank-space activations in the activation dtype
    w_ptr,  # expert weights, W[e][r, d] through (s_w_e, s_w_r, s_w_d)
    mask_ptr,  # [T, D] dropout mask on the output, or a dummy when HAS_MASK is False
    seed_ptr,  # int64 Philox seed of in-kernel dropout (HAS_DROPOUT)
    pair_ptr,  # [P_pad] int32 sorted pairs, -1 = padding
    block_expert_ptr,  # [P_pad / BLOCK_M] int32 expert of each block
    out_ptr,  # [P, D] per-pair outputs in the activation dtype (the host sums each token's K rows)
    D,
    R,
    K,
    s_w_e,
    s_w_r,
    s_w_d,
    s_mask_t,
    s_mask_d,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[p, d] = mask[t_p, d] * sum_r in[p, r] * W[e_p][r, d]."""
    block = tl.program_id(0)
    pid_d = tl.program_id(1)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:  # a block past the last segment: padding only
        return
    pairs = tl.load(pair_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs >= 0  # blocks past the end (expert -1) hold only padding rows
    safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D

    h = tl.load(in_ptr + safe_pairs[:, None] * R + offs_r[None, :], mask=valid[:, None] & in_r[None, :], other=0.0)
    w_base = w_ptr + tl.maximum(expert, 0).to(tl.int64) * s_w_e
    w = tl.load(
        w_base + offs_r[:, None] * s_w_r + offs_d[None, :] * s_w_d, mask=in_r[:, None] & in_d[None, :], other=0.0
    )
    acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision=DOT_PRECISION)

    out_mask = valid[:, None] & in_d[None, :]
    rows = tl.where(valid, pairs // K, 0).to(tl.int64)
    if HAS_MASK:
        m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=out_mask, other=0.0)
        acc = acc * m.to(tl.float32)
    if HAS_DROPOUT:
        acc = acc * dropout_scale(seed_ptr, rows, offs_d, D, p_drop)
    tl.store(out_ptr + safe_pairs[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_grad_kernel(
    p_ptr,  # [P, R] gated rank-space activations in the activation dtype (uw for dA, hw for dB)
    q_ptr,  # [T, D] activations (x for dA, dy for dB)
    mask_ptr,  # [T, D] dropout mask on q, or a dummy when HAS_MASK is False
    seed_ptr,  # int64 Philox seed of in-kernel dropout (HAS_DROPOUT)
    pair_ptr,  # [P_pad] int32 sorted pairs, -1 = padding
    offsets_ptr,  # [E + 1] int32 first padded row of each expert
    out_ptr,  # weight gradient, G[e][r, d] through (s_o_e, s_o_r, s_o_d)
    D,
    R,
    K,
    s_q_t,
    s_q_d,
    s_mask_t,
    s_mask_d,
    s_o_e,
    s_o_r,
    s_o_d,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[e][r, d] = sum over the pairs p of expert e of p[p, r] * q[t_p, d] * mask[t_p, d], in sorted order."""
    expert = tl.program_id(0)
    pid_d = tl.program_id(1)
    start = tl.load(offsets_ptr + expert)
    end = tl.load(offsets_ptr + expert + 1)
    offs_r = tl.arange(0, BLOCK_R)
    in_r = offs_r < R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D

    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for row0 in range(start, end, BLOCK_M):
        pairs = tl.load(pair_ptr + row0 + tl.arange(0, BLOCK_M))
        valid = pairs >= 0
        safe_pairs = tl.where(valid, pairs, 0).to(tl.int64)
        rows = tl.where(valid, pairs // K, 0).to(tl.int64)
        p = tl.load(p_ptr + safe_pairs[:, None] * R + offs_r[None, :], mask=valid[:, None] & in_r[None, :], other=0.0)
        q_mask = valid[:, None] & in_d[None, :]
        q = tl.load(q_ptr + rows[:, None] * s_q_t + offs_d[None, :] * s_q_d, mask=q_mask, other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=q_mask, other=0.0)
            q = q.to(tl.float32) * m.to(tl.float32)
        if HAS_DROPOUT:
            q = q.to(tl.float32) * dropout_scale(seed_ptr, rows, offs_d, D, p_drop)
        acc = tl.dot(tl.trans(p.to(DOT_DTYPE)), q.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    out = out_ptr + expert.to(tl.int64) * s_o_e + offs_r[:, None] * s_o_r + offs_d[None, :] * s_o_d
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_r[:, None] & in_d[None, :])
