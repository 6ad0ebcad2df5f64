"""Host side of the grouped (sorted-by-expert) Triton MoE-LoRA path, and the choice between the two Triton paths.

For many experts or large ranks (E * R well above K * R), where the stacked path would compute every expert for
every token. The (token, slot) pairs sorted by expert come from the step's routing metadata
(routing_meta.RoutingMeta.blocks: built once per step, shared by every layer). Shape letters in grouped_kernels.py;
coef = routing weight * the expert's scaling, per pair.

  forward   h = x~[t_p] A[e_p]^T, hw = h * coef      shrink   [P, R] float32 and activation dtype
            y_pairs = hw B[e_p]^T; y = sum over K     expand   [P, D_out] -> [T, D_out]
  backward  u = dy[t_p] B[e_p], uw = u * coef         shrink   [P, R]
            dx = sum over K of (uw A[e_p]) * mask     expand   [P, D_in] -> [T, D_in]
            dA[e] = sum over e's pairs of uw^T x~     grad     one program per (expert, D tile)
            dB[e] = sum over e's pairs of dy^T hw     grad
            dcoef = sum_r h * u                       PyTorch  [T, K]

Saved for backward beyond the inputs: h and hw (rank space, P * R each); the sort is an input (shared).
The per-pair outputs [P, D] are transient, summed over K in a fixed order (a view when K = 1).
"""

from __future__ import annotations

import torch

from . import grouped_kernels as GK
from ._launch import ACTIVATION_DTYPES, FusedOp, cdiv, device_guard, dot_flags, interpreter_enabled, launch, next_pow2
from ._launch import strides3 as _weight_view
from .routing_meta import ExpertBlocks, RoutingMeta, padded_rows

BLOCK_M = 16 if interpreter_enabled() else 64
BLOCK_D = 32 if interpreter_enabled() else 128

# Above this stacked rank width (E * R), with sparse routing, the grouped path computes only the K selected
# experts per token instead of all E. A first estimate from the bytes each path streams (stacked: one pass over
# x per 128 rank columns; grouped: 3K + 1 passes), not yet tuned on a GPU.
GROUPED_MIN_RANK_WIDTH = 512
PATHS = ("auto", "stacked", "grouped")


def choose_path(num_experts: int, rank: int, top_k: int) -> str:
    """The Triton path for these sizes: "stacked" (all experts as one rank space) or "grouped" (sorted pairs)."""
    sparse = top_k < num_experts
    return "grouped" if sparse and num_experts * rank > GROUPED_MIN_RANK_WIDTH else "stacked"


def _block_r(rank: int) -> int:
    return max(next_pow2(rank), 16)


def _dropout_args(mask, seed, like):
    return (like if mask is None else mask), (like if seed is None else seed)


def grouped_shrink(inp, weight, rank_dim, coef, meta, num_slots, mask, seed, p):
    """Per-pair rank-space activations [P, R] float32 and the same times coef in inp's dtype."""
    rank = weight.shape[rank_dim]
    num_pairs = coef.numel()
    out = torch.empty(num_pairs, rank, device=inp.device, dtype=torch.float32)
    gated = torch.empty(num_pairs, rank, device=inp.device, dtype=inp.dtype)
    mask_t, seed_t = _dropout_args(mask, seed, inp)
    launch(
        GK._grouped_shrink_kernel, (meta.expert_of_block.numel(),),
        inp, mask_t, seed_t, weight, coef, meta.pair_of_row, meta.expert_of_block, out, gated,
        inp.shape[1], rank, num_slots, inp.stride(0), inp.stride(1), mask_t.stride(0), mask_t.stride(1),
        *_weight_view(weight, rank_dim), p,
        HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **dot_flags(inp.dtype),
    )  # fmt: skip
    return out, gated


def grouped_expand(rank_act, weight, rank_dim, meta, num_slots, mask, seed, p):
    """[P, R] x W[e_p] -> [T, D]: per-pair outputs, then each token's K rows summed in order."""
    num_pairs, rank = rank_act.shape
    D = weight.shape[3 - rank_dim]
    # Rows of padding-only blocks are never written (those blocks exit at once) and every real pair row is.
    out = torch.empty(num_pairs, D, device=rank_act.device, dtype=rank_act.dtype)
    mask_t, seed_t = _dropout_args(mask, seed, out)
    launch(
        GK._grouped_expand_kernel, (meta.expert_of_block.numel(), cdiv(D, BLOCK_D)),
        rank_act, weight, mask_t, seed_t, meta.pair_of_row, meta.expert_of_block, out, D, rank, num_slots,
        *_weight_view(weight, rank_dim), mask_t.stride(0), mask_t.stride(1), p,
        HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **dot_flags(rank_act.dtype),
    )  # fmt: skip
    out = out.view(-1, num_slots, D)
    return out[:, 0] if num_slots == 1 else out.sum(1)


def grouped_grad(rank_act, act, meta, num_slots, like, rank_dim, mask, seed, p):
    """Weight gradient (float32) shaped like ``like``: per expert, the sum over its pairs of rank_act^T act."""
    rank = like.shape[rank_dim]
    D = act.shape[1]
    out = torch.empty(like.shape, device=like.device, dtype=torch.float32)
    mask_t, seed_t = _dropout_args(mask, seed, act)
    launch(
        GK._grouped_grad_kernel, (like.shape[0], cdiv(D, BLOCK_D)),
        rank_act, act, mask_t, seed_t, meta.pair_of_row, meta.expert_offsets, out, D, rank, num_slots,
        act.stride(0), act.stride(1), mask_t.stride(0), mask_t.stride(1), *_weight_view(out, rank_dim), p,
        HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
        BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **dot_flags(act.dtype),
    )  # fmt: skip
    return out


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on flat x [T, D_in]: (y [T, D_out], h [P, R] float32, hw [P, R]); coef [T, K] float32."""
    num_slots = coef.shape[1]
    if x.shape[0] == 0:
        rank = lora_a.shape[1]
        return x.new_empty(0, lora_b.shape[1]), x.new_empty(0, rank, dtype=torch.float32), x.new_empty(0, rank)
    meta = ExpertBlocks(pair_of_row, expert_of_block, expert_offsets)
    with device_guard(x):
        h, hw = grouped_shrink(x, lora_a, 1, coef.reshape(-1), meta, num_slots, mask, seed, p)
        y = grouped_expand(hw, lora_b, 2, meta, num_slots, None, None, p)
    return y, h, hw


def _fake_forward(
    x, lora_a, lora_b, coef, pair_of_row, expert_of_block, expert_offsets, mask, seed, p, *, inplace=False
):
    rank = lora_a.shape[1]
    return (
        x.new_empty(x.shape[0], lora_b.shape[1]),
        x.new_empty(coef.numel(), rank, dtype=torch.float32),
        x.new_empty(coef.numel(), rank),
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
    mask: torch.Tensor | None,
    seed: torch.Tensor | None,
    p: float,
    *,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dcoef) of the grouped forward, reusing the shared sort; skips what ``needs`` says is unused."""
    num_slots = coef.shape[1]
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(coef)
    meta = ExpertBlocks(pair_of_row, expert_of_block, expert_offsets)
    grad_y = grad_y.to(x.dtype).contiguous()
    dx, da, db, dcoef = torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)
    with device_guard(x):
        if needs[0] or needs[1] or needs[3]:
            u, uw = grouped_shrink(grad_y, lora_b, 2, coef.reshape(-1), meta, num_slots, None, None, p)
            if needs[0]:
                dx = grouped_expand(uw, lora_a, 1, meta, num_slots, mask, seed, p)
            if needs[1]:
                da = grouped_grad(uw, x, meta, num_slots, lora_a, 1, mask, seed, p).to(lora_a.dtype)
            if needs[3]:
                dcoef = (h * u).sum(-1).view_as(coef)
        if needs[2]:
            db = grouped_grad(hw, grad_y, meta, num_slots, lora_b, 2, None, None, p).to(lora_b.dtype)
    return dx, da, db, dcoef


def _fake_backward(grad_y, x, lora_a, lora_b, coef, *rest, needs):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)


def _save(inputs, outputs):
    x, lora_a, lora_b, coef, pair_of_row, expert_of_block, expert_offsets, mask, seed, p = inputs
    _, h, hw = outputs
    return x, lora_a, lora_b, coef, h, hw, pair_of_row, expert_of_block, expert_offsets, mask, seed, p


def _to_input_grads(grad_y, grads, needs):
    dx, da, db, dcoef = grads
    return dx, da, db, dcoef, None, None, None, None, None, None


grouped_op = FusedOp(
    "moe_lora_grouped", grouped_forward, _fake_forward, grouped_backward, _fake_backward, _save, _to_input_grads
)


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
) -> torch.Tensor:
    """Triton MoE-LoRA on x [..., D_in] (validated by moe_lora): base_output + delta, or the delta.

    ``path`` forces "stacked" or "grouped" (tests, benchmarks); "auto" picks with :func:`choose_path`.
    """
    from .stacked import moe_lora_stacked

    if x.dtype not in ACTIVATION_DTYPES or lora_a.dtype not in ACTIVATION_DTYPES:
        raise TypeError(
            f"the Triton moe_lora supports activations and weights in {ACTIVATION_DTYPES}; got x {x.dtype}, "
            f"weights {lora_a.dtype} (use backend='eager' for float64)"
        )
    if path not in PATHS:
        raise ValueError(f"unknown Triton path {path!r}; expected one of {', '.join(PATHS)}")
    num_experts, rank, _ = lora_a.shape
    if path == "auto":
        path = choose_path(num_experts, rank, routing.ids.shape[1])
    scale_vec = scaling.float() if isinstance(scaling, torch.Tensor) else None
    scale_const = 1.0 if scale_vec is not None else float(scaling)
    if path == "stacked":
        return moe_lora_stacked(
            x, lora_a, lora_b, routing.gate, scale_vec, scale_const, base_output, dropout_mask, seed, p
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    mask2 = None if dropout_mask is None else dropout_mask.reshape(-1, x.shape[-1])
    per_pair = scale_vec[routing.ids] if scale_vec is not None else scale_const
    coef = routing.weights.float() * per_pair
    blocks = routing.blocks(BLOCK_M)
    y = grouped_op(x2, lora_a, lora_b, coef, *blocks, mask2, seed, p).reshape(*lead, lora_b.shape[1])
    return y if base_output is None else base_output + y.to(base_output.dtype)


def padded_sort_rows(num_pairs: int, num_experts: int) -> int:
    """Rows of the shared sort for this path's block size (tests of the saved-memory bound)."""
    return padded_rows(num_pairs, num_experts, BLOCK_M)
