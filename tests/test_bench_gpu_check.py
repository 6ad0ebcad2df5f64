"""benchmarks/gpu_check.py, part (a) of ``run_gpu.sh quick``, rehearsed on the CPU (Triton's interpreter, tiny
shapes): it writes its JSON and markdown, passes on the kernels as they are, and fails on a kernel that is off."""

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import gpu_check  # noqa: E402


def test_first_cases_pass_and_are_written(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--limit", "3"]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] == 3 and report["failed"] == 0 and report["commit"]
    assert all(c["ok"] and max(c["errors"].values()) <= 1 for c in report["checks"])
    text = (tmp_path / "check.md").read_text()
    assert text.startswith("# Device check: ") and text.count("| ok |") == 3


def test_a_kernel_that_is_off_fails_the_check(tmp_path, monkeypatch):
    real = gpu_check.ops.moe_lora

    def off_by_one_percent(*args, backend, **kw):
        out = real(*args, backend=backend, **kw)
        return out * 1.01 if backend == "triton" else out

    monkeypatch.setattr(gpu_check.ops, "moe_lora", off_by_one_percent)
    assert gpu_check.main(["--out", str(tmp_path), "--limit", "1"]) == 1
    (case,) = json.loads((tmp_path / "check.json").read_text())["checks"]
    assert not case["ok"] and case["errors"]["y"] > 1
    assert "**FAIL**" in (tmp_path / "check.md").read_text()


def test_every_case_kind_is_listed_and_a_spent_budget_stops_cleanly(tmp_path):
    kinds = {(m["check"], m["provider"], m["variant"], m["x"], m["weights"]) for m, _ in gpu_check.cases()}
    low = "fp16" if not torch.cuda.is_available() else "bf16"
    assert ("moe_lora", "triton", "dropout+base+scaling", low, "fp32") in kinds
    assert ("moe_lora", "grouped_mm", "plain", low, "fp32") in kinds
    assert any(k[:3] == ("router", "triton", "-") for k in kinds)
    assert gpu_check.main(["--out", str(tmp_path), "--budget", "0"]) == 1
    assert "STOPPED: budget" in (tmp_path / "check.md").read_text()


def test_quick_refuses_to_mix_with_other_phases(tmp_path):
    run = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "run_gpu.sh"), "quick", "ops"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT_DIR": str(tmp_path)},
    )
    assert run.returncode == 2 and "unknown phase 'quick'" in run.stderr
