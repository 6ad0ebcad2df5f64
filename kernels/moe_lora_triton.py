"""Host side of the Triton MoE-LoRA op: launchers, compile-safe registration and autograd.

Dataflow (stacked experts, DESIGN 4b; shape letters in moe_lora_kernels.py). The gate
G[t, e] = sum of coef[t, j] over the slots j with ids[t, j] = e (coef = scaling * routing weights) is built
from the ids on the way in and again in backward; dcoef[t, j] = dG[t, ids[t, j]].

  forward   S = x~ A_cat^T, H = S * G       proj    [T, N] float32 and [T, N] activation dtype
            y = H B_cat^T                   expand  [T, D_out]
  backward  U = dy B_cat, V = U * G         proj    [T, N] float32 and [T, N] activation dtype
            dx = (V A_cat) * mask           expand  [T, D_in]
            dA = V^T x~                     grad    [E, R, D_in]   (T split in fixed chunks, summed in order)
            dB = dy^T H                     grad    [E, D_out, R]   (H recomputed from S and G)
            dG = per-expert sums of S * U   PyTorch [T, E], gathered at the ids into dcoef [T, K]

The gate is applied once, in the proj epilogue, so expand and grad stream plain rank-space tiles.
Saved for backward: S (T * E * R) plus the ids and coefficients (2 T * K): T * (E*R + 2K), never T * K * D.
"""

from __future__ import annotations

import functools
import os

import torch

from . import moe_lora_kernels as K
from .routing_meta import dense_gate

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _kernel_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the interpreter has no bf16 arithmetic. fp32 dots follow torch's TF32 switch, like torch.matmul."""
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not _INTERPRET
    return dict(
        UPCAST=_INTERPRET and dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if dtype == torch.float32 and not tf32 else "tf32",
    )


def _rank_tile(n: int) -> int:
    """The whole stacked rank width in one tile up to 128 (the activations are then read once), at least 16."""
    return min(max(_next_pow2(n), 16), 128)


def _weight_view(w: torch.Tensor, rank_dim: int) -> tuple[int, int, int]:
    """Strides (s_e, s_r, s_d) that address an [E, R, D] or [E, D, R] tensor as the stacked W[n, d]."""
    d_dim = 3 - rank_dim
    return w.stride(0), w.stride(rank_dim), w.stride(d_dim)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grad_splits(num_tokens: int, rank_tiles: int, device: torch.device) -> int:
    """Tokens per split of the weight-gradient reduction: about one program per SM (best of 1x/4x on an H100)."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    splits = max(1, min(_cdiv(sms, rank_tiles), _cdiv(num_tokens, K.GRAD_SPLIT_ALIGN)))
    return _cdiv(_cdiv(num_tokens, splits), K.GRAD_SPLIT_ALIGN) * K.GRAD_SPLIT_ALIGN


def rank_proj(
    inp: torch.Tensor, weight: torch.Tensor, gate: torch.Tensor, rank_dim: int, rank: int, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, D] x stacked W[N, D] -> ([T, N] float32, the same gated in inp's dtype).

    S = x~ A^T and H = S * G when rank_dim=1; U = dy B and V = U * G when rank_dim=2.
    """
    T, D = inp.shape
    N = weight.shape[0] * rank
    out = torch.empty(T, N, device=inp.device, dtype=torch.float32)
    gated = torch.empty(T, N, device=inp.device, dtype=inp.dtype)
    block_n = _rank_tile(N)
    mask_t = inp if mask is None else mask

    def grid(meta):
        return (_cdiv(T, meta["BLOCK_T"]), _cdiv(N, block_n))

    K._rank_proj_kernel[grid](
        inp, mask_t, weight, gate, out, gated, T, D, N, rank, _next_pow2(T), gate.stride(0), gate.stride(1),
        inp.stride(0), inp.stride(1), mask_t.stride(0), mask_t.stride(1),
        *_weight_view(weight, rank_dim), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, BLOCK_N=block_n, **_kernel_flags(inp.dtype),
    )  # fmt: skip
    return out, gated


def rank_expand(rank_act: torch.Tensor, weight: torch.Tensor, rank_dim: int, rank: int, mask: torch.Tensor | None):
    """Gated [T, N] x stacked W[N, D] -> [T, D] (y = H B^T when rank_dim=2, dx = (V A) * mask when 1)."""
    T, N = rank_act.shape
    D = weight.shape[3 - rank_dim]
    out = torch.empty(T, D, device=rank_act.device, dtype=rank_act.dtype)
    mask_t = out if mask is None else mask

    def grid(meta):
        return (_cdiv(T, meta["BLOCK_T"]), _cdiv(D, meta["BLOCK_D"]))

    K._rank_expand_kernel[grid](
        rank_act, weight, mask_t, out, T, N, D, rank, _next_pow2(T), rank_act.stride(0), rank_act.stride(1),
        *_weight_view(weight, rank_dim), mask_t.stride(0), mask_t.stride(1), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, **_kernel_flags(out.dtype),
    )  # fmt: skip
    return out


def rank_grad(rank_act: torch.Tensor, act: torch.Tensor, mask: torch.Tensor | None, like: torch.Tensor, rank_dim: int):
    """Weight gradient shaped like ``like`` ([E, R, D] or [E, D, R]): sum_t rank_act[t, n] act[t, d] mask[t, d]."""
    T, N = rank_act.shape
    D = act.shape[1]
    num_experts, rank = like.shape[0], like.shape[rank_dim]
    block_n = _rank_tile(N)
    t_per_split = _grad_splits(T, _cdiv(N, block_n) * _cdiv(D, 128), act.device)
    splits = _cdiv(T, t_per_split)
    partial = torch.empty(splits, N, D, device=act.device, dtype=torch.float32)
    mask_t = act if mask is None else mask

    def grid(meta):
        return (_cdiv(N, block_n), _cdiv(D, meta["BLOCK_D"]), splits)

    K._rank_grad_kernel[grid](
        rank_act, act, mask_t, partial, T, N, D, rank, _next_pow2(T), t_per_split,
        rank_act.stride(0), rank_act.stride(1), act.stride(0), act.stride(1), mask_t.stride(0), mask_t.stride(1),
        HAS_MASK=mask is not None, BLOCK_N=block_n, **_kernel_flags(act.dtype),
    )  # fmt: skip
    # A fixed-order sum over the splits keeps the result bitwise deterministic.
    grad = partial.sum(0) if splits > 1 else partial[0]
    grad = grad.view(num_experts, rank, D)
    if rank_dim == 2:
        grad = grad.transpose(1, 2)
    return grad.to(like.dtype).contiguous()


# --- forward / backward, registered compile-safe (custom_op + fake; triton_op breaks torch.compile in the
# interpreter) and wrapped in a plain autograd.Function for eager mode, where the custom-op dispatcher's host
# cost (hundreds of us per call) would exceed the kernels' own time at small T.


def stacked_forward(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    coef: torch.Tensor,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: returns (y [T, D_out], S [T, E*R] float32); S is what backward keeps.

    coef [T, K] float32 = scaling * routing weights; the gate G is their scatter over experts.
    """
    num_experts, rank, _ = lora_a.shape
    if x.shape[0] == 0:
        return x.new_empty(0, lora_b.shape[1]), x.new_empty(0, num_experts * rank, dtype=torch.float32)
    gate = dense_gate(expert_ids, coef, num_experts)
    s, h = rank_proj(x, lora_a, gate, rank_dim=1, rank=rank, mask=dropout_mask)
    y = rank_expand(h, lora_b, rank_dim=2, rank=rank, mask=None)
    return y, s


moe_lora_fwd = torch.library.custom_op("dylora_moe::moe_lora_fwd", stacked_forward, mutates_args=())


@moe_lora_fwd.register_fake
def _(x, lora_a, lora_b, expert_ids, coef, dropout_mask):
    n = lora_a.shape[0] * lora_a.shape[1]
    return x.new_empty(x.shape[0], lora_b.shape[1]), x.new_empty(x.shape[0], n, dtype=torch.float32)


def stacked_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    coef: torch.Tensor,
    s: torch.Tensor,
    dropout_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: returns (dx, dA, dB, dcoef) of the forward above."""
    num_experts, rank, _ = lora_a.shape
    if x.shape[0] == 0:
        return torch.zeros_like(x), torch.zeros_like(lora_a), torch.zeros_like(lora_b), torch.zeros_like(coef)
    # G and H = S * G are rebuilt (rank space, cheap) rather than saved: the saved extra is S plus the ids and
    # coefficients, T * (E*R + 2K) elements (DESIGN 4).
    gate = dense_gate(expert_ids, coef, num_experts)
    h = (s.view(-1, num_experts, rank) * gate.unsqueeze(-1)).view_as(s).to(x.dtype)
    grad_y = grad_y.to(x.dtype).contiguous()
    u, v = rank_proj(grad_y, lora_b, gate, rank_dim=2, rank=rank, mask=None)
    dx = rank_expand(v, lora_a, rank_dim=1, rank=rank, mask=dropout_mask)
    da = rank_grad(v, x, dropout_mask, lora_a, rank_dim=1)
    db = rank_grad(h, grad_y, None, lora_b, rank_dim=2)
    dgate = (s * u).view(-1, num_experts, rank).sum(-1)
    return dx, da, db, dgate.gather(1, expert_ids.long())


moe_lora_bwd = torch.library.custom_op("dylora_moe::moe_lora_bwd", stacked_backward, mutates_args=())


@moe_lora_bwd.register_fake
def _(grad_y, x, lora_a, lora_b, expert_ids, coef, s, dropout_mask):
    return torch.empty_like(x), torch.empty_like(lora_a), torch.empty_like(lora_b), torch.empty_like(coef)


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, expert_ids, coef, dropout_mask = inputs
    ctx.save_for_backward(x, lora_a, lora_b, expert_ids, coef, output[1], dropout_mask)


def _backward(ctx, grad_y, _grad_s):
    dx, da, db, dcoef = moe_lora_bwd(grad_y, *ctx.saved_tensors)
    return dx, da, db, None, dcoef, None


moe_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class StackedFunction(torch.autograd.Function):
    """The same forward and backward as the registered ops, without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, expert_ids, coef, dropout_mask):
        y, s = stacked_forward(x, lora_a, lora_b, expert_ids, coef, dropout_mask)
        ctx.save_for_backward(x, lora_a, lora_b, expert_ids, coef, s, dropout_mask)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dx, da, db, dcoef = stacked_backward(grad_y, *ctx.saved_tensors)
        return dx, da, db, None, dcoef, None


# Above this stacked rank width (E * R), with sparse routing, the grouped path computes only the K selected
# experts per token instead of all E. A first estimate from the bytes each path streams (stacked: one pass over
# x per 128 rank columns; grouped: 3K + 1 passes), not yet tuned on a GPU.
GROUPED_MIN_RANK_WIDTH = 512
PATHS = ("auto", "stacked", "grouped")


def choose_path(num_experts: int, rank: int, top_k: int) -> str:
    """The Triton path for these sizes: "stacked" (all experts as one rank space) or "grouped" (sorted pairs)."""
    sparse = top_k < num_experts
    return "grouped" if sparse and num_experts * rank > GROUPED_MIN_RANK_WIDTH else "stacked"


def moe_lora_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """Triton MoE-LoRA delta for flat inputs x [T, D_in] -> [T, D_out] (validated by moe_lora).

    ``path`` forces "stacked" or "grouped" (tests, benchmarks); "auto" picks with :func:`choose_path`.
    """
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"the Triton moe_lora supports {_ACTIVATION_DTYPES}; got {x.dtype}")
    if path not in PATHS:
        raise ValueError(f"unknown Triton path {path!r}; expected one of {', '.join(PATHS)}")
    num_experts, rank, _ = lora_a.shape
    if path == "auto":
        path = choose_path(num_experts, rank, expert_ids.shape[1])
    # Both paths take coef = scaling * weights [T, K] and return its gradient; the ids are not differentiable.
    coef = expert_weights.float() * scaling
    if path == "grouped" and x.shape[0] > 0:
        from .moe_lora_grouped import GroupedFunction, moe_lora_grouped_fwd

        fused, function = moe_lora_grouped_fwd, GroupedFunction
    else:
        fused, function = moe_lora_fwd, StackedFunction
    if torch.compiler.is_compiling():
        return fused(x, lora_a, lora_b, expert_ids, coef, dropout_mask)[0]
    return function.apply(x, lora_a, lora_b, expert_ids, coef, dropout_mask)
