"""train.py --code_eval: the functional evaluation after training lands in summary.md, code_eval.* and the metrics."""

import json

import pytest
from train_support import TINY

from dylora_moe.evaluate import BENCHMARKS
from dylora_moe.train import args as train_args
from dylora_moe.train import cli as train
from dylora_moe.train.runs import RUN_OUTPUTS


def test_the_flag_knows_the_evaluators_benchmarks():
    assert train_args.CODE_EVAL_BENCHMARKS == BENCHMARKS


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--code_eval", "mbpp,bogus"], "--code_eval: expected benchmarks among mbpp, humaneval"),
        (["--code_eval", "mbpp", "--code_eval_limit", "0"], "--code_eval_limit: expected an integer >= 1"),
        (["--code_eval_max_new_tokens", "0"], "--code_eval_max_new_tokens: expected an integer >= 1"),
    ],
)
def test_bad_values_exit_2_before_anything_is_written(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main([*TINY, *flags, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_code_eval_after_training(tmp_path):
    out = tmp_path / "out"
    flags = ["--code_eval", "mbpp,humaneval", "--code_eval_limit", "1", "--code_eval_max_new_tokens", "4"]
    result = train.main([*TINY, "--backend", "eager", "--max_steps", "1", *flags, "--output_dir", str(out)])
    metrics = result["code_eval"]
    for bench in ("mbpp", "humaneval"):
        for routing in ("base", "learned", "expert_0", "expert_1", "oracle"):
            assert 0.0 <= metrics[f"code_eval/{bench}/{routing}/pass@1"] <= 1.0
    assert "## Functional evaluation" in (out / "summary.md").read_text()
    samples = [json.loads(line) for line in (out / "code_eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4  # one problem per benchmark x (base, learned, two experts)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("code_eval/mbpp/learned/pass@1" in row for row in logged)
    assert {"code_eval.json", "code_eval.md", "code_eval_samples.jsonl"} <= set(RUN_OUTPUTS)


def test_a_machine_without_isolation_is_refused_before_training(tmp_path, monkeypatch):
    from dylora_moe.evaluate import execution

    def unavailable(limits=execution.Limits()):
        raise execution.SandboxUnavailableError("refusing to run untrusted code without kernel isolation (test)")

    monkeypatch.setattr(execution, "isolation_level", unavailable)
    out = tmp_path / "out"
    with pytest.raises(execution.SandboxUnavailableError, match="without kernel isolation"):
        train.main([*TINY, "--max_steps", "1", "--code_eval", "mbpp", "--output_dir", str(out)])
    assert not out.exists()  # nothing trained, nothing written
