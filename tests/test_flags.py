"""The commands' manners (dylora_moe.flags, train.py's and evaluate's parsers): no abbreviated flags, the closest
flag for a misspelt one (difflib and a small alias table), answered in well under 2 s before anything is set up,
and the installed command's own name in its usage."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dylora_moe.evaluate import cli as evaluate_cli
from dylora_moe.flags import closest, unrecognized
from dylora_moe.train import args as train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "typed,meant",
    [("--num_exprets", "--num_experts"), ("--num_expert", "--num_experts"), ("--lr", "--learning_rate"),
     ("--lerning_rate", "--learning_rate"), ("--optimm", "--optim")],
)  # fmt: skip
def test_a_misspelt_or_abbreviated_flag_is_refused_with_the_closest_one(typed, meant, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        train_args.parse_args([typed, "4", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"unrecognized arguments: {typed} 4 (did you mean {meant}?)" in err


def test_trainer_flags_still_pass_to_the_full_parser(tmp_path):
    args = train_args.parse_args(["--optim", "adamw_torch", "--disable_tqdm", "--output_dir", str(tmp_path)])
    assert args.trainer_only == ["--optim", "adamw_torch", "--disable_tqdm"]


def test_the_helpers():
    assert closest("--no_such_flag", ["--num_experts", "--learning_rate"]) is None
    assert closest("--lr", ["--num_experts"]) is None  # an alias is suggested only where the command has it
    assert unrecognized(["--optim", "sgd", "--typo", "1", "--x=2"], {"--optim"}) == ["--typo", "1", "--x=2"]


def test_evaluate_refuses_abbreviations_and_suggests(capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.parser().parse_args(["--benchmark", "mbpp", "--model_name", "tiny", "--backen", "eager"])
    assert "unrecognized arguments: --backen eager (did you mean --backend?)" in capsys.readouterr().err


def _command(argv0: str, *argv: str) -> tuple[subprocess.CompletedProcess, float]:
    code = (
        f"import sys; sys.argv = [{argv0!r}, *{list(argv)!r}]\n"
        "from dylora_moe.train.cli import cli\n"
        "try:\n    cli()\n"
        "finally:\n    print('heavy:', sorted(m for m in ('torch', 'transformers', 'wandb') if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    return done, time.perf_counter() - started


def test_a_misspelt_flag_is_answered_at_once_before_anything_is_set_up(tmp_path):
    done, seconds = _command("train.py", "--num_exprets", "4", "--output_dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "heavy: []" in done.stdout and seconds < 2.0
    assert done.stderr == "train.py: error: unrecognized arguments: --num_exprets 4 (did you mean --num_experts?)\n"
    assert not (tmp_path / "out").exists()


def test_the_installed_command_names_itself():
    done, _ = _command("/venv/bin/dylora-moe-train", "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: dylora-moe-train")
    done, _ = _command("train.py", "--help")
    assert done.stdout.startswith("usage: train.py")
