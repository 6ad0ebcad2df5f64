"""train.py's arguments: HfArgumentParser dataclasses, the original's flag names, and every bad value refused up
front (one ``error: argument --x`` line, exit code 2) with an existing run left byte for byte as it was."""

import dataclasses
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dylora_moe.train import args as train_args
from dylora_moe.train import cli as train

REPO = Path(__file__).resolve().parents[2]


# One bad value per numeric flag (and a few per flag where the bound has two sides); each must exit 2.
BAD_VALUES = [
    ("--code_eval_limit", "0"),
    ("--code_eval_max_new_tokens", "0"),
    ("--code_eval", "mbpp,bogus"),
    ("--tiny_hidden_size", "0"),
    ("--tiny_num_layers", "0"),
    ("--tiny_vocab_size", "100"),
    ("--num_experts", "0"),
    ("--num_experts", "two"),
    ("--lora_r", "0"),
    ("--lora_alpha", "0"),
    ("--lora_alpha", "nan"),
    ("--lora_dropout", "1.0"),
    ("--lora_dropout", "-0.1"),
    ("--top_k", "0"),
    ("--top_k", "5"),
    ("--temperature", "0"),
    ("--temperature", "inf"),
    ("--sequence_top_k", "0"),
    ("--balance_coefficient", "-1"),
    ("--balance_update_rate", "-0.001"),
    ("--balance_loss", "aux"),
    ("--collapse_threshold", "1.5"),
    ("--collapse_patience", "0"),
    ("--sweep_jobs", "0"),
    ("--z_loss_coefficient", "-0.5"),
    ("--max_length", "0"),
    ("--max_length", "1"),
    ("--training_subset", "0"),
    ("--training_subset", "101"),
    ("--eval_subset", "0"),
    ("--eval_subset", "-5"),
    ("--num_epochs", "0"),
    ("--max_steps", "0"),
    ("--max_steps", "-2"),
    ("--batch_size", "0"),
    ("--per_device_eval_batch_size", "0"),
    ("--gradient_accumulation_steps", "0"),
    ("--learning_rate", "-0.01"),
    ("--learning_rate", "0"),
    ("--weight_decay", "-1"),
    ("--warmup_steps", "-0.1"),
    ("--early_stopping_patience", "-1"),  # 0 turns early stopping off
    ("--eval_steps", "-1"),
    ("--save_steps", "0"),
    ("--save_total_limit", "0"),
    ("--logging_steps", "0"),
    ("--seed", "-1"),
    ("--kernel", "fast"),
    ("--routing", "expert"),
    ("--fp16", "maybe"),
]


def _numeric_fields() -> set[str]:
    names = set()
    for dtype in train_args.ARGUMENT_GROUPS.values():
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}:
                names.add(f.name)
    return names


def test_every_numeric_flag_has_a_check_and_a_bad_value_here():
    checked = {name for name, _, _ in train_args.CHECKS}
    assert _numeric_fields() <= checked, _numeric_fields() - checked
    flags = {flag for flag, _ in BAD_VALUES}
    for name in _numeric_fields():
        assert f"--{train_args._flag(name)}" in flags or f"--{name}" in flags, name


@pytest.fixture
def existing_run(tmp_path) -> Path:
    """A run folder as train.py leaves it (what matters here: every file must stay byte for byte)."""
    out = tmp_path / "run"
    (out / "checkpoint-2" / "expert_0").mkdir(parents=True)
    (out / "checkpoint-2" / "expert_0" / "adapter_model.safetensors").write_bytes(os.urandom(256))
    state = {"global_step": 2, "stateful_callbacks": {"RunIdentity": {"args": {"run_id": "abc", "fingerprint": {}}}}}
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    (out / "run.json").write_text(json.dumps({"run_id": "abc", "fingerprint": {}}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "run_id": "abc"}\n')
    (out / "notes.txt").write_text("the user's own file")
    return out


def _snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


@pytest.mark.parametrize("flag,value", BAD_VALUES, ids=[f"{f}={v}" for f, v in BAD_VALUES])
def test_bad_value_exits_2_and_leaves_the_run_untouched(flag, value, existing_run, capsys):
    before = _snapshot(existing_run)
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, value, "--output_dir", str(existing_run), "--resume_from_checkpoint"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error: argument "), err
    name = flag.lstrip("-")
    assert f"--{name}" in err[0] or f"--{name.replace('-', '_')}" in err[0], err[0]
    assert _snapshot(existing_run) == before


def test_num_experts_zero_blames_num_experts(capsys):
    with pytest.raises(SystemExit):
        train_args.parse_args(["--num_experts", "0"])
    err = capsys.readouterr().err
    assert "argument --num_experts: expected an integer >= 1, got 0" in err and "top_k" not in err


def test_output_dir_naming_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    for out in (target, target / "below"):
        with pytest.raises(SystemExit) as exit_info:
            train.main(["--output_dir", str(out)])
        assert exit_info.value.code == 2
        assert "argument --output_dir" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_original_flags_keep_their_meaning():
    tiny = train_args.parse_args([])
    assert (tiny.num_train_epochs, tiny.learning_rate, tiny.per_device_train_batch_size) == (1, 2e-3, 8)
    assert tiny.per_device_eval_batch_size == 8 and (tiny.eval_strategy, tiny.save_strategy) == ("epoch", "epoch")
    argv = ["--num_epochs", "3", "--batch_size", "2", "--eval_steps", "5", "--warmup_ratio", "0.2"]
    args = train_args.parse_args(argv)
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.per_device_eval_batch_size) == (3, 2, 2)
    assert (args.eval_strategy, args.eval_steps, args.save_steps, args.warmup_steps) == ("steps", 5, 5, 0.2)
    assert train_args.parse_args(["--eval_steps", "0"]).eval_strategy == "epoch"  # the original's 0: each epoch
    assert train_args.parse_args(["--resume_from_checkpoint"]).resume_from_checkpoint == "last"
    assert train_args.parse_args(["--bf16"]).bf16 is True and train_args.parse_args(["--compile"]).torch_compile is True
    assert train_args.parse_args(["--freeze_router"]).freeze_router is True
    plain = train_args.parse_args([])
    assert (plain.freeze_router, plain.strict_gradients, plain.sweep) == (False, False, None)


def test_trainer_arguments_take_every_trainer_flag(tmp_path):
    argv = ["--num_epochs", "2", "--batch_size", "3", "--optim", "adafactor", "--max_grad_norm", "0.5", "--compile"]
    argv += ["--output_dir", str(tmp_path), "--disable_tqdm", "true", "--torch_compile_backend", "eager"]
    train_args.parse_args(argv)
    targs = train_args.trainer_arguments(argv, report_to=[])
    assert (targs.num_train_epochs, targs.per_device_train_batch_size, targs.per_device_eval_batch_size) == (2, 3, 3)
    assert (targs.optim.value, targs.max_grad_norm, targs.torch_compile, targs.disable_tqdm) == (
        "adafactor",
        0.5,
        True,
        True,
    )
    assert (targs.learning_rate, targs.lr_scheduler_type.value, targs.weight_decay) == (2e-3, "cosine", 0.01)
    assert targs.load_best_model_at_end and targs.metric_for_best_model == "eval_code_alpaca_loss"
    assert not list(tmp_path.iterdir())  # parsing wrote nothing


def test_unknown_trainer_value_exits_2(tmp_path, capsys):
    argv = ["--optim", "no-such-optimizer", "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        train_args.trainer_arguments(argv, report_to=[])
    assert exit_info.value.code == 2 and "--optim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        train_args.trainer_arguments(["--no_such_flag", "1"], report_to=[])
    assert exit_info.value.code == 2


def _cli(*argv, cwd=REPO) -> subprocess.CompletedProcess:
    """train.py as a user runs it, reporting which heavy modules it imported."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train.py', *{list(argv)!r}]\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\n"
        "finally:\n    print('heavy:', sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_help_and_bad_flags_import_nothing_heavy(tmp_path):
    helped = _cli("--help")
    assert helped.returncode == 0 and "--num_epochs" in helped.stdout and "--help_trainer" in helped.stdout
    assert "heavy: []" in helped.stdout
    bad = _cli("--lora_r", "0", "--output_dir", str(tmp_path / "out"))
    assert bad.returncode == 2 and "heavy: []" in bad.stdout
    assert bad.stderr.strip() == "train.py: error: argument --lora_r: expected an integer >= 1, got 0"
    missing = _cli("--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out"))
    assert missing.returncode == 1 and "heavy: []" in missing.stdout and "Traceback" not in missing.stderr
    assert not (tmp_path / "out").exists()  # a data error writes nothing either


def test_unknown_flag_is_refused_before_the_data_is_read(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--no_such_flag", "1", "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)  # the typo is named, not the missing data folder
    assert exit_info.value.code == 2 and "unrecognized arguments: --no_such_flag 1" in capsys.readouterr().err
    assert not out.exists()
