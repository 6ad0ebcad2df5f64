"""wandb is set up only when the run reports to it, and its notices reach the log in the log's format."""

import os
import subprocess
import sys
from pathlib import Path

from dylora_moe.train import args as train_args

REPO = Path(__file__).resolve().parents[2]


def test_report_to_none_touches_nothing_of_wandb(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    assert train_args.resolve_report_to("none", str(tmp_path)) == []
    assert not {"WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"} & set(os.environ)


def test_the_offline_notice_goes_to_the_log_not_to_stdout(tmp_path):
    """transformers prints ``[INFO] Running in WANDB offline mode`` when its integrations load under
    WANDB_MODE=offline; the training command says it once, as a log line."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        "from dylora_moe.train import args\n"
        f"report_to = args.resolve_report_to('wandb', {str(tmp_path)!r})\n"
        f"args.trainer_arguments(['--output_dir', {str(tmp_path)!r}], report_to)\n"
    )
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Running in WANDB offline mode" not in proc.stdout
    assert proc.stderr.count("wandb: WANDB_MODE=offline") == 1
