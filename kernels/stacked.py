"""Host side of the stacked Triton MoE-LoRA path: the three launches, their registration and the path's launcher
(its launch configs: configs.stacked_config).

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

import torch

from . import stacked_kernels as SK
from ._launch import cdiv, device_guard, dot_flags, launch, next_pow2, register_fused_op, strides3
from .configs import grad_splits, stacked_config
from .device import device_spec
from .routing_meta import RoutingMeta


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
    cfg = _config(x, lora_a, device_spec(x.device), seed is not None or mask is not None)
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
    cfg = _config(x, lora_a, spec, seed is not None or mask is not None)
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


def launch_stacked(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    routing: RoutingMeta,
    scaling: float | torch.Tensor,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    base: torch.Tensor | None,
    donated: bool,
) -> torch.Tensor:
    """The stacked path as dispatch.py calls it (x [..., D_in], validated by moe_lora): base + delta or the delta
    when base is None; in eager mode written into a ``donated`` base where nobody can see it. Either way one
    forward launch: the kernel reads ``base`` and writes the sum. Experts no token selects (``routing.counts``)
    are never read. A scaling tensor that requires grad is folded into the gate ([T, E] * [E]), so autograd gives
    it its gradient through the gate's (the kernels apply a scale vector but return no gradient for it)."""
    gate, scale, scale_const = routing.gate, None, 1.0
    if not isinstance(scaling, torch.Tensor):
        scale_const = float(scaling)
    elif scaling.requires_grad and torch.is_grad_enabled():
        gate = gate * scaling.float()
    else:
        scale = scaling.float()
    counts = routing.counts
    return stacked_op(x, lora_a, lora_b, gate, counts, scale, base, mask, seed, scale_const, p, bool(donated))


def record_stacked(x, lora_a, lora_b, top_k, scale, base, mask, seed) -> None:
    """Forward and backward (every gradient needed) on meta tensors: the launches the compile report records."""
    num_tokens, num_experts = x.shape[0], lora_a.shape[0]
    gate = torch.empty(num_tokens, num_experts, device="meta")
    counts = torch.empty(num_experts, device="meta", dtype=torch.int64)
    y, s = stacked_forward(x, lora_a, lora_b, gate, counts, scale, base, mask, seed, 1.0, 0.1, False)
    stacked_backward(y, x, lora_a, lora_b, gate, counts, scale, mask, seed, s, 1.0, 0.1, needs=[True] * 12)


def _config(x: torch.Tensor, lora_a: torch.Tensor, spec, dropout: bool):
    num_tokens = x.numel() // x.shape[-1]
    n = lora_a.shape[0] * lora_a.shape[1]
    return stacked_config(next_pow2(num_tokens), n, x.dtype, spec, dropout, lora_a.dtype)


def _writable_in_place(base: torch.Tensor, *others: torch.Tensor | None) -> bool:
    """Whether a donated ``base`` can take the sum unseen: not a view (autograd would rebase a view's history
    through extra copies), contiguous (a flat [T, D_out] view), not a leaf that requires grad (autograd forbids
    the write) and sharing no memory with another input (``others``: x of a square layer is read again in
    backward). Attribute reads only, no host sync."""
    if base._is_view() or not base.is_contiguous() or (base.is_leaf and base.requires_grad):
        return False
    storage = base.untyped_storage().data_ptr()
    return all(t is None or t.untyped_storage().data_ptr() != storage for t in others)
