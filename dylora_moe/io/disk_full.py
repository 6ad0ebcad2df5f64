"""Telling a full disk from other write failures, whichever library reported it.

Python's own writes raise ``OSError`` with errno ENOSPC, but ``torch.save`` reports a failed write as
``RuntimeError: [enforce fail at inline_container.cc:...] . unexpected pos ...`` (the iostream text, if any, only in
its ``__context__``), and safetensors as ``SafetensorError: ... No space left on device (os error 28)`` without an
errno. Standard library only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

LOW_SPACE = 64 * 2**20  # below this much free space, torch's bare "write failed" is taken for a full disk
_NO_SPACE_TEXTS = ("no space left on device", "os error 28")
_TORCH_WRITE_FAILED = ("unexpected pos", "iostream error")


def _chain(err: BaseException | None) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling."""
    found = []
    while err is not None and not any(err is e for e in found):
        found.append(err)
        err = err.__cause__ or err.__context__
    return found


def free_bytes(path: str | Path) -> int | None:
    """Free space on the file system of ``path`` (or of its nearest existing parent); None when unknown."""
    path = Path(path)
    try:
        return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None


def is_disk_full(err: BaseException, where: str | Path) -> bool:
    """Whether ``err`` (or what it was raised from) is a write that failed for want of space on ``where``'s disk."""
    chain = _chain(err)
    for e in chain:
        if getattr(e, "errno", None) == errno.ENOSPC or any(t in str(e).lower() for t in _NO_SPACE_TEXTS):
            return True
    if any(isinstance(e, RuntimeError) and any(t in str(e) for t in _TORCH_WRITE_FAILED) for e in chain):
        free = free_bytes(where)
        return free is not None and free < LOW_SPACE
    return False


def failed_path(err: BaseException) -> str | None:
    """The file named by the OSError in ``err``'s chain, if any."""
    return next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None)


def as_disk_full(err: BaseException, where: str | Path) -> OSError | None:
    """``err`` as ``OSError(ENOSPC)`` naming where it failed, when it was a full disk in other words; None when it was
    not, or already says so. Call it before removing what the failed write left (that frees the space)."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return None
    if not is_disk_full(err, where):
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), failed_path(err) or str(where))
