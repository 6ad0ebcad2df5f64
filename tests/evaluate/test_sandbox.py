"""The sandbox: every bad program ends in a defined verdict, writes nothing outside its directory, leaves no process
behind, and the evaluation goes on. Timeouts are short (1.5 s) so the file costs seconds. These run at the strongest
isolation this machine allows (or none); the walls one by one: test_sandbox_escapes.py and test_sandbox_kernel.py."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dylora_moe.evaluate.execution import Limits, run_program, run_programs

FAST = Limits(timeout_s=1.5, unsafe_no_isolation=True)
NO_AUDIT = Limits(timeout_s=1.5, audit=False, unsafe_no_isolation=True)
# No isolation and no hook: the launcher's group kill alone (the program writes its child's pid outside)
BARE = Limits(timeout_s=1.5, audit=False, isolation="none", max_processes=100_000)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def wait_dead(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds  # the killed child is reparented and reaped asynchronously
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def test_pass_fail_and_syntax_error():
    assert run_program("def f():\n    return 2\nassert f() == 2", FAST).result == "passed"
    failed = run_program("assert 1 == 2, 'one is not two'", FAST)
    assert (failed.passed, failed.result) == (False, "failed: AssertionError: one is not two")
    assert run_program("def f(:\n", FAST).result.startswith("failed: SyntaxError")


def test_infinite_loop_times_out():
    assert run_program("while True:\n    pass", FAST).result == "timed out"


@pytest.mark.parametrize("ending", ["exit()", "quit()", "import sys; sys.exit(0)", "raise SystemExit", "exit(1)"])
def test_exit_before_the_tests_fails(ending):
    outcome = run_program(f"{ending}\nassert True", FAST)
    assert not outcome.passed and "called exit" in outcome.result


def test_hard_exit_with_code_0_fails():
    # os._exit skips the verdict: exit code 0 alone never counts as passing
    outcome = run_program("import os\nos._exit(0)\nassert True", FAST)
    assert not outcome.passed and "exit code 0" in outcome.result


def test_fork_bomb_is_refused():
    outcome = run_program("import os\nwhile True:\n    os.fork()", FAST)
    assert outcome.result == "failed: PermissionError: sandbox: os.fork is not allowed"


@pytest.mark.parametrize(
    "spawn",
    [
        "import subprocess\nsubprocess.Popen(['sleep', '30'])",
        "import os\nos.system('sleep 30 &')",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '30'], {})",
        "import os\nos.execv('/bin/true', ['true'])",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
    ],
)
def test_process_spawning_is_refused(spawn):
    outcome = run_program(spawn, FAST)
    assert not outcome.passed and "PermissionError: sandbox" in outcome.result


def test_memory_hog_fails():
    assert run_program("x = bytearray(8 << 30)", FAST).result == "failed: MemoryError: "
    grow = "x = []\nwhile True:\n    x.append(bytearray(1 << 20))"
    assert run_program(grow, Limits(timeout_s=5, memory_mb=256)).result == "failed: MemoryError: "


def test_writes_outside_are_refused(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = tmp_path / "new.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"open({str(victim)!r}, 'a').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, 'here.txt')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.mkdir({str(tmp_path / 'dir')!r})",
        f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/new.txt', 'w').write('x')",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
    ]
    for program in attempts:
        outcome = run_program(program, FAST)
        assert not outcome.passed, program
        outcome = run_program(program, Limits(timeout_s=1.5, isolation="none"))  # the hook alone says why
        assert not outcome.passed and "sandbox" in outcome.result, program
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]
    assert victim.read_text() == "keep"


def test_writes_inside_work_and_the_directory_is_fresh_and_removed():
    program = (
        "import os, shutil, tempfile\n"
        "assert sorted(os.listdir('.')) == ['program.py']\n"
        "os.makedirs('a/b')\nopen('a/b/f.txt', 'w').write('x')\nos.rename('a/b/f.txt', 'g.txt')\n"
        "shutil.rmtree('a')\nos.remove('g.txt')\nos.chmod('.', 0o500)\n"
        "raise RuntimeError(os.getcwd())"
    )
    outcome = run_program(program, FAST)
    assert outcome.result.startswith("failed: RuntimeError: ")
    workdir = outcome.result.removeprefix("failed: RuntimeError: ")
    assert os.path.basename(workdir).startswith("dylora-eval-") and not os.path.exists(workdir)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    program = "import os\nassert sorted(os.environ) == ['HOME', 'LANG', 'LC_ALL', 'PATH', 'TMPDIR'], sorted(os.environ)"
    assert run_program(program, FAST).result == "passed"


def test_file_size_limit():
    outcome = run_program("open('big', 'w').write('x' * (20 << 20))", Limits(timeout_s=5))
    assert outcome.result == "failed: OSError: [Errno 27] File too large"


@pytest.mark.parametrize(
    "program",
    [
        "import socket\nsocket.socket()",
        "import socket\nsocket.create_connection(('127.0.0.1', 80))",
        "import ctypes",
        "import os\nos.kill(os.getppid(), 9)",
        "import gc\ngc.get_objects()",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (100, 100))",
    ],
)
def test_sockets_signals_native_code_and_limits_are_refused(program):
    outcome = run_program(program, FAST)
    assert not outcome.passed and "PermissionError: sandbox" in outcome.result


@pytest.mark.parametrize("stream", ["print('y' * 10000)", "import sys\nsys.stderr.write('y' * 10000)"])
def test_output_flood(stream):
    # an endless flood is a timeout; a large finite one passes (the output is discarded, never buffered)
    assert run_program(f"while True:\n    {stream}", FAST).result == "timed out"
    assert run_program(f"for _ in range(5000):\n    {stream}", Limits(timeout_s=10)).result == "passed"


def test_child_left_running_is_killed_with_the_group(tmp_path):
    # without the audit hook a program can start a child; the group kill at the end still ends it
    pid_file = tmp_path / "pid"
    program = (
        f"import subprocess\np = subprocess.Popen(['sleep', '60'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    assert run_program(program, BARE).result == "passed"
    assert wait_dead(int(pid_file.read_text()))


def test_child_of_a_timed_out_program_is_killed(tmp_path):
    pid_file = tmp_path / "pid"
    program = (
        f"import subprocess\np = subprocess.Popen(['sleep', '60'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "while True:\n    pass"
    )
    assert run_program(program, BARE).result == "timed out"
    assert wait_dead(int(pid_file.read_text()))


def test_killed_by_a_signal_is_a_failure():
    outcome = run_program(f"import os\nos.kill(os.getpid(), {int(signal.SIGKILL)})", NO_AUDIT)
    assert outcome.result.startswith("failed: killed")


def test_parallel_workers_keep_the_order_and_go_on_after_bad_programs():
    programs = ["assert True", "while True: pass", "assert False", "import os\nos.fork()", "exit()", "x = 1"] * 2
    outcomes = run_programs(programs, FAST, workers=4)
    assert [o.passed for o in outcomes] == [True, False, False, False, False, True] * 2
    assert outcomes[1].result == "timed out"


@pytest.mark.parametrize(
    "kwargs, match",
    [({"timeout_s": 0}, "timeout_s"), ({"memory_mb": 10}, "memory_mb"), ({"file_size_mb": 0}, "file_size_mb")],
)
def test_bad_limits_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Limits(**kwargs)


def test_limits_are_only_ever_lowered():
    # under a hard file-size limit of 1 MiB (set in a fresh interpreter: hard limits cannot be raised back), a request
    # for 16 MiB keeps 1 MiB: the child never tries to raise a hard limit (which fails without privileges)
    script = (
        "import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from dylora_moe.evaluate.execution import Limits, run_program\n"
        "print(run_program(\"open('f', 'w').write('x' * (2 << 20))\", Limits(file_size_mb=16)).result)"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo, timeout=60)
    assert done.stdout.strip() == "failed: OSError: [Errno 27] File too large", done.stderr


def test_a_grandchild_in_its_own_session_is_killed_too(tmp_path):
    # it leaves the process group; the launcher, as its subreaper, still ends it
    pid_file = tmp_path / "pid"
    program = (
        "import os, subprocess\n"
        f"p = subprocess.Popen(['sleep', '60'], start_new_session=True)\nopen({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    assert run_program(program, BARE).result == "passed"
    assert wait_dead(int(pid_file.read_text()))
