"""Offline sweeps (issue 12, item 4): grid parsing, a failing configuration reported and not fatal, the wandb YAML,
and a two-configuration sweep of train.py end to end on the CPU."""

import json
import logging
import sys
import textwrap

import pytest

from dylora_moe.train.sweep import (
    RunResult,
    SweepError,
    config_argv,
    config_name,
    configurations,
    parse_grid,
    read_run,
    run_sweep,
    strip_flags,
)


def test_parse_grid_and_configurations():
    axes = parse_grid("num_experts=2,4,8 --top_k=1,2 temperature=1,2")
    assert axes == {"num_experts": ["2", "4", "8"], "top_k": ["1", "2"], "temperature": ["1", "2"]}
    configs = configurations(axes)
    assert len(configs) == 12 and configs[0] == {"num_experts": "2", "top_k": "1", "temperature": "1"}
    assert configs[1] == {"num_experts": "2", "top_k": "1", "temperature": "2"}  # the last flag varies fastest
    assert config_name(configs[-1]) == "num_experts-8_top_k-2_temperature-2"
    assert config_name({"model_name": "org/model x"}) == "model_name-org-model-x"
    assert config_argv({"top_k": "2", "freeze_router": "true", "bf16": "False"}) == ["--top_k", "2", "--freeze_router"]


@pytest.mark.parametrize(
    "grid,message",
    [
        ("num_experts", "expected flag=value"),
        ("num_experts=", "expected flag=value"),
        ("top_k=1 top_k=2", "given twice"),
        ("output_dir=a,b", "set by the sweep itself"),
        ("num_expert=2,4", "'num_expert' is not a train.py flag"),
        ("   ", "empty sweep grid"),
    ],
)
def test_bad_grids_are_named(grid, message):
    with pytest.raises(SweepError, match=message):
        parse_grid(grid, known_flags=["--num_experts", "--top_k", "--output_dir", "-h", "--help"])


def test_strip_flags():
    argv = ["--sweep", "top_k=1,2", "--max_steps", "3", "--output_dir=/x", "--output_dir", "/y", "--bf16"]
    assert strip_flags(argv, ["sweep", "output_dir"]) == ["--max_steps", "3", "--bf16"]


FAKE_TRAIN = """
import json, sys
args = sys.argv[1:]
out = args[args.index("--output_dir") + 1]
top_k = int(args[args.index("--top_k") + 1])
if top_k > 2:
    sys.exit("error: --top_k must be in [1, --num_experts=2], got 3")
records = [
    {"step": 1, "loss": 3.0, "tokens_per_s": 100.0 * top_k},
    {"step": 1, "tokens_per_s": 300.0 * top_k, "loss": 2.5},
    {"step": 1, "eval_mbpp_loss": 9.0, "eval_mbpp_router_entropy": 9.0, "eval_mbpp_runtime": 1},
    {"step": 1, "eval_mbpp_loss": 2.0 / top_k, "eval_mbpp_router_entropy": 0.5, "eval_mbpp_runtime": 1,
     "eval_mbpp_balance_loss": 0.01},  # not a domain called "mbpp_balance"
    {"step": 1, "eval_code_alpaca_loss": 1.0 / top_k, "eval_code_alpaca_router_entropy": 0.25,
     "eval_code_alpaca_runtime": 1},
    {"step": 1, "eval_spec_nmi": 0.1 * top_k, "eval_spec_load_max_over_mean": 1.5, "eval_spec_expert_entropy": 0.5,
     "eval_spec_nmi_above_chance": 0.05},
]
open(out + "/metrics.jsonl", "w").write("\\n".join(json.dumps(r) for r in records))
open(out + "/summary.md", "w").write("# summary")
"""


def test_failed_configuration_is_reported_not_fatal(tmp_path, caplog):
    script = tmp_path / "fake_train.py"
    script.write_text(textwrap.dedent(FAKE_TRAIN))
    with caplog.at_level(logging.INFO, logger="dylora_moe.train.sweep"):
        path = run_sweep(
            "top_k=1,3,2", ["--max_steps", "1", "--sweep", "x", "--output_dir", "old"], tmp_path, script=script
        )
    assert caplog.records[-1].getMessage() == (
        f"sweep done: 3 configurations, 2 finished, 1 failed; table: {tmp_path / 'sweep.md'}, "
        f"plot: {tmp_path / 'sweep.png'}"
    )
    text = path.read_text()
    assert "- configurations: 3 (2 finished, 1 failed)" in text
    assert "- other flags: `--max_steps 1`" in text
    # final numbers: the last evaluation per domain, the mean training speed, the mean router entropy of the domains
    header = "| configuration | status | code_alpaca loss | mbpp loss | load max×E | load entropy | effective experts |"
    assert header + " MI (norm.) | MI above chance | router entropy | tokens/s |" in text
    assert "| top_k=1 | ok | 1.0000 | 2.0000 | 1.50 | 0.500 | — | 0.100 | 0.050 | 0.375 | 200 |" in text
    assert "| top_k=2 | ok | 0.5000 | 1.0000 | 1.50 | 0.500 | — | 0.200 | 0.050 | 0.375 | 400 |" in text
    assert "| top_k=3 | failed (1) | — | — | — | — | — | — | — | — | — |" in text
    failure = "- `top_k=3`: exit 1: error: --top_k must be in [1, --num_experts=2], got 3 (log: top_k-3.failed.log)"
    assert failure in text
    assert not (tmp_path / "top_k-3").exists()  # the failed configuration's folder is gone, its log kept
    assert (tmp_path / "top_k-3.failed.log").read_text().startswith("$ ")
    assert "[top_k-1](top_k-1/summary.md)" in text
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (tmp_path / "top_k-2" / "train.log").read_text()
    assert log.startswith(f"$ {sys.executable} {script} --max_steps 1 --top_k 2 --output_dir {tmp_path / 'top_k-2'}")
    yaml = (tmp_path / "sweep_wandb.yaml").read_text()
    for line in (
        "program: train.py",
        "method: grid",
        "  name: eval/code_alpaca_loss",
        "  top_k:\n    values: [1, 3, 2]",
        '  model_name:\n    value: "google/codegemma-2b"',
        "  bf16:\n    value: true",
        "  - ${args_no_boolean_flags}",
    ):
        assert line in yaml, line


def test_wandb_yaml_is_valid_yaml(tmp_path):
    yaml = pytest.importorskip("yaml")
    from dylora_moe.train.sweep import wandb_sweep_yaml

    config = yaml.safe_load(wandb_sweep_yaml(parse_grid("num_experts=2,4 routing=token,sequence"), [], "eval/x"))
    assert config["parameters"]["num_experts"] == {"values": [2, 4]}
    assert config["parameters"]["routing"] == {"values": ["token", "sequence"]}
    assert config["parameters"]["backend"] == {"value": "triton"} and config["metric"]["goal"] == "minimize"


@pytest.mark.slow
def test_two_configuration_sweep_of_train_py(tmp_path, monkeypatch):
    """train.py --sweep end to end: two tiny runs as processes, each in its own folder, compared in sweep.md."""
    from test_train import TINY, train

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = [*TINY, "--kernel", "eager", "--max_steps", "1", "--eval_subset", "2", "--output_dir", str(tmp_path)]
    result = train.main(["--sweep", "top_k=1,2", *argv])
    text = result["sweep"].read_text()
    assert "- configurations: 2 (2 finished, 0 failed)" in text, (tmp_path / "top_k-1" / "train.log").read_text()[
        -2000:
    ]
    for top_k in (1, 2):
        folder = tmp_path / f"top_k-{top_k}"
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        final = [r for r in records if "eval_mbpp_loss" in r][-1]
        nmi = [r for r in records if "eval_spec_nmi" in r][-1]["eval_spec_nmi"]
        row = next(line for line in text.splitlines() if line.startswith(f"| top_k={top_k} | ok |"))
        assert f"| {final['eval_mbpp_loss']:.4f} |" in row and f"| {nmi:.3f} |" in row
        assert f"top_k={top_k}" in (folder / "summary.md").read_text()
    assert list((tmp_path / "top_k-2").glob("tiny-*")), "the tiny base of the first run is reused"
    assert (tmp_path / "sweep.png").is_file() and (tmp_path / "sweep_wandb.yaml").is_file()


def test_a_killed_configurations_torn_metrics_line_is_left_out(tmp_path):
    """A run killed mid-write leaves a torn last line in metrics.jsonl: the sweep reads the valid rows."""
    record = {"eval_mbpp_loss": 2.5, "eval_mbpp_runtime": 0.1, "step": 4}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(record) + "\n" + '{"eval_mbpp_lo')
    result = read_run(RunResult({"top_k": "1"}, tmp_path, returncode=-9, seconds=1.0))
    assert result.losses == {"mbpp": 2.5}


def test_runs_use_the_package_not_a_script_path(tmp_path):
    """Each configuration runs ``python -m dylora_moe.train.cli`` of the package the sweep runs from (works from a
    wheel install, where there is no train.py)."""
    import subprocess
    from pathlib import Path

    from dylora_moe.train import sweep

    assert sweep.TRAIN_COMMAND == (sys.executable, "-m", "dylora_moe.train.cli")
    code = "import dylora_moe; print(dylora_moe.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=sweep._child_env(), cwd=tmp_path, capture_output=True)
    assert out.stdout.decode().strip() == str(Path(sweep.__file__).resolve().parents[1] / "__init__.py")


def test_sweep_plot_draws_points_on_an_axis_around_the_data(tmp_path):
    """Losses 0.02 apart are seen: points on an axis spanning the data, not bars from zero; one labelled row per
    configuration, a failed one marked."""
    from pathlib import Path

    from dylora_moe.train.sweep import plot_sweep

    results = [RunResult({"top_k": str(k)}, Path(tmp_path), 0, 1.0, losses={"mbpp": 7.60 + 0.02 * k}) for k in (1, 2)]
    results.append(RunResult({"top_k": "3"}, Path(tmp_path), 1, 1.0))
    loss = plot_sweep(tmp_path / "sweep.png", results).axes[0]
    assert not loss.patches  # no bars
    low, high = loss.get_xlim()
    assert 7.55 < low < 7.62 and 7.64 < high < 7.7
    assert [t.get_text() for t in loss.get_yticklabels()] == ["top_k=1", "top_k=2", "top_k=3 (failed)"]
