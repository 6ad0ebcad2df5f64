"""Host side of the grouped (sorted-by-expert) Triton MoE-LoRA path: the three launches, their registration and
the path's launcher (its launch configs: configs.grouped_config).

For many experts or large ranks (E * R well above K * R), where the stacked path would compute every expert for
every token. The (token, slot) pairs sorted by expert come from the step's routing metadata
(routing_meta.RoutingMeta.blocks: built once per step, shared by every layer). Shape letters in grouped_kernels.py;
coef = routing weight * the expert's scaling, per pair.

  forward   1 launch   per block of one expert's pairs: h = x~[t_p] A[e]^T, hw = h * coef (registers),
                       y_pairs = hw B[e]^T [P, D_out]; then y = sum over K (a view when K = 1)
  backward  1 launch   dy pass per block: u = dy[t_p] B[e], dcoef = sum_r h * u, uw = u * coef,
                       dx_pairs = (uw A[e]) * mask [P, D_in]; then dx = sum over K
            1 launch   weights pass, one program per (expert, D tile): dA[e] = sum of uw^T x~ (D_in tiles),
                       dB[e] = sum of dy^T (h * coef) (D_out tiles), pairs in sorted order

Saved for backward beyond the inputs: h (rank space, P * R float32); the sort is an input (shared per step).
The per-pair outputs are transient, summed over K in a fixed order. Dropout is drawn in-kernel (Philox).
"""

from __future__ import annotations

import torch

from . import grouped_kernels as GK
from ._launch import cdiv, device_guard, dot_flags, launch, register_fused_op
from ._launch import strides3 as _weight_view
from .configs import BLOCK_M, GroupedConfig, grouped_config
from .device import device_spec
from .routing_meta import RoutingMeta, padded_rows


def _dropout_args(mask, seed, like):
    return (like if mask is None else mask), (like if seed is None else seed)


def _sum_slots(per_pair: torch.Tensor, num_slots: int) -> torch.Tensor:
    """[P, D] per-pair rows -> [T, D]: each token's K rows summed in a fixed order (a view when K = 1)."""
    per_pair = per_pair.view(-1, num_slots, per_pair.shape[1])
    return per_pair[:, 0] if num_slots == 1 else per_pair.sum(1)


def grouped_forward(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: torch.Tensor,
    pair_of_row: torch.Tensor,
    expert_of_block: torch.Tensor,
    expert_offsets: torch.Tensor,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on flat x [T, D_in], one launch: (y [T, D_out], h [P, R] float32); coef [T, K] float32."""
    num_slots = coef.shape[1]
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    num_pairs = coef.numel()
    h = torch.empty(num_pairs, rank, device=x.device, dtype=torch.float32)
    if x.shape[0] == 0:
        return x.new_empty(0, d_out), h
    # Rows of padding-only blocks are never written (those blocks exit at once) and every real pair row is.
    per_pair = torch.empty(num_pairs, d_out, device=x.device, dtype=x.dtype)
    mask_t, seed_t = _dropout_args(mask, seed, x)
    cfg = grouped_config(rank, x.dtype, device_spec(x.device), seed is not None or mask is not None, lora_a.dtype)
    with device_guard(x):
        launch(
            GK._grouped_fwd_kernel, (expert_of_block.numel(),),
            x_ptr=x, mask_ptr=mask_t, seed_ptr=seed_t, a_ptr=lora_a, b_ptr=lora_b, coef_ptr=coef,
            pair_ptr=pair_of_row, block_expert_ptr=expert_of_block, h_ptr=h, out_ptr=per_pair,
            D_IN=d_in, D_OUT=d_out, R=rank, K=num_slots, **_strides("x", x), **_strides("m", mask_t),
            **_a_strides(lora_a), **_b_strides(lora_b), p_drop=p,
            HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None, **_meta(cfg), **dot_flags(x.dtype),
        )  # fmt: skip
    return _sum_slots(per_pair, num_slots), h


def _fake_forward(
    x, lora_a, lora_b, coef, pair_of_row, expert_of_block, expert_offsets, mask, seed, p, *, inplace=False
):
    return x.new_empty(x.shape[0], lora_b.shape[1]), x.new_empty(coef.numel(), lora_a.shape[1], dtype=torch.float32)


def grouped_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: torch.Tensor,
    h: torch.Tensor,
    pair_of_row: torch.Tensor,
    expert_of_block: torch.Tensor,
    expert_offsets: torch.Tensor,
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    *,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dcoef) of the grouped forward in two launches (dy pass, weights pass), reusing the shared
    sort; skips what ``needs`` says is unused. dA and dB come out in the weights' dtype (fp32 for fp32 masters)."""
    need_x, need_a, need_b, need_coef = needs[0], needs[1], needs[2], needs[3]
    num_slots = coef.shape[1]
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(coef)
    f32 = dict(device=x.device, dtype=torch.float32)
    num_pairs = coef.numel()
    flags = dot_flags(x.dtype)
    mask_t, seed_t = _dropout_args(mask, seed, x)
    cfg = grouped_config(rank, x.dtype, device_spec(x.device), seed is not None or mask is not None, lora_a.dtype)
    dx, dcoef = torch.empty_like(x), torch.empty(num_pairs, **f32)
    uw = torch.empty(num_pairs, rank, **f32)
    da = db = None
    with device_guard(x):
        if need_x or need_a or need_coef:
            dx_pairs = torch.empty(num_pairs if need_x else 0, d_in, device=x.device, dtype=x.dtype)
            launch(
                GK._grouped_dy_kernel, (expert_of_block.numel(),),
                dy_ptr=grad_y, mask_ptr=mask_t, seed_ptr=seed_t, a_ptr=lora_a, b_ptr=lora_b, coef_ptr=coef,
                pair_ptr=pair_of_row, block_expert_ptr=expert_of_block, h_ptr=h, uw_ptr=uw, dcoef_ptr=dcoef,
                dx_ptr=dx_pairs, D_IN=d_in, D_OUT=d_out, R=rank, K=num_slots,
                **_strides("dy", grad_y, "o"), **_strides("m", mask_t), **_a_strides(lora_a), **_b_strides(lora_b),
                p_drop=p, HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None, COMPUTE_DX=need_x,
                **_meta(cfg), **flags,
            )  # fmt: skip
            if need_x:
                dx = _sum_slots(dx_pairs, num_slots)
        in_tiles = cdiv(d_in, cfg.block_d) if need_a else 0
        out_tiles = cdiv(d_out, cfg.block_d) if need_b else 0
        if in_tiles + out_tiles:
            da = torch.empty(num_experts, rank, d_in, **f32)
            db = torch.empty(num_experts, d_out, rank, **f32)
            launch(
                GK._grouped_weights_kernel, (num_experts, in_tiles + out_tiles),
                x_ptr=x, mask_ptr=mask_t, seed_ptr=seed_t, dy_ptr=grad_y, uw_ptr=uw, h_ptr=h, coef_ptr=coef,
                pair_ptr=pair_of_row, offsets_ptr=expert_offsets, da_ptr=da, db_ptr=db,
                D_IN=d_in, D_OUT=d_out, R=rank, K=num_slots, N_IN_TILES=in_tiles,
                **_strides("x", x), **_strides("m", mask_t), **_strides("dy", grad_y, "o"),
                s_da_e=da.stride(0), s_da_r=da.stride(1), s_da_d=da.stride(2),
                s_db_e=db.stride(0), s_db_o=db.stride(1), s_db_r=db.stride(2), p_drop=p,
                HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
                **{**_meta(cfg), "num_stages": cfg.weights_stages}, **flags,
            )  # fmt: skip
    da = torch.empty_like(lora_a) if da is None else da.to(lora_a.dtype)
    db = torch.empty_like(lora_b) if db is None else db.to(lora_b.dtype)
    return dx, da, db, dcoef.view_as(coef)


def _fake_backward(grad_y, x, lora_a, lora_b, coef, *rest, needs):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)


def _save(inputs: dict, outputs: tuple) -> dict:
    return {**{k: v for k, v in inputs.items() if k != "inplace"}, "h": outputs[1]}


def _input_grads(grads: tuple, result_grads: dict, needs: list[bool]) -> dict:
    dx, da, db, dcoef = grads
    return dict(x=dx, lora_a=da, lora_b=db, coef=dcoef)


grouped_op = register_fused_op(
    "moe_lora_grouped",
    forward=grouped_forward,
    backward=grouped_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    save=_save,
    input_grads=_input_grads,
    grad_names=("grad_y",),
)


def _strides(prefix: str, t: torch.Tensor, col: str = "d") -> dict:
    return {f"s_{prefix}_t": t.stride(0), f"s_{prefix}_{col}": t.stride(1)}


def _a_strides(lora_a: torch.Tensor) -> dict:
    s_e, s_r, s_d = _weight_view(lora_a, 1)
    return dict(s_a_e=s_e, s_a_r=s_r, s_a_d=s_d)


def _b_strides(lora_b: torch.Tensor) -> dict:
    return dict(s_b_e=lora_b.stride(0), s_b_o=lora_b.stride(1), s_b_r=lora_b.stride(2))


def _meta(cfg: GroupedConfig) -> dict:
    return dict(BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages)  # fmt: skip


def launch_grouped(
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
    """The grouped path as dispatch.py calls it (x [..., D_in], validated by moe_lora): base + delta, or the delta
    when base is None (never written in place: ``donated`` is not used here). The sort is the step's
    ``routing.blocks``."""
    scale_vec = scaling.float() if isinstance(scaling, torch.Tensor) else None
    per_pair = scale_vec[routing.ids] if scale_vec is not None else float(scaling)
    coef = routing.weights.float() * per_pair
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = None if mask is None else mask.reshape(-1, x.shape[-1])
    y = grouped_op(x2, lora_a, lora_b, coef, *routing.blocks(BLOCK_M), mask2, seed, p)
    y = y.reshape(*x.shape[:-1], lora_b.shape[1])
    return y if base is None else base + y.to(base.dtype)


def record_grouped(x, lora_a, lora_b, top_k, scale, base, mask, seed) -> None:
    """Forward and backward (every gradient needed) on meta tensors: the launches the compile report records."""
    num_experts = lora_a.shape[0]
    rows = padded_rows(x.shape[0] * top_k, num_experts, BLOCK_M)
    coef = torch.empty(x.shape[0], top_k, device="meta")
    sort = [torch.empty(n, device="meta", dtype=torch.int32) for n in (rows, rows // BLOCK_M, num_experts + 1)]
    y, h = grouped_forward(x, lora_a, lora_b, coef, *sort, mask, seed, 0.1)
    grad_y = torch.empty(y.shape, device="meta", dtype=x.dtype)
    grouped_backward(grad_y, x, lora_a, lora_b, coef, h, *sort, mask, seed, 0.1, needs=[True] * 10)
