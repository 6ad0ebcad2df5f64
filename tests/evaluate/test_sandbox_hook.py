"""The audit hook alone (isolation "none"): every operation docs/sandbox.md says it refuses is refused, what ordinary
solutions use still works, and its state is out of the program's reach (no global or builtin name read, no closure
cell, frozen tables)."""

from __future__ import annotations

import dis
import re
from pathlib import Path

from dylora_moe.evaluate import execution
from dylora_moe.evaluate.execution import Limits, run_programs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "sandbox.md"
HOOK_ONLY = Limits(timeout_s=5, isolation="none")

# what is refused -> a program doing only that (run in the program's own folder)
REFUSED = {
    "subprocess": "import subprocess\nsubprocess.run(['true'])",
    "os.system": "import os\nos.system('true')",
    "os.exec*": "import os\nos.execv('/bin/true', ['true'])",
    "os.posix_spawn": "import os\nos.posix_spawn('/bin/true', ['true'], {})",
    "os.fork": "import os\nos.fork()",
    "os.forkpty and pty.spawn": "import pty\npty.fork()",
    "multiprocessing": "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    "import _posixsubprocess": "import _posixsubprocess",
    "os.kill": "import os\nos.kill(os.getpid(), 0)",
    "os.killpg": "import os\nos.killpg(os.getpgid(0), 0)",
    "signal.pthread_kill": "import signal, threading\nsignal.pthread_kill(threading.get_ident(), 0)",
    "os.pidfd_open": "import os\nos.pidfd_open(os.getpid())",
    "signal.pidfd_send_signal": "import signal\nsignal.pidfd_send_signal(0, 0)",
    "re-importing posix or _signal": "import sys\ndel sys.modules['posix']\nimport posix",
    "_imp.create_builtin": "import _imp\n_imp.create_builtin(None)",
    "sockets": "import socket\nsocket.socket()",
    "ctypes": "import ctypes",
    "sub-interpreters": "import _xxsubinterpreters",
    "sub-interpreter channels": "import _xxinterpchannels",
    "resource.setrlimit and resource.prlimit": "import resource\nresource.setrlimit(resource.RLIMIT_CORE, (0, 0))",
    "gc.get_objects, gc.get_referrers, gc.get_referents": "import gc\ngc.get_referents(gc)",
    "sys.settrace and threading.settrace": "import sys\nsys.settrace(None)",
    "sys.setprofile": "import sys\nsys.setprofile(None)",
    "sys._current_frames": "import sys\nsys._current_frames()",
    "making code objects (code.__new__, code.replace)": "(lambda: 0).__code__.replace(co_consts=(1,))",
    "fcntl.ioctl": "import fcntl\nfcntl.ioctl(0, 0)",
    "fcntl.flock and fcntl.lockf": "import fcntl\nfcntl.flock(open('program.py'), fcntl.LOCK_SH)",
    "os.setpriority": "import os\nos.setpriority(os.PRIO_PROCESS, 0, 1)",
    "os.sched_setscheduler, os.sched_setparam, os.sched_setaffinity": "import os\nos.sched_setaffinity(0, {0})",
    "sqlite3": "import sqlite3",
    "dbm": "import dbm.gnu",
    "POSIX shared memory and semaphores": "from multiprocessing import shared_memory",
    "readline, syslog, curses, tkinter": "import syslog",
    "CPython's test modules and cffi": "import _testcapi",
    "rewriting the hook's helpers (__code__, __defaults__)": (
        "import __main__\n__main__.resolve.__defaults__ = __main__.resolve.__defaults__"
    ),
    "open for writing outside the folder": "open('/tmp/dylora-hook-probe', 'w')",
    "opening a directory outside the folder": "import os\nos.open('/', os.O_RDONLY)",
    "reading another process's /proc entries": "open('/proc/1/environ', 'rb')",
    "remove, rmdir, mkdir, rename, link, symlink, mkfifo, mknod, truncate outside": "import os\nos.mkdir('/x')",
    "chmod, chown, utime, setxattr, removexattr outside (by path or descriptor)": "import os\nos.chmod('/', 0o755)",
    "shutil.rmtree outside": "import shutil\nshutil.rmtree('/usr/share')",
    "a symlink pointing outside": "import os\nos.symlink('/', 'root')",
}

ORDINARY = """
import ast, bisect, collections, dataclasses, decimal, enum, fractions, functools, heapq, itertools, json, logging
import math, os, pathlib, random, re, shutil, string, tempfile, threading, time, typing
P = collections.namedtuple("P", "x y", defaults=(0,))
@dataclasses.dataclass
class D:
    a: int = 1
class E(enum.Enum):
    A = 1
assert P(1).y == 0 and D().a == 1 and E.A.value == 1 and ast.parse("1 + 1")
assert string.Formatter().format("{0}", 5) == "5" and functools.lru_cache()(abs)(-2) == 2
logging.getLogger("x").warning("hello")
with tempfile.TemporaryDirectory() as folder:
    pathlib.Path(folder, "f.txt").write_text("x")
    os.rename(os.path.join(folder, "f.txt"), os.path.join(folder, "g.txt"))
    os.symlink("g.txt", os.path.join(folder, "link"))
    assert open(os.path.join(folder, "link")).read() == "x"
pathlib.Path("d").mkdir()
pathlib.Path("d/f").write_text("x")
pathlib.Path("d/f").unlink()
shutil.rmtree(pathlib.Path("d"))
t = threading.Thread(target=lambda: None)
t.start()
t.join()
assert sorted(open("/proc/self/status").read().split()[:1]) == ["Name:"]
assert open("/etc/hostname").read() is not None or True
"""


def test_every_refused_operation_is_refused_by_the_hook():
    outcomes = run_programs(list(REFUSED.values()), HOOK_ONLY, workers=2)
    not_refused = {name: o.result for name, o in zip(REFUSED, outcomes) if "sandbox" not in o.result}
    assert not_refused == {}


def test_ordinary_programs_still_run_under_the_hook():
    assert run_programs([ORDINARY], HOOK_ONLY)[0].result == "passed"


def child_namespace() -> dict:
    namespace = {"__name__": "sandbox_child"}
    exec(compile(execution.CHILD_SOURCE, "sandbox_child.py", "exec"), namespace)
    return namespace


def test_the_hook_reads_no_global_or_builtin_name_and_has_no_closure():
    # a program can rebind any global of the child's __main__ and any builtin, and rewrite any closure cell it
    # reaches: the hook and its helpers use nothing but their own (frozen) default arguments
    child = child_namespace()
    for function in (child["make_hook"]("/tmp/x"), child["resolve"], child["text"]):
        assert function.__closure__ is None, function.__name__
        names = [i.argval for i in dis.get_instructions(function) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")]
        assert names == [], (function.__name__, names)
        mutable = [d for d in function.__defaults__ if isinstance(d, (list, dict, set, bytearray))]
        assert mutable == [], function.__name__


def test_the_docs_list_exactly_what_the_hook_refuses():
    section = DOCS.read_text(encoding="utf-8").split("## Refused by the audit hook", 1)[1].split("\n## ", 1)[0]
    listed = [item.strip("`") for item in re.findall(r"^- (.+?)\.?$", section, flags=re.M)]
    assert listed == list(REFUSED)
