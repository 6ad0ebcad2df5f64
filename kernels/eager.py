"""Eager PyTorch twins of the ops: the CPU path, the benchmark baseline and the test oracle.

Shape letters: T tokens, K experts per token (top-k), E experts, D_in / D_out widths, R rank.

The grouped MoE-LoRA op in its stacked form (one pass over x for all experts, no sort): with
A_cat = A.reshape(E*R, D_in) and
B_cat[o, e*R + i] = B[e, o, i],

    S = x~ A_cat^T            [T, E*R]   rank-space activations, all experts at once
    G = s * scatter(w by ids) [T, E]     gate of each expert for each token (0 if not selected)
    H = S * G (per expert)    [T, E*R]
    y = H B_cat^T             [T, D_out]

Exact for any k: unselected experts have G = 0. Autograd gives the gradients (those the Triton kernels compute).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing_meta import expert_counts


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Gate/scaling dtype of the eager path: float64 stays float64, everything else runs its gate in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expert_coefficients(gate: torch.Tensor, scaling: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G * c [T, E] in ``dtype``: the routing gate times each expert's scaling (a float or a tensor [E])."""
    gate = gate.to(dtype)
    return gate * (scaling.to(dtype) if isinstance(scaling, torch.Tensor) else scaling)


def unselected_experts_zeroed(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float | torch.Tensor, counts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
    """``lora_a``, ``lora_b`` and a ``scaling`` tensor with the experts that no pair selects (``counts`` [E] == 0)
    set to zero.

    For the dense paths, which multiply every expert's weights with every token: a gate of 0 would not stop NaN/Inf
    in an unselected expert's weights (0 * NaN = NaN), so those weights are not read at all, as on the grouped and
    loop paths. A select, with no host sync; the unselected experts get a zero gradient through it.
    """
    used = counts > 0
    if isinstance(scaling, torch.Tensor):
        scaling = torch.where(used, scaling, 0.0)
    used = used.view(-1, 1, 1)
    return torch.where(used, lora_a, 0.0), torch.where(used, lora_b, 0.0), scaling


def moe_lora_eager(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    gate: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stacked-expert MoE-LoRA delta for flat inputs: x [T, D_in] -> [T, D_out] in x's dtype.

    ``gate`` [T, E] is the dense routing gate (routing_meta.dense_gate). LoRA weights of another dtype (fp32
    masters under bf16/fp16 x) are cast to x's dtype for the matmuls; their gradients come back in their own dtype.
    """
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    coef = expert_coefficients(gate, scaling, _compute_dtype(x)).to(x.dtype)  # [T, E]
    s = x_lora @ lora_a.reshape(num_experts * rank, d_in).to(x.dtype).t()  # [T, E*R]
    h = (s.view(-1, num_experts, rank) * coef.unsqueeze(-1)).view(-1, num_experts * rank)
    b_cat = lora_b.permute(1, 0, 2).reshape(d_out, num_experts * rank).to(x.dtype)
    return h @ b_cat.t()


def moe_lora_loop(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loop over experts most MoE-LoRA code writes: gather each expert's tokens, two matmuls, scatter-add.

    A benchmark baseline (it syncs with the host once per expert via nonzero); same math as moe_lora_eager.
    """
    x_lora = x if dropout_mask is None else x * dropout_mask.to(x.dtype)
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    for e in range(lora_a.shape[0]):
        token_idx, slot_idx = torch.nonzero(expert_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        scale = scaling[e] if isinstance(scaling, torch.Tensor) else scaling
        w = (expert_weights[token_idx, slot_idx].unsqueeze(-1) * scale).to(x.dtype)
        delta = (x_lora[token_idx] @ lora_a[e].to(x.dtype).t()) @ lora_b[e].to(x.dtype).t()
        out = out.index_add(0, token_idx, delta * w)
    return out


# --- the eager twin of the kernels' dropout (Triton's Philox 4x32-10, as tl.rand computes it) -------------------

_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product of the constant ``a`` and uint32 values ``b`` (in int64)."""
    p_lo = b * (a & 0xFFFF)  # < 2^48
    p_hi = b * (a >> 16)  # < 2^48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return high, low


def philox_uniform(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand(seed, offsets) in PyTorch: float32 uniforms in [0, 1), bit-identical to the kernels' draws.

    ``seed``: an int64 tensor with one element; ``offsets``: int64 counters. For tests and the eager twin only
    (about 100 elementwise ops per call).
    """
    seed = seed.reshape(()).long()
    c0, c1 = offsets & _U32, (offsets >> 32) & _U32
    c2 = c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _U32, (seed >> 32) & _U32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _U32, (k1 + _PHILOX_KEY_B) & _U32
    as_int32 = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    as_int32 = torch.where(as_int32 < 0, -as_int32 - 1, as_int32)  # ~x for negative x
    return as_int32.to(torch.float32) * 4.6566127342e-10


def philox_dropout_mask(seed: torch.Tensor, shape: tuple[int, int], p: float, dtype=torch.float32) -> torch.Tensor:
    """The inverted-dropout multiplier [T, D] (1/(1-p) kept, 0 dropped) the kernels draw in-register for ``seed``."""
    rows, cols = shape
    offsets = torch.arange(rows, device=seed.device).unsqueeze(1) * cols + torch.arange(cols, device=seed.device)
    keep = philox_uniform(seed, offsets) >= p
    return keep.to(dtype) / (1.0 - p)


def lora_dense(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, p: float = 0.0):
    """One plain LoRA of rank R as peft computes it (dropout, two matmuls): the cost routing must not exceed."""
    return (F.dropout(x, p) @ lora_a.t()) @ lora_b.t() * scaling


def topk_route_eager(logits: torch.Tensor, top_k: int, temperature: float = 1.0, normalize: bool = True):
    """Tempered softmax, top-k (ties: lowest expert id wins), optional renormalisation over the k.

    Returns (weights [T, K], ids [T, K] int64, dense [T, E], counts [E] int64, mean_prob [E]).
    Probabilities are computed in float32; weights, dense and mean_prob come back in float32.
    """
    num_experts = logits.shape[-1]
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    # A stable descending sort keeps equal probabilities in id order, so the lowest id wins a tie.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights, ids = sorted_probs[:, :top_k], sorted_ids[:, :top_k]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(probs).scatter(1, ids, weights)
    counts = expert_counts(ids, num_experts)
    mean_prob = probs.mean(dim=0) if probs.shape[0] > 0 else probs.new_zeros(num_experts)
    return weights, ids, dense, counts, mean_prob
