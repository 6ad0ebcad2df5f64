"""Benchmark set-up: device and dtype, commit, peak memory, and the ``bench`` fixture every benchmark uses.

Run the suite with ``pytest benchmarks/ --benchmark-only`` (the normal test run passes ``--benchmark-skip``, so
nothing here is timed there). The device is CUDA when one is visible (bf16), else the CPU (fp32).

Every benchmark records in ``extra_info``: device, device_name, dtype, commit, torch version, its shapes, and the
peak memory of one call (see :func:`peak_memory` for what that number is on each device).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
REPO = Path(__file__).resolve().parent.parent
requires_gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="Triton kernels are timed on a CUDA GPU only (the CPU interpreter is not a speed path)"
)


def pytest_configure(config):
    """CPU runs use ``BENCH_CPU_THREADS`` intra-op threads (default 1): with more threads than idle cores, torch's
    parallel regions wait on descheduled threads (a peft step measured 100 ms on 1 thread and 880 ms on 2 on a
    loaded 2-core machine), so one thread is the figure that repeats. The thread count is in ``device_name``."""
    if not HAS_CUDA:
        torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", "1")))


def sync() -> None:
    """Wait for queued GPU work, so a host timer measures the kernels and not just their launch."""
    if HAS_CUDA:
        torch.cuda.synchronize()


@functools.cache
def commit() -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files differ from it (figures must name their commit).

    A copy without .git (a lent GPU machine gets the working tree only) takes it from DYLORA_MOE_COMMIT.
    """
    if os.environ.get("DYLORA_MOE_COMMIT"):
        return os.environ["DYLORA_MOE_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@functools.cache
def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    try:
        import cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw", "")
    except ImportError:
        brand = platform.processor()
    return f"{brand or platform.machine()}, torch threads={torch.get_num_threads()}"


def _cpu_peak_extra_bytes(fn) -> int | None:
    """Peak bytes of CPU tensors allocated during ``fn()`` above what was live before it.

    Replays the allocator's alloc/free events recorded by the torch profiler (``profile_memory=True``); this reads
    the profiler's event tree, a private API, so a torch that changes it gives None rather than a wrong number.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
                events.append((event.start_time_ns, event.extra_fields.alloc_size))
    except (ImportError, AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def peak_memory(fn) -> dict:
    """Peak memory of one call of ``fn``.

    CUDA: ``peak_mem_bytes`` is ``torch.cuda.max_memory_allocated`` during the call (everything live: weights,
    optimizer state, activations), ``peak_extra_bytes`` the same minus what was allocated before the call.
    CPU: only ``peak_extra_bytes``, from the profiler's allocator events (process RSS would count the Python heap
    and never goes down, so it cannot tell one provider from another).
    """
    if HAS_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mem_bytes": peak, "peak_extra_bytes": peak - before, "mem_method": "cuda max_memory_allocated"}
    return {"peak_extra_bytes": _cpu_peak_extra_bytes(fn), "mem_method": "profiler allocator events (CPU)"}


class Bench:
    """Times one callable with pytest-benchmark and fills ``extra_info``; one instance per test."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def __call__(self, fn, *, rounds: int, warmup_rounds: int, cuda_events: bool = False, **info) -> None:
        """Time ``fn`` (a GPU sync is appended), after ``warmup_rounds`` untimed calls that absorb JIT compilation and
        autotuning.

        ``info`` goes to ``extra_info``; when it holds ``lora_bytes`` (bytes the op must move) or ``tokens`` (tokens
        per call), the achieved GB/s or tokens/s at the median time are added. ``cuda_events`` also records
        ``triton.testing.do_bench``'s median (CUDA events, L2 flushed between calls, no host sync in the figure),
        the right clock for kernels of a few microseconds.
        """
        fn()  # warm once before measuring memory, so one-time compilation buffers do not count
        sync()
        extra = self.benchmark.extra_info
        extra.update(
            device=DEVICE.type,
            device_name=device_name(),
            dtype=str(DTYPE).removeprefix("torch."),
            commit=commit(),
            torch=torch.__version__,
            **info,
        )
        extra.update(peak_memory(fn))

        def timed():
            fn()
            sync()

        self.benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(self.benchmark.stats, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        median = stats.median
        if cuda_events and HAS_CUDA:
            import triton.testing

            median = triton.testing.do_bench(fn, return_mode="median") / 1e3
            extra["cuda_event_median_s"] = median
        if "lora_bytes" in info:
            extra["gbps"] = info["lora_bytes"] / median / 1e9
        if "tokens" in info:
            extra["tokens_per_s"] = info["tokens"] / stats.median


@pytest.fixture
def bench(benchmark):
    return Bench(benchmark)
