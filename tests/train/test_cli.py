"""The training command's run (dylora_moe.train.cli): it never deletes a file it did not write, checks every flag
combination before it writes anything, and ends a failure a user can act on with one line (issue 17: items 3, 6, 7
and 8)."""

import errno
import json
import logging
import shutil
from pathlib import Path

import pytest

from dylora_moe.train import cli as train
from dylora_moe.train.runs import RUN_OUTPUTS, RunConflict, plan_run, start_run
from dylora_moe.train.sweep import wandb_sweep_yaml

PRINT = {"model_name": "tiny", "num_experts": 2, "lora_r": 4}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run(out: Path, run_id="run-a") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps({"run_id": run_id, "fingerprint": PRINT}))
    return out


def _checkpoint(out: Path, step: int, run_id: str) -> None:
    folder = out / f"checkpoint-{step}"
    folder.mkdir()
    callbacks = {"RunIdentity": {"args": {"run_id": run_id, "fingerprint": PRINT}}}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "stateful_callbacks": callbacks}))


# ----- item 3: --overwrite_output_dir removes only what this project wrote for a run it can identify -----------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_without_run_json_is_never_emptied(tmp_path, overwrite):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "paper.txt").write_text("the user's paper")
    (out / "summary.md").write_text("the user's summary")
    before = _files(out)
    with pytest.raises(RunConflict) as refused:
        start_run(plan_run(out, PRINT, resume=None, overwrite=overwrite))
    message = str(refused.value)
    assert "final" in message and "summary.md" in message  # what is in the way, listed
    assert "--overwrite_output_dir to" not in message  # and no advice to pass the flag that would delete them
    assert _files(out) == before


def test_overwrite_refuses_a_final_folder_that_train_py_did_not_write(tmp_path):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    (out / "final").mkdir()
    (out / "final" / "paper.txt").write_text("the user's")
    before = _files(out)
    with pytest.raises(RunConflict, match=r"final/ \(no training_args.json"):
        plan_run(out, PRINT, resume=None, overwrite=True)
    _checkpoint(out, 4, "run-b")  # another run's checkpoint is not this run's to delete either
    (out / "final" / "paper.txt").unlink()
    with pytest.raises(RunConflict, match=r"checkpoint-4/ \(not a checkpoint of run run-a\)"):
        plan_run(out, PRINT, resume=None, overwrite=True)
    assert set(_files(out)) == (set(before) - {"final/paper.txt"}) | {"checkpoint-4/trainer_state.json"}


def test_overwrite_removes_every_output_of_the_run_and_nothing_else(tmp_path):
    from dylora_moe.train.runs import EXAMPLES_HTML, EXAMPLES_PLOT, HEATMAP_PLOT, LOSS_PLOT, UTIL_PLOT

    assert {LOSS_PLOT, UTIL_PLOT, HEATMAP_PLOT, EXAMPLES_PLOT, EXAMPLES_HTML, "summary.md"} <= set(RUN_OUTPUTS)
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    for name in RUN_OUTPUTS:
        if name not in ("run.json", "final", "wandb"):
            (out / name).write_text("written by the run")
    (out / "final").mkdir()
    (out / "final" / "training_args.json").write_text("{}")
    (out / "wandb").mkdir()
    (out / "notes.txt").write_text("the user's")
    (out / "tiny-0123").mkdir()
    with pytest.raises(RunConflict, match="--overwrite_output_dir to replace it"):  # safe now, so it is offered
        plan_run(out, PRINT, resume=None, overwrite=False)
    start_run(plan_run(out, PRINT, resume=None, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json", "tiny-0123"]


# ----- item 6: a late failure never blocks the rerun; each flag error is its own ------------------------------------


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_again(tmp_path, caplog):
    out = _run(tmp_path / "out")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "wandb").mkdir()
    (out / "notes.txt").write_text("the user's")
    with caplog.at_level(logging.INFO):
        plan = plan_run(out, PRINT, resume=None, overwrite=False)
    assert "before its first checkpoint" in caplog.text
    start_run(plan)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run.json"]
    assert json.loads((out / "run.json").read_text())["run_id"] == plan.run_id != "run-a"


@pytest.mark.parametrize("argv, expected", [
    (["--metric_for_best_model", "bogus"], "argument --metric_for_best_model: expected one of eval_code_alpaca_loss"),
    (["--eval_strategy", "no"], "add --early_stopping_patience 0 --load_best_model_at_end false"),
    (["--routing", "token", "--sequence_top_k", "1"], "argument --sequence_top_k: applies to --routing sequence"),
    (["--max_length", "100000"], "argument --max_length: at most 8192 with --model_name tiny"),
    (["--output_dir", "out/$DYLORA_TEST_UNSET_VARIABLE"], "an environment variable in it is not set"),
])  # fmt: skip
def test_flag_combinations_are_refused_before_anything_is_written(tmp_path, capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--output_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_corrected_flags_are_accepted(tmp_path):
    args = train.parse_args([
        "--output_dir", str(tmp_path), "--eval_strategy", "no", "--early_stopping_patience", "0",
        "--load_best_model_at_end", "false", "--metric_for_best_model", "mbpp_ppl", "--routing", "sequence",
        "--sequence_top_k", "1",
    ])  # fmt: skip
    assert args.early_stopping_patience == 0 and not args.load_best_model_at_end


def test_a_mistyped_flag_gets_its_own_error_where_a_run_is(tmp_path, capsys):
    out = _run(tmp_path / "out")
    _checkpoint(out, 2, "run-a")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output_dir", str(out), "--lerning_rate", "1", "--report_to", "none"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unrecognized arguments: --lerning_rate 1" in err


# ----- item 8: bare boolean Trainer flags; one folder per wandb sweep run ------------------------------------------


def test_boolean_trainer_flags_work_bare(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    assert train.trainer_arguments([*out, "--disable_tqdm"], report_to=[]).disable_tqdm is True
    assert train.trainer_arguments([*out, "--disable_tqdm", "false"], report_to=[]).disable_tqdm is False
    assert train.trainer_arguments([*out, "--no_load_best_model_at_end"], report_to=[]).load_best_model_at_end is False


def test_the_wandb_sweep_gives_each_run_its_own_folder(tmp_path, monkeypatch):
    yaml = wandb_sweep_yaml({"num_experts": ["2", "4"]}, [], "eval/code_alpaca_loss")
    folder = next(line for line in yaml.splitlines() if line.startswith("  - outputs/"))[4:]
    assert "$WANDB_RUN_ID" in folder
    seen = set()
    for run_id in ("r1", "r2"):
        monkeypatch.setenv("WANDB_RUN_ID", run_id)  # what the wandb agent sets for each run it starts
        seen.add(train.parse_args(["--output_dir", folder]).output_dir)
    assert seen == {"outputs/wandb-sweep/r1", "outputs/wandb-sweep/r2"}


# ----- item 7: ctrl-C and a full disk end with one line a user can act on -------------------------------------------


def _cli(monkeypatch, argv, raises):
    def main():
        raise raises

    monkeypatch.setattr(train, "main", main)
    monkeypatch.setattr("sys.argv", ["train.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        train.cli()
    return exit_info.value.code


def test_ctrl_c_prints_one_line_and_the_resume_command(tmp_path, monkeypatch, capsys):
    out = _run(tmp_path / "out")
    code = _cli(monkeypatch, ["--output_dir", str(out), "--overwrite_output_dir", "--num_experts", "2"],
                KeyboardInterrupt())  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 130 and "\n" not in err and "before the first checkpoint" in err
    _checkpoint(out, 2, "run-a")
    _cli(monkeypatch, ["--output_dir", str(out), "--overwrite_output_dir", "--num_experts", "2"], KeyboardInterrupt())
    err = capsys.readouterr().err.strip()
    assert err == (f"train.py: interrupted; continue with: python train.py --output_dir {out} --num_experts 2 "
                   "--resume_from_checkpoint")  # fmt: skip


@pytest.mark.parametrize("raises", [
    RuntimeError("[enforce fail at inline_container.cc:664] unexpected pos 64 vs 0: basic_ios::clear: iostream error"),
    OSError(errno.ENOSPC, "No space left on device", "out/checkpoint-2/optimizer.pt"),
], ids=["torch.save", "oserror"])  # fmt: skip
def test_a_full_disk_says_so_and_where(tmp_path, monkeypatch, raises):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    code = _cli(monkeypatch, ["--output_dir", str(tmp_path / "out")], raises)
    assert "no space left on device while writing to" in code
    assert (str(tmp_path / "out") if isinstance(raises, RuntimeError) else "out/checkpoint-2/optimizer.pt") in code


def test_rows_longer_than_the_base_models_positions_are_refused():
    from moe_models import tiny_llama

    from dylora_moe.base_models import ModelLoadError

    base = tiny_llama(layers=1)  # 64 positions
    train.check_max_length(base, 64)
    with pytest.raises(ModelLoadError, match=r"--max_length 100000 is longer than the base model's 64 positions"):
        train.check_max_length(base, 100000)


def test_a_file_added_to_the_runs_final_folder_is_never_deleted(tmp_path):
    out = _run(tmp_path / "out")
    final = out / "final"
    (final / "expert_0").mkdir(parents=True)
    for name in ("training_args.json", "tokenizer.json", "router.safetensors", "expert_0/adapter_model.safetensors"):
        (final / name).write_text("{}")
    files = {"router.safetensors": {}, "expert_0/adapter_model.safetensors": {}}
    (final / "dylora_moe_config.json").write_text(json.dumps({"checkpoint": {"files": files}}))
    (final / "paper.txt").write_text("the user's")
    with pytest.raises(RunConflict, match=r"final/paper.txt \(in final/, not written by train.py\)"):
        plan_run(out, PRINT, resume=None, overwrite=True)
    (final / "paper.txt").unlink()
    start_run(plan_run(out, PRINT, resume=None, overwrite=True))
    assert not final.exists()
