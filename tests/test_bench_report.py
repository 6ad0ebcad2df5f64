"""benchmarks/report.py: speed-up ratios, DESIGN 4 goal verdicts and the files it writes, on hand-made JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(median, *, minimum=None, group="g", **info):
    info = {"device": "cpu", "device_name": "test cpu", "dtype": "float32", "commit": "abc1234", "torch": "x", **info}
    return {"group": group, "extra_info": info, "stats": {"median": median, "min": minimum or median}}


def step(backend, routing, median, experts=4, mode="train", peak=None):
    extra = {"tokens_per_s": 512 / median} | ({} if peak is None else {"peak_mem_bytes": peak})
    return bench(
        median, kind="step", mode=mode, backend=backend, routing=routing, E=experts, shape="s", top_k=1, **extra
    )


def write(tmp_path, benchmarks, name="run.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"datetime": "2026-11-25T10:00:00+00:00", "benchmarks": benchmarks}))
    return path


def test_cpu_goals_met_and_not_met(report, tmp_path):
    # reference sequence 0.6 s; eager token 0.2 s (3x: met); eager sequence 0.7 s (slower: not met)
    runs = [step("reference", "sequence", 0.6), step("eager", "token", 0.2), step("eager", "sequence", 0.7)]
    rows, _ = report.load_rows([write(tmp_path, runs)])
    token, sequence = report.cpu_goals(rows)
    assert token["value"] == pytest.approx(3.0) and token["status"] == "MET"
    assert sequence["value"] == pytest.approx(0.6 / 0.7) and sequence["status"] == "NOT MET"


def test_cpu_goal_not_measured_without_reference(report, tmp_path):
    rows, _ = report.load_rows([write(tmp_path, [step("eager", "token", 0.2)])])
    assert [g["status"] for g in report.cpu_goals(rows)] == ["NOT MEASURED", "NOT MEASURED"]


def test_gpu_goals_use_cuda_event_times(report, tmp_path):
    def op(provider, host, cuda, mode="fwd+bwd", **extra):
        return bench(
            host,
            kind="moe_lora",
            provider=provider,
            mode=mode,
            shape="S",
            T=8192,
            d_in=4096,
            E=8,
            r=16,
            device="cuda",
            device_name="NVIDIA H100 80GB HBM3",
            cuda_event_median_s=cuda,
            **extra,
        )

    benchmarks = [
        op("triton", 1.0, 0.001, gbps=2680.0, saved_extra_elems=90, saved_bound_elems=100),
        op("triton", 1.0, 0.0005, mode="fwd", gbps=1000.0),
        op("loop", 1.0, 0.006),  # 6x slower than triton by CUDA events although host times are equal
        op("lora_dense", 1.0, 0.0009),
        op("base", 1.0, 0.010),
        op("base+moe_lora", 1.0, 0.0125),
    ]
    rows, _ = report.load_rows([write(tmp_path, benchmarks)])
    goals = {g["name"]: g for g in report.gpu_goals(rows, bandwidth=3350.0)}

    def find(fragment):
        (match,) = [g for name, g in goals.items() if fragment in name]
        return match

    assert find("loop over experts")["value"] == pytest.approx(6.0) and find("loop over experts")["status"] == "MET"
    assert find("plain eager LoRA")["value"] == pytest.approx(0.9) and find("plain eager LoRA")["status"] == "NOT MET"
    assert find("MoE-LoRA fwd+bwd S: LoRA bytes")["value"] == pytest.approx(0.8)
    assert find("MoE-LoRA fwd S: LoRA bytes")["status"] == "NOT MET"
    linear = find("base linear alone")
    assert linear["value"] == pytest.approx(1.25) and linear["status"] == "NOT MET"
    assert find("saved extra")["status"] == "MET"
    assert find("vs single-adapter peft LoRA, tokens/s")["status"] == "NOT MEASURED"  # no step rows in this run


def test_main_writes_report_and_plots(report, tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (a dev extra)")
    ops = [
        bench(0.002, group="moe_lora S fwd", kind="moe_lora", provider="eager", mode="fwd", shape="S", k=2),
        bench(0.008, group="moe_lora S fwd", kind="moe_lora", provider="loop", mode="fwd", shape="S", k=2),
    ]
    steps = [step("reference", "sequence", 0.6, peak=200), step("eager", "token", 0.2, peak=100)]
    steps.append(bench(0.1, kind="step", mode="train", backend="peft", routing="-", E=1, shape="s", peak_mem_bytes=80))
    out = tmp_path / "out"
    files = [str(write(tmp_path, ops, "a.json")), str(write(tmp_path, steps, "b.json"))]
    path = report.main([*files, "--out-dir", str(out)])
    assert path == out / "cpu-2026-11-25.md"
    text = path.read_text()
    assert "| loop | 8.000 | 8.000 | 0.25x | 1.00x | - | - | - |" in text  # eager is 4x faster than the loop
    assert "| 4 | token | eager | 200.0 |" in text and "**MET**" in text
    assert {p.name for p in out.glob("*.png")} == {f"cpu-2026-11-25-{n}.png" for n in ("ops", "step", "memory")}
