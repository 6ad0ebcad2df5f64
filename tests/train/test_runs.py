"""One run per output folder (dylora_moe.train.runs): refusals before any write, resume picks only its own run's
checkpoints, staging leftovers go, metrics.jsonl tolerates a torn line and never repeats a step."""

import json
import logging
from pathlib import Path

import pytest

from dylora_moe.train.runs import (
    CheckpointNotFound,
    RunConflict,
    checkpoint_identity,
    plan_run,
    read_metrics,
    start_run,
)

PRINT = {"model_name": "tiny", "num_experts": 2, "lora_r": 4}


def _checkpoint(out: Path, step: int, run_id: str | None, fingerprint=PRINT) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    callbacks = {"RunIdentity": {"args": {"run_id": run_id, "fingerprint": fingerprint}}} if run_id else {}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": callbacks}))
    return folder


def _run(out: Path, run_id: str = "run-a", fingerprint=PRINT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "fingerprint": fingerprint}))
    return out


def test_fresh_run_into_a_run_refuses_and_names_both_ways_out(tmp_path):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    with pytest.raises(RunConflict, match=r"--resume_from_checkpoint.*--overwrite_output_dir"):
        plan_run(out, PRINT, resume=None, overwrite=False)
    (tmp_path / "metrics-only").mkdir()
    (tmp_path / "metrics-only" / "metrics.jsonl").write_text("{}\n")  # a run killed before its first checkpoint
    with pytest.raises(RunConflict):
        plan_run(tmp_path / "metrics-only", PRINT, resume=None, overwrite=False)
    # A folder with other things only (the user's files, a tiny model cache) is not a run.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    assert plan_run(tmp_path / "other", PRINT, resume=None, overwrite=False).fresh


def test_overwrite_removes_the_runs_outputs_only(tmp_path):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    (out / "final").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("the user's")
    (out / "tiny-0123").mkdir()
    plan = plan_run(out, PRINT, resume=None, overwrite=True)
    assert plan.run_id != "run-a" and (out / "checkpoint-2").exists()  # planning writes nothing
    start_run(plan)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json", "tiny-0123"]
    assert json.loads((out / "run.json").read_text())["run_id"] == plan.run_id


def test_resume_picks_the_newest_checkpoint_of_the_same_run(tmp_path):
    out = _run(tmp_path / "out", "run-a")
    _checkpoint(out, 2, "run-a")
    _checkpoint(out, 4, "run-a")
    _checkpoint(out, 3, "run-b")  # another run's checkpoint left in the folder
    _checkpoint(out, 1, None)  # an older train.py's
    (out / ".staging-checkpoint-10").mkdir()
    plan = plan_run(out, PRINT, resume="last", overwrite=False)
    assert (plan.resume_from, plan.resume_step, plan.run_id) == (str(out / "checkpoint-4"), 4, "run-a")
    assert checkpoint_identity(out / "checkpoint-3")["run_id"] == "run-b"


def test_resume_refuses_other_model_flags_and_other_runs(tmp_path):
    out = _run(tmp_path / "out", "run-a")
    _checkpoint(out, 2, "run-a")
    with pytest.raises(RunConflict, match=r"--lora_r 8 here vs 4 in the run"):
        plan_run(out, {**PRINT, "lora_r": 8}, resume="last", overwrite=False)
    with pytest.raises(RunConflict, match="exclude each other"):
        plan_run(out, PRINT, resume="last", overwrite=True)
    other = _checkpoint(tmp_path / "elsewhere", 3, "run-z")
    with pytest.raises(RunConflict, match=r"holds run run-a, not the run of"):
        plan_run(out, PRINT, resume=str(other), overwrite=False)
    with pytest.raises(RunConflict, match=r"--num_experts 3 here vs 2"):
        plan_run(tmp_path / "new", {**PRINT, "num_experts": 3}, resume=str(other), overwrite=False)
    plan = plan_run(tmp_path / "new", PRINT, resume=str(other), overwrite=False)
    assert (plan.run_id, plan.resume_step) == ("run-z", 3)


def test_resume_without_a_checkpoint_of_the_run(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint-N folder in"):
        plan_run(tmp_path, PRINT, resume="last", overwrite=False)
    out = _run(tmp_path / "out", "run-a")
    _checkpoint(out, 2, "run-b")
    with pytest.raises(CheckpointNotFound, match="of run run-a"):
        plan_run(out, PRINT, resume="last", overwrite=False)
    legacy = tmp_path / "legacy"
    _checkpoint(legacy, 2, None)
    with pytest.raises(RunConflict, match="no run.json"):
        plan_run(legacy, PRINT, resume="last", overwrite=False)


def test_start_removes_staging_leftovers_only(tmp_path):
    out = _run(tmp_path / "out", "run-a")
    _checkpoint(out, 2, "run-a")
    leftovers = [".staging-checkpoint-4", "..staging-checkpoint-4.tmp-x1y2", ".staging-final", ".final.tmp-ab"]
    for name in leftovers:
        (out / name).mkdir()
        (out / name / "adapter_model.safetensors").write_bytes(b"half")
    (out / ".hidden-user-folder").mkdir()
    start_run(plan_run(out, PRINT, resume="last", overwrite=False))
    assert not any((out / name).exists() for name in leftovers)
    assert (out / ".hidden-user-folder").is_dir() and (out / "checkpoint-2").is_dir()


def test_metrics_torn_line_dropped_with_a_warning_and_steps_past_the_checkpoint_cut(tmp_path, caplog):
    out = _run(tmp_path / "out", "run-a")
    _checkpoint(out, 2, "run-a")
    rows = [{"step": s, "loss": 1.0 / s, "run_id": "run-a"} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo'  # killed mid-write
    (out / "metrics.jsonl").write_text(text)
    assert read_metrics(out / "metrics.jsonl") == (rows, 1)
    with caplog.at_level(logging.WARNING):
        start_run(plan_run(out, PRINT, resume="last", overwrite=False))
    assert "dropped 1 unreadable line" in caplog.text
    assert read_metrics(out / "metrics.jsonl") == (rows[:2], 0)  # step 3 is trained again after checkpoint 2


def test_metrics_file_does_not_repeat_what_the_run_logged(tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainerState

    from dylora_moe.train.trainer import MetricsFile

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "epoch": 0, "time": 1.0, "run_id": "r", "eval_mbpp_loss": 3.0}) + "\n")
    callback = MetricsFile(path, "r")
    state = TrainerState()
    state.global_step, state.epoch = 0, 0.0
    callback.on_log(None, state, None, logs={"eval_mbpp_loss": 3.0})  # the resumed run's baseline: already there
    state.global_step = 3
    callback.on_log(None, state, None, logs={"loss": 2.0})
    callback.on_log(None, state, None, logs={"eval_mbpp_loss": 2.5})
    rows = read_metrics(path)[0]
    assert [(r["step"], sorted(k for k in r if k.endswith("loss"))) for r in rows] == [
        (0, ["eval_mbpp_loss"]),
        (3, ["loss"]),
        (3, ["eval_mbpp_loss"]),
    ]
    assert all(r["run_id"] == "r" for r in rows)
