"""Where a result came from: the machine and the commit, written into run.json, benchmark rows and reports.

One implementation for the compile report, the training app and the benchmarks (``dylora_moe.provenance``
re-exports it). Standard library only (torch is imported when the machine is asked for), so a bare checkout can
use it.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout (kernels/ is at its root; dylora_moe/kernels links here)
COMMIT_ENV = "DYLORA_MOE_COMMIT"  # a copy without .git (a lent GPU machine gets the working tree only) names it here


def machine() -> str:
    """The GPU's name and how many are visible, else the CPU's core count and type."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def commit(*paths: str) -> str:
    """Short hash of HEAD, with ``+dirty`` when tracked files (under ``paths``, when given) differ from it;
    ``$DYLORA_MOE_COMMIT`` when set; ``unknown`` outside a git checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "--", *paths]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"
