"""summary.md of train.py: the specialisation section for token and sequence routing, the eval_spec_* metrics of
every evaluation, markers on short curves, and the wall time of short runs (issue 12, items 1 and 5)."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dylora_moe.train.report import format_duration, plot_losses, plot_utilization, write_report
from dylora_moe.train.specialisation import Example, collect_specialisation
from dylora_moe.train.specialisation_report import EXAMPLE_TOKENS, example_labels, layout_tokens, plot_examples


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 42, 119.4, 150, 7199, 9000)] == [
        "0 s", "42 s", "119 s", "2.5 min", "120.0 min", "2.5 h",
    ]  # fmt: skip


def test_a_curve_with_one_point_has_markers(tmp_path):
    one = [{"step": 1, "loss": 2.0, "lm_loss": 2.0, "util_expert_0": 0.5, "util_expert_1": 0.5}]
    many = [dict(one[0], step=s) for s in range(1, 21)]
    fig = plot_losses(tmp_path / "a.png", one, {"mbpp": [(0, 2.5)]})
    assert fig.axes[0].lines[0].get_marker() == "o"
    assert plot_losses(tmp_path / "b.png", many, {}).axes[0].lines[0].get_marker() in ("None", None, "")
    final = {"mbpp": {"util": [0.5, 0.5]}}
    right = plot_utilization(tmp_path / "c.png", final, one, 2).axes[1]
    assert [line.get_marker() for line in right.lines[:2]] == ["o", "o"]  # the last line: the even load


def test_one_logged_step_is_drawn_on_an_honest_axis(tmp_path):
    """A single logged step: whole steps from 0 on x (not 0.96-1.04), shares from 0 on y with the even load drawn."""
    one = [{"step": 1, "loss": 2.0, "util_expert_0": 0.3, "util_expert_1": 0.7}]
    right = plot_utilization(tmp_path / "u.png", {"mbpp": {"util": [0.3, 0.7]}}, one, 2).axes[1]
    low, high = right.get_xlim()
    assert low < 0 and high > 1 and right.get_ylim()[0] == 0
    assert all(float(t).is_integer() for t in right.get_xticks())
    assert any(line.get_label() == "even load (1/2)" for line in right.lines)


def test_summary_says_each_thing_once(tmp_path):
    """The per-domain shares appear once (in the specialisation section), the load figures once (load section)."""
    from test_specialisation import _datasets, _model, _tokenizer

    stats = collect_specialisation(_model("token"), _datasets(), batch_size=4)
    metrics = {}
    for domain in ("alpha", "beta"):
        metrics |= {f"eval_{domain}_loss": 2.0, f"eval_{domain}_router_entropy": 0.5}
        metrics |= {f"eval_{domain}_util_expert_{e}": 1 / 3 for e in range(3)}
    path = write_report(
        tmp_path, initial=metrics, final=metrics, domains=["alpha", "beta"], num_experts=3,
        run_info={"wall time": "3 s"}, specialisation=stats, tokenizer=_tokenizer(),
    )  # fmt: skip
    text = path.read_text()
    assert "## Expert utilisation per domain" not in text and "- load: largest expert share" not in text
    assert text.count("Largest expert share x E over all evaluation tokens") == 1
    rows = [line for line in text.splitlines() if line.startswith("| alpha |")]
    assert len(rows) == 2  # the evaluation table and the specialisation table, nothing repeated
    assert text.count("| domain | expert 0 | expert 1 | expert 2 |") == 1


def test_routing_examples_are_text_labelled_within_their_domain(tmp_path):
    class Letters:
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    mass = np.eye(2)[np.arange(200) % 2]
    stats = SimpleNamespace(
        examples=[Example("alpaca", list(range(5)), mass[:5]), Example("mbpp", list(range(200)), mass)],
        routing="token",
        num_experts=2,
    )
    assert example_labels(["alpaca", "alpaca", "mbpp", "alpaca"]) == ["alpaca 1", "alpaca 2", "mbpp 1", "alpaca 3"]
    fig = plot_examples(tmp_path / "e.png", stats, Letters())
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "alpaca 1 (all 5 tokens)" in texts
    assert f"mbpp 1 (first {EXAMPLE_TOKENS} of 200 tokens)" in texts
    assert texts.count("c") == 1 + EXAMPLE_TOKENS // 26 + (EXAMPLE_TOKENS % 26 > 2)  # every token drawn as text
    assert f"at most {EXAMPLE_TOKENS} tokens per row" in fig._suptitle.get_text()
    assert layout_tokens(["ab", "c\n", "def"], 4) == [(0, 0, "ab"), (0, 2, "c↵"), (1, 0, "def")]


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
