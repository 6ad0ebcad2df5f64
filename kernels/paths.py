"""The registry of Triton MoE-LoRA paths: each formulation registered once with its name, the layer shapes it can
run, its cost model, its launch-config chooser, its launcher and what the compile report records of it.

:func:`choose_path` (``triton_path="auto"``), dispatch.py (a forced ``triton_path``) and the compile report's grid
and shape table all read :data:`PATHS`, so a new path is one entry here plus its tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._launch import next_pow2
from .configs import MAX_RANK_WIDTH, grouped_config, stacked_config
from .cost import Shape, grouped_costs, predicted_seconds, stacked_costs, weight_dtype
from .device import TARGETS, DeviceSpec
from .grouped import launch_grouped, record_grouped
from .stacked import launch_stacked, record_stacked


class TritonPath(NamedTuple):
    name: str
    fits: Callable[[int, int], bool]  # (num_experts, rank) -> whether the path can run that layer
    costs: Callable[[Shape, DeviceSpec], list]  # its launches' bytes, FLOPs and programs (cost.py)
    config: Callable[[Shape, DeviceSpec], Any]  # the launch config it picks for a layer shape (configs.py)
    launch: Callable[..., torch.Tensor]  # (x, lora_a, lora_b, routing, scaling, mask, seed, p, base, donated)
    record: Callable[..., None]  # forward + backward on meta tensors (the compile report's launches)


def _stacked_config(s: Shape, spec: DeviceSpec):
    return stacked_config(next_pow2(s.num_tokens), s.num_experts * s.rank, s.dtype, spec, s.dropout, weight_dtype(s))


def _grouped_config(s: Shape, spec: DeviceSpec):
    return grouped_config(s.rank, s.dtype, spec, s.dropout, weight_dtype(s))


# In order of preference where the cost model cannot decide (the interpreter, equal predicted times).
PATHS: dict[str, TritonPath] = {
    p.name: p
    for p in (
        # all experts as one rank space: up to the widest rank tile the kernels hold in registers
        TritonPath("stacked", lambda e, r: e * r <= MAX_RANK_WIDTH, stacked_costs, _stacked_config, launch_stacked,
                   record_stacked),
        # (token, slot) pairs sorted by expert: any number of experts and rank
        TritonPath("grouped", lambda e, r: True, grouped_costs, _grouped_config, launch_grouped, record_grouped),
    )
}  # fmt: skip


def candidates(num_experts: int, rank: int) -> list[str]:
    """The registered paths that can run a layer of ``num_experts`` experts of rank ``rank``, in registry order."""
    return [p.name for p in PATHS.values() if p.fits(num_experts, rank)]


@functools.lru_cache(maxsize=1024)
def choose_path(
    num_experts: int,
    rank: int,
    top_k: int,
    *,
    num_tokens: int = 8192,
    d_in: int = 4096,
    d_out: int = 4096,
    dtype: torch.dtype = torch.bfloat16,
    spec: DeviceSpec = TARGETS["sm_90"],
    dropout: bool = False,
) -> str:
    """The registered path with the lowest predicted forward + backward time on ``spec`` (defaults: the reference
    layer, T = 8192, 4096 x 4096, bf16, H100) among those that fit the layer; the first that fits under the
    interpreter (time there is Python per program). Cached: callers pass T rounded to a power of two, so each
    layer shape is modelled once."""
    names = candidates(num_experts, rank)
    if not spec.is_gpu:
        return names[0]
    shape = Shape(num_tokens, d_in, d_out, num_experts, rank, top_k, dtype, dropout=dropout)
    return min(names, key=lambda name: predicted_seconds(PATHS[name].costs(shape, spec), spec, dtype))
