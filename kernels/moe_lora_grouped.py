"""Host side of the grouped (sorted-by-expert) Triton MoE-LoRA path: launchers, registration, autograd.

For many experts or large ranks (E * R well above K * R), where the stacked path would compute every expert
for every token. The (token, slot) pairs are sorted by expert once per forward (routing_meta.group_by_expert)
and the sort is saved for the backward. Shape letters in grouped_kernels.py; coef = scaling * weights.

  forward   h = x~[t_p] A[e_p]^T, hw = h * coef      shrink   [P, R] float32 and activation dtype
            y_pairs = hw B[e_p]^T; y = sum over K     expand   [P, D_out] -> [T, D_out]
  backward  u = dy[t_p] B[e_p], uw = u * coef         shrink   [P, R]
            dx = sum over K of (uw A[e_p]) * mask     expand   [P, D_in] -> [T, D_in]
            dA[e] = sum over e's pairs of uw^T x~     grad     one program per (expert, D tile)
            dB[e] = sum over e's pairs of dy^T hw     grad
            dcoef = sum_r h * u                       PyTorch  [T, K]

Saved for backward beyond the inputs: h and hw (rank space, P * R each) and the sort (P_pad + E + 1 ints).
The per-pair outputs [P, D] are transient, summed over K in a fixed order (a view when K = 1).
"""

from __future__ import annotations

import os

import torch

from . import grouped_kernels as GK
from .moe_lora_triton import _cdiv, _kernel_flags, _next_pow2, _weight_view
from .routing_meta import ExpertBlocks, group_by_expert

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M = 16 if _INTERPRET else 64
BLOCK_D = 32 if _INTERPRET else 128


def _block_r(rank: int) -> int:
    return max(_next_pow2(rank), 16)


def grouped_shrink(inp, weight, rank_dim, coef, meta, num_slots, mask):
    """Per-pair rank-space activations [P, R] float32 and the same times coef in inp's dtype."""
    rank = weight.shape[rank_dim]
    num_pairs = coef.numel()
    out = torch.empty(num_pairs, rank, device=inp.device, dtype=torch.float32)
    gated = torch.empty(num_pairs, rank, device=inp.device, dtype=inp.dtype)
    mask_t = inp if mask is None else mask
    GK._grouped_shrink_kernel[(meta.expert_of_block.numel(),)](
        inp, mask_t, weight, coef, meta.pair_of_row, meta.expert_of_block, out, gated,
        inp.shape[1], rank, num_slots, inp.stride(0), inp.stride(1), mask_t.stride(0), mask_t.stride(1),
        *_weight_view(weight, rank_dim),
        HAS_MASK=mask is not None, BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D,
        **_kernel_flags(inp.dtype),
    )  # fmt: skip
    return out, gated


def grouped_expand(rank_act, weight, rank_dim, meta, num_slots, mask):
    """[P, R] x W[e_p] -> [T, D]: per-pair outputs, then each token's K rows summed in order."""
    num_pairs, rank = rank_act.shape
    D = weight.shape[3 - rank_dim]
    out = torch.empty(num_pairs, D, device=rank_act.device, dtype=rank_act.dtype)
    mask_t = out if mask is None else mask
    grid = (meta.expert_of_block.numel(), _cdiv(D, BLOCK_D))
    GK._grouped_expand_kernel[grid](
        rank_act, weight, mask_t, meta.pair_of_row, meta.expert_of_block, out, D, rank, num_slots,
        *_weight_view(weight, rank_dim), mask_t.stride(0), mask_t.stride(1),
        HAS_MASK=mask is not None, BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D,
        **_kernel_flags(rank_act.dtype),
    )  # fmt: skip
    out = out.view(-1, num_slots, D)
    return out[:, 0] if num_slots == 1 else out.sum(1)


def grouped_grad(rank_act, act, mask, meta, num_slots, like, rank_dim):
    """Weight gradient shaped like ``like``: per expert, the sum over its pairs of rank_act^T act."""
    rank = like.shape[rank_dim]
    D = act.shape[1]
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    mask_t = act if mask is None else mask
    grid = (like.shape[0], _cdiv(D, BLOCK_D))
    GK._grouped_grad_kernel[grid](
        rank_act, act, mask_t, meta.pair_of_row, meta.expert_offsets, out, D, rank, num_slots,
        act.stride(0), act.stride(1), mask_t.stride(0), mask_t.stride(1), *_weight_view(out, rank_dim),
        HAS_MASK=mask is not None, BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D,
        **_kernel_flags(act.dtype),
    )  # fmt: skip
    return out


def grouped_forward(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    coef: torch.Tensor,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward: (y [T, D_out], h [P, R] float32, hw [P, R], and the sort: pair_of_row, expert_of_block, offsets)."""
    num_slots = expert_ids.shape[1]
    meta = group_by_expert(expert_ids, lora_a.shape[0], BLOCK_M)
    h, hw = grouped_shrink(x, lora_a, 1, coef.reshape(-1), meta, num_slots, dropout_mask)
    y = grouped_expand(hw, lora_b, 2, meta, num_slots, None)
    return y, h, hw, *meta


moe_lora_grouped_fwd = torch.library.custom_op("dylora_moe::moe_lora_grouped_fwd", grouped_forward, mutates_args=())


@moe_lora_grouped_fwd.register_fake
def _(x, lora_a, lora_b, expert_ids, coef, dropout_mask):
    num_experts, rank, _ = lora_a.shape
    num_pairs = expert_ids.numel()
    rows = _cdiv(num_pairs + num_experts * (BLOCK_M - 1), BLOCK_M) * BLOCK_M
    return (
        x.new_empty(x.shape[0], lora_b.shape[1]),
        x.new_empty(num_pairs, rank, dtype=torch.float32),
        x.new_empty(num_pairs, rank),
        x.new_empty(rows, dtype=torch.int32),
        x.new_empty(rows // BLOCK_M, dtype=torch.int32),
        x.new_empty(num_experts + 1, dtype=torch.int32),
    )


def grouped_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    coef: torch.Tensor,
    h: torch.Tensor,
    hw: torch.Tensor,
    pair_of_row: torch.Tensor,
    expert_of_block: torch.Tensor,
    expert_offsets: torch.Tensor,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward: (dx, dA, dB, dcoef) of the grouped forward, reusing its sort."""
    num_slots = coef.shape[1]
    meta = ExpertBlocks(pair_of_row, expert_of_block, expert_offsets)
    grad_y = grad_y.to(x.dtype).contiguous()
    u, uw = grouped_shrink(grad_y, lora_b, 2, coef.reshape(-1), meta, num_slots, None)
    dx = grouped_expand(uw, lora_a, 1, meta, num_slots, dropout_mask)
    da = grouped_grad(uw, x, dropout_mask, meta, num_slots, lora_a, 1)
    db = grouped_grad(hw, grad_y, None, meta, num_slots, lora_b, 2)
    dcoef = (h * u).sum(-1).view_as(coef)
    return dx, da, db, dcoef


moe_lora_grouped_bwd = torch.library.custom_op("dylora_moe::moe_lora_grouped_bwd", grouped_backward, mutates_args=())


@moe_lora_grouped_bwd.register_fake
def _(grad_y, x, lora_a, lora_b, coef, h, hw, pair_of_row, expert_of_block, expert_offsets, dropout_mask):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, _, coef, dropout_mask = inputs
    _, h, hw, *sort = output
    ctx.save_for_backward(x, lora_a, lora_b, coef, h, hw, *sort, dropout_mask)


def _backward(ctx, grad_y, *_unused_grads):
    dx, da, db, dcoef = moe_lora_grouped_bwd(grad_y, *ctx.saved_tensors)
    return dx, da, db, None, dcoef, None


moe_lora_grouped_fwd.register_autograd(_backward, setup_context=_setup_context)


class GroupedFunction(torch.autograd.Function):
    """The same forward and backward as the registered ops, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, expert_ids, coef, dropout_mask):
        y, h, hw, *sort = grouped_forward(x, lora_a, lora_b, expert_ids, coef, dropout_mask)
        ctx.save_for_backward(x, lora_a, lora_b, coef, h, hw, *sort, dropout_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, da, db, dcoef = grouped_backward(grad_y, *ctx.saved_tensors)
        return dx, da, db, None, dcoef, None
