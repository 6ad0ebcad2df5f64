"""summary.md of train.py: the specialisation section for token and sequence routing, the eval_spec_* metrics of
every evaluation, markers on short curves, and the wall time of short runs (issue 12, items 1 and 5)."""

import json
import re

import pytest
import torch

from dylora_moe.train.report import format_duration, plot_losses, plot_utilization, write_report


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 119.4, 150, 7199, 9000)] == [
        "0 s", "42 s", "119 s", "2.5 min", "120.0 min", "2.5 h",
    ]  # fmt: skip


def test_a_curve_with_one_point_has_markers(tmp_path):
    one = [{"step": 1, "loss": 2.0, "lm_loss": 2.0, "util_expert_0": 0.5, "util_expert_1": 0.5}]
    many = [dict(one[0], step=s) for s in range(1, 11)]
    fig = plot_losses(tmp_path / "a.png", one, {"mbpp": [(0, 2.5)]})
    assert fig.axes[0].lines[0].get_marker() == "o"
    assert plot_losses(tmp_path / "b.png", many, {}).axes[0].lines[0].get_marker() in ("None", None, "")
    final = {"mbpp": {"util": [0.5, 0.5]}}
    right = plot_utilization(tmp_path / "c.png", final, one, 2).axes[1]
    assert [line.get_marker() for line in right.lines] == ["o", "o"]


def test_report_without_specialisation_has_no_section(tmp_path):
    metrics = {"eval_mbpp_loss": 2.0, "eval_mbpp_util_expert_0": 1.0, "eval_mbpp_router_entropy": 0.0}
    path = write_report(
        tmp_path, initial=metrics, final=metrics, domains=["mbpp"], num_experts=1, run_info={"wall time": "3 s"}
    )
    text = path.read_text()
    assert "## Evaluation per domain" in text and "## Specialisation" not in text


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_train_py_writes_the_specialisation_section(routing, tmp_path):
    from test_train import TINY, train

    torch.set_num_threads(1)
    argv = [*TINY, "--kernel", "eager", "--routing", routing, "--max_steps", "2", "--eval_steps", "1"]
    train.main([*argv, "--output_dir", str(tmp_path)])
    summary = (tmp_path / "summary.md").read_text()
    for heading in (
        "## Specialisation (final model, evaluation splits)",
        "| domain | expert 0 | expert 1 | effective experts | router entropy (nats/token) |",
        "![domain x expert over evaluations](specialisation.png)",
        "| rank | expert 0 | expert 1 |",
        "![tokens coloured by top expert](routing_examples.png)",
    ):
        assert heading in summary, heading
    assert ("sequence's expert weights" in summary) == (routing == "sequence")
    assert re.search(r"- wall time: \d+ s\n", summary)  # a short run prints seconds
    for name in ("specialisation.png", "routing_examples.png", "routing_examples.html"):
        assert (tmp_path / name).stat().st_size > 0, name

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "eval_mbpp_loss" in r]  # before training, at steps 1 and 2, final
    spec = [r for r in records if "eval_spec_nmi" in r]
    assert [r["step"] for r in spec] == [r["step"] for r in evaluations] == [0, 1, 2, 2]
    for r in spec:
        assert 0.0 <= r["eval_spec_nmi"] <= 1.0 and r["eval_spec_load_max_over_mean"] >= 1.0
        for domain in ("code_alpaca", "mbpp"):
            shares = [r[f"eval_spec_{domain}_share_expert_{e}"] for e in range(2)]
            assert sum(shares) == pytest.approx(1.0)
    if routing == "token":  # at top_k = 1 the mass shares are the pick shares the evaluation already logs
        final = evaluations[-1]
        assert spec[-1]["eval_spec_mbpp_share_expert_1"] == pytest.approx(final["eval_mbpp_util_expert_1"], rel=1e-6)
