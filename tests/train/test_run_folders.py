"""One run per folder, always (issue 24, item 2): a run locks its folder; rotation and --overwrite_output_dir remove
only the identified run's checkpoints holding only train.py's files; resume refuses changed routing semantics unless
asked, skips a damaged newest checkpoint saying so, and never saves over another run's checkpoint; a full disk is
one line, whatever library reported it, and the staging folder goes."""

import errno
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dylora_moe.train import cli as train
from dylora_moe.train.args import CHANGEABLE_SETTINGS, model_fingerprint, parse_args
from dylora_moe.train.runs import (
    LOCK_FILE,
    CheckpointNotFound,
    RunConflict,
    RunFolderLock,
    plan_run,
    rotation_victims,
    start_run,
    write_manifest,
)

PRINT = {"model_name": "tiny", "num_experts": 2, "lora_r": 4, "temperature": 2.0, "router_weighting": "softmax"}


def _run(out: Path, run_id: str = "run-a", fingerprint=PRINT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "fingerprint": fingerprint}))
    return out


def _checkpoint(out: Path, step: int, run_id: str | None, fingerprint=PRINT, extra: str | None = None) -> Path:
    """A checkpoint as train.py writes it (trainer state with the run id, a weights file, the manifest); ``extra``: a
    user's file added afterwards."""
    folder = out / f"checkpoint-{step}"
    (folder / "expert_0").mkdir(parents=True)
    callbacks = {"RunIdentity": {"args": {"run_id": run_id, "fingerprint": fingerprint}}} if run_id else {}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": callbacks}))
    (folder / "expert_0" / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "optimizer.pt").write_bytes(b"state" * 100)
    write_manifest(folder)
    if extra:
        (folder / extra).write_text("the user's notes")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----- the lock ---------------------------------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import sys
    from dylora_moe.train.runs import RunFolderLock
    with RunFolderLock(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def test_a_second_run_into_a_locked_folder_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=root)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr("sys.argv", ["train.py", "--output_dir", str(out), "--data_dir", str(tmp_path / "none")])
        with pytest.raises(SystemExit) as exit_info:
            train.cli()
        err = capsys.readouterr().err.strip()
        assert exit_info.value == SystemExit(2) or exit_info.value.code == 2
        assert err.count("\n") == 0 and f"in use by another run (process {holder.pid} holds" in err, err
        with pytest.raises(RunConflict, match="one run per folder"):
            RunFolderLock(out).__enter__()
    finally:
        holder.communicate("")  # the holder exits: the kernel drops its lock
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    with RunFolderLock(out):  # free again
        pass


def test_the_lock_is_held_for_the_run_and_released_after(tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = []

    def run_training(args, argv, held):
        held.enter_context(RunFolderLock(args.output_dir))
        with pytest.raises(RunConflict), RunFolderLock(args.output_dir):
            pass
        seen.append("ran")
        raise ValueError("the run failed")

    monkeypatch.setattr(train, "run_training", run_training)
    with pytest.raises(ValueError):
        train.main(["--output_dir", str(out)])
    assert seen == ["ran"]
    with RunFolderLock(out):  # released when the run ended, on an error too
        pass


# ----- rotation and overwrite: the identified run's checkpoints only ----------------------------------------------


def test_rotation_removes_only_the_runs_own_checkpoints_without_user_files(tmp_path, caplog):
    out = _run(tmp_path / "out")
    own = [_checkpoint(out, step, "run-a") for step in (2, 4, 6, 8)]
    noted = _checkpoint(out, 3, "run-a", extra="NOTES")
    candidates = sorted([*own, noted], key=lambda p: int(p.name.split("-")[1]))
    with caplog.at_level(logging.WARNING):
        victims = rotation_victims(candidates, 2, keep=(own[-1], own[0]))  # the newest and the best stay
    assert victims == own[1:3] and "keeping" in caplog.text and "NOTES" in caplog.text
    assert rotation_victims(candidates, None, keep=(own[-1],)) == []


def test_overwrite_keeps_a_checkpoint_of_the_run_holding_a_user_file(tmp_path):
    out = _run(tmp_path / "out")
    _checkpoint(out, 1, "run-a", extra="NOTES")
    before = _files(out)
    with pytest.raises(RunConflict, match=r"NOTES \(in checkpoint-1/, not written by train.py\)"):
        plan_run(out, PRINT, resume=None, overwrite=True)
    assert _files(out) == before
    (out / "checkpoint-1" / "NOTES").unlink()
    start_run(plan_run(out, PRINT, resume=None, overwrite=True))
    assert not (out / "checkpoint-1").exists()


def test_overwrite_with_a_checkpoint_from_elsewhere_keeps_a_foreign_checkpoint_of_the_same_name(tmp_path):
    out = _run(tmp_path / "out", "run-b")
    _checkpoint(out, 2, "run-b", extra="NOTES")
    elsewhere = _checkpoint(tmp_path / "elsewhere", 2, "run-z")
    before = _files(out)
    with pytest.raises(RunConflict, match=r"checkpoint-2"):
        plan_run(out, PRINT, resume=str(elsewhere), overwrite=True)
    assert _files(out) == before


def test_resume_refuses_another_runs_checkpoint_where_it_would_save(tmp_path):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    _checkpoint(out, 9, "run-b", extra="NOTES")
    with pytest.raises(RunConflict, match=r"holds checkpoint-9, not of run run-a, where the resumed run would save"):
        plan_run(out, PRINT, resume="last", overwrite=False)


# ----- resume: settings, damaged checkpoints ----------------------------------------------------------------------


def test_resume_refuses_changed_routing_semantics_unless_allowed(tmp_path, caplog):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    changed = {**PRINT, "temperature": 0.5, "router_weighting": "original"}
    allow = dict(changeable=frozenset(CHANGEABLE_SETTINGS))
    with pytest.raises(RunConflict) as refused:
        plan_run(out, changed, resume="last", overwrite=False, **allow)
    message = str(refused.value)
    assert "\n" not in message and "--allow_setting_changes" in message
    assert "--temperature 0.5 here vs 2.0 in the run" in message and "--router_weighting 'original' here" in message
    with caplog.at_level(logging.WARNING):
        plan = plan_run(out, changed, resume="last", overwrite=False, allow_changes=allow["changeable"], **allow)
    assert plan.resume_step == 2 and "--temperature 0.5 here vs 2.0" in caplog.text
    start_run(plan)
    assert json.loads((out / "run.json").read_text())["fingerprint"]["temperature"] == 0.5
    with pytest.raises(RunConflict, match="--lora_r 8 here vs 4") as refused:  # shapes never change
        plan_run(out, {**PRINT, "lora_r": 8}, resume="last", overwrite=False, allow_changes=allow["changeable"])
    assert "--allow_setting_changes" not in str(refused.value)


def test_the_fingerprint_holds_every_setting_that_changes_what_the_model_computes():
    args = parse_args(["--temperature", "0.5", "--router_weighting", "original", "--balance_loss", "mse"])
    printed = model_fingerprint(args)
    assert (printed["temperature"], printed["router_weighting"], printed["balance_loss"]) == (0.5, "original", "mse")
    assert {"balance_coefficient", "balance_update_rate", "global_balance", "z_loss_coefficient"} <= set(printed)
    assert "backend" not in printed  # the backends compute the same values


def test_a_damaged_newest_checkpoint_is_named_and_the_newest_intact_one_resumed(tmp_path, caplog):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    newest = _checkpoint(out, 4, "run-a")
    weights = newest / "expert_0" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF  # one flipped byte
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        plan = plan_run(out, PRINT, resume="last", overwrite=False)
    assert plan.resume_from == str(out / "checkpoint-2")
    assert "checkpoint-4 is damaged (expert_0/adapter_model.safetensors does not match" in caplog.text
    assert "resuming from checkpoint-2, the newest intact checkpoint" in caplog.text
    with pytest.raises(CheckpointNotFound, match=r"damaged.*the newest intact checkpoint of its run is .*checkpoint-2"):
        plan_run(out, PRINT, resume=str(newest), overwrite=False)
    (out / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointNotFound, match=r"no intact checkpoint of run run-a.*optimizer.pt is missing"):
        plan_run(out, PRINT, resume="last", overwrite=False)


# ----- a full disk ------------------------------------------------------------------------------------------------


class SafetensorError(Exception):
    """What safetensors raises (no errno)."""


def _torch_save_failure() -> RuntimeError:
    try:
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1431") from None
    except RuntimeError as err:
        err.__context__ = RuntimeError("basic_ios::clear: iostream error")
        return err


@pytest.mark.parametrize("make", [
    lambda: SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space "
                            "left on device\" }) (os error 28)"),
    _torch_save_failure,
], ids=["safetensors", "torch.save"])  # fmt: skip
def test_a_full_disk_is_one_line_and_the_staging_folder_goes(tmp_path, monkeypatch, make):
    import shutil

    from dylora_moe.train.trainer import _give_up

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    staging = tmp_path / "out" / ".staging-checkpoint-1"
    (staging / "checkpoint-1").mkdir(parents=True)
    with pytest.raises(OSError) as raised:
        _give_up(str(staging), make())
    assert raised.value.errno == errno.ENOSPC and not staging.exists()
    message = train.disk_full_message(raised.value, ["--output_dir", str(tmp_path / "out")])
    assert message.startswith("error: no space left on device while writing to") and "\n" not in message
    assert "the unfinished save was removed" in message
    assert train.disk_full_message(make(), ["--output_dir", str(tmp_path / "out")]) is not None  # as raised, too
    with pytest.raises(ValueError):
        _give_up(str(staging), ValueError("another failure"))  # anything else is raised as it was
