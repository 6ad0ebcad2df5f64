"""Benchmark set-up: device and dtype, commit, peak memory, where rows go, and the ``bench`` fixture.

Run the suite with ``pytest benchmarks/ --benchmark-only`` (the normal test run passes ``--benchmark-skip``, so
nothing here is timed there). The device is CUDA when one is visible (bf16), else the CPU (fp32).

Every benchmark appends its rows (see benchmarks/records.py) to ONE CSV: ``benchmarks/out/all_benchmark_data.csv``
(untracked) by default, the committed ``benchmarks/data/all_benchmark_data.csv`` with ``--update-results`` (or
``BENCH_UPDATE_RESULTS=1``), or any file with ``--bench-csv PATH`` (or ``BENCH_CSV``). ``BENCH_RUN_ID`` names the
run (default: the session's start time), so separate pytest sessions of one suite run share it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import benchmarks.quiet  # noqa: F401  (before torch: no profiler lines between the measurements)

# isort: split
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from benchmarks.records import COMMITTED_CSV, LOCAL_CSV, append_rows, make_row  # noqa: E402
from dylora_moe.provenance import commit  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
RUN_ID = os.environ.get("BENCH_RUN_ID") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pytest_addoption(parser):
    group = parser.getgroup("dylora_moe benchmarks")
    group.addoption(
        "--update-results",
        action="store_true",
        default=os.environ.get("BENCH_UPDATE_RESULTS") == "1",
        help=f"append rows to the committed {COMMITTED_CSV.relative_to(REPO)} (default: {LOCAL_CSV.relative_to(REPO)})",
    )
    group.addoption("--bench-csv", default=os.environ.get("BENCH_CSV"), help="append rows to this CSV instead")


def csv_path(config) -> Path:
    if config.getoption("--bench-csv"):
        return Path(config.getoption("--bench-csv"))
    return COMMITTED_CSV if config.getoption("--update-results") else LOCAL_CSV


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
@functools.cache
def triton_version() -> str:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return ""


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


def peak_memory(fn) -> dict[str, float | None]:
    """Peak memory of one call of ``fn``, in MiB, by metric name (see benchmarks/records.py).

    CUDA: ``memory`` is ``torch.cuda.max_memory_allocated`` during the call (everything live: weights, optimizer
    state, activations), ``memory_extra`` the same minus what was allocated before the call.
    CPU: only ``memory_extra``, from the profiler's allocator events (process RSS would count the Python heap and
    never goes down, so it cannot tell one provider from another).
    """
    if HAS_CUDA:
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated()
        return {"memory": peak / MIB, "memory_extra": (peak - before) / MIB}
    extra = _cpu_peak_extra_bytes(fn)
    return {"memory_extra": None if extra is None else extra / MIB}


MEMORY_METHOD = "cuda max_memory_allocated" if HAS_CUDA else "torch profiler allocator events (CPU)"


def cudagraph_ms(fn) -> tuple[float | None, str]:
    """Median ms of ``fn`` replayed as a CUDA graph (``triton.testing.do_bench_cudagraph``): the GPU time without
    launch cost. A callable that cannot be captured (a host sync inside) gives None and the reason."""
    import triton.testing

    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median"), ""
    except Exception as error:  # capture fails with backend-specific errors; the reason goes into the row
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {error}"[:200]


class Bench:
    """Times one callable with pytest-benchmark and appends its rows to the run's CSV; one instance per test."""

    def __init__(self, benchmark, path: Path):
        self.benchmark = benchmark
        self.path = path

    def __call__(
        self,
        fn,
        *,
        op: str,
        provider: str,
        mode: str,
        x: tuple[str, object],
        shape: dict,
        rounds: int,
        warmup_rounds: int,
        kernel_clock: bool = False,
        cudagraph: bool = False,
        bytes_moved: int | None = None,
        tokens: int | None = None,
        saved_elems: int | None = None,
        info: dict | None = None,
    ) -> None:
        """Time ``fn`` (a GPU sync is appended) after ``warmup_rounds`` untimed calls that absorb JIT compilation
        and autotuning, and write one row per metric: ``time`` (host median, min, max over ``rounds``), the peak
        memory of one call, and where asked: ``kernel_time`` (GPU: ``triton.testing.do_bench`` median and 20/80%
        quantiles, the clock for kernels of a few microseconds), ``cudagraph_time`` (GPU), ``bandwidth`` (from
        ``bytes_moved`` at the kernel clock if measured, else the host one), ``throughput`` (``tokens`` per
        call), ``saved_elems``.
        """
        fn()  # warm once before measuring memory, so one-time compilation buffers do not count
        sync()
        memory = peak_memory(fn)

        def timed():
            fn()
            sync()

        self.benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(self.benchmark.stats, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured, nothing written
            return
        info = dict(info or {})
        measured = [("time", stats.median * 1e3, stats.min * 1e3, stats.max * 1e3)]
        clock = (stats.median, stats.max, stats.min)  # seconds: median, slowest, fastest
        if kernel_clock and HAS_CUDA:
            import triton.testing

            median, low, high = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
            measured.append(("kernel_time", median, low, high))
            clock = (median / 1e3, high / 1e3, low / 1e3)
        if cudagraph and HAS_CUDA:
            median, error = cudagraph_ms(fn)
            if median is not None:
                measured.append(("cudagraph_time", median, median, median))
            if error:
                info["cudagraph_error"] = error
        for name, value in memory.items():
            if value is not None:
                measured.append((name, value, value, value))
                info["memory_method"] = MEMORY_METHOD
        if bytes_moved is not None:
            info["bytes_moved"] = bytes_moved
            measured.append(("bandwidth", *(bytes_moved / seconds / 1e9 for seconds in clock)))
        if tokens is not None:
            info["tokens"] = tokens
            measured.append(("throughput", *(tokens / s for s in (stats.median, stats.max, stats.min))))
        if saved_elems is not None:
            measured.append(("saved_elems", saved_elems, saved_elems, saved_elems))
        common = dict(
            op=op,
            provider=provider,
            mode=mode,
            x_name=x[0],
            x_value=x[1],
            shape=shape,
            info=info,
            dtype=str(DTYPE).removeprefix("torch."),
            device=DEVICE.type,
            device_name=device_name(),
            commit=commit(),
            torch=torch.__version__,
            triton=triton_version(),
            run_id=RUN_ID,
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
        rows = [
            make_row(metric=metric, value=value, value_min=low, value_max=high, **common)
            for metric, value, low, high in measured
        ]
        self.benchmark.extra_info.update(common, **{f"{metric}_median": value for metric, value, _, _ in measured})
        append_rows(self.path, rows)


@pytest.fixture
def bench(benchmark, request):
    return Bench(benchmark, csv_path(request.config))
