"""Under torchrun every process meets a refusal (bad data, a model that cannot load): its one line is said by rank 0
alone, as its last line, with no traceback; the other processes end silently with the same exit code."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _train(tmp_path, rank: int):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(REPO / "train.py"), "--data_dir", str(tmp_path / "nowhere"), "--report_to", "none"]
    cmd += ["--output_dir", str(tmp_path / f"out{rank}")]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_the_reason_comes_once_from_rank_0(tmp_path):
    main, other = _train(tmp_path, 0), _train(tmp_path, 1)
    assert main.returncode == other.returncode == 1
    assert main.stderr.strip().splitlines()[-1].startswith("error: data directory")
    assert "error:" not in other.stderr and "Traceback" not in main.stderr + other.stderr
