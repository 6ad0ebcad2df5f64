"""What the kernel isolation of one program needs from the evaluation's side: the levels and what each means, the
folders the program's interpreter must still see, the folders to cover, and a dedicated uid per program.

The launcher (:mod:`dylora_moe.evaluate.sandbox_launcher`) applies them; :mod:`dylora_moe.evaluate.execution` finds
the strongest level the machine allows by trying each once.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import pwd
import stat
import subprocess
import sys

# strongest first; "auto" picks the first one that works here
LEVELS = ("namespaces", "uid", "none")
CHOICES = ("auto", *LEVELS)
MEANING = {
    "namespaces": "own {who}, no network (own network namespace), read-only file system but its own folder "
    "(own mount namespace, /tmp, /home, /root, /run covered), own PID and IPC namespaces",
    "uid": "own uid/gid only: no namespaces, so the network and world-writable folders such as /tmp stay reachable",
    "none": "no kernel isolation: the audit hook alone (--unsafe_no_isolation)",
}
# The opt-in without a flag, for machines (CI) where no isolation is possible: as explicit as the flag.
UNSAFE_ENV = "DYLORA_UNSAFE_NO_ISOLATION"
# Folders covered by an empty tmpfs in the mount namespace (the interpreter's and the program's folders bound back).
COVERED = ("/tmp", "/var/tmp", "/dev/shm", "/dev/pts", "/run", "/home", "/root")
# Dedicated ids: one per program, from a range no account uses; the low bits count programs, the rest is the pid,
# so concurrent programs (of this process, and of other evaluations) do not share a uid or its RLIMIT_NPROC.
UID_BASE, UID_SLOTS = 0x40000000, 1024
_programs = itertools.count()


class SandboxUnavailableError(RuntimeError):
    """The isolation asked for is not available on this machine (the message says why, in one line)."""


def is_root() -> bool:
    return os.geteuid() == 0


def candidates() -> tuple[str, ...]:
    """The levels worth trying here, strongest first (a dedicated uid needs root)."""
    return ("namespaces", "uid") if is_root() else ("namespaces",)


def meaning(level: str) -> str:
    who = "uid/gid" if is_root() else "user namespace (no capabilities)"
    return f"{level}: " + MEANING[level].format(who=who)


def dedicated_uid() -> int:
    """A uid (= gid) for one program: unused by any account, distinct for concurrently running programs."""
    return UID_BASE + (os.getpid() % (1 << 18)) * UID_SLOTS + next(_programs) % UID_SLOTS


@functools.cache
def interpreter_paths() -> tuple[str, ...]:
    """Everything the program's interpreter (``sys.executable -I``) reads: its prefixes, its sys.path, and the
    folders of the executable and of what its links point to."""
    script = "import sys, json; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, *sys.path]))"
    found = json.loads(subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, check=True).stdout)
    found += [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))]
    return tuple(sorted({os.path.realpath(p) for p in found if p and os.path.exists(p)}))


def untraversable_ancestors(path: str) -> list[str]:
    """Folders above ``path`` that other users cannot enter (a dedicated uid could not reach ``path``)."""
    out = []
    parent = os.path.dirname(path)
    while parent not in ("/", ""):
        try:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                out.append(parent)
        except OSError:
            pass
        parent = os.path.dirname(parent)
    return out


def covered_folders(keep: tuple[str, ...]) -> list[str]:
    """The folders to cover: the fixed list, the caller's home, and any folder above a kept path that others cannot
    enter; never a kept path or a folder inside one, never a folder inside another covered one."""
    folders = {os.path.realpath(f) for f in COVERED}
    try:
        folders.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
    except KeyError:
        pass
    for path in keep:
        folders.update(untraversable_ancestors(path))
    folders = {f for f in folders if f != "/" and not any(f == k or f.startswith(k + "/") for k in keep)}
    return sorted(f for f in folders if not any(f.startswith(o + "/") for o in folders))
