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

import torch

from . import grouped_kernels as GK
from ._launch import ACTIVATION_DTYPES, FusedOp, cdiv, device_guard, dot_flags, interpreter_enabled, launch, next_pow2
from ._launch import strides3 as _weight_view
from .routing_meta import RoutingMeta

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
    with device_guard(x):
        launch(
            GK._grouped_fwd_kernel, (expert_of_block.numel(),),
            x, mask_t, seed_t, lora_a, lora_b, coef, pair_of_row, expert_of_block, h, per_pair,
            d_in, d_out, rank, num_slots, *x.stride(), *mask_t.stride(), *_weight_view(lora_a, 1),
            lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), p,
            HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
            BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **dot_flags(x.dtype),
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
    dx, dcoef = torch.empty_like(x), torch.empty(num_pairs, **f32)
    uw = torch.empty(num_pairs, rank, **f32)
    da = db = None
    with device_guard(x):
        if need_x or need_a or need_coef:
            dx_pairs = torch.empty(num_pairs if need_x else 0, d_in, device=x.device, dtype=x.dtype)
            launch(
                GK._grouped_dy_kernel, (expert_of_block.numel(),),
                grad_y, mask_t, seed_t, lora_a, lora_b, coef, pair_of_row, expert_of_block, h, uw, dcoef, dx_pairs,
                d_in, d_out, rank, num_slots, *grad_y.stride(), *mask_t.stride(), *_weight_view(lora_a, 1),
                lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), p,
                HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None, COMPUTE_DX=need_x,
                BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **flags,
            )  # fmt: skip
            if need_x:
                dx = _sum_slots(dx_pairs, num_slots)
        in_tiles = cdiv(d_in, BLOCK_D) if need_a else 0
        out_tiles = cdiv(d_out, BLOCK_D) if need_b else 0
        if in_tiles + out_tiles:
            da = torch.empty(num_experts, rank, d_in, **f32)
            db = torch.empty(num_experts, d_out, rank, **f32)
            launch(
                GK._grouped_weights_kernel, (num_experts, in_tiles + out_tiles),
                x, mask_t, seed_t, grad_y, uw, h, coef, pair_of_row, expert_offsets, da, db,
                d_in, d_out, rank, num_slots, in_tiles, *x.stride(), *mask_t.stride(), *grad_y.stride(),
                *da.stride(), *db.stride(), p,
                HAS_MASK=mask is not None, HAS_DROPOUT=seed is not None,
                BLOCK_M=BLOCK_M, BLOCK_R=_block_r(rank), BLOCK_D=BLOCK_D, **flags,
            )  # fmt: skip
    da = torch.empty_like(lora_a) if da is None else da.to(lora_a.dtype)
    db = torch.empty_like(lora_b) if db is None else db.to(lora_b.dtype)
    return dx, da, db, dcoef.view_as(coef)


def _fake_backward(grad_y, x, lora_a, lora_b, coef, *rest, needs):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)


def _save(inputs, outputs):
    x, lora_a, lora_b, coef, pair_of_row, expert_of_block, expert_offsets, mask, seed, p = inputs
    return x, lora_a, lora_b, coef, outputs[1], pair_of_row, expert_of_block, expert_offsets, mask, seed, p


def _to_input_grads(grad_y, grads, needs):
    dx, da, db, dcoef = grads
    return dx, da, db, dcoef, None, None, None, None, None, None


grouped_op = FusedOp(
    "moe_lora_grouped", grouped_forward, _fake_forward, grouped_backward, _fake_backward, _save, _to_input_grads
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
    num_experts, rank, _ = lora_a.shape
    if path == "auto":
        path = choose_path(num_experts, rank, routing.ids.shape[1])
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
