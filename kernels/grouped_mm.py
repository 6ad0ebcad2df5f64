"""The grouped-GEMM baseline of the MoE-LoRA op: torch's ``grouped_mm`` over the (token, slot) pairs sorted by
expert, the way a MoE library without its own kernels writes it.

Per call: sort the T*K pairs by expert (stable), gather x~ for each pair, S = x~ A_e^T per expert group (one
grouped_mm), H = S * w * c_e, D = H B_e^T per group (a second grouped_mm), then each token's K rows summed back in
pair order (a gather and a sum, not an atomic scatter-add, so the result is deterministic). Autograd runs through
grouped_mm's own backward. Same math and rules as ``eager.moe_lora_eager``: LoRA weights of another dtype (fp32
masters under bf16/fp16 x) are cast to x's dtype for the matmuls, the gate times the scaling in float32 (float64
for float64 x) then cast to x's dtype; an expert no pair selects owns an empty group, so its weights are never read
and its gradient is zero.

grouped_mm wants every stride a multiple of 16 bytes; widths that are not (odd d_in, d_out or r) are zero-padded
here, which changes no value. A benchmark baseline (``benchmarks/test_ops.py``), not a backend of ``moe_lora``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import eager
from .eager import _compute_dtype, philox_dropout_mask
from .routing_meta import RoutingMeta, expert_counts

STRIDE_ALIGN_BYTES = 16  # grouped_mm's stride rule (CPU and CUDA)
# The eager backend's cost rule (docs/benchmarks.md, "eager vs grouped_mm"): on the CPU in float32 the grouped
# GEMMs win once there are this many experts per routing slot (E / k): the stacked form multiplies all E*r rank
# columns for every token, the grouped one only k*r of them plus a gather of x and of the K output rows.
GROUPED_MM_MIN_EXPERTS_PER_SLOT = 8


def grouped_mm_op():
    """torch's grouped GEMM: ``F.grouped_mm`` (public), else ``torch._grouped_mm`` (the same op, older torch)."""
    op = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    if op is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no grouped_mm (torch.nn.functional.grouped_mm or torch._grouped_mm): "
            "the grouped-GEMM baseline needs torch >= 2.8"
        )
    return op


def _padded(n: int, elem_bytes: int) -> int:
    align = max(1, STRIDE_ALIGN_BYTES // elem_bytes)
    return -(-n // align) * align


def _pad_to(t: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``t`` zero-padded at the end of each dim up to ``sizes``; itself when no dim grows and its storage starts on
    a 16-byte boundary (grouped_mm's rule for the pointer too), else a copy."""
    pad = []
    for have, want in zip(reversed(t.shape), reversed(sizes)):
        pad += [0, want - have]
    if any(pad):
        return F.pad(t, pad)
    return t if t.data_ptr() % STRIDE_ALIGN_BYTES == 0 else t.clone(memory_format=torch.contiguous_format)


def moe_lora_grouped_mm(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoE-LoRA delta for flat inputs, x [T, D_in] -> [T, D_out] in x's dtype, on grouped GEMMs.

    ``expert_ids`` / ``expert_weights`` [T, K] (ids in [0, E), not checked here); ``scaling`` a float or a tensor
    [E]; ``dropout_mask`` an optional [T, D_in] multiplier on x: the arguments of ``eager.moe_lora_loop``.
    ``counts`` [E] (pairs per expert) and ``order`` [T*K] (the pairs stably sorted by expert) when the caller has
    them (RoutingMeta builds them once per step for every layer); computed here otherwise. No host sync.
    """
    if x.dtype == torch.float64:
        raise TypeError("grouped_mm has no float64 kernel; use the eager backend for float64")
    grouped_mm = grouped_mm_op()
    num_tokens, top_k = expert_ids.shape
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    elem = x.element_size()
    d_in_p, d_out_p, rank_p = _padded(d_in, elem), _padded(d_out, elem), _padded(rank, elem)

    flat_ids = expert_ids.reshape(-1)
    if order is None:
        order = torch.argsort(flat_ids, stable=True)  # pairs grouped by expert, token order kept inside a group
    order = order.long()
    counts = expert_counts(flat_ids, num_experts) if counts is None else counts
    offsets = counts.cumsum(0).to(torch.int32)
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    x_pairs = _pad_to(x_lora, (num_tokens, d_in_p)).index_select(0, order // top_k)  # [P, D_in]
    a = _pad_to(lora_a.to(x.dtype).contiguous(), (num_experts, rank_p, d_in_p))
    b = _pad_to(lora_b.to(x.dtype).contiguous(), (num_experts, d_out_p, rank_p))

    coef = expert_weights.to(_compute_dtype(x)).reshape(-1)  # gate * scaling as eager computes it, then x's dtype
    coef = coef * (scaling.to(coef.dtype)[flat_ids] if isinstance(scaling, torch.Tensor) else scaling)
    s = grouped_mm(x_pairs, a.transpose(1, 2), offs=offsets)  # [P, R]
    h = s * coef.index_select(0, order).to(x.dtype).unsqueeze(1)
    d = grouped_mm(h, b.transpose(1, 2), offs=offsets)  # [P, D_out], pairs in expert order
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)  # sorted position of each (token, slot) pair
    y = d.index_select(0, back).view(num_tokens, top_k, d_out_p).sum(1)
    return y[:, :d_out] if d_out_p != d_out else y


def moe_lora_grouped_mm_op(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    base_output: torch.Tensor | None = None,
) -> torch.Tensor:
    """The grouped-GEMM baseline with ``moe_lora``'s arguments and result: x [..., D_in], ids/weights [..., K],
    ``base_output`` + delta when given, dropout as a mask or drawn from ``dropout_seed`` (the kernels' Philox mask).
    Inputs are not validated (call ``moe_lora`` for that): this is the benchmark's timed path."""
    if dropout_p and dropout_mask is not None:
        raise ValueError("pass either dropout_mask or dropout_p/dropout_seed, not both")
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    k = expert_ids.shape[-1]
    mask = None if dropout_mask is None else dropout_mask.reshape(-1, d_in)
    if dropout_p:
        mask = philox_dropout_mask(dropout_seed.reshape(1), tuple(x2.shape), dropout_p, x.dtype)
    out = moe_lora_grouped_mm(
        x2, lora_a, lora_b, expert_ids.reshape(-1, k), expert_weights.reshape(-1, k), scaling, mask
    ).reshape(*lead, lora_b.shape[1])
    return out if base_output is None else base_output + out.to(base_output.dtype)


def eager_path(num_experts: int, top_k: int, dtype: torch.dtype, device: torch.device) -> str:
    """The eager backend's formulation for a layer call: "grouped_mm" where it measured faster (CPU, float32,
    E >= 8k), "stacked" (``eager.moe_lora_eager``) elsewhere: GPUs (eager is the baseline there, measured beside
    grouped_mm in the benchmarks), other dtypes (not measured), under torch.compile (one traced form) and on a
    torch without grouped_mm."""
    if device.type != "cpu" or dtype != torch.float32 or torch.compiler.is_compiling():
        return "stacked"
    if getattr(F, "grouped_mm", None) is None and getattr(torch, "_grouped_mm", None) is None:
        return "stacked"
    return "grouped_mm" if num_experts >= GROUPED_MM_MIN_EXPERTS_PER_SLOT * top_k else "stacked"


def moe_lora_eager_dispatch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    routing: RoutingMeta,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager backend on flat inputs: the grouped GEMMs or the stacked form, by :func:`eager_path`."""
    top_k = routing.ids.shape[-1]
    if eager_path(lora_a.shape[0], top_k, x.dtype, x.device) == "grouped_mm":
        order = routing.blocks(1).pair_of_row  # block 1: no padding rows, the pairs sorted by expert
        return moe_lora_grouped_mm(
            x, lora_a, lora_b, routing.ids, routing.weights, scaling, dropout_mask, routing.counts, order
        )
    lora_a, lora_b, scaling = eager.unselected_experts_zeroed(lora_a, lora_b, scaling, routing.counts)
    return eager.moe_lora_eager(x, lora_a, lora_b, routing.gate, scaling, dropout_mask)
