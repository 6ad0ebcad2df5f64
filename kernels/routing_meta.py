"""Routing metadata shared by the eager and Triton paths.

Shape letters: T tokens, K experts per token, E experts, P = T * K (token, slot) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def dense_gate(expert_ids: torch.Tensor, expert_weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Scatter the k routing weights of each token into a dense [T, E] gate (weights of a repeated id add up).

    Differentiable in expert_weights; float32 so a bf16 weight sum is not rounded twice.
    """
    gate = expert_weights.new_zeros(expert_ids.shape[0], num_experts, dtype=torch.float32)
    return gate.scatter_add(1, expert_ids.long(), expert_weights.float())


class ExpertBlocks(NamedTuple):
    """(token, slot) pairs sorted by expert, each expert's segment padded to a whole number of blocks.

    A pair is p = t * K + j. Only the index list is padded, never the activations, and every size is a static
    bound of T * K and E, so building it needs no host sync (CUDA graphs and torch.compile stay whole).

    pair_of_row:     [P_pad] int32, the pair in each sorted row; -1 for padding rows.
    expert_of_block: [P_pad / BLOCK] int32, the expert whose rows a block holds; -1 for blocks past the end.
    expert_offsets:  [E + 1] int32, first padded row of each expert's segment (the last entry ends the last one).
    """

    pair_of_row: torch.Tensor
    expert_of_block: torch.Tensor
    expert_offsets: torch.Tensor


def group_by_expert(expert_ids: torch.Tensor, num_experts: int, block: int) -> ExpertBlocks:
    """Sort the pairs of ``expert_ids`` [T, K] by expert (stable: pairs keep token order within an expert)."""
    flat = expert_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block - 1) // block * block
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    sorted_expert = flat[order]
    rank_in_expert = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    total_rows = (num_pairs + num_experts * (block - 1) + block - 1) // block * block
    pair_of_row = torch.full((total_rows,), -1, dtype=torch.int32, device=device)
    pair_of_row[padded_start[sorted_expert] + rank_in_expert] = order.to(torch.int32)
    block_start = torch.arange(0, total_rows, block, device=device)
    expert_of_block = torch.searchsorted(padded_end, block_start, right=True)
    expert_of_block = torch.where(expert_of_block < num_experts, expert_of_block, -1).to(torch.int32)
    expert_offsets = torch.cat([padded_start, padded_end[-1:]]).to(torch.int32)
    return ExpertBlocks(pair_of_row, expert_of_block, expert_offsets)
