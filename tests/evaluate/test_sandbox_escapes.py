"""Escapes tried against the sandbox (issue 24), and the variants a careful attacker tries next. Each attack is a
program that passes only if it got through (it ends with the harmful step, or asserts what it stole), and that
otherwise leaves a mark outside (a file changed, a process killed, a connection made), which is checked too.

Every attack runs against each wall alone: the audit hook (isolation "none", hook on) and the kernel's (isolation
"namespaces", hook off). ``docs/sandbox.md`` lists exactly these attacks (the last test checks)."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from string import Template

import pytest

from dylora_moe.evaluate import execution
from dylora_moe.evaluate.execution import Limits, run_programs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sandbox.md"
SECRET = "dylora-secret-7f3a"
MTIME = 1_000_000
SHM = f"dylora-escape-{os.getpid()}"

# $V: the victim file (outside), $D: its folder, $P: a process outside (its environment holds $SECRET), $PORT: a
# TCP server on 127.0.0.1 outside.
ATTACKS = {
    "rewrite the hook's deny sets through __main__": """
import __main__
for name in ("DENIED", "DENIED_PREFIXES", "DENIED_IMPORTS", "PATH_EVENTS"):
    setattr(__main__, name, type(getattr(__main__, name, ()))())
import subprocess
subprocess.run(["sh", "-c", "echo x > $D/new.txt"], check=True)
""",
    "run code in a sub-interpreter": """
import _xxsubinterpreters as interpreters
interpreters.run_string(interpreters.create(), "import os; os.remove('$V')")
""",
    "patch builtins the hook calls": """
import builtins, os
builtins.isinstance = lambda *a: False
builtins.any = lambda *a: False
builtins.bool = lambda *a: False
open("$D/new.txt", "w").write("x")
os.remove("$V")
""",
    "rewrite the hook's helper code from a traceback frame": """
import os
def always(function, value):
    names = ", ".join(f"v{i}" for i in range(len(function.__code__.co_freevars)))
    namespace = {}
    use = f"({names},)\\n        " if names else ""
    exec(f"def outer({names}):\\n    def f(*a, **k):\\n        {use}return {value!r}\\n    return f\\n", namespace)
    function.__code__ = namespace["outer"](*function.__code__.co_freevars).__code__
try:
    os.remove("$V")
except PermissionError as err:
    tb = err.__traceback__
while tb is not None:
    for name, value in list(tb.tb_frame.f_locals.items()):
        if name in ("inside", "resolve"):
            always(value, True if name == "inside" else os.getcwd())
    tb = tb.tb_next
os.remove("$V")
""",
    "rewrite the hook's closure cells": """
import os
try:
    os.remove("$V")
except PermissionError as err:
    tb = err.__traceback__
while tb is not None:
    for value in list(tb.tb_frame.f_locals.values()):
        for cell in getattr(value, "__closure__", None) or ():
            if isinstance(cell.cell_contents, str) and len(cell.cell_contents) > 1:
                cell.cell_contents = ""
    tb = tb.tb_next
os.remove("$V")
""",
    "rewrite the hook's locals with a trace function": """
import sys
def tracer(frame, event, arg):
    if event == "call" and frame.f_code.co_name in ("hook", "inside"):
        frame.f_locals.update(root="", prefix="/")
    return None
sys.settrace(tracer)
open("$V", "w").write("x")
""",
    "rename with the source's dir_fd outside": """
import os
fd = os.open("$D", os.O_RDONLY)
os.rename("victim.txt", "stolen.txt", src_dir_fd=fd)
""",
    "hard link with the source's dir_fd outside, then write": """
import os
fd = os.open("$D", os.O_RDONLY)
os.link("victim.txt", "mine.txt", src_dir_fd=fd)
open("mine.txt", "w").write("overwritten")
""",
    "open for writing through a dir_fd outside": """
import os
fd = os.open("$D", os.O_RDONLY)
os.write(os.open("new.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd), b"x")
""",
    "chmod through a descriptor": """
import os
os.chmod(os.open("$V", os.O_RDONLY), 0o777)
""",
    "fchmod": """
import os
os.fchmod(os.open("$V", os.O_RDONLY), 0o777)
""",
    "utime through a descriptor": """
import os
os.utime(os.open("$V", os.O_RDONLY), (0, 0))
""",
    "fchown": """
import os
os.fchown(os.open("$V", os.O_RDONLY), 4242, 4242)
""",
    "setxattr on a path outside": """
import os
os.setxattr("$V", "user.mark", b"1")
""",
    "setxattr through a descriptor": """
import os
os.setxattr(os.open("$V", os.O_RDONLY), "user.mark", b"1")
""",
    "write through a symlink pointing outside": """
import os
os.symlink("$D", "link")
open("link/new.txt", "w").write("x")
""",
    "write outside with a str subclass path": """
class Inside(str):
    def startswith(self, *a):
        return True
    def __eq__(self, other):
        return True
    __hash__ = str.__hash__
open(Inside("$D/new.txt"), "w").write("x")
""",
    "write outside through a hard link made inside": """
import os
os.link("$V", "mine.txt")
open("mine.txt", "w").write("overwritten")
""",
    "write outside": """
open("$V", "w").write("x")
""",
    "kill a process outside with pidfd_send_signal": """
import os, signal
signal.pidfd_send_signal(os.pidfd_open($P), signal.SIGKILL)
""",
    "kill the parent with pidfd_send_signal": """
import os, signal, time
parent = os.getppid()
signal.pidfd_send_signal(os.pidfd_open(parent), signal.SIGKILL)
time.sleep(0.5)
assert os.getppid() != parent
""",
    "bring pidfd back with a fresh built-in module": """
import _imp, signal
spec = lambda name: type("Spec", (), {"name": name})()
posix, _signal = _imp.create_builtin(spec("posix")), _imp.create_builtin(spec("_signal"))
_signal.pidfd_send_signal(posix.pidfd_open($P), signal.SIGKILL)
""",
    "kill a process outside": """
import os
os.kill($P, 9)
""",
    "kill a process group outside": """
import os
os.killpg($P, 9)
""",
    "read the environment of a process outside": """
data = open("/proc/$P/environ", "rb").read()
assert b"$SECRET" in data
""",
    "read the parent's environment": """
import os
data = open(f"/proc/{os.getppid()}/environ", "rb").read()
assert b"HOME=" in data
""",
    "connect to a server outside": """
import socket
socket.create_connection(("127.0.0.1", $PORT), timeout=2).sendall(b"x")
""",
    "write outside through sqlite3's ATTACH": """
import sqlite3
sqlite3.connect(":memory:").execute("ATTACH DATABASE '$D/new.db' AS x").execute("CREATE TABLE x.t(a)")
""",
    "create a file in /dev/shm with POSIX shared memory": """
from multiprocessing import shared_memory
shared_memory.SharedMemory(name="$SHM", create=True, size=16)
""",
    "lower the priority of a process outside": """
import os
os.setpriority(os.PRIO_PROCESS, $P, 19)
""",
    "raise a hard resource limit": """
import resource
resource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
""",
    "walk the object graph with gc to reach the hook, then write outside": """
import gc
gc.get_objects()
open("$V", "w").write("x")
""",
    "kill a process outside through ctypes": """
import ctypes
assert ctypes.CDLL(None).kill($P, 9) == 0
""",
}


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A process outside (with the secret in its environment) and a TCP server that counts connections."""
    sleeper = subprocess.Popen(["sleep", "600"], env={"DYLORA_SECRET": SECRET}, start_new_session=True)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    connections = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connections.append(server.accept())
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    priority = os.getpriority(os.PRIO_PROCESS, sleeper.pid)  # the caller's (a `nice` run starts above 0)
    yield {"P": sleeper.pid, "PORT": server.getsockname()[1], "connections": connections, "sleeper": sleeper,
           "priority": priority}  # fmt: skip
    stop.set()
    thread.join()
    server.close()
    sleeper.kill()
    sleeper.wait()


def make_victim(folder: Path) -> Path:
    folder.mkdir(parents=True)
    victim = folder / "victim.txt"
    victim.write_text("keep")
    victim.chmod(0o644)
    os.utime(victim, (MTIME, MTIME))
    return victim


def damage(folder: Path) -> str:
    """What changed in a victim's folder ('' if nothing)."""
    names = sorted(p.name for p in folder.iterdir())
    if names != ["victim.txt"]:
        return f"folder now holds {names}"
    victim = folder / "victim.txt"
    info = victim.stat()
    if victim.read_text() != "keep" or stat.S_IMODE(info.st_mode) != 0o644 or info.st_mtime != MTIME:
        return "victim changed"
    if info.st_uid != os.getuid() or os.listxattr(victim):
        return "victim's owner or attributes changed"
    return ""


def run_attacks(tmp_path, outside, limits: Limits) -> dict[str, str]:
    """Every attack under ``limits``: {name: how it got through} for those that did."""
    programs, folders = [], []
    for i, template in enumerate(ATTACKS.values()):
        folder = tmp_path / f"attack{i}"
        victim = make_victim(folder)
        values = {"V": victim, "D": folder, "P": outside["P"], "PORT": outside["PORT"], "SECRET": SECRET}
        values["SHM"] = SHM
        programs.append(Template(template).substitute(values))
        folders.append(folder)
    outcomes = run_programs(programs, limits, workers=2)
    through = {}
    for name, outcome, folder in zip(ATTACKS, outcomes, folders):
        if outcome.passed:
            through[name] = "the program passed"
        elif damage(folder):
            through[name] = damage(folder) + f" ({outcome.result})"
    if outside["sleeper"].poll() is not None:
        through["(the process outside)"] = "killed"
    elif os.getpriority(os.PRIO_PROCESS, outside["P"]) != outside["priority"]:
        through["(the process outside)"] = "its priority changed"
    if Path("/dev/shm", SHM).exists():
        Path("/dev/shm", SHM).unlink()
        through["(/dev/shm)"] = "a file was created"
    if outside["connections"]:
        through["(the server outside)"] = f"{len(outside['connections'])} connections"
    return through


def test_no_attack_gets_past_the_audit_hook_alone(tmp_path, outside):
    assert run_attacks(tmp_path, outside, Limits(timeout_s=5, isolation="none")) == {}


def namespaces_available() -> bool:
    try:
        return execution.isolation_level(Limits(isolation="namespaces")) == "namespaces"
    except execution.SandboxUnavailableError:
        return False


needs_namespaces = pytest.mark.skipif(
    sys.platform != "linux" or not namespaces_available(), reason="namespaces are not allowed on this machine"
)


@needs_namespaces
def test_no_attack_gets_past_the_kernel_alone(tmp_path, outside):
    assert run_attacks(tmp_path, outside, Limits(timeout_s=5, isolation="namespaces", audit=False)) == {}


def test_the_docs_list_exactly_these_attacks():
    section = DOCS.read_text(encoding="utf-8").split("## Attacks that are tested", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^- (.+?)\.?$", section, flags=re.M)
    assert listed == list(ATTACKS)
