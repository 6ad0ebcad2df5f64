"""The benchmark scripts' tables print without the profiler's and c10's chatter (benchmarks/quiet.py)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILE = (
    "import torch\n"
    "x = torch.randn(64, 64)\n"
    "with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True):\n"
    "    x @ x\n"
)


def _stderr(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_profiled_steps_print_no_usdt_lines():
    assert "USDT:" in _stderr(PROFILE)  # the noise is there without the filter (the test can fail)
    assert "USDT:" not in _stderr("import benchmarks.quiet\n" + PROFILE)
