"""A written cost model of the two Triton MoE-LoRA paths: bytes moved, FLOPs and launches per op, and the
roofline time they predict on a target. The path registry (paths.py) chooses the path with it, and it is printed
beside every configuration of the compile report and every GPU benchmark, so a measured time can be read against it.

Per launch, time = max(DRAM bytes / bandwidth, FLOPs / peak) / fill + the launch gap, where fill = min(1, programs
/ SMs) (a launch with fewer programs than SMs leaves SMs idle). DRAM bytes count every tensor a launch must read or
write once (weights included, re-reads assumed to hit L2); FLOPs count the padded tiles the kernels really
multiply (the stacked rank width and the grouped rank rounded up to a power of two >= 16, the grouped pair list
padded per expert). Peaks: the target's dense bf16/fp16 tensor FLOP/s, or its fp32 FLOP/s for fp32 activations.
A roofline is a lower bound: skinny rank-space dots do not reach the tensor-core peak.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._launch import cdiv, next_pow2
from .configs import grad_splits, grouped_config, stacked_config
from .device import DeviceSpec
from .routing_meta import padded_rows


class LaunchCost(NamedTuple):
    name: str
    bytes: float
    flops: float
    programs: int

    def seconds(self, spec: DeviceSpec, dtype: torch.dtype) -> float:
        peak = spec.fp32_flops if dtype == torch.float32 else spec.tensor_flops
        fill = min(1.0, self.programs / spec.sm_count)
        return max(self.bytes / spec.mem_bandwidth, self.flops / peak) / fill + spec.launch_overhead


class Shape(NamedTuple):
    """One MoE-LoRA layer call: T tokens, widths, E experts of rank R, K per token, dtypes by element size."""

    num_tokens: int
    d_in: int
    d_out: int
    num_experts: int
    rank: int
    top_k: int
    dtype: torch.dtype = torch.bfloat16
    weight_bytes: int = 4  # fp32 master weights
    base: bool = True
    dropout: bool = False  # in-kernel dropout: no mask tensor is read


def weight_dtype(s: Shape) -> torch.dtype:
    """The LoRA weights' dtype of ``s``: fp32 masters (4 bytes) or the activations' dtype."""
    return torch.float32 if s.weight_bytes == 4 else s.dtype


def _size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def stacked_costs(s: Shape, spec: DeviceSpec) -> list[LaunchCost]:
    """The stacked path's launches (forward, dy pass, weights pass, the fixed-order split sum)."""
    a, w, T = _size(s.dtype), s.weight_bytes, s.num_tokens
    N = s.num_experts * s.rank
    cfg = stacked_config(next_pow2(T), N, s.dtype, spec, s.dropout, weight_dtype(s))
    Np, E = cfg.block_n, s.num_experts
    weights = N * (s.d_in + s.d_out) * w
    t_programs = cdiv(T, cfg.block_t)
    tiles = cdiv(s.d_in, cfg.block_d) + cdiv(s.d_out, cfg.block_d)
    splits = cdiv(T, grad_splits(T, tiles, spec))
    costs = [
        LaunchCost(
            "stacked forward",
            T * s.d_in * a + weights + T * E * 4 + T * N * 4 + T * s.d_out * a * (2 if s.base else 1),
            2 * T * Np * (s.d_in + s.d_out),
            t_programs,
        ),
        LaunchCost(
            "stacked dy", T * s.d_out * a + N * s.d_out * w + 2 * T * N * 4 + 2 * T * E * 4, 2 * T * Np * s.d_out,
            t_programs,
        ),
        LaunchCost(
            "stacked weights",
            2 * T * s.d_in * a + T * s.d_out * a + 2 * T * N * 4 + T * E * 4 + N * s.d_in * w
            + splits * N * (s.d_in + s.d_out) * 4,
            2 * T * Np * (2 * s.d_in + s.d_out),
            tiles * splits,
        ),
    ]  # fmt: skip
    if splits > 1:
        costs.append(LaunchCost("split sum", (splits + 1) * N * (s.d_in + s.d_out) * 4, 0, spec.sm_count))
    return costs


def grouped_costs(s: Shape, spec: DeviceSpec, block_m: int = 64) -> list[LaunchCost]:
    """The grouped path's launches (forward, dy pass, weights pass) and the ATen sums and adds around them."""
    a, w, T, E, R, K = _size(s.dtype), s.weight_bytes, s.num_tokens, s.num_experts, s.rank, s.top_k
    P = T * K
    P_pad = padded_rows(P, E, block_m)
    Rp = max(16, next_pow2(R))
    weights = E * R * (s.d_in + s.d_out) * w
    blocks = P_pad // block_m
    block_d = grouped_config(R, s.dtype, spec, s.dropout, weight_dtype(s)).block_d
    costs = [
        LaunchCost(
            "grouped forward", P * s.d_in * a + weights + P * 4 + P_pad * 4 + P * R * 4 + P * s.d_out * a,
            2 * P_pad * Rp * (s.d_in + s.d_out), blocks,
        ),
        LaunchCost(
            "grouped dy", P * s.d_out * a + weights + 2 * P * R * 4 + 2 * P * 4 + P_pad * 4 + P * s.d_in * a,
            2 * P_pad * Rp * (s.d_in + s.d_out), blocks,
        ),
        LaunchCost(
            "grouped weights",
            P * (s.d_in + s.d_out) * a + 2 * P * R * 4 + P * 4 + P_pad * 4 + E * R * (s.d_in + s.d_out) * 4,
            2 * P_pad * Rp * (s.d_in + s.d_out), E * (cdiv(s.d_in, block_d) + cdiv(s.d_out, block_d)),
        ),
    ]  # fmt: skip
    if K > 1:  # each token's K per-pair rows summed by ATen, forward (y) and backward (dx)
        costs.append(LaunchCost("slot sum y", (P + T) * s.d_out * a, 0, spec.sm_count))
        costs.append(LaunchCost("slot sum dx", (P + T) * s.d_in * a, 0, spec.sm_count))
    if s.base:
        costs.append(LaunchCost("base + delta", 3 * T * s.d_out * a, 0, spec.sm_count))
    return costs


def predicted_seconds(costs: list[LaunchCost], spec: DeviceSpec, dtype: torch.dtype) -> float:
    return sum(c.seconds(spec, dtype) for c in costs)
