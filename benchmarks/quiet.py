"""Library noise off for the benchmark and report scripts, so their tables print alone: import before torch.

Set only where unset (a user's own setting wins), and only in these scripts' processes:

- ``KINETO_LOG_LEVEL=6``: the profiler (CPU peak memory, benchmarks/conftest.py) prints ``USDT: ... profiler_start``
  and ``profiler_stop`` at every measurement; its USDT level is the highest it has, so 6 is the one that drops them.
- ``TORCH_CPP_LOG_LEVEL=ERROR``: c10's "Memory block of unknown size was allocated before the profiling started"
  (CPUAllocator), said for every profiled step.
- ``TRITON_DEFAULT_FP_FUSION=1``: Triton 3.9 warns, once per import path, that the variable is unset and FP fusion
  stays on; 1 is that same default, said explicitly (no number changes).
"""

import os

for name, value in (("KINETO_LOG_LEVEL", "6"), ("TORCH_CPP_LOG_LEVEL", "ERROR"), ("TRITON_DEFAULT_FP_FUSION", "1")):
    os.environ.setdefault(name, value)
