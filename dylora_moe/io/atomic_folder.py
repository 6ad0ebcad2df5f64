"""Publish a folder (or a file) atomically: write it under a hidden staging name beside its destination, then rename
it there. The one way this project publishes what a reader may open: checkpoints, the Trainer's checkpoint-N and
final/ folders, the tiny base model, a run's small files.

A reader of the destination sees the old folder or the new one, never a half-written one. Replacing a folder uses
Linux's ``renameat2(RENAME_EXCHANGE)`` (old and new swap in one step; there is no moment with neither); where the
OS or file system lacks it, two renames (a moment with no folder at the destination, never a half one; a failed
second rename is undone).

Staging folders are named ``.<destination name>.tmp-<pid>-<random>``, are created with the user's umask (not
``mkdtemp``'s private 0700), and are removed on any error. A process killed mid-save leaves its staging folder
behind: :func:`remove_stale_staging` removes those of dead processes (and first puts back a complete folder that a
kill between the two renames left aside). The Trainer writes a checkpoint-N folder inside a staging root named
``.staging-checkpoint-N`` (its code names the folder itself); :func:`is_staging_name` knows both names.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
STAGING_ROOT_PREFIX = ".staging-"
_STAGED = re.compile(r"^\..+\.tmp-.+$")


def staging_root(destination: Path) -> Path:
    """A staging folder to hold a folder named like ``destination`` (for writers that choose the inner name)."""
    return destination.parent / f"{STAGING_ROOT_PREFIX}{destination.name}"


def is_staging_name(name: str) -> bool:
    """Whether ``name`` is one of this module's staging names (what a save cut short leaves behind)."""
    return name.startswith(STAGING_ROOT_PREFIX) or bool(_STAGED.match(name))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file ``path`` by ``text`` in one rename (a reader sees the old text or the new)."""
    tmp = _sibling(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_prefix(destination: Path) -> str:
    return f".{destination.name}.tmp-"


def _sibling(destination: Path) -> Path:
    """A fresh staging name beside ``destination``."""
    return destination.parent / f"{staging_prefix(destination)}{os.getpid()}-{secrets.token_hex(4)}"


def new_staging(destination: Path) -> Path:
    """A new empty folder beside ``destination`` (permissions from the umask)."""
    while True:
        path = _sibling(destination)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's data to disk (so a rename published after it never exposes missing data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync a folder; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2, or None (another C library, another OS)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the OS or file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:
        return False


def _fill_in_place(staging: Path, destination: Path, last: str) -> None:
    """Move the entries of ``staging`` into the empty folder ``destination``, ``last`` at the end; on an error,
    move back what was moved (the destination is left empty again)."""
    moved = []
    try:
        for entry in sorted(staging.iterdir(), key=lambda p: p.name == last):
            os.rename(entry, destination / entry.name)
            moved.append(entry.name)
    except BaseException:
        for name in reversed(moved):
            os.rename(destination / name, staging / name)
        raise
    staging.rmdir()


def _replace_by_two_renames(staging: Path, destination: Path) -> None:
    """Without an atomic exchange: old folder aside, new one in (the old one comes back if that fails)."""
    old = _sibling(destination)
    os.rename(destination, old)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(old, destination)
        raise
    shutil.rmtree(old)


def publish(staging: Path, destination: Path, *, replace: bool, last: str) -> None:
    """Make the complete folder ``staging`` visible as ``destination``.

    ``replace=False``: ``destination`` is absent or an empty folder (POSIX rename replaces an empty folder in one
    step; it fails, losing nothing, if something appeared there meanwhile). The process's own working folder is
    filled entry by entry instead, ``last`` (the entry readers look for first) at the end, so the folder a shell
    sits in stays the same folder. ``replace=True``: ``destination`` is an earlier folder of the caller's, swapped
    out and deleted."""
    fsync_path(staging)
    if not replace and _is_cwd(destination):
        _fill_in_place(staging, destination, last)
    elif not replace:
        os.rename(staging, destination)
    else:
        cwd_inside = _is_cwd(destination)
        if exchange(staging, destination):
            shutil.rmtree(staging)  # now holds the old folder
        else:
            _replace_by_two_renames(staging, destination)
        if cwd_inside:  # the old folder is gone: step into its replacement at the same path
            os.chdir(destination)
    fsync_path(destination.parent)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be saving; its own error path cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def stale_staging(destination: Path) -> list[Path]:
    """Staging folders of ``destination`` whose process is gone (newest first)."""
    prefix = staging_prefix(destination)
    found = []
    for name in os.listdir(destination.parent):
        path = destination.parent / name
        if not name.startswith(prefix) or path.is_symlink() or not path.is_dir():
            continue
        pid = name[len(prefix) :].split("-", 1)[0]  # names of earlier versions (mkdtemp) have no pid: stale
        if not (pid.isdigit() and _pid_alive(int(pid))):
            found.append(path)
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def remove_stale_staging(
    destination: Path, is_ours: Callable[[Path], bool], is_complete: Callable[[Path], bool]
) -> list[Path]:
    """Clean up after killed saves to ``destination``; returns the folders removed.

    Where ``destination`` is missing (a process killed between the two renames of the fallback replace), the newest
    stale folder that ``is_complete`` accepts is renamed back to ``destination`` first. Then the stale folders whose
    content ``is_ours`` accepts are removed; anything else is left alone."""
    stale = stale_staging(destination)
    if not os.path.lexists(destination):
        for path in stale:
            if is_complete(path):
                os.rename(path, destination)
                stale.remove(path)
                break
    removed = []
    for path in stale:
        if is_ours(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
