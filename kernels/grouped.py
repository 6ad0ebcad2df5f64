"""Host side of the grouped (sorted-by-expert) Triton MoE-LoRA path, and the choice between the two Triton paths.

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

import functools
from typing import NamedTuple

import torch

from . import grouped_kernels as GK
from ._launch import (
    ACTIVATION_DTYPES,
    cdiv,
    device_guard,
    dot_flags,
    interpreter_enabled,
    launch,
    next_pow2,
    register_fused_op,
)
from ._launch import strides3 as _weight_view
from .cost import choose_path
from .device import DeviceSpec, device_spec, tile_registers_per_thread
from .routing_meta import RoutingMeta

# Rows per block of the sorted pair list: one value per process, because the step's sort (routing_meta) is built
# once for every layer, whatever its width or rank.
BLOCK_M = 16 if interpreter_enabled() else 64
PATHS = ("auto", "stacked", "grouped")


class GroupedConfig(NamedTuple):
    block_m: int
    block_r: int
    block_d: int
    num_warps: int
    num_stages: int
    weights_stages: int  # of the weights pass, which pipelines two streams and spills sooner


@functools.lru_cache(maxsize=256)
def grouped_config(rank: int, dtype: torch.dtype, spec: DeviceSpec, dropout: bool = False) -> GroupedConfig:
    """Launch config of the three grouped kernels per (rank, dtype, target, dropout), chosen once and cached.

    The rank block is the next power of two of max(r, 16); BLOCK_D shrinks as it grows so the live tiles fit the
    register budget per thread (dropout and fp32 halve it), and pipeline stages are dropped until the buffers fit
    the target's shared memory per block. fp32 pipelines less: at rank 128 its 2- and 3-stage kernels spill
    (compile report)."""
    block_r = max(next_pow2(rank), 16)
    if not spec.is_gpu:  # the interpreter: few, small programs
        return GroupedConfig(BLOCK_M, block_r, 32, 4, 1, 1)
    fp32 = dtype == torch.float32
    num_warps = 4 if block_r <= 32 else 8
    per_thread = tile_registers_per_thread(spec)
    budget = per_thread * 32 * num_warps // (2 if dropout or fp32 else 1)
    block_d = 128
    while BLOCK_M * block_r + BLOCK_M * block_d + block_r * block_d > budget and block_d > 16:
        block_d //= 2
    num_stages = (1 if block_r >= 128 else 2) if fp32 else 3
    while num_stages > 1 and grouped_shared_bytes(block_r, block_d, num_stages) > spec.shared_per_block:
        num_stages -= 1
    # The weights pass at rank 128 spills 16 B per thread on sm_120 at three stages, none at two (compile report).
    weights_stages = 1 if fp32 else min(num_stages, 2) if block_r >= 128 else num_stages
    return GroupedConfig(BLOCK_M, block_r, block_d, num_warps, num_stages, weights_stages)


def grouped_shared_bytes(block_r: int, block_d: int, num_stages: int) -> int:
    """Upper estimate of a grouped kernel's shared memory: each pipeline stage buffers an fp32 [BLOCK_M, BLOCK_D]
    activation tile and an fp32 [BLOCK_R, BLOCK_D] weight tile, plus one stage of staging for the dot operands."""
    return (num_stages + 1) * 4 * (BLOCK_M * block_d + block_r * block_d)


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
    cfg = grouped_config(rank, x.dtype, device_spec(x.device), seed is not None or mask is not None)
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
    cfg = grouped_config(rank, x.dtype, device_spec(x.device), seed is not None or mask is not None)
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


def _stacked_gate(gate: torch.Tensor, scaling: float | torch.Tensor):
    """(gate, scale vector or None, scale constant) for the stacked kernels. A scaling tensor that requires grad is
    folded into the gate ([T, E] * [E]) so autograd gives it its gradient through the gate's (the kernels apply a
    scale vector but return no gradient for it)."""
    if not isinstance(scaling, torch.Tensor):
        return gate, None, float(scaling)
    if scaling.requires_grad and torch.is_grad_enabled():
        return gate * scaling.float(), None, 1.0
    return gate, scaling.float(), 1.0


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


def moe_lora_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    routing: RoutingMeta,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    base_output: torch.Tensor | None,
    path: str = "auto",
    donate_base_output: bool = False,
) -> torch.Tensor:
    """Triton MoE-LoRA on x [..., D_in] (validated by moe_lora): base_output + delta, or the delta.

    ``path`` forces "stacked" or "grouped" (tests, benchmarks); "auto" picks with :func:`choose_path`. The stacked
    path skips the weights of experts no token selects (``routing.counts``; never read, as on the grouped path)
    and may write into a donated ``base_output`` (moe_lora's rules).
    """
    from .stacked import moe_lora_stacked

    if x.dtype not in ACTIVATION_DTYPES or lora_a.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"the Triton moe_lora supports activations and weights in {ACTIVATION_DTYPES}; got x {x.dtype}, "
            f"weights {lora_a.dtype} (use backend='eager' for float64)"
        )
    if path not in PATHS:
        raise ValueError(f"unknown Triton path {path!r}; expected one of {', '.join(PATHS)}")
    num_experts, rank, d_in = lora_a.shape
    if path == "auto":
        path = choose_path(
            num_experts, rank, routing.ids.shape[1], num_tokens=next_pow2(routing.num_tokens), d_in=d_in,
            d_out=lora_b.shape[1], dtype=x.dtype, spec=device_spec(x.device), dropout=seed is not None,
        )  # fmt: skip
    if path == "stacked":
        gate, scale_vec, scale_const = _stacked_gate(routing.gate, scaling)
        return moe_lora_stacked(
            x, lora_a, lora_b, gate, routing.counts, scale_vec, scale_const, base_output, dropout_mask, seed, p,
            donate_base_output,
        )  # fmt: skip
    scale_vec = scaling.float() if isinstance(scaling, torch.Tensor) else None
    scale_const = 1.0 if scale_vec is not None else float(scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = None if dropout_mask is None else dropout_mask.reshape(-1, x.shape[-1])
    per_pair = scale_vec[routing.ids] if scale_vec is not None else scale_const
    coef = routing.weights.float() * per_pair
    blocks = routing.blocks(BLOCK_M)
    y = grouped_op(x2, lora_a, lora_b, coef, *blocks, mask2, seed, p).reshape(*lead, lora_b.shape[1])
    return y if base_output is None else base_output + y.to(base_output.dtype)
