"""train.py under two processes (torchrun, gloo on the CPU) against one process on the same global batch.

Both runs see the same rows in the same order (one process: batches of 8; two processes: 4 rows each), with LoRA
dropout off (its random masks depend on how the rows are split) and plain SGD (Adam's first steps are about the sign
of each gradient entry, which turns rounding differences of near-zero entries into whole steps), so every number must
agree to rounding: the
training losses (DDP averages the gradients), every evaluation (no row counted twice, losses over all tokens of all
ranks, routing statistics gathered) and the final evaluation, which equals the last step's. DeepSpeed ZeRO-3 through
the Trainer does the same where deepspeed is installed.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HAS_DATASETS, NEEDS_DATASETS
from train_support import REPO, TINY

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HAS_DATASETS, reason=NEEDS_DATASETS)]

# 3 % of MBPP's validation split is 3 rows: the two ranks' batches of 4 hold 3 real rows and 5 blank ones.
COMMON = [*TINY, "--kernel", "eager", "--lora_dropout", "0", "--optim", "sgd", "--learning_rate", "1"]
COMMON += ["--max_steps", "4", "--eval_steps", "2"]
TIMING_KEYS = ("runtime", "per_second", "preparation_time", "tokens_per_s", "peak_mem_mb")


# DeepSpeed ZeRO-3 through the Trainer (deepspeed is not a dependency: the test runs where it is installed).
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
    "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
    "zero_allow_untested_optimizer": True,
}  # fmt: skip


def _run(out: Path, processes: int, *extra: str) -> None:
    batch = str(8 // processes)
    args = [str(REPO / "train.py"), *COMMON, "--batch_size", batch, "--output_dir", str(out), *extra]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    else:
        launcher = [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _series(out: Path) -> dict[str, list[float]]:
    """Every logged number but timings, as a series per key in log order (evaluations and training logs)."""
    series: dict[str, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key in ("step", "epoch", "time", "run_id") or any(t in key for t in TIMING_KEYS):
                continue
            series.setdefault(key, []).append(value)
    return series


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    _run(root / "one", 1)
    _run(root / "two", 2)
    return root / "one", root / "two"


def test_two_processes_log_what_one_process_logs(runs):
    _assert_same_logs(*runs)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_logs_what_one_process_logs(runs, tmp_path):
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    _run(tmp_path / "zero3", 2, "--deepspeed", str(config))
    _assert_same_logs(runs[0], tmp_path / "zero3")
    assert json.loads((tmp_path / "zero3" / "run.json").read_text())["sharding"] == {
        "world_size": 2, "strategy": "deepspeed", "zero_stage": 3,
    }  # fmt: skip
    files = sorted(p.relative_to(runs[0] / "final") for p in (runs[0] / "final").rglob("*"))
    assert (
        sorted(p.relative_to(tmp_path / "zero3" / "final") for p in (tmp_path / "zero3" / "final").rglob("*")) == files
    )


def _assert_same_logs(one_dir: Path, other_dir: Path) -> None:
    one, two = _series(one_dir), _series(other_dir)
    assert set(one) == set(two)
    assert {"loss", "eval_code_alpaca_loss", "eval_mbpp_util_expert_0", "eval_spec_nmi", "eval_spec_mi_chance"} <= set(
        one
    )
    differ = []
    for key in one:
        assert len(one[key]) == len(two[key]), key
        # Before training (the first value) the two runs hold the same model: rounding only. After the SGD steps the
        # gradients' different summation orders leave differences of ~1e-6 in the weights.
        before = math.isclose(one[key][0], two[key][0], rel_tol=1e-6, abs_tol=1e-8)
        after = all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) for a, b in zip(one[key][1:], two[key][1:]))
        if not (before and after):
            differ.append((key, one[key], two[key]))
    assert not differ, differ


def test_final_evaluation_equals_the_last_steps(runs):
    for out in runs:
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [row for row in evals if "eval_code_alpaca_loss" in row or "eval_mbpp_loss" in row]
        *_, last_code, last_mbpp, final_code, final_mbpp = evals  # step 4's evaluation, then the final one
        for last, final in ((last_code, final_code), (last_mbpp, final_mbpp)):
            assert last["step"] == final["step"] == 4
            for key, value in last.items():
                if key.startswith("eval_") and not any(t in key for t in TIMING_KEYS):
                    assert final[key] == pytest.approx(value, rel=1e-9), key


def test_run_json_records_the_processes(runs):
    one, two = (json.loads((out / "run.json").read_text())["sharding"] for out in runs)
    assert one == {"world_size": 1, "strategy": "single"}
    assert two == {"world_size": 2, "strategy": "ddp"}
