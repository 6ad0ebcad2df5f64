"""Host side of the stacked Triton MoE-LoRA path: launch configs, the three launches, registration.

All E experts form one rank space of width N = E * R (exact, no sort or padding: unselected experts have gate 0),
for small E * R or dense routing. Per layer and
step, with the routing gate G [T, E] built once per step (routing_meta.RoutingMeta) and c [E] the per-expert
scaling (alpha_e / r_e):

  forward   1 launch   S = x~ A^T; H = S * G * c in registers; y = base + H B^T (into a donated base output)
  backward  1 launch   dy pass: U = dy B, V = U * G * c, dG = c * per-expert sums of S * U
            1 launch   weights pass: dx = (V A) * mask and dA partials = V^T x~ (D_in tiles), dB partials =
                       dy^T H with H recomputed from S (D_out tiles)
            0-1 op     the fixed-order sum of the partials over splits of T (none when one split suffices)

Dropout is applied inside the kernels (Philox, regenerated in backward), so no [T, D_in] mask exists. LoRA
weights of any float dtype (fp32 masters) are read directly and cast per tile; weight gradients come out fp32.
The weights of an expert that no token selects (the step's counts) are never read: its columns of S, H and V are 0.
Saved for backward beyond the inputs: S (T * E * R float32) and the seed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from . import stacked_kernels as SK
from ._launch import (
    cdiv,
    deterministic_mode,
    device_guard,
    dot_flags,
    interpreter_enabled,
    launch,
    next_pow2,
    register_fused_op,
    strides3,
)
from .device import DeviceSpec, device_spec, tile_registers_per_thread

# Each split of T in the weights pass is a multiple of this (and of every BLOCK_T).
GRAD_SPLIT_ALIGN = 64 if interpreter_enabled() else 256
# Widest stacked rank space (E * R) the kernels hold as one register tile; wider ones take the grouped path (at 512
# the weights pass spills 200-260 B per thread in bf16 whatever the warps and tiles: compile report).
MAX_RANK_WIDTH = 256
# Fixed stand-in for the SM count in deterministic mode: the split of T (hence the summation order) is then the
# same on every GPU model.
_DETERMINISTIC_SMS = 132


class StackedConfig(NamedTuple):
    block_t: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    weights_stages: int  # of the weights pass, which pipelines three streams and spills sooner


@functools.lru_cache(maxsize=256)
def stacked_config(t_bucket: int, n: int, dtype: torch.dtype, spec: DeviceSpec, dropout: bool = False) -> StackedConfig:
    """Launch config per (T bucket, rank width, dtype, target, dropout), chosen once and cached: no autotuner on the
    hot path, the same in every process. The rank width is one register tile; BLOCK_T and BLOCK_D shrink as it
    grows so the live tiles fit the register budget per thread (in-kernel dropout adds the Philox state and an fp32
    copy of the activation tile), and pipeline stages are dropped until the buffers fit the target's shared memory
    per block."""
    if n > MAX_RANK_WIDTH:
        raise ValueError(
            f"the stacked Triton path holds E * r <= {MAX_RANK_WIDTH} rank columns in registers; got {n} "
            "(use triton_path='grouped' or 'auto')"
        )
    block_n = max(16, next_pow2(n))
    if not spec.is_gpu:  # the interpreter: few, small programs
        return StackedConfig(min(32, max(16, next_pow2(t_bucket))), block_n, 32, 4, 1, 1)
    fp32 = dtype == torch.float32
    num_warps = 4 if block_n <= 64 else 8
    per_thread = tile_registers_per_thread(spec)
    budget = per_thread * 32 * num_warps // (2 if dropout or fp32 else 1)
    block_t, block_d = 64, 64
    while block_t * block_n + block_t * block_d + block_n * block_d > budget and block_t > 16:
        block_t //= 2
    while block_t * block_n + block_t * block_d + block_n * block_d > budget and block_d > 16:
        block_d //= 2
    # D tiles of 16 for the widest rank tile (more spills on sm_80) and at 128 columns with in-kernel dropout (the
    # forward spills 4 B per thread on sm_90 at D tiles of 32 since it reads the routing counts): compile report.
    if block_n >= 256 or (block_n >= 128 and dropout):
        block_d = 16
    num_stages = 2 if block_n >= 256 else 3
    while num_stages > 1 and stacked_shared_bytes(block_t, block_n, block_d, num_stages) > spec.shared_per_block:
        num_stages -= 1
    # fp32 (a correctness mode): the 2-stage weights pass spills 8 B per thread at rank width 256 on sm_86
    return StackedConfig(block_t, block_n, block_d, num_warps, num_stages, 1 if fp32 else num_stages)


def stacked_shared_bytes(block_t: int, block_n: int, block_d: int, num_stages: int) -> int:
    """Upper estimate of the shared memory of the largest stacked kernel (the weights pass): each pipeline stage
    buffers an fp32 [BLOCK_T, BLOCK_N] rank tile, an fp32 [BLOCK_T, BLOCK_D] activation tile and an fp32
    [BLOCK_N, BLOCK_D] weight tile, plus one stage of staging for the dot operands."""
    per_stage = 4 * (block_t * block_n + block_t * block_d + block_n * block_d)
    return (num_stages + 1) * per_stage


def grad_splits(num_tokens: int, d_tiles: int, spec: DeviceSpec) -> int:
    """Tokens per split of the weights pass: about one program per SM of ``spec``."""
    sms = _DETERMINISTIC_SMS if deterministic_mode() and spec.is_gpu else spec.sm_count
    splits = max(1, min(cdiv(sms, d_tiles), cdiv(num_tokens, GRAD_SPLIT_ALIGN)))
    return cdiv(cdiv(num_tokens, splits), GRAD_SPLIT_ALIGN) * GRAD_SPLIT_ALIGN


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _scale_args(scale: torch.Tensor | None, scale_const: float, like: torch.Tensor):
    return (like if scale is None else scale), scale_const, scale is not None


def stacked_forward(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gate: torch.Tensor,
    counts: torch.Tensor,
    scale: torch.Tensor | None,
    base: torch.Tensor | None,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    scale_const: float,
    p: float,
    donated: bool,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., D_out], S [T, E*R] float32). y = base + delta, or the delta alone when ``base`` is None; x [..., D_in]
    with T = prod of the leading dims; gate [T, E]; counts [E] pairs per expert (an expert with none is not
    read). Written into ``base`` when ``inplace`` (eager mode) and the
    caller ``donated`` it and nobody can see the write (:func:`_writable_in_place`); else into a new tensor."""
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    x2 = _flat(x)
    T, N = x2.shape[0], num_experts * rank
    s = torch.empty(T, N, device=x.device, dtype=torch.float32)
    out_shape = (*x.shape[:-1], d_out)
    others = (x, lora_a, lora_b, gate, counts, scale, mask, seed)
    inplace = inplace and donated and base is not None and _writable_in_place(base, *others)
    if inplace:
        y = base
    else:
        y = torch.empty(out_shape, device=x.device, dtype=x.dtype if base is None else base.dtype)
    if T == 0:
        return y, s
    y2 = y.view(T, d_out)
    base2 = y2 if base is None or inplace else _flat(base)
    mask2 = x2 if mask is None else _flat(mask)
    scale_t, scale_c, has_vec = _scale_args(scale, scale_const, gate)
    cfg = stacked_config(next_pow2(T), N, x.dtype, device_spec(x.device), seed is not None or mask is not None)
    s_a_e, s_a_r, s_a_d = strides3(lora_a, 1)
    with device_guard(x):
        launch(
            SK._stacked_fwd_kernel, (cdiv(T, cfg.block_t),),
            x_ptr=x2, mask_ptr=mask2, seed_ptr=x2 if seed is None else seed, a_ptr=lora_a, b_ptr=lora_b,
            gate_ptr=gate, counts_ptr=counts, scale_ptr=scale_t, base_ptr=base2, y_ptr=y2, s_ptr=s,
            T=T, D_IN=d_in, D_OUT=d_out, N=N, R=rank,
            s_x_t=x2.stride(0), s_x_d=x2.stride(1), s_m_t=mask2.stride(0), s_m_d=mask2.stride(1),
            s_a_e=s_a_e, s_a_r=s_a_r, s_a_d=s_a_d,
            s_b_e=lora_b.stride(0), s_b_o=lora_b.stride(1), s_b_r=lora_b.stride(2),
            s_g_t=gate.stride(0), s_g_e=gate.stride(1), s_base_t=base2.stride(0), s_base_d=base2.stride(1),
            s_y_t=y2.stride(0), s_y_d=y2.stride(1), scale_const=scale_c, p_drop=p,
            HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None, HAS_SCALE_VEC=has_vec, HAS_BASE=base is not None,
            BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **dot_flags(x.dtype),
        )  # fmt: skip
    return y, s


def _fake_forward(x, lora_a, lora_b, gate, counts, scale, base, mask, seed, scale_const, p, donated, *, inplace=False):
    num_tokens = x.numel() // x.shape[-1]
    y = x.new_empty(*x.shape[:-1], lora_b.shape[1], dtype=x.dtype if base is None else base.dtype)
    return y, x.new_empty(num_tokens, lora_a.shape[0] * lora_a.shape[1], dtype=torch.float32)


def stacked_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gate: torch.Tensor,
    counts: torch.Tensor,
    scale: torch.Tensor | None,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    s: torch.Tensor,
    scale_const: float,
    p: float,
    *,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dG) of :func:`stacked_forward`; ``needs`` is ctx.needs_input_grad (a gradient that is not
    needed is an uninitialised placeholder and its work is skipped). dA, dB come out in the weights' dtype."""
    need_x, need_a, need_b, need_gate = needs[0], needs[1], needs[2], needs[3]
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    x2, dy = _flat(x), _flat(grad_y)
    T, N = x2.shape[0], num_experts * rank
    f32 = dict(device=x.device, dtype=torch.float32)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dgate = torch.empty(T, num_experts, **f32) if need_gate or T == 0 else torch.empty(0, num_experts, **f32)
    if T == 0:
        return dx, torch.zeros_like(lora_a), torch.zeros_like(lora_b), dgate
    spec = device_spec(x.device)
    cfg = stacked_config(next_pow2(T), N, x.dtype, spec, seed is not None or mask is not None)
    flags = dot_flags(x.dtype)
    scale_t, scale_c, has_vec = _scale_args(scale, scale_const, gate)
    v = torch.empty(T, N, **f32)
    with device_guard(x):
        if need_x or need_a or need_gate:
            launch(
                SK._stacked_dy_kernel, (cdiv(T, cfg.block_t),),
                dy_ptr=dy, b_ptr=lora_b, s_ptr=s, gate_ptr=gate, counts_ptr=counts, scale_ptr=scale_t, v_ptr=v,
                dgate_ptr=dgate if need_gate else v,
                T=T, D_OUT=d_out, N=N, R=rank, E=num_experts if need_gate else 0,
                s_dy_t=dy.stride(0), s_dy_o=dy.stride(1),
                s_b_e=lora_b.stride(0), s_b_o=lora_b.stride(1), s_b_r=lora_b.stride(2),
                s_g_t=gate.stride(0), s_g_e=gate.stride(1), scale_const=scale_c,
                HAS_SCALE_VEC=has_vec, BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
            )  # fmt: skip
        in_tiles = cdiv(d_in, cfg.block_d) if (need_x or need_a) else 0
        out_tiles = cdiv(d_out, cfg.block_d) if need_b else 0
        if in_tiles + out_tiles > 0:
            t_per_split = grad_splits(T, in_tiles + out_tiles, spec)
            splits = cdiv(T, t_per_split)
            size_a, size_b = lora_a.numel(), lora_b.numel()
            if splits == 1:
                da = torch.empty(num_experts, rank, d_in, **f32)
                db = torch.empty(num_experts, d_out, rank, **f32)
                da_slab, db_slab, split_stride = da, db, 0
            else:
                partial = torch.empty(splits, size_a + size_b, **f32)
                da_slab, db_slab, split_stride = partial, partial[:, size_a:], size_a + size_b
            mask2 = x2 if mask is None else _flat(mask)
            s_a_e, s_a_r, s_a_d = strides3(lora_a, 1)
            launch(
                SK._stacked_weights_kernel, (in_tiles + out_tiles, splits),
                x_ptr=x2, mask_ptr=mask2, seed_ptr=x2 if seed is None else seed, a_ptr=lora_a, v_ptr=v, dx_ptr=dx,
                dy_ptr=dy, s_ptr=s, gate_ptr=gate, counts_ptr=counts, scale_ptr=scale_t, da_ptr=da_slab, db_ptr=db_slab,
                T=T, D_IN=d_in, D_OUT=d_out, N=N, R=rank, T_PER_SPLIT=t_per_split, N_IN_TILES=in_tiles,
                s_x_t=x2.stride(0), s_x_d=x2.stride(1), s_m_t=mask2.stride(0), s_m_d=mask2.stride(1),
                s_a_e=s_a_e, s_a_r=s_a_r, s_a_d=s_a_d, s_dy_t=dy.stride(0), s_dy_o=dy.stride(1),
                s_g_t=gate.stride(0), s_g_e=gate.stride(1),
                s_da_split=split_stride, s_da_e=rank * d_in, s_da_r=d_in, s_da_d=1,
                s_db_split=split_stride, s_db_e=d_out * rank, s_db_o=rank, s_db_r=1,
                scale_const=scale_c, p_drop=p,
                HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None, HAS_SCALE_VEC=has_vec, COMPUTE_DX=need_x,
                BLOCK_T=cfg.block_t, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.weights_stages, **flags,
            )  # fmt: skip
            if splits > 1:  # a fixed-order sum: deterministic
                total = partial.sum(0)
                da = total[:size_a].view(num_experts, rank, d_in)
                db = total[size_a:].view(num_experts, d_out, rank)
        else:
            da = db = None
    da = torch.empty_like(lora_a) if da is None else da.to(lora_a.dtype)
    db = torch.empty_like(lora_b) if db is None else db.to(lora_b.dtype)
    return dx, da, db, dgate


def _fake_backward(grad_y, x, lora_a, lora_b, gate, counts, scale, mask, seed, s, scale_const, p, *, needs):
    num_tokens = x.numel() // x.shape[-1]
    rows = num_tokens if needs[3] or num_tokens == 0 else 0
    return (
        torch.empty_like(x),
        torch.empty_like(lora_a),
        torch.empty_like(lora_b),
        x.new_empty(rows, lora_a.shape[0], dtype=torch.float32),
    )


def _save(inputs: dict, outputs: tuple) -> dict:
    saved = {
        k: inputs[k] for k in ("x", "lora_a", "lora_b", "gate", "counts", "scale", "mask", "seed", "scale_const", "p")
    }
    return {**saved, "s": outputs[1]}


def _input_grads(grads: tuple, result_grads: dict, needs: list[bool]) -> dict:
    dx, da, db, dgate = grads
    return dict(x=dx, lora_a=da, lora_b=db, gate=dgate, base=result_grads["grad_y"])


stacked_op = register_fused_op(
    "moe_lora_stacked",
    forward=stacked_forward,
    backward=stacked_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    save=_save,
    input_grads=_input_grads,
    grad_names=("grad_y",),
    dirty="base",
)


def moe_lora_stacked(
    x, lora_a, lora_b, gate, counts, scale, scale_const, base=None, mask=None, seed=None, p=0.0, donated=False
):
    """The stacked path: base + delta or the delta when base is None; in eager mode written into a ``donated``
    base where nobody can see it. Either way one forward launch: the kernel reads ``base`` and writes the sum."""
    return stacked_op(x, lora_a, lora_b, gate, counts, scale, base, mask, seed, scale_const, p, bool(donated))


def _writable_in_place(base: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a donated ``base`` can take the sum unseen: not a view (autograd would rebase a view's history
    through extra copies), contiguous (a flat [T, D_out] view), not a leaf that requires grad (autograd forbids
    the write) and sharing no memory with another input (``others``: x of a square layer is read again in
    backward). Attribute reads only, no host sync."""
    if base._is_view() or not base.is_contiguous() or (base.is_leaf and base.requires_grad):
        return False
    storage = base.untyped_storage().data_ptr()
    return all(t is None or t.untyped_storage().data_ptr() != storage for t in others)
