"""The kernel's wall alone (audit hook off): what a program sees and may do at each isolation level, that nothing it
starts outlives it, that RLIMIT_NPROC counts the program's tasks alone, and that the level is chosen (or refused)
as documented. Run as root here, as CI does; the user-namespace level is tried by dropping to an unused uid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dylora_moe.evaluate import execution
from dylora_moe.evaluate.execution import Limits, SandboxUnavailableError, run_program

REPO = Path(__file__).resolve().parents[2]
KERNEL = Limits(timeout_s=10, isolation="namespaces", audit=False)


def available(level: str) -> bool:
    try:
        return execution.isolation_level(Limits(isolation=level)) == level
    except SandboxUnavailableError:
        return False


needs_namespaces = pytest.mark.skipif(not available("namespaces"), reason="namespaces are not allowed here")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to drop to another uid)")

CONFINED = """
import errno, os, socket, sys
assert os.getuid() != 0, "runs as root"
assert sorted(os.environ) == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"], sorted(os.environ)
for folder in ["/", "/etc", "/usr", "/var", sys.prefix, "/tmp", "/var/tmp", "/dev/shm", os.path.dirname(os.getcwd())]:
    try:
        open(os.path.join(folder, "dylora-escape-probe"), "w")
    except OSError as err:
        assert err.errno in (errno.EROFS, errno.EACCES, errno.ENOENT), (folder, err)
    else:
        raise AssertionError(f"wrote into {folder}")
# /tmp: the program's own folder, and the interpreter's folders bound back where it lives under /tmp (a venv there)
bound = {p.split("/")[2] for p in (sys.prefix, sys.base_prefix, *sys.path) if p.startswith("/tmp/")}
assert sorted(os.listdir("/tmp")) == sorted({os.path.basename(os.getcwd())} | bound), os.listdir("/tmp")
assert sorted(p for p in os.listdir("/proc") if p.isdigit()) == ["1", "2"], "sees processes outside"
assert [name for _, name in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
try:
    socket.create_connection(("127.0.0.1", $PORT), timeout=2)
except OSError as err:
    assert err.errno == errno.ENETUNREACH, err
else:
    raise AssertionError("connected outside")
try:
    os.kill($PID, 0)
except ProcessLookupError:
    pass
else:
    raise AssertionError("can signal the evaluation")
open("inside.txt", "w").write("its own folder is writable")
os.mkdir("sub")
"""


@needs_namespaces
def test_namespaces_confine_the_program():
    with socket.create_server(("127.0.0.1", 0)) as server:
        program = CONFINED.replace("$PORT", str(server.getsockname()[1])).replace("$PID", str(os.getpid()))
        assert run_program(program, KERNEL).result == "passed"
    assert not Path("/dylora-escape-probe").exists()


@needs_namespaces
def test_nothing_the_program_starts_outlives_it():
    # a grandchild in its own session, sleeping with a marker argument: the namespace dies with the program
    marker = f"{time.time() % 1000:.6f}"
    program = (
        "import os, subprocess\n"
        f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
        "if os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
    )
    assert run_program(program, KERNEL).result == "passed"
    assert (
        run_program(
            program + "while True:\n    pass\n", Limits(timeout_s=1.5, isolation="namespaces", audit=False)
        ).result
        == "timed out"
    )
    time.sleep(0.2)
    survivors = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
    assert survivors == []


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


THREADS = (
    "import threading\nstop = threading.Event()\nthreads = [threading.Thread(target=stop.wait) for _ in range({n})]\n"
    "try:\n    for t in threads:\n        t.start()\nfinally:\n    stop.set()\n"
)


@needs_namespaces
def test_the_process_limit_is_enforced_by_the_kernel():
    # root bypasses RLIMIT_NPROC; the program's own uid does not (4 GiB: each thread reserves address space)
    limits = Limits(timeout_s=10, isolation="namespaces", audit=False, max_processes=16, memory_mb=4096)
    assert run_program(THREADS.format(n=8), limits).result == "passed"
    assert run_program(THREADS.format(n=40), limits).result == "failed: RuntimeError: can't start new thread"


@needs_root
@needs_namespaces
def test_an_unprivileged_caller_gets_a_user_namespace_and_its_threads_do_not_count():
    # the evaluation runs as an ordinary user with 80 threads alive; a program starting 10 threads under
    # RLIMIT_NPROC = 64 passes: the limit counts the program's tasks in its own user namespace only
    uid = 0x3F000000 + os.getpid() % 4096
    script = f"""
import os, sys, threading, ctypes
launcher = {{"__name__": "launcher"}}
exec(open("dylora_moe/evaluate/sandbox_launcher.py").read(), launcher)
from dylora_moe.evaluate import execution, sandbox_isolation
keep = list(sandbox_isolation.interpreter_paths()) + [os.getcwd()]
assert ctypes.CDLL(None).unshare(launcher["CLONE_NEWNS"]) == 0
launcher["mount"](None, "/", None, launcher["MS_REC"] | launcher["MS_PRIVATE"])
blocked = {{a for k in keep for a in sandbox_isolation.untraversable_ancestors(k)}}
launcher["cover"](sorted(blocked), keep)  # so that this user can reach the interpreter
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(80)]
for t in threads:
    t.start()
limits = execution.Limits(timeout_s=20, max_processes=64)
print(execution.isolation_level(limits), sandbox_isolation.meaning(execution.isolation_level(limits)).split(":")[1])
print(execution.run_program({THREADS.format(n=10)!r}, limits).result)
stop.set()
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TMPDIR": "/tmp"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    level, result = done.stdout.strip().splitlines()
    assert level.startswith("namespaces") and "user namespace" in level
    assert result == "passed"


def test_no_isolation_is_refused_unless_asked_for(monkeypatch):
    monkeypatch.setattr(execution, "candidates", lambda: ())
    monkeypatch.delenv("DYLORA_UNSAFE_NO_ISOLATION", raising=False)
    with pytest.raises(SandboxUnavailableError, match="--unsafe_no_isolation"):
        run_program("assert True", Limits(timeout_s=5))
    with pytest.raises(SandboxUnavailableError, match="--unsafe_no_isolation"):
        execution.run_programs(["assert True"], Limits(timeout_s=5))
    assert run_program("assert True", Limits(timeout_s=5, unsafe_no_isolation=True)).result == "passed"
    assert execution.isolation_level(Limits(unsafe_no_isolation=True)) == "none"
    monkeypatch.setenv("DYLORA_UNSAFE_NO_ISOLATION", "1")
    assert execution.isolation_level(Limits()) == "none"


def test_an_unavailable_level_is_refused_with_its_reason(monkeypatch):
    monkeypatch.setattr(execution, "_probe", lambda level: "unshare: Operation not permitted")
    monkeypatch.delenv("DYLORA_UNSAFE_NO_ISOLATION", raising=False)
    with pytest.raises(SandboxUnavailableError, match="'namespaces' is not available here: unshare: Operation"):
        execution.isolation_level(Limits(isolation="namespaces"))
    with pytest.raises(SandboxUnavailableError, match="refusing to run untrusted code without kernel isolation"):
        execution.isolation_level(Limits())


def test_bad_isolation_is_named():
    with pytest.raises(ValueError, match="isolation must be one of"):
        Limits(isolation="docker")


UID_CONFINED = """
import errno, os
assert os.getuid() >= 0x40000000, os.getuid()
for path in ["$VICTIM", "/etc/dylora-escape-probe"]:
    try:
        open(path, "w")
    except OSError as err:
        assert err.errno == errno.EACCES, (path, err)
    else:
        raise AssertionError(f"wrote {path}")
for action in (lambda: os.kill($PID, 0), lambda: open("/proc/$PID/environ", "rb").read()):
    try:
        action()
    except PermissionError:
        pass
    else:
        raise AssertionError("reached the evaluation")
import subprocess
subprocess.Popen(["sleep", "$MARKER"], start_new_session=True)
"""


@needs_root
@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="needs a system /usr/bin/python3")
def test_the_uid_level_confines_by_uid_alone(monkeypatch, tmp_path):
    # here the venv's interpreter lives under /root (0700): a dedicated uid can run only an interpreter others can
    # reach, so this uses the system one
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3")
    monkeypatch.setattr(execution, "_probe", execution._probe.__wrapped__)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    tmp_path.chmod(0o755)
    marker = f"{time.time() % 1000:.6f}"
    program = UID_CONFINED.replace("$VICTIM", str(victim)).replace("$PID", str(os.getpid()))
    limits = Limits(timeout_s=10, isolation="uid", audit=False)
    assert run_program(program.replace("$MARKER", marker), limits).result == "passed"
    assert victim.read_text() == "keep"
    time.sleep(0.2)
    assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)] == []


def test_the_cli_refuses_without_isolation_unless_asked_and_records_the_level(monkeypatch, data_dir, tmp_path, capsys):
    import json

    from dylora_moe.evaluate.cli import main
    from dylora_moe.evaluate.problems import load_problems

    problem = load_problems("mbpp", data_dir, limit=1)[0]
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": problem.task_id, "completion": problem.reference}) + "\n")
    args = ["--benchmark", "mbpp", "--samples", str(samples), "--data_dir", str(data_dir), "--k", "1"]
    monkeypatch.setattr(execution, "candidates", lambda: ())  # a machine that allows no isolation
    monkeypatch.delenv("DYLORA_UNSAFE_NO_ISOLATION", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and "refusing to run untrusted code" in error and "--unsafe_no_isolation" in error
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()
    assert main([*args, "--unsafe_no_isolation"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl_results.jsonl").read_text().splitlines()]
    assert [(r["passed"], r["sandbox"].split(":")[0]) for r in rows] == [(True, "none")]


def test_a_model_evaluation_records_the_level_and_is_refused_before_generating(
    moe, tokenizer, data_dir, tmp_path, monkeypatch
):
    import json

    from dylora_moe.evaluate import evaluate_model, generation
    from dylora_moe.evaluate.generation import Sampling

    options = {"routings": ["learned"], "limit": 1, "data_dir": data_dir, "sampling": Sampling(max_new_tokens=4)}
    limits = Limits(timeout_s=5, unsafe_no_isolation=True)
    evaluate_model(moe, tokenizer, ["mbpp"], limits=limits, output_dir=tmp_path, **options)
    summary = json.loads((tmp_path / "code_eval.json").read_text())["summary"]
    assert summary["sandbox"].split(":")[0] == execution.isolation_level(limits)
    assert "Sandbox here: " + summary["sandbox"] in (tmp_path / "code_eval.md").read_text()
    monkeypatch.setattr(execution, "candidates", lambda: ())
    monkeypatch.delenv("DYLORA_UNSAFE_NO_ISOLATION", raising=False)
    monkeypatch.setattr(generation, "generate_completions", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(SandboxUnavailableError):
        evaluate_model(moe, tokenizer, ["mbpp"], limits=Limits(timeout_s=5), **options)
