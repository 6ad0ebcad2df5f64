"""Routing metadata shared by the eager and Triton paths.

Shape letters: T tokens, K experts per token, E experts.
"""

from __future__ import annotations

import torch


def dense_gate(expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the k routing weights of each token into a dense [T, E] gate (weights of a repeated id add up).

    Differentiable in expert_weights; float32 so a bf16 weight sum is not rounded twice.
    """
    gate = expert_weights.new_zeros(expert_ids.shape[0], num_experts, dtype=torch.float32)
    return gate.scatter_add(1, expert_ids.long(), expert_weights.float())
