"""Triton kernels of the stacked MoE-LoRA path (host code and dataflow: stacked.py).

Shape letters:
  T  tokens            D_in / D_out  the layer's widths
  E  experts           R  LoRA rank          N = E * R  the stacked rank width (one BLOCK_N tile)
Column n of the stacked rank space belongs to expert e = n // R, rank index i = n % R.

The expert weights are never copied into a stacked layout or another dtype: each kernel addresses the stacked
matrix W[n, d] of the [E, R, D_in] / [E, D_out, R] parameter through its three strides and casts each tile to
DOT_DTYPE on load (fp32 masters under bf16/fp16 activations). The per-token gate G[t, e] (routing weight of
expert e, 0 if not selected) times the per-expert scaling c[e] is applied in registers. The weights, gate and
scaling of an expert that no token selects (counts[e] == 0) are never loaded (masked to 0), so NaN/Inf there
reach no output or gradient, as on the grouped path.

Every reduction runs in a fixed order inside one program (no atomics), so results are bitwise deterministic.
Masked loads give 0 outside the tensor (other=0.0).
"""

import triton
import triton.language as tl

from ._launch import dropout_scale


@triton.jit
def _gate_tile(gate_ptr, scale_ptr, rows, expert, valid, s_g_t, s_g_e, scale_const, HAS_SCALE_VEC: tl.constexpr):
    """[BLOCK_T, BLOCK_N] float32 G[t, e_n] * c[e_n]: what multiplies each rank-space activation."""
    g = tl.load(gate_ptr + rows[:, None] * s_g_t + expert[None, :] * s_g_e, mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE_VEC:
        c = tl.load(scale_ptr + expert, mask=expert >= 0, other=0.0).to(tl.float32)
        return g * c[None, :]
    return g * scale_const


@triton.jit
def _used_columns(counts_ptr, offs_n, in_n, R):
    """[BLOCK_N] mask of the rank columns whose expert some token selects (the only weights a kernel reads)."""
    return in_n & (tl.load(counts_ptr + offs_n // R, mask=in_n, other=0) > 0)


@triton.jit
def _stacked_fwd_kernel(
    x_ptr,  # [T, D_in] activations
    mask_ptr,  # [T, D_in] dropout mask given by the caller (HAS_MASK)
    seed_ptr,  # int64 Philox seed of in-kernel dropout (HAS_DROPOUT)
    a_ptr,  # lora_A seen as A[n, d] through (s_a_e, s_a_r, s_a_d)
    b_ptr,  # lora_B seen as B[o, n] through (s_b_e, s_b_o, s_b_r)
    gate_ptr,  # [T, E] routing gate
    counts_ptr,  # [E] int64 pairs per expert: the weights of an expert with none are not read
    scale_ptr,  # [E] float32 per-expert scaling (HAS_SCALE_VEC), else scale_const
    base_ptr,  # [T, D_out] the base layer's output to add to (HAS_BASE); may be y_ptr itself (in place)
    y_ptr,  # [T, D_out] output, activation dtype
    s_ptr,  # [T, N] float32 rank-space activations S = x~ A^T, kept for backward
    T,
    D_IN,
    D_OUT,
    N,
    R,
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
    s_g_t,
    s_g_e,
    s_base_t,
    s_base_d,
    s_y_t,
    s_y_d,
    scale_const,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_SCALE_VEC: tl.constexpr,
    HAS_BASE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One launch for the whole forward of a tile of tokens:
    S = x~ A^T (shrink), H = S * G * c (gate in registers), y = base + H B^T (expand, accumulated in place)."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    used = _used_columns(counts_ptr, offs_n, in_n, R)
    expert = tl.where(used, offs_n // R, -1)
    a_col = (offs_n // R).to(tl.int64) * s_a_e + (offs_n % R).to(tl.int64) * s_a_r

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D_IN, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D_IN
        tile = in_t[:, None] & in_d[None, :]
        xt = tl.load(x_ptr + rows[:, None] * s_x_t + offs_d[None, :] * s_x_d, mask=tile, other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_m_t + offs_d[None, :] * s_m_d, mask=tile, other=0.0)
            xt = xt.to(tl.float32) * m.to(tl.float32)
        if HAS_DROPOUT:
            xt = xt.to(tl.float32) * dropout_scale(seed_ptr, offs_t, offs_d, D_IN, p_drop)
        w = tl.load(a_ptr + a_col[None, :] + offs_d[:, None] * s_a_d, mask=in_d[:, None] & used[None, :], other=0.0)
        acc = tl.dot(xt.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)

    valid = in_t[:, None] & in_n[None, :]
    tl.store(s_ptr + rows[:, None] * N + offs_n[None, :], acc, mask=valid)
    gated = in_t[:, None] & used[None, :]
    h = (acc * _gate_tile(gate_ptr, scale_ptr, rows, expert, gated, s_g_t, s_g_e, scale_const, HAS_SCALE_VEC)).to(
        DOT_DTYPE
    )

    b_row = (offs_n // R).to(tl.int64) * s_b_e + (offs_n % R).to(tl.int64) * s_b_r
    for o0 in range(0, D_OUT, BLOCK_D):
        offs_o = o0 + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        w = tl.load(b_ptr + b_row[:, None] + offs_o[None, :] * s_b_o, mask=used[:, None] & in_o[None, :], other=0.0)
        out = tl.dot(h, w.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        tile = in_t[:, None] & in_o[None, :]
        if HAS_BASE:
            base = tl.load(base_ptr + rows[:, None] * s_base_t + offs_o[None, :] * s_base_d, mask=tile, other=0.0)
            out += base.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * s_y_t + offs_o[None, :] * s_y_d, out.to(y_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _stacked_dy_kernel(
    dy_ptr,  # [T, D_out] upstream gradient
    b_ptr,  # lora_B seen as B[o, n]
    s_ptr,  # [T, N] float32 S saved by the forward
    gate_ptr,  # [T, E] routing gate
    counts_ptr,  # [E] int64 pairs per expert
    scale_ptr,  # [E] per-expert scaling (HAS_SCALE_VEC)
    v_ptr,  # [T, N] float32 V = (dy B) * G * c
    dgate_ptr,  # [T, E] float32 gradient of the gate
    T,
    D_OUT,
    N,
    R,
    E,
    s_dy_t,
    s_dy_o,
    s_b_e,
    s_b_o,
    s_b_r,
    s_g_t,
    s_g_e,
    scale_const,
    HAS_SCALE_VEC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The dy pass: U = dy B, V = U * G * c (for dx and dA), dG[t, e] = c[e] * sum_i S[t, eR+i] U[t, eR+i]."""
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    in_t = offs_t < T
    rows = offs_t.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    used = _used_columns(counts_ptr, offs_n, in_n, R)
    expert = tl.where(used, offs_n // R, -1)
    b_col = (offs_n // R).to(tl.int64) * s_b_e + (offs_n % R).to(tl.int64) * s_b_r

    u = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, D_OUT, BLOCK_D):
        offs_o = o0 + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        dy = tl.load(
            dy_ptr + rows[:, None] * s_dy_t + offs_o[None, :] * s_dy_o, mask=in_t[:, None] & in_o[None, :], other=0.0
        )
        w = tl.load(b_ptr + b_col[None, :] + offs_o[:, None] * s_b_o, mask=in_o[:, None] & used[None, :], other=0.0)
        u = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), u, input_precision=DOT_PRECISION)

    valid = in_t[:, None] & in_n[None, :]
    gated = in_t[:, None] & used[None, :]
    gc = _gate_tile(gate_ptr, scale_ptr, rows, expert, gated, s_g_t, s_g_e, scale_const, HAS_SCALE_VEC)
    tl.store(v_ptr + rows[:, None] * N + offs_n[None, :], u * gc, mask=valid)
    s = tl.load(s_ptr + rows[:, None] * N + offs_n[None, :], mask=gated, other=0.0)
    if HAS_SCALE_VEC:
        c = tl.load(scale_ptr + expert, mask=used, other=0.0).to(tl.float32)
        su = s * u * c[None, :]
    else:
        su = s * u * scale_const
    for e in range(0, E):
        dg = tl.sum(tl.where(expert[None, :] == e, su, 0.0), axis=1)
        tl.store(dgate_ptr + rows * E + e, dg, mask=in_t)


@triton.jit
def _stacked_weights_kernel(
    x_ptr,  # [T, D_in] activations
    mask_ptr,  # [T, D_in] dropout mask given by the caller (HAS_MASK)
    seed_ptr,  # int64 Philox seed (HAS_DROPOUT)
    a_ptr,  # lora_A seen as A[n, d]
    v_ptr,  # [T, N] float32 V from the dy pass
    dx_ptr,  # [T, D_in] input gradient (COMPUTE_DX), activation dtype, contiguous
    dy_ptr,  # [T, D_out] upstream gradient
    s_ptr,  # [T, N] float32 S
    gate_ptr,  # [T, E] gate
    counts_ptr,  # [E] int64 pairs per expert
    scale_ptr,  # [E] per-expert scaling (HAS_SCALE_VEC)
    da_ptr,  # dA slabs: split s, A-shaped gradient through (s_da_e, s_da_r, s_da_d), float32
    db_ptr,  # dB slabs through (s_db_e, s_db_o, s_db_r), float32
    T,
    D_IN,
    D_OUT,
    N,
    R,
    T_PER_SPLIT,
    N_IN_TILES,
    s_x_t,
    s_x_d,
    s_m_t,
    s_m_d,
    s_a_e,
    s_a_r,
    s_a_d,
    s_dy_t,
    s_dy_o,
    s_g_t,
    s_g_e,
    s_da_split,
    s_da_e,
    s_da_r,
    s_da_d,
    s_db_split,
    s_db_e,
    s_db_o,
    s_db_r,
    scale_const,
    p_drop,
    HAS_MASK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_SCALE_VEC: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The x pass and the dB pass in one launch; program (d, s) walks the tokens of split s in order.

    d < N_IN_TILES (a D_in tile): dx = (V A) * mask for those rows and dA partial = V^T x~.
    d >= N_IN_TILES (a D_out tile): dB partial = dy^T H with H = S * G * c recomputed in registers.
    Partials of different splits go to separate slabs, summed by the host in a fixed order.
    """
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    t_start = pid_s * T_PER_SPLIT
    t_end = tl.minimum(t_start + T_PER_SPLIT, T)
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    used = _used_columns(counts_ptr, offs_n, in_n, R)
    expert = tl.where(used, offs_n // R, -1)
    n_e = (offs_n // R).to(tl.int64)
    n_r = (offs_n % R).to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if pid_d < N_IN_TILES:
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        in_d = offs_d < D_IN
        a = tl.load(
            a_ptr + (n_e * s_a_e + n_r * s_a_r)[:, None] + offs_d[None, :] * s_a_d,
            mask=used[:, None] & in_d[None, :],
            other=0.0,
        ).to(DOT_DTYPE)
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < t_end
            rows = offs_t.to(tl.int64)
            v = tl.load(v_ptr + rows[:, None] * N + offs_n[None, :], mask=in_t[:, None] & in_n[None, :], other=0.0)
            v = v.to(DOT_DTYPE)
            tile = in_t[:, None] & in_d[None, :]
            xt = tl.load(x_ptr + rows[:, None] * s_x_t + offs_d[None, :] * s_x_d, mask=tile, other=0.0)
            if HAS_MASK:
                m = tl.load(mask_ptr + rows[:, None] * s_m_t + offs_d[None, :] * s_m_d, mask=tile, other=0.0)
                m = m.to(tl.float32)
            elif HAS_DROPOUT:
                m = dropout_scale(seed_ptr, offs_t, offs_d, D_IN, p_drop)
            if HAS_MASK or HAS_DROPOUT:
                xt = xt.to(tl.float32) * m
            if COMPUTE_DX:
                dx = tl.dot(v, a, input_precision=DOT_PRECISION)
                if HAS_MASK or HAS_DROPOUT:
                    dx = dx * m
                tl.store(dx_ptr + rows[:, None] * D_IN + offs_d[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile)
            acc = tl.dot(tl.trans(v), xt.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        out = da_ptr + pid_s.to(tl.int64) * s_da_split + (n_e * s_da_e + n_r * s_da_r)[:, None]
        tl.store(out + offs_d[None, :] * s_da_d, acc, mask=in_n[:, None] & in_d[None, :])
    else:
        offs_o = (pid_d - N_IN_TILES) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_o = offs_o < D_OUT
        for t0 in range(t_start, t_end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            in_t = offs_t < t_end
            rows = offs_t.to(tl.int64)
            gated = in_t[:, None] & used[None, :]
            s = tl.load(s_ptr + rows[:, None] * N + offs_n[None, :], mask=gated, other=0.0)
            gc = _gate_tile(gate_ptr, scale_ptr, rows, expert, gated, s_g_t, s_g_e, scale_const, HAS_SCALE_VEC)
            h = (s * gc).to(DOT_DTYPE)
            tile = in_t[:, None] & in_o[None, :]
            dy = tl.load(dy_ptr + rows[:, None] * s_dy_t + offs_o[None, :] * s_dy_o, mask=tile, other=0.0)
            acc = tl.dot(tl.trans(h), dy.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        out = db_ptr + pid_s.to(tl.int64) * s_db_split + (n_e * s_db_e + n_r * s_db_r)[:, None]
        tl.store(out + offs_o[None, :] * s_db_o, acc, mask=in_n[:, None] & in_o[None, :])
