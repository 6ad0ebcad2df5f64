"""Fault injection: a real ``train.py`` process is SIGKILLed at a chosen point, then resumed with a bare
``--resume_from_checkpoint``; the resumed run must end exactly as an uninterrupted one (final/ weights bit for bit,
every evaluation loss, each training step logged once) and leave no staging folder behind.

Kill points: half-way through writing checkpoint-4's first expert file (during a save), half-way through writing the
metrics line of step 3 (between saves: a torn last line), and half-way through writing final/ (after the last
checkpoint). A small wrapper runs train.py with one function patched to write half its bytes and SIGKILL its own
process there; the test checks that the kill really happened (exit -9), so a renamed hook cannot pass silently.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_support import TINY

from dylora_moe.train.runs import LOCK_FILE

REPO = Path(__file__).resolve().parents[2]
RUN = [*TINY, "--kernel", "eager", "--max_steps", "4", "--eval_steps", "2"]

WRAPPER = textwrap.dedent(
    """
    import os, runpy, signal, sys

    point, train_py, *argv = sys.argv[1:]
    sys.argv = [train_py, *argv]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point in ("save", "final"):
        import safetensors.torch
        import dylora_moe.io.checkpoint as checkpoint

        marker = "checkpoint-4" if point == "save" else "final"
        real_save_file = checkpoint.save_file

        def save_file(tensors, filename, metadata=None):
            if marker in str(filename):
                data = safetensors.torch.save(tensors, metadata=metadata)
                with open(filename, "wb") as f:
                    f.write(data[: len(data) // 2])
                die()
            return real_save_file(tensors, filename, metadata=metadata)

        checkpoint.save_file = save_file
    elif point == "metrics":
        import json
        from dylora_moe.train.trainer import MetricsFile

        real_on_log = MetricsFile.on_log

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step == 3 and logs and "loss" in logs:
                with self.path.open("a") as f:
                    f.write(json.dumps({"step": 3, **logs})[:25])
                die()
            return real_on_log(self, args, state, control, logs=logs, **kwargs)

        MetricsFile.on_log = on_log
    runpy.run_path(train_py, run_name="__main__")
    """
)


def _run(tmp_path: Path, out: Path, *extra: str, point: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    if point is None:
        cmd = [sys.executable, str(REPO / "train.py")]
    else:
        wrapper = tmp_path / "kill_at.py"
        wrapper.write_text(WRAPPER)
        cmd = [sys.executable, str(wrapper), point, str(REPO / "train.py")]
    cmd += [*RUN, "--output_dir", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for key, value in load_file(path).items():
            out[f"{path.relative_to(folder)}:{key}"] = value
    return out


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _evals(rows: list[dict]) -> dict:
    """Evaluation losses by (step, key); the last one wins (final evaluation after the best-model reload)."""
    return {(r["step"], k): v for r in rows for k, v in r.items() if k.startswith("eval_") and k.endswith("_loss")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("straight")
    proc = _run(tmp, tmp / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out"


@pytest.mark.slow
@pytest.mark.parametrize("point", ["save", "metrics", "final"])
def test_killed_run_resumes_to_the_uninterrupted_result(point, straight, tmp_path):
    out = tmp_path / "out"
    killed = _run(tmp_path, out, point=point)
    assert killed.returncode == -signal.SIGKILL, f"the kill at {point!r} did not happen:\n{killed.stderr[-3000:]}"
    if point == "save":
        assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
        assert any(p.name.startswith(".") and "staging" in p.name for p in out.iterdir())
    if point == "metrics":
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # a torn last line
    if point == "final":
        assert (out / "checkpoint-4").is_dir() and not (out / "final").exists()

    fresh = _run(tmp_path, out)  # the same command again, without resume: refused, nothing touched
    assert fresh.returncode == 2 and "--resume_from_checkpoint" in fresh.stderr and "Traceback" not in fresh.stderr

    resumed = _run(tmp_path, out, "--resume_from_checkpoint")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if point == "metrics":
        assert "dropped 1 unreadable line" in resumed.stderr

    a, b = _tensors(straight / "final"), _tensors(out / "final")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    rows, straight_rows = _rows(out), _rows(straight)
    assert _evals(rows) == _evals(straight_rows)
    steps = [r["step"] for r in rows if "loss" in r and "lm_loss" in r]
    assert steps == [1, 2, 3, 4]  # each training step logged once, in order
    assert {r["step"]: r["loss"] for r in rows if "lm_loss" in r} == {
        r["step"]: r["loss"] for r in straight_rows if "lm_loss" in r
    }
    assert len({r["run_id"] for r in rows}) == 1
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]  # no staging left
    assert (out / "summary.md").is_file()
