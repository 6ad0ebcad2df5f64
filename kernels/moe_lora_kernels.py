"""Triton kernels of the stacked MoE-LoRA op (host code and dataflow: moe_lora_triton.py).

Shape letters:
  T  tokens            D  a model width (D_in for x, D_out for y)
  E  experts           R  LoRA rank          N = E * R  the stacked rank width
Column n of the stacked rank space belongs to expert e = n // R, rank index i = n % R.

The expert weights are never copied into a stacked layout: each kernel addresses the stacked matrix
W[n, d] of the [E, R, D] or [E, D, R] parameter through its three strides (s_e, s_r, s_d).

Every reduction runs in a fixed order inside one program (no atomics), so results are bitwise
deterministic. Block sizes are autotuned on GPUs (keyed on N, D and T rounded up to a power of two).
UPCAST loads every operand as float32: the CPU interpreter needs it for bf16 (DESIGN 7),
and it keeps fp32 inputs exact when DOT_PRECISION is "ieee".
"""

import os

import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DYLORA_MOE_AUTOTUNE=0 pins the first config of each list that fits shared memory (the interpreter runs one).
_AUTOTUNE = not _INTERPRET and os.environ.get("DYLORA_MOE_AUTOTUNE", "1") != "0"
_KEY = ["N", "D", "T_BUCKET"]


def _configs(shapes: list[tuple], names: tuple[str, ...], interpreter_shape: tuple) -> list[triton.Config]:
    """Configs from (block sizes..., num_warps, num_stages) tuples; one small config in the interpreter."""
    if _INTERPRET:
        return [triton.Config(dict(zip(names, interpreter_shape)))]
    return [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in shapes]


_SMEM_BUDGET = 200 * 1024  # bytes; an H100 SM has 227 KiB, leave room for the compiler's own buffers


def _fitting(tile_elements, elem_arg: str):
    """An early_config_prune that drops configs whose pipelined tiles overflow shared memory for this dtype
    (fp32 tiles are twice bf16's), and keeps only the first fitting one when autotuning is off."""

    def prune(configs, named_args, **kwargs):
        elem = named_args[elem_arg].element_size()
        block_n = kwargs.get("BLOCK_N", named_args.get("BLOCK_N", 128))
        fits = [
            c for c in configs if c.num_stages * tile_elements({"BLOCK_N": block_n, **c.kwargs}) * elem <= _SMEM_BUDGET
        ]
        fits = fits or configs[-1:]
        return fits if _AUTOTUNE else fits[:1]

    return prune


# Config lists hold the fastest few of a sweep on an H100 at the DESIGN 4 shape (bf16, T=8192, D=4096, E*R=128;
# benchmarks/results/NOTES.md), best first: the first one is what DYLORA_MOE_AUTOTUNE=0 pins.
# (BLOCK_T, BLOCK_D, warps, stages); BLOCK_N is the whole rank width up to 128, chosen by the host.
PROJ_CONFIGS = _configs(
    [(64, 128, 4, 4), (64, 128, 8, 4), (32, 128, 4, 3), (32, 64, 4, 2)],
    ("BLOCK_T", "BLOCK_D"),
    (32, 32),
)
# (BLOCK_T, BLOCK_N, BLOCK_D, warps, stages); BLOCK_N is the chunk of the rank loop.
EXPAND_CONFIGS = _configs(
    [(128, 64, 128, 4, 3), (128, 32, 128, 4, 3), (128, 64, 256, 8, 3), (64, 32, 64, 4, 2)],
    ("BLOCK_T", "BLOCK_N", "BLOCK_D"),
    (32, 32, 32),
)
# (BLOCK_D, BLOCK_T, warps, stages); BLOCK_N is the whole rank width up to 128; the host splits T.
GRAD_CONFIGS = _configs(
    [(128, 64, 8, 3), (128, 64, 4, 3), (256, 64, 8, 3), (64, 32, 4, 2)],
    ("BLOCK_D", "BLOCK_T"),
    (32, 32),
)
# Each split of T in the grad kernel is a multiple of every BLOCK_T above.
GRAD_SPLIT_ALIGN = 256


@triton.autotune(
    configs=PROJ_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": _fitting(lambda c: c["BLOCK_D"] * (c["BLOCK_T"] + c["BLOCK_N"]), "in_ptr")},
)
@triton.jit
def _rank_proj_kernel(
    in_ptr,  # [T, D] activations (x or dy)
    mask_ptr,  # [T, D] dropout mask on the input, or a dummy when HAS_MASK is False
    w_ptr,  # the expert weights seen as W[n, d] through (s_w_e, s_w_r, s_w_d)
    gate_ptr,  # [T, E] float32 gate: scaling * routing weight of each expert, 0 if not selected
    out_ptr,  # [T, N] float32
    gated_ptr,  # [T, N] out * gate[t, n // R] in the activation dtype
    T,
    D,
    N,
    R,
    T_BUCKET,  # autotune key only: T rounded up to a power of two
    s_gate_t,
    s_gate_e,
    s_in_t,
    s_in_d,
    s_mask_t,
    s_mask_d,
    s_w_e,
    s_w_r,
    s_w_d,
    s_out_t,
    s_out_n,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, n] = sum_d in[t, d] * mask[t, d] * W[n, d] and gated[t, n] = out[t, n] * gate[t, n // R].

    The shrink to rank space: S = x~ A^T with H = S * G, or U = dy B with V = U * G. out and gated share
    strides (s_out_t, s_out_n).
    """
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_t = offs_t < T
    in_n = offs_n < N
    rows = offs_t.to(tl.int64)
    w_col = (offs_n // R).to(tl.int64) * s_w_e + (offs_n % R).to(tl.int64) * s_w_r

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        tile_mask = in_t[:, None] & in_d[None, :]
        a = tl.load(in_ptr + rows[:, None] * s_in_t + offs_d[None, :] * s_in_d, mask=tile_mask, other=0.0)
        w = tl.load(w_ptr + w_col[None, :] + offs_d[:, None] * s_w_d, mask=in_d[:, None] & in_n[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=tile_mask, other=0.0)
            a = a * m.to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    tile = rows[:, None] * s_out_t + offs_n[None, :] * s_out_n
    out_mask = in_t[:, None] & in_n[None, :]
    tl.store(out_ptr + tile, acc, mask=out_mask)
    g = tl.load(gate_ptr + rows[:, None] * s_gate_t + (offs_n // R)[None, :] * s_gate_e, mask=out_mask, other=0.0)
    tl.store(gated_ptr + tile, (acc * g).to(gated_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=EXPAND_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": _fitting(lambda c: c["BLOCK_N"] * (c["BLOCK_T"] + c["BLOCK_D"]), "in_ptr")},
)
@triton.jit
def _rank_expand_kernel(
    in_ptr,  # [T, N] gated rank-space activations (H or V) in the activation dtype
    w_ptr,  # the expert weights seen as W[n, d] through (s_w_e, s_w_r, s_w_d)
    mask_ptr,  # [T, D] dropout mask on the output, or a dummy when HAS_MASK is False
    out_ptr,  # [T, D] in the activation dtype
    T,
    N,
    D,
    R,
    T_BUCKET,  # autotune key only
    s_in_t,
    s_in_n,
    s_w_e,
    s_w_r,
    s_w_d,
    s_mask_t,
    s_mask_d,
    s_out_t,
    s_out_d,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, d] = mask[t, d] * sum_n in[t, n] * W[n, d]: the expand (y = H B^T, dx = V A)."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_t = offs_t < T
    in_d = offs_d < D
    rows = offs_t.to(tl.int64)

    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        h = tl.load(in_ptr + rows[:, None] * s_in_t + offs_n[None, :] * s_in_n, mask=in_t[:, None] & in_n[None, :])
        w_row = (offs_n // R).to(tl.int64) * s_w_e + (offs_n % R).to(tl.int64) * s_w_r
        w = tl.load(w_ptr + w_row[:, None] + offs_d[None, :] * s_w_d, mask=in_n[:, None] & in_d[None, :], other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

    out_mask = in_t[:, None] & in_d[None, :]
    if HAS_MASK:
        m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=out_mask, other=0.0)
        acc = acc * m.to(tl.float32)
    out = out_ptr + rows[:, None] * s_out_t + offs_d[None, :] * s_out_d
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(
    configs=GRAD_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": _fitting(lambda c: c["BLOCK_T"] * (c["BLOCK_N"] + c["BLOCK_D"]), "q_ptr")},
)
@triton.jit
def _rank_grad_kernel(
    p_ptr,  # [T, N] gated rank-space activations (V for dA, H for dB) in the activation dtype
    q_ptr,  # [T, D] activations (x for dA, dy for dB)
    mask_ptr,  # [T, D] dropout mask on q, or a dummy when HAS_MASK is False
    out_ptr,  # [SPLITS, N, D] float32 partial sums, one slab per split of T
    T,
    N,
    D,
    R,
    T_BUCKET,  # autotune key only
    T_PER_SPLIT,
    s_p_t,
    s_p_n,
    s_q_t,
    s_q_d,
    s_mask_t,
    s_mask_d,
    HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """out[s, n, d] = sum over t in split s of p[t, n] * q[t, d] * mask[t, d].

    dA = V^T x~ and dB = dy^T H. One program owns one [BLOCK_N, BLOCK_D] tile of one split of T and walks it
    in order; the host sums the splits in a fixed order: deterministic, no atomics. T_PER_SPLIT is a multiple
    of BLOCK_T.
    """
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_n = offs_n < N
    in_d = offs_d < D
    t_start = pid_s * T_PER_SPLIT
    t_end = tl.minimum(t_start + T_PER_SPLIT, T)

    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        in_t = offs_t < t_end
        rows = offs_t.to(tl.int64)
        p = tl.load(p_ptr + rows[:, None] * s_p_t + offs_n[None, :] * s_p_n, mask=in_t[:, None] & in_n[None, :])
        q_mask = in_t[:, None] & in_d[None, :]
        q = tl.load(q_ptr + rows[:, None] * s_q_t + offs_d[None, :] * s_q_d, mask=q_mask, other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        if HAS_MASK:
            m = tl.load(mask_ptr + rows[:, None] * s_mask_t + offs_d[None, :] * s_mask_d, mask=q_mask, other=0.0)
            q = q * m.to(q.dtype)
        acc = tl.dot(tl.trans(p), q, acc, input_precision=DOT_PRECISION)

    slab = out_ptr + pid_s.to(tl.int64) * N * D
    out = slab + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    tl.store(out, acc, mask=in_n[:, None] & in_d[None, :])
