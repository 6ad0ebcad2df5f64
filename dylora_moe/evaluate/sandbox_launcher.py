"""The launcher (see :mod:`dylora_moe.evaluate.execution`): this file's text runs as ``python -I -S -c <text>
<json>``, a fresh single-threaded interpreter started by the evaluation, which puts one program where the kernel
confines it, starts it, enforces its wall-clock timeout and prints one status line: ``exit N``, ``signal N``,
``timeout`` or ``error: <why>`` (the program's own verdict travels on the result pipe).

Levels (``level`` in the JSON), strongest first:

- ``namespaces``: new mount, network, PID, IPC and UTS namespaces (``unshare(2)`` through libc), and, when the
  launcher is not root, a user namespace too. Process 1 of the PID namespace (a fork of this launcher) makes every
  mount private, covers /tmp, /var/tmp, /dev/shm, /dev/pts, /run, /home, /root and the caller's home with empty
  tmpfs (binding back only the interpreter's folders and the program's folder), makes the whole tree read-only,
  the program's folder alone writable, and mounts a fresh read-only /proc; then it forks the program (process 2).
  As root the program runs as its own dedicated uid/gid; otherwise as the caller's uid inside the user namespace,
  without capabilities. When process 1 ends, the kernel kills everything left in the namespace.
- ``uid``: root without namespaces: the program runs as its own dedicated uid/gid; when it ends, every process of
  that uid is killed.
- ``none``: no isolation at all (the audit hook alone; only when the user asked for it). What the program started
  is killed at the end all the same: its process group, then every process the launcher, their subreaper, inherits.

At every level the program runs in its own session with no new privileges (``PR_SET_NO_NEW_PRIVS``), dies with its
parent (``PR_SET_PDEATHSIG``), has the resource limits it was given (only ever lowered), stdin/stdout/stderr on
/dev/null and the environment it was given (nothing inherited).

Standard library only (ctypes for unshare, mount, mount_setattr and prctl): the launcher must not depend on the
parent's packages.
"""

import ctypes
import json
import os
import resource
import select
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 36, 38
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # mount_setattr: 442 on every architecture
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def check(result: int, what: str) -> None:
    if result != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def prctl(option: int, value: int) -> None:
    """prctl(2) on Linux; elsewhere (level "none" only: the probe finds no other) there is none, and nothing to do."""
    if sys.platform == "linux":
        check(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option})")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    encode = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    check(
        libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
        f"mount {target}",
    )


def mount_setattr(path: str, flags: int, attr_set: int = 0, attr_clr: int = 0) -> None:
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    result = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), os.fsencode(path), ctypes.c_uint(flags),
        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
    )  # fmt: skip
    check(result, f"mount_setattr {path}")


def write_file(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_namespaces(c: dict) -> None:
    """unshare(2) the launcher into new namespaces; without root also a user namespace mapping only its own ids."""
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    uid, gid = os.getuid(), os.getgid()
    if c["userns"]:
        flags |= CLONE_NEWUSER
    check(libc.unshare(ctypes.c_int(flags)), "unshare")
    if c["userns"]:
        write_file("/proc/self/setgroups", "deny")
        write_file("/proc/self/uid_map", f"{uid} {uid} 1")
        write_file("/proc/self/gid_map", f"{gid} {gid} 1")


def cover(hidden: list, keep: list) -> None:
    """Put an empty tmpfs over each folder of ``hidden``, then bind back the paths of ``keep`` below it (opened
    before it is covered, bound through /proc/self/fd)."""
    for folder in hidden:
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        below = sorted(k for k in keep if k.startswith(folder.rstrip("/") + "/") and os.path.exists(k))
        outermost = [k for k in below if not any(k.startswith(o + "/") for o in below if o != k)]
        fds = [(k, os.open(k, os.O_PATH | os.O_CLOEXEC)) for k in outermost]
        mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        for path, fd in fds:
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(path, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)


def build_file_system(c: dict) -> None:
    """In the new mount namespace: everything private and read-only, the program's folder writable, /proc fresh."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    workdir = c["workdir"]
    cover(c["hidden"], c["keep"] + [workdir])
    mount(workdir, workdir, None, MS_BIND)
    mount_setattr("/", AT_RECURSIVE, attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    mount_setattr(workdir, 0, attr_clr=MOUNT_ATTR_RDONLY)
    try:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
    except PermissionError:  # a /proc partly masked (containers) cannot be mounted afresh: hide it instead
        mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, "mode=0555,size=4k")


def exec_program(c: dict) -> None:
    """The program's process: its own session, dedicated ids, no new privileges, limits, then exec."""
    try:
        os.setsid()
        if c["uid"] is not None:
            os.setgroups([])
            os.setgid(c["gid"])
            os.setuid(c["uid"])
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        for name, soft, hard in c["rlimits"]:
            limit = getattr(resource, name)
            _, current = resource.getrlimit(limit)
            if current != resource.RLIM_INFINITY:  # only ever lower a limit: raising a hard one needs privileges
                soft, hard = min(soft, current), min(hard, current)
            resource.setrlimit(limit, (soft, hard))
        os.chdir(c["workdir"])
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.set_inheritable(c["result_fd"], True)
        argv = [c["executable"], "-I", "-c", c["child_source"], str(c["result_fd"]), "1" if c["audit"] else "0"]
        os.execve(c["executable"], argv, c["env"])
    except BaseException as err:  # noqa: BLE001 - the parent reads the exit code
        report(c, f"error: starting the program: {err}")
    os._exit(127)


def wait_exit(pid: int, deadline: float) -> bool:
    """Wait until ``pid`` exits (without reaping it) or ``deadline`` (time.monotonic) passes; True if it exited."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if pidfd is not None:
                if select.select([pidfd], [], [], max(left, 0))[0]:
                    return True
            elif os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            else:
                time.sleep(min(0.005, max(left, 0)))
            if time.monotonic() >= deadline:
                return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def describe(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"signal {-code}" if code < 0 else f"exit {code}"


def report(c: dict, line: str) -> None:
    os.write(c["status_fd"], (line + "\n").encode())


def kill_descendants() -> None:
    """Kill every child of the launcher until none is left: as the subreaper it inherits everything the program
    started, even in another session; an unreaped child keeps its pid, so killing by pid hits no one else."""
    for _ in range(1000):
        try:
            with open(f"/proc/self/task/{os.getpid()}/children", encoding="ascii") as f:
                children = [int(pid) for pid in f.read().split()]
        except OSError:  # no /proc: the group kill must do
            return
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)


def processes_of(uid: int) -> bool:
    """Whether any process (zombies included) has ``uid`` as its real uid."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status", encoding="utf-8") as status:
                    for line in status:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                return True
                            break
            except (OSError, ValueError):  # gone meanwhile
                pass
    return False


def kill_uid(uid: int) -> None:
    """Kill every process of ``uid``: a helper takes that uid and sends SIGKILL to all it may signal (kill(-1): the
    kernel checks the permission, so nothing else is hit), the launcher, their subreaper, reaps the orphans, until
    no process of the uid is left."""
    for _ in range(1000):
        helper = os.fork()
        if helper == 0:
            try:
                os.setuid(uid)
                os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        if not processes_of(uid):
            return
        time.sleep(0.001)


def be_init(c: dict, alive_fd: int) -> None:
    """Process 1 of the PID namespace: build the file system, fork the program, wait for it, report its status."""
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if select.select([alive_fd], [], [], 0)[0]:  # the launcher died before the line above
            os._exit(1)
        prctl(PR_SET_DUMPABLE, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as init, signals from inside the namespace are then dropped
        build_file_system(c)
        os.setsid()
        program = os.fork()
        if program == 0:
            exec_program(c)
        os.close(c["result_fd"])
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == program:
                break
        report(c, describe(status))
    except BaseException as err:  # noqa: BLE001 - reported to the launcher
        report(c, f"error: {err}")
    os._exit(0)


def main(c: dict) -> str:
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != c["parent_pid"]:  # the evaluation died before the line above
        return "error: the evaluation ended"
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # what the program leaves behind outside a PID namespace becomes ours
    status_read, c["status_fd"] = os.pipe()
    alive_read, alive_write = os.pipe()
    if c["level"] == "namespaces":
        enter_namespaces(c)  # before the next line: a process that is not dumpable cannot write its uid_map
    prctl(PR_SET_DUMPABLE, 0)
    deadline = time.monotonic() + c["timeout_s"]
    pid = os.fork()
    if pid == 0:
        os.close(status_read)
        os.close(alive_write)
        if c["level"] == "namespaces":
            be_init(c, alive_read)
        exec_program(c)
    os.close(c["status_fd"])
    os.close(c["result_fd"])
    exited = wait_exit(pid, deadline)
    if c["level"] == "none":
        try:
            os.killpg(pid, signal.SIGKILL)  # the program's own session: everything it started (not yet reaped)
        except (ProcessLookupError, PermissionError):
            pass
    if not exited:
        os.kill(pid, signal.SIGKILL)  # in a PID namespace: process 1; the kernel then kills everything in it
    _, status = os.waitpid(pid, 0)
    if c["level"] == "uid":
        kill_uid(c["uid"])
    elif c["level"] == "none":
        kill_descendants()
    reported = os.read(status_read, 4096).decode(errors="replace").split("\n")[0]
    if not exited:
        return "timeout"
    if c["level"] == "namespaces":
        return reported or f"error: the namespace's process 1 ended without a status ({describe(status)})"
    return reported or describe(status)


if __name__ == "__main__":
    try:
        line = main(json.loads(sys.argv[1]))
    except BaseException as err:  # noqa: BLE001 - reported to the evaluation
        line = f"error: {err}"
    os.write(1, line.encode())
    os._exit(0)
