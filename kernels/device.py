"""What the hardware allows: per-block shared memory, registers, SM count, bandwidth and peak FLOPs of a target.

The launch configs (configs.py) and the path cost model (cost.py) read these limits from a
:class:`DeviceSpec`: on a GPU from ``torch.cuda.get_device_properties`` (:func:`device_spec`), for the compile report
from :data:`TARGETS`, one representative card per architecture, and under Triton's CPU interpreter from
:data:`INTERPRETER` (small tiles: the interpreter runs every program in Python).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, replace

import torch

KIB = 1024


@dataclass(frozen=True)
class DeviceSpec:
    """Limits of one target. Bandwidth and FLOP figures are vendor peaks (dense, no sparsity): roofline inputs."""

    name: str
    arch: int  # compute capability as major * 10 + minor (86 = sm_86); 0 for the interpreter
    sm_count: int
    shared_per_block: int  # bytes, the opt-in maximum a kernel may request
    shared_per_sm: int  # bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int
    mem_bandwidth: float  # bytes / s
    tensor_flops: float  # bf16 / fp16 tensor-core FLOP/s with fp32 accumulation
    fp32_flops: float  # FLOP/s of fp32 dots without TF32
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    launch_overhead: float = 3e-6  # s between back-to-back kernels of one stream (no CUDA graph)

    @property
    def is_gpu(self) -> bool:
        return self.arch > 0


# One representative card per architecture (the 'name' says which). Shared memory: the CUDA programming guide's
# opt-in per-block maximum (99 KiB on consumer Ampere / Ada / Blackwell).
TARGETS: dict[str, DeviceSpec] = {
    "sm_80": DeviceSpec("A100-SXM4-80GB", 80, 108, 163 * KIB, 164 * KIB, 2048, 32, 2.039e12, 312e12, 19.5e12),
    "sm_86": DeviceSpec("RTX 3090 (A10, A40)", 86, 82, 99 * KIB, 100 * KIB, 1536, 16, 0.936e12, 71e12, 35.6e12),
    "sm_89": DeviceSpec("RTX 4090 (L4, L40S)", 89, 128, 99 * KIB, 100 * KIB, 1536, 24, 1.008e12, 165e12, 82.6e12),
    "sm_90": DeviceSpec("H100-SXM5-80GB", 90, 132, 227 * KIB, 228 * KIB, 2048, 32, 3.35e12, 989e12, 67e12),
    "sm_100": DeviceSpec("B200", 100, 148, 227 * KIB, 228 * KIB, 2048, 32, 8.0e12, 2250e12, 80e12),
    "sm_120": DeviceSpec("RTX 5090", 120, 170, 99 * KIB, 100 * KIB, 1536, 32, 1.792e12, 209e12, 104.8e12),
}

# Triton's CPU interpreter: every program runs in Python, so few, small programs (test shapes are small).
INTERPRETER = DeviceSpec("Triton interpreter (CPU)", 0, 8, 64 * KIB, 64 * KIB, 2048, 32, 1e10, 1e10, 1e10)

_override: list[DeviceSpec] = []


@contextlib.contextmanager
def pretend_device(spec: DeviceSpec):
    """Inside the block every config chooser plans for ``spec`` whatever the tensors' device (the compile report)."""
    _override.append(spec)
    try:
        yield spec
    finally:
        _override.pop()


def device_spec(device: torch.device) -> DeviceSpec:
    """The limits the launches on ``device`` must respect: the GPU's own, or the interpreter's on the CPU."""
    if _override:
        return _override[-1]
    if device.type != "cuda":
        return INTERPRETER
    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_spec(index: int) -> DeviceSpec:
    """Read from the driver: SM count, per-SM shared memory, threads, bandwidth (memory clock x bus width); the rest
    (opt-in shared memory per block, registers, peak FLOPs) from the table row of its architecture, or of the closest
    one below it, where this torch does not report them."""
    props = torch.cuda.get_device_properties(index)
    arch = props.major * 10 + props.minor
    row = _nearest_row(arch)
    shared_block = getattr(props, "shared_memory_per_block_optin", 0) or row.shared_per_block
    bandwidth = row.mem_bandwidth
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:  # double data rate: 2 transfers per clock
        bandwidth = 2 * clock_khz * 1e3 * bus_bits / 8
    return replace(
        row,
        name=props.name,
        arch=arch,
        sm_count=props.multi_processor_count,
        shared_per_block=shared_block,
        shared_per_sm=getattr(props, "shared_memory_per_multiprocessor", 0) or row.shared_per_sm,
        max_threads_per_sm=getattr(props, "max_threads_per_multi_processor", 0) or row.max_threads_per_sm,
        regs_per_sm=getattr(props, "regs_per_multiprocessor", 0) or row.regs_per_sm,
        mem_bandwidth=bandwidth,
    )


def _nearest_row(arch: int) -> DeviceSpec:
    """The table row of ``arch``, or of the closest architecture below it (a newer card than the table knows)."""
    rows = sorted(TARGETS.values(), key=lambda s: s.arch)
    below = [s for s in rows if s.arch <= arch]
    return below[-1] if below else rows[0]


def occupancy(spec: DeviceSpec, num_warps: int, regs: int, shared: int) -> tuple[int, float]:
    """(resident blocks per SM, fraction of the SM's warp slots used) for a kernel of ``num_warps`` warps that uses
    ``regs`` registers per thread and ``shared`` bytes of shared memory per block; 0 blocks when it cannot launch.

    Registers are allocated per warp in units of 256; each block reserves 1 KiB of shared memory for the system.
    """
    threads = 32 * num_warps
    if regs > spec.max_regs_per_thread or shared > spec.shared_per_block:
        return 0, 0.0
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    limits = [
        spec.max_blocks_per_sm,
        spec.max_threads_per_sm // threads,
        spec.regs_per_sm // (regs_per_warp * num_warps),
    ]
    limits.append(spec.shared_per_sm // (shared + KIB))
    blocks = max(0, min(limits))
    return blocks, blocks * num_warps / (spec.max_threads_per_sm // 32)


def tile_registers_per_thread(spec: DeviceSpec) -> int:
    """Registers per thread the config choosers give the fp32 elements of a kernel's live tiles (the rank tile, one
    activation tile and one weight tile): a quarter of the target's limit; the rest holds addresses, masks and the
    pipeline. A larger share spilled (compile report)."""
    return (spec.max_regs_per_thread + 1) // 4
