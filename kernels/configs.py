"""Launch configs of every Triton kernel: tile sizes, warps and pipeline stages, chosen per shape, dtype and target.

One chooser per kernel family, each cached (no autotuner on the hot path: the same config in every process):
:func:`stacked_config` (stacked.py), :func:`grouped_config` (grouped.py), :func:`route_config` (topk_route.py).
Tiles are sized to a register budget per thread and pipeline stages to the target's shared memory per block
(device.py); the compile report (compile_report.py) compiles every config they return for sm_80..sm_120 and is
what the exceptions below were read from. The cost model (cost.py) reads the same configs.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ._launch import cdiv, deterministic_mode, interpreter_enabled, next_pow2
from .device import DeviceSpec, tile_registers_per_thread

# --- stacked path ----------------------------------------------------------------------------------------------

# Each split of T in the stacked weights pass is a multiple of this (and of every BLOCK_T).
GRAD_SPLIT_ALIGN = 64 if interpreter_enabled() else 256
# Widest stacked rank space (E * R) the kernels hold as one register tile; wider ones take the grouped path (at 512
# the weights pass spills 200-260 B per thread in bf16 whatever the warps and tiles: compile report).
MAX_RANK_WIDTH = 256
# Fixed stand-in for the SM count in deterministic mode: the split of T (hence the summation order) is then the
# same on every GPU model.
_DETERMINISTIC_SMS = 132


class StackedConfig(NamedTuple):
    block_t: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    weights_stages: int  # of the weights pass, which pipelines three streams and spills sooner


@functools.lru_cache(maxsize=256)
def stacked_config(
    t_bucket: int,
    n: int,
    dtype: torch.dtype,
    spec: DeviceSpec,
    dropout: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> StackedConfig:
    """Launch config of the three stacked kernels per (T bucket, rank width, activation and weight dtypes, target,
    dropout). The rank width is one register tile; BLOCK_T and BLOCK_D shrink as it grows so the live tiles fit
    the register budget per thread (in-kernel dropout adds the Philox state and an fp32 copy of the activation
    tile), and pipeline stages are dropped until the buffers fit the target's shared memory per block.
    ``weight_dtype`` None means the activation dtype."""
    if n > MAX_RANK_WIDTH:
        raise ValueError(
            f"the stacked Triton path holds E * r <= {MAX_RANK_WIDTH} rank columns in registers; got {n} "
            "(use triton_path='grouped' or 'auto')"
        )
    block_n = max(16, next_pow2(n))
    if not spec.is_gpu:  # the interpreter: few, small programs
        return StackedConfig(min(32, max(16, next_pow2(t_bucket))), block_n, 32, 4, 1, 1)
    fp32 = dtype == torch.float32
    num_warps = 4 if block_n <= 64 else 8
    per_thread = tile_registers_per_thread(spec)
    budget = per_thread * 32 * num_warps // (2 if dropout or fp32 else 1)
    block_t, block_d = 64, 64
    while block_t * block_n + block_t * block_d + block_n * block_d > budget and block_t > 16:
        block_t //= 2
    while block_t * block_n + block_t * block_d + block_n * block_d > budget and block_d > 16:
        block_d //= 2
    if spec.arch == 100 and block_n == 32 and not fp32:  # 64 rows: the forward spills 4-12 B (compile report)
        block_t = 32
    # D tiles of 16 for the widest rank tile (more spills on sm_80) and at 128 columns with in-kernel dropout (the
    # forward spills 4 B per thread on sm_90 at D tiles of 32 since it reads the routing counts): compile report.
    if block_n >= 256 or (block_n >= 128 and dropout):
        block_d = 16
    num_stages = 2 if block_n >= 256 else 3
    while num_stages > 1 and stacked_shared_bytes(block_t, block_n, block_d, num_stages) > spec.shared_per_block:
        num_stages -= 1
    return StackedConfig(block_t, block_n, block_d, num_warps, num_stages, _stacked_weights_stages(
        num_stages, block_n, dtype, weight_dtype or dtype, spec, dropout))  # fmt: skip


# ptxas for sm_86 and sm_89 caps the stacked weights pass at 128 / 168 registers per thread where it does not for
# sm_80, sm_90, sm_100 or sm_120, and spills a few bytes there (compile report).
_TIGHT_REGISTER_ARCHS = (86, 89)


def _stacked_weights_stages(
    num_stages: int, block_n: int, dtype: torch.dtype, weight_dtype: torch.dtype, spec: DeviceSpec, dropout: bool
) -> int:
    """Pipeline stages of the stacked weights pass, which pipelines three streams and spills sooner than the other
    two kernels. Fewer only where the compile report found a spill (measured on sm_86 and sm_89 in bf16 and fp16:
    fp32 weights at rank width 32 with two stages spill 8 B per thread, none at one; in-kernel dropout at rank
    width 64 with three stages 4 B, none at two); stages do not enter the cost model's time."""
    if dtype == torch.float32:  # a correctness mode: two stages spill 8 B per thread at rank width 256 on sm_86
        return 1
    if spec.arch in _TIGHT_REGISTER_ARCHS:
        if weight_dtype == torch.float32 and block_n == 32 and num_stages == 2:
            return 1
        if dropout and block_n == 64:
            return min(num_stages, 2)
    return num_stages


def stacked_shared_bytes(block_t: int, block_n: int, block_d: int, num_stages: int) -> int:
    """Upper estimate of the shared memory of the largest stacked kernel (the weights pass): each pipeline stage
    buffers an fp32 [BLOCK_T, BLOCK_N] rank tile, an fp32 [BLOCK_T, BLOCK_D] activation tile and an fp32
    [BLOCK_N, BLOCK_D] weight tile, plus one stage of staging for the dot operands."""
    per_stage = 4 * (block_t * block_n + block_t * block_d + block_n * block_d)
    return (num_stages + 1) * per_stage


def grad_splits(num_tokens: int, d_tiles: int, spec: DeviceSpec) -> int:
    """Tokens per split of the stacked weights pass: about one program per SM of ``spec``."""
    sms = _DETERMINISTIC_SMS if deterministic_mode() and spec.is_gpu else spec.sm_count
    splits = max(1, min(cdiv(sms, d_tiles), cdiv(num_tokens, GRAD_SPLIT_ALIGN)))
    return cdiv(cdiv(num_tokens, splits), GRAD_SPLIT_ALIGN) * GRAD_SPLIT_ALIGN


# --- grouped path ----------------------------------------------------------------------------------------------

# Rows per block of the sorted pair list: one value per process, because the step's sort (routing_meta) is built
# once for every layer, whatever its width or rank.
BLOCK_M = 16 if interpreter_enabled() else 64


class GroupedConfig(NamedTuple):
    block_m: int
    block_r: int
    block_d: int
    num_warps: int
    num_stages: int
    weights_stages: int  # of the weights pass, which pipelines two streams and spills sooner


@functools.lru_cache(maxsize=256)
def grouped_config(
    rank: int,
    dtype: torch.dtype,
    spec: DeviceSpec,
    dropout: bool = False,
    weight_dtype: torch.dtype | None = None,
) -> GroupedConfig:
    """Launch config of the three grouped kernels per (rank, activation and weight dtypes, target, dropout).

    The rank block is the next power of two of max(r, 16); BLOCK_D shrinks as it grows so the live tiles fit the
    register budget per thread (dropout and fp32 halve it), and pipeline stages are dropped until the buffers fit
    the target's shared memory per block. fp32 pipelines less: at rank 128 its 2- and 3-stage kernels spill
    (compile report). ``weight_dtype`` None means the activation dtype."""
    block_r = max(next_pow2(rank), 16)
    if not spec.is_gpu:  # the interpreter: few, small programs
        return GroupedConfig(BLOCK_M, block_r, 32, 4, 1, 1)
    fp32 = dtype == torch.float32
    num_warps = 4 if block_r <= 32 else 8
    per_thread = tile_registers_per_thread(spec)
    budget = per_thread * 32 * num_warps // (2 if dropout or fp32 else 1)
    block_d = 128
    while BLOCK_M * block_r + BLOCK_M * block_d + block_r * block_d > budget and block_d > 16:
        block_d //= 2
    if dropout and spec.arch == 120:  # D tiles of 32 spill 4 B per thread in the forward and dy pass (compile report)
        block_d = 16
    num_stages = (1 if block_r >= 128 else 2) if fp32 else 3
    while num_stages > 1 and grouped_shared_bytes(block_r, block_d, num_stages) > spec.shared_per_block:
        num_stages -= 1
    # The weights pass at rank 128 spills 16 B per thread on sm_120 at three stages, none at two (compile report).
    weights_stages = 1 if fp32 else min(num_stages, 2) if block_r >= 128 else num_stages
    return GroupedConfig(BLOCK_M, block_r, block_d, num_warps, num_stages, weights_stages)


def grouped_shared_bytes(block_r: int, block_d: int, num_stages: int) -> int:
    """Upper estimate of a grouped kernel's shared memory: each pipeline stage buffers an fp32 [BLOCK_M, BLOCK_D]
    activation tile and an fp32 [BLOCK_R, BLOCK_D] weight tile, plus one stage of staging for the dot operands."""
    return (num_stages + 1) * 4 * (BLOCK_M * block_d + block_r * block_d)


# --- the fused router ------------------------------------------------------------------------------------------

# Elements of the [BLOCK_T, BLOCK_E] tile per program: 16 per thread at 2 warps. Compiled for sm_90 (ptxas of the
# triton wheel, no GPU) at E = 64, k = 2 this needs 111 (forward) / 122 (backward) registers and no spills, so
# ~8 programs and ~8k logits are in flight per SM; 8 per thread (4 warps) allows ~4k, 32 per thread spills.
# Not yet timed on a GPU: DYLORA_ROUTER_BLOCK_T / DYLORA_ROUTER_NUM_WARPS pin another config.
_ROUTE_TILE_ELEMENTS = 1024
_ROUTE_MAX_BLOCK_T = 128
_ROUTE_NUM_WARPS = 2
# The backward holds more per element (p, g, the selection, the Jacobian terms): at 2 warps it spills 8 B per
# thread on sm_80 (E 32-64, k 4-8; compile report), at 4 warps none.
_ROUTE_BWD_NUM_WARPS = 4


class RouteConfig(NamedTuple):
    block_t: int
    block_e: int
    num_warps: int


class RouteStatsConfig(NamedTuple):
    block_n: int
    block_e: int
    num_warps: int


def route_config(num_tokens: int, num_experts: int, spec: DeviceSpec, backward: bool = False) -> RouteConfig:
    """Config of the router's forward (or backward) kernel on ``spec``. ``DYLORA_ROUTER_BLOCK_T`` /
    ``DYLORA_ROUTER_NUM_WARPS`` pin it."""
    block_e = next_pow2(num_experts)
    block_t = min(_ROUTE_MAX_BLOCK_T, max(1, _ROUTE_TILE_ELEMENTS // block_e), next_pow2(num_tokens))
    # sm_120: the forward at 128 expert columns spills 24 B per thread at 2 warps, none at 4 (compile report)
    wide = spec.arch == 120 and block_e == 128
    default = _ROUTE_BWD_NUM_WARPS if backward or wide else _ROUTE_NUM_WARPS
    num_warps = _env_int("DYLORA_ROUTER_NUM_WARPS", default)
    return RouteConfig(_env_int("DYLORA_ROUTER_BLOCK_T", block_t), block_e, num_warps)


def route_stats_config(num_blocks: int, block_e: int) -> RouteStatsConfig:
    """Config of the router's statistics kernel: 8 experts per program, [1024, 8] partials per step at 8 warps (32
    values per thread); at T = 32k, E = 64 that is 8 programs of 2 steps over the 2048 x 64 partials."""
    stats_block_e = min(block_e, 8)
    return RouteStatsConfig(min(8192 // stats_block_e, next_pow2(num_blocks)), stats_block_e, 8)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1 or int(value) & (int(value) - 1):
        raise ValueError(f"{name}={value!r} must be a power of two >= 1")
    return int(value)
