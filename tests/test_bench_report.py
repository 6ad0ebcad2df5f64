"""Benchmark data pipeline: the CSV writer (records.py), the goal table (report.py), the plots (visualize.py), the
committed data (its goal figures are the ones the old reports printed) and one benchmark writing its rows."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the checkout, not of the installed package

from benchmarks import records, report  # noqa: E402


def row(op="step", provider="eager", metric="time", value=1.0, mode="full", vmin=None, vmax=None, run="r1", **shape):
    return records.make_row(
        op=op,
        provider=provider,
        mode=mode,
        metric=metric,
        x_name="E",
        x_value=shape.get("E", 1),
        value=value,
        value_min=value if vmin is None else vmin,
        value_max=value if vmax is None else vmax,
        shape=shape,
        info={"memory_method": "test"},
        dtype="float32",
        device="cpu" if "cpu" in run else "cuda",
        device_name="test cpu" if "cpu" in run else "Test GPU H100",
        commit="abc1234",
        torch="2.x",
        triton="3.x",
        run_id=run,
        timestamp=f"2026-11-25T10:00:0{run[-1]}Z",
    )


def roundtrip(tmp_path, rows):
    path = tmp_path / "data.csv"
    records.append_rows(path, rows)
    return records.read_rows(path)


def test_writer_appends_under_one_header_and_reads_back_typed(tmp_path):
    path = tmp_path / "sub" / "data.csv"
    records.append_rows(path, [row(value=2.5, E=4, routing="token")])
    records.append_rows(path, [row(metric="memory_extra", value=3.0, E=4, routing="token")])
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(records.COLUMNS) and len(lines) == 3  # header written once
    first, second = records.read_rows(path)
    assert first["value"] == 2.5 and first["unit"] == "ms" and second["unit"] == "MiB"
    assert first["shape"] == {"E": 4, "routing": "token"} and first["x_value"] == 4.0
    assert first["info"] == {"memory_method": "test"}


def test_writer_refuses_other_schema_and_unknown_metric(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("kernel_name,value\nx,1\n")
    with pytest.raises(ValueError, match="not the benchmark schema"):
        records.append_rows(path, [row()])
    with pytest.raises(ValueError, match="unknown metric 'speed'"):
        row(metric="speed")
    with pytest.raises(ValueError, match="missing columns"):
        records.make_row(metric="time", value=1.0)


def test_runs_keeps_the_newest_run_per_device(tmp_path):
    rows = roundtrip(tmp_path, [row(run="cpu1"), row(run="cpu2", value=9.0), row(run="gpu1")])
    newest = records.runs(rows)
    assert list(newest) == ["cpu2", "gpu1"]
    assert list(records.runs(rows, run_id="cpu1")) == ["cpu1"]
    assert list(records.runs(rows, device="h100")) == ["gpu1"]


def verdicts(rows, text_fragment):
    """Every (median, best) verdict of the goals whose text contains the fragment, for this run's device."""
    found = []
    for goal in report.GOALS:
        if text_fragment in goal.text and goal.device == rows[0]["device"]:
            found += list(zip(goal.evaluate(rows), goal.evaluate(rows, best=True)))
    return found


def test_cpu_goals_met_not_met_and_not_measured(tmp_path):
    # reference sequence 600 ms; eager token 200 ms (3x: met); eager sequence 700 ms (slower: not met, but its best
    # time 500 ms would meet it: the "at best" column shows a miss that noise could explain)
    rows = roundtrip(
        tmp_path,
        [
            row(provider="reference", value=600.0, run="cpu1", E=4, routing="sequence"),
            row(provider="eager", value=200.0, run="cpu1", E=4, routing="token"),
            row(provider="eager", value=700.0, vmin=500.0, run="cpu1", E=4, routing="sequence"),
            row(provider="eager", value=1.0, run="cpu1", E=2, routing="token"),  # another E: ignored
        ],
    )
    ((token, _),) = verdicts(rows, "eager token routing")
    ((sequence, sequence_best),) = verdicts(rows, "eager sequence routing")
    assert token["value"] == pytest.approx(3.0) and token["status"] == "MET"
    assert sequence["value"] == pytest.approx(600 / 700) and sequence["status"] == "NOT MET"
    assert sequence_best["value"] == pytest.approx(600 / 500) and sequence_best["status"] == "MET"
    no_reference = roundtrip(tmp_path / "b", [row(provider="eager", value=2.0, run="cpu1", E=4, routing="token")])
    assert [m["status"] for m, _ in verdicts(no_reference, "CPU")] == ["NOT MEASURED", "NOT MEASURED"]
    table = "\n".join(report.goal_table(rows))
    assert "| 3 | 3 | >= 2.5 | **MET** |" in table and "triton" not in table  # GPU goals are not in a CPU run


def test_gpu_op_goals_per_k_prefer_kernel_time_and_use_device_constants(tmp_path):
    ref = dict(T=8192, d_in=4096, d_out=4096, E=8, r=16)

    def op(provider, metric, value, k=2, mode="full"):
        return row(op="moe_lora", provider=provider, metric=metric, value=value, mode=mode, run="gpu1", k=k, **ref)

    rows = roundtrip(
        tmp_path,
        [
            op("triton", "time", 1.0),  # host time: equal for both, the kernel clock decides
            op("loop", "time", 1.0),
            op("triton", "kernel_time", 0.1),
            op("loop", "kernel_time", 0.6),
            op("triton", "kernel_time", 0.1, k=8),
            op("loop", "kernel_time", 0.4, k=8),
            op("triton", "bandwidth", 2680.0),  # 0.8 of an H100's 3350 GB/s
            op("triton", "saved_elems", 8192 * (8 * 16 + 4) + 1),  # one element over the bound
        ],
    )
    (k2, _), (k8, _) = verdicts(rows, "eager loop over experts")
    assert (k2["goal"], k2["status"]) == ("op fwd+bwd k=2: triton vs eager loop over experts", "MET")
    assert k2["value"] == pytest.approx(6.0)  # by kernel time: the host times are equal
    assert (k8["goal"], k8["status"]) == ("op fwd+bwd k=8: triton vs eager loop over experts", "NOT MET")
    assert k8["value"] == pytest.approx(4.0)
    (bandwidth_k2, _), (bandwidth_k8, _) = verdicts(rows, "fwd+bwd k={k}: LoRA bytes")
    assert bandwidth_k2["value"] == pytest.approx(0.8) and bandwidth_k2["status"] == "MET"
    assert bandwidth_k8["status"] == "NOT MEASURED"
    (saved_k2, _), _ = verdicts(rows, "saved-for-backward")
    assert saved_k2["status"] == "NOT MET"
    ((peft, _),) = verdicts(rows, "single-adapter peft LoRA, tokens/s")
    assert peft["status"] == "NOT MEASURED"  # no step rows in this run


def test_visualizer_draws_lines_and_bars(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the train extra)")
    from benchmarks import visualize

    rows = roundtrip(
        tmp_path,
        [
            row(provider=p, value=v * e, E=e, routing="token")
            for p, v in (("eager", 1.0), ("triton", 0.5))
            for e in (2, 4)
        ]
        + [row(op="router", provider=p, mode="fwd", value=v, E=8) for p, v in (("eager", 2.0), ("torch_seq", 3.0))],
    )
    for r in rows[4:]:
        r["x_name"], r["x_value"] = "case", "T32768-E8-k2"
    steps = visualize.select(rows, "step", "time", "full", {"routing": "token"})
    assert len(steps) == 4
    lines = visualize.plot(steps, tmp_path / "steps.png")
    bars = visualize.plot(visualize.select(rows, "router", "time", "fwd"), tmp_path / "router.png")
    for png in (lines, bars):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    both = steps + roundtrip(tmp_path / "b", [row(provider="eager", value=9.0, E=2, routing="sequence")])
    assert sorted(visualize.series_of(both)) == [
        "eager routing=sequence",
        "eager routing=token",
        "triton routing=token",
    ]
    assert visualize.main(["--op", "step", "--data", str(tmp_path / "data.csv"), "--out", str(tmp_path / "cli.png")])
    with pytest.raises(ValueError, match="no benchmark rows"):
        visualize.plot([], tmp_path / "none.png")


def test_committed_data_regenerates_the_recorded_goal_figures():
    """benchmarks/data holds the CPU (0b7407f) and H100 (d577555) runs converted from benchmarks/results/*.json: the
    goal table computed from the rows gives the figures the old Markdown reports printed."""
    rows = records.read_rows(records.COMMITTED_CSV)
    (cpu,) = records.runs(rows, run_id="2026-11-25T09:54:54Z").values()
    (h100,) = records.runs(rows, run_id="2026-11-25T10:01:20Z").values()
    assert {r["commit"] for r in h100} == {"d577555"} and {r["commit"] for r in cpu} == {"0b7407f+dirty"}
    figures = [
        ("eager token routing", cpu, 3.57),
        ("eager sequence routing", cpu, 1.60),
        ("eager loop over experts", h100, 5.37),
        ("ONE plain eager LoRA", h100, 0.276),
        ("layer fwd+bwd", h100, 3.06),
        ("triton time (us)", h100, 49.4),
        ("original algorithm", h100, 2.57),
        ("triton peak memory / single-adapter", h100, 0.949),
        ("triton peak memory / reference", h100, 0.815),
    ]
    for fragment, run, expected in figures:
        median, _ = verdicts(run, fragment)[0]
        assert median["value"] == pytest.approx(expected, rel=5e-3), fragment
    text = report.build_report(rows, run_id="2026-11-25T10:01:20Z")
    assert "## NVIDIA H100 80GB HBM3: run 2026-11-25T10:01:20Z" in text and "**NOT MET**" in text


@pytest.mark.slow
def test_a_benchmark_appends_its_rows(tmp_path):
    """One real benchmark (plain LoRA forward), run as the suite runs: its rows land in --bench-csv, not in
    benchmarks/data."""
    out = tmp_path / "rows.csv"
    before = records.COMMITTED_CSV.read_bytes()
    env = {**os.environ, "BENCH_RUN_ID": "test-run", "OMP_NUM_THREADS": "1"}
    select = "test_moe_lora and lora_dense and fwd and k2"
    command = [sys.executable, "-m", "pytest", "benchmarks/test_ops.py", "--benchmark-only", "-q", "-p",
               "no:cacheprovider", "-k", select, "--bench-csv", str(out)]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with out.open() as f:
        written = list(csv.DictReader(f))
    metrics = {r["metric"] for r in written}
    assert {"time", "memory_extra", "bandwidth"} <= metrics
    assert {(r["op"], r["provider"], r["mode"], r["run_id"]) for r in written} == {
        ("moe_lora", "lora_dense", "fwd", "test-run")
    }
    assert records.COMMITTED_CSV.read_bytes() == before


def test_one_colour_per_provider_and_plain_ticks(tmp_path):
    """Case labels that name E and k already: one series (one colour) per provider, not one per E and k; the log
    axis reads 0.5, 1, 2, 5 instead of 4x10^0."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the train extra)")
    import matplotlib.pyplot as plt

    from benchmarks import visualize

    cases = {"E8-k2": (8, 2), "E64-k2": (64, 2), "E8-k8": (8, 8)}
    rows = roundtrip(
        tmp_path,
        [row(op="moe_lora", provider=p, value=v * e, E=e, k=k) for p, v in (("loop", 1.0), ("triton", 0.1))
         for e, k in cases.values()],
    )  # fmt: skip
    for r in rows:
        r["x_name"], r["x_value"] = (
            "case",
            next(c for c, (e, k) in cases.items() if (e, k) == (r["shape"]["E"], r["shape"]["k"])),
        )
    assert sorted(visualize.series_of(rows)) == ["loop", "triton"]
    drawn = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn.append(fig)
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt.Figure, "savefig", keep)
        visualize.plot(rows, tmp_path / "cases.png")
    ax = drawn[0].axes[0]
    assert len({tuple(bar.get_facecolor()) for bar in ax.patches}) == 2
    formatter = ax.yaxis.get_major_formatter()
    assert [formatter(v, 0) for v in (0.5, 4.0, 50.0)] == ["0.5", "4", "50"]


def test_visualizer_plots_the_run_just_measured(tmp_path, monkeypatch):
    """Without --data, the local run (benchmarks/out/, what `pytest benchmarks/` writes) is plotted, not the committed
    history; without a local run, the committed history."""
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the train extra)")
    from benchmarks import visualize

    roundtrip(tmp_path, [row(provider="eager", value=1.0, E=e, routing="token") for e in (2, 4)])
    monkeypatch.setattr(visualize, "LOCAL_CSV", tmp_path / "data.csv")
    seen = []
    monkeypatch.setattr(visualize, "read_rows", lambda *paths: seen.extend(paths) or records.read_rows(*paths))
    visualize.main(["--op", "step", "--out", str(tmp_path / "local.png")])
    assert seen == [tmp_path / "data.csv"] and (tmp_path / "local.png").is_file()
    monkeypatch.setattr(visualize, "LOCAL_CSV", tmp_path / "absent.csv")
    seen.clear()
    visualize.main(["--op", "step", "--out", str(tmp_path / "committed.png")])
    assert seen == [records.COMMITTED_CSV]


def test_case_tables_state_what_each_provider_adds_to_the_frozen_base():
    shape = dict(T=8, d_in=4, d_out=4, E=2, r=2, k=1)
    rows = [
        {**row(op="moe_lora", provider=p, value=v, **shape), "shape": shape, "info": {}}
        for p, v in (("base", 4.0), ("eager", 1.0), ("grouped_mm", 2.0), ("base+moe_lora", 5.0))
    ]
    text = "\n".join(report.case_tables(rows))
    assert "adds to base (%)" in text
    assert "| eager | 1 | 1 | 25 |" in text  # the delta alone: 1 / 4
    assert "| grouped_mm | 2 | 0.5 | 50 |" in text
    assert "| base+moe_lora | 5 | 0.2 | 25 |" in text  # includes the base: 5 / 4 - 1
    assert "| base | 4 | 0.25 | - |" in text
    assert "Experts (base+moe_lora) add 25% to the frozen base layer (same run, time)." in text
    step = [
        {**row(provider=p, value=v, E=e, routing=r), "shape": {"E": e, "routing": r, "h": 1}, "info": {}}
        for p, v, e, r in (("base", 10.0, 0, "-"), ("eager", 13.0, 4, "token"), ("peft", 11.0, 1, "-"))
    ]
    text = "\n".join(report.case_tables(step))
    assert "| 4 | token | eager | 13 | - | 30 |" in text and "| 1 | - | peft | 11 | - | 10 |" in text
    assert "Experts (eager) add 30% to the frozen base model's step" in text
    no_base = "\n".join(report.case_tables(rows[1:2]))
    assert "adds to base" not in no_base
