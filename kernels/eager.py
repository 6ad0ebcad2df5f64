"""Eager PyTorch twins of the ops: the CPU path, the benchmark baseline and the test oracle.

Shape letters: T tokens, K experts per token (top-k), E experts, D_in / D_out widths, R rank.

The grouped MoE-LoRA op in its stacked form (DESIGN 4b): with A_cat = A.reshape(E*R, D_in) and
B_cat[o, e*R + i] = B[e, o, i],

    S = x~ A_cat^T            [T, E*R]   rank-space activations, all experts at once
    G = s * scatter(w by ids) [T, E]     gate of each expert for each token (0 if not selected)
    H = S * G (per expert)    [T, E*R]
    y = H B_cat^T             [T, D_out]

Exact for any k: unselected experts have G = 0. Autograd gives the gradients of DESIGN 3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .routing_meta import dense_gate


def moe_lora_eager(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stacked-expert MoE-LoRA delta for flat inputs: x [T, D_in] -> [T, D_out]."""
    num_experts, rank, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    x_lora = x if dropout_mask is None else x * dropout_mask
    gate = dense_gate(expert_ids, expert_weights, num_experts).to(x.dtype) * scaling  # [T, E]
    s = x_lora @ lora_a.reshape(num_experts * rank, d_in).t()  # [T, E*R]
    h = (s.view(-1, num_experts, rank) * gate.unsqueeze(-1)).view(-1, num_experts * rank)
    b_cat = lora_b.permute(1, 0, 2).reshape(d_out, num_experts * rank)
    return h @ b_cat.t()


def moe_lora_loop(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loop over experts most MoE-LoRA code writes: gather each expert's tokens, two matmuls, scatter-add.

    A benchmark baseline (it syncs with the host once per expert via nonzero); same math as moe_lora_eager.
    """
    x_lora = x if dropout_mask is None else x * dropout_mask
    out = x.new_zeros(x.shape[0], lora_b.shape[1])
    for e in range(lora_a.shape[0]):
        token_idx, slot_idx = torch.nonzero(expert_ids == e, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        w = expert_weights[token_idx, slot_idx].unsqueeze(-1).to(x.dtype)
        delta = (x_lora[token_idx] @ lora_a[e].t()) @ lora_b[e].t()
        out = out.index_add(0, token_idx, delta * (w * scaling))
    return out


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
    counts = torch.bincount(ids.flatten(), minlength=num_experts)
    mean_prob = probs.mean(dim=0) if probs.shape[0] > 0 else probs.new_zeros(num_experts)
    return weights, ids, dense, counts, mean_prob
