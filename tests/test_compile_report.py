"""The kernels fit real GPUs, shown without one: every kernel variant at its largest tiles, compiled by Triton for
sm_86 (99 KiB of shared memory per block: RTX 3090/4090, A10, L4) and sm_90 (H100) on the CPU, compiles, spills
nothing in bf16/fp16 (fp32 within compile_report.FP32_SPILL_BOUND) and stays within each target's shared memory
per block; plus the occupancy arithmetic and the path cost model they are read with."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from dylora_moe.kernels import compile_report, configs, cost, paths
from dylora_moe.kernels.device import KIB, TARGETS, occupancy, pretend_device

KERNELS = {
    "_stacked_fwd_kernel", "_stacked_dy_kernel", "_stacked_weights_kernel",
    "_grouped_fwd_kernel", "_grouped_dy_kernel", "_grouped_weights_kernel",
    "_topk_route_fwd_kernel", "_topk_route_bwd_kernel", "_route_stats_kernel",
}  # fmt: skip
READS_LORA_WEIGHTS = KERNELS - {"_grouped_weights_kernel", "_topk_route_fwd_kernel", "_topk_route_bwd_kernel",
                                "_route_stats_kernel"}  # fmt: skip


@pytest.fixture(scope="module")
def ci_report(tmp_path_factory):
    """The CI grid compiled in a subprocess without TRITON_INTERPRET (the interpreter replaces the compiler), on
    two worker processes: 328 compilations, 88 s with a cold Triton cache on 2 shared cores (8 s warm)."""
    out = tmp_path_factory.mktemp("compile") / "report"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    cmd = [sys.executable, "-m", "dylora_moe.kernels.compile_report", "--grid", "ci", "--targets",
           ",".join(compile_report.CI_TARGETS), "--jobs", "2", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert os.path.exists(f"{out}.json.gz"), done.stdout + done.stderr
    return compile_report.read(f"{out}.json.gz"), done


def test_every_kernel_variant_compiles_for_sm86_and_sm90_without_spills_within_shared_memory(ci_report):
    report, done = ci_report
    rows = report["rows"]
    problems = [
        f"{r['target']} {r['kernel']} {r['dtype']} {r['config']}: {r['problems']}" for r in rows if r["problems"]
    ]
    assert not problems, "\n".join(problems)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for target in compile_report.CI_TARGETS:
        seen = {(r["kernel"], r["dtype"]) for r in rows if r["target"] == target}
        assert {k for k, _ in seen} == KERNELS
        for kernel in KERNELS - {"_route_stats_kernel"}:  # the statistics kernel reads only fp32/int32 partials
            assert {d for k, d in seen if k == kernel} == {"float32", "bfloat16", "float16"}, kernel
        precisions = {(r["kernel"], r["dtype"], r["weights"]) for r in rows if r["target"] == target}
        for kernel in READS_LORA_WEIGHTS:  # the training default: fp32 masters under bf16 / fp16 activations
            assert {(kernel, "bfloat16", "float32"), (kernel, "float16", "float32")} <= precisions, kernel
        flag_sets = {(r["kernel"], json.dumps(r["flags"], sort_keys=True)) for r in rows if r["target"] == target}
        for flag in ("HAS_BASE", "HAS_SCALE_VEC"):  # with and without, in the forward of the stacked path
            assert {json.loads(f).get(flag) for k, f in flag_sets if k == "_stacked_fwd_kernel"} == {True, False}
        for r in rows:
            assert r["regs"] <= 255 and r["shared"] <= TARGETS[r["target"]].shared_per_block
            assert r["blocks_per_sm"] >= 1


def test_report_checks_catch_spills_and_shared_memory_over_the_limit():
    spec = TARGETS["sm_86"]
    row = dict(error=None, shared=100 * KIB, spill=0, dtype="bfloat16")
    assert "shared" in compile_report.check(row, spec)[0]
    row.update(shared=48 * KIB, spill=16)
    assert "spills 16 B" in compile_report.check(row, spec)[0]
    row.update(spill=0)
    assert compile_report.check(row, spec) == []
    assert compile_report.check(dict(row, error="boom"), spec) == ["compile failed: boom"]


def test_occupancy_follows_registers_shared_memory_and_threads():
    spec = TARGETS["sm_90"]  # 64 warp slots, 65536 registers, 228 KiB shared per SM
    assert occupancy(spec, 4, 128, 0) == (4, 0.25)  # registers: 65536 / (128 * 128 threads) = 4 blocks
    assert occupancy(spec, 4, 32, 100 * KIB)[0] == 2  # shared memory: 228 KiB / (100 + 1) KiB
    assert occupancy(spec, 8, 32, 0) == (8, 1.0)  # threads: 2048 / 256
    assert occupancy(TARGETS["sm_86"], 4, 64, 100 * KIB) == (0, 0.0)  # over the 99 KiB per block: no launch


def test_cost_model_prefers_stacked_for_few_experts_and_grouped_for_many():
    for target in ("sm_86", "sm_90"):
        spec = TARGETS[target]
        assert paths.choose_path(8, 16, 2, spec=spec) == "stacked"  # the reference case: E * r = 128
        assert paths.choose_path(64, 16, 2, spec=spec) == "grouped"  # E * r = 1024: wider than the stacked tile
        assert paths.choose_path(32, 16, 1, spec=spec) == "grouped"  # 32x the rank work for 1 expert per token
    shape = cost.Shape(8192, 4096, 4096, 8, 16, 2)
    fast, slow = TARGETS["sm_90"], TARGETS["sm_86"]
    for costs in (cost.stacked_costs, cost.grouped_costs):
        assert cost.predicted_seconds(costs(shape, fast), fast, torch.bfloat16) < cost.predicted_seconds(
            costs(shape, slow), slow, torch.bfloat16
        )
    # The forward must at least read x and read-modify-write y: its roofline is never below those bytes.
    forward = cost.stacked_costs(shape, fast)[0]
    assert forward.seconds(fast, torch.bfloat16) >= 3 * 8192 * 4096 * 2 / fast.mem_bandwidth


def test_the_path_registry_drives_the_path_choice_and_the_compile_grid(monkeypatch):
    """A path registered in paths.PATHS is a candidate of choose_path and compiled by the report's grids."""
    grouped = paths.PATHS["grouped"]
    free = grouped._replace(name="free", costs=lambda shape, spec: [cost.LaunchCost("free", 0, 0, spec.sm_count)])
    monkeypatch.setitem(paths.PATHS, "free", free)
    paths.choose_path.cache_clear()
    try:
        assert paths.candidates(8, 16) == ["stacked", "grouped", "free"]
        assert paths.choose_path(8, 16, 2, spec=TARGETS["sm_90"]) == "free"  # no bytes, no FLOPs: the fastest
        interpreter = dataclasses.replace(TARGETS["sm_90"], arch=0)
        assert paths.choose_path(8, 16, 2, spec=interpreter) == "stacked"  # the first registered path that fits
        assert paths.candidates(64, 16) == ["grouped", "free"]  # wider than the stacked rank tile
        for cases in (compile_report.lora_grid(), compile_report._ci_lora_cases()):
            assert {c.path for c in cases} == set(paths.PATHS)
        with pretend_device(TARGETS["sm_86"]):
            launches = compile_report.lora_launches(
                compile_report.LoraCase("free", 64, 64, 64, 4, 8, 2, "bf16", "none", True, True, "fp32")
            )
        assert [compile_report._launch.kernel_name(x.kernel) for x in launches][0] == "_grouped_fwd_kernel"
    finally:
        paths.choose_path.cache_clear()


@pytest.mark.parametrize("name", list(paths.PATHS))
@pytest.mark.parametrize("target", ["sm_86", "sm_90"])
def test_a_paths_registered_config_is_the_one_its_kernels_launch_with(name, target):
    """The cost model reads the config the registry reports; the launches must use that same config."""
    spec, shape = TARGETS[target], cost.Shape(8192, 4096, 4096, 4, 16, 1, torch.bfloat16, dropout=True)
    config = paths.PATHS[name].config(shape, spec)
    case = compile_report.LoraCase(name, 8192, 4096, 4096, 4, 16, 1, "bf16", "seed", True, True, "fp32")
    with pretend_device(spec):
        forward = compile_report.lora_launches(case)[0].kwargs
    assert (forward["BLOCK_D"], forward["num_warps"], forward["num_stages"]) == (
        config.block_d,
        config.num_warps,
        config.num_stages,
    )


def test_the_stacked_weights_pass_drops_stages_only_where_the_full_grid_found_spills():
    """sm_86/sm_89 (measured: 8 B spilled with fp32 weights at rank width 32 and two stages, 4 B with in-kernel
    dropout at rank width 64 and three stages); the other targets and the other kernels keep their stages."""
    bf16, fp32 = torch.bfloat16, torch.float32
    for target in ("sm_86", "sm_89"):
        mixed = configs.stacked_config(8192, 32, bf16, TARGETS[target], False, fp32)
        assert (mixed.num_stages, mixed.weights_stages) == (2, 1)
        assert configs.stacked_config(8192, 32, bf16, TARGETS[target], False, bf16).weights_stages == 2
        dropout = configs.stacked_config(8192, 64, bf16, TARGETS[target], True)
        assert (dropout.num_stages, dropout.weights_stages) == (3, 2)
    for target in ("sm_80", "sm_90", "sm_100", "sm_120"):
        for n, dropout in ((32, False), (64, True)):
            cfg = configs.stacked_config(8192, n, bf16, TARGETS[target], dropout, fp32)
            assert cfg.weights_stages == cfg.num_stages


def test_the_sm100_and_sm120_exceptions_apply_only_there():
    """Where the full grid found spills on sm_100 (stacked forward, 64 rows at rank width 32) and sm_120 (grouped
    kernels with dropout at D tiles of 32, the router's forward at 2 warps and 128 expert columns)."""
    bf16 = torch.bfloat16
    assert configs.stacked_config(8192, 32, bf16, TARGETS["sm_100"]).block_t == 32
    assert configs.stacked_config(8192, 32, bf16, TARGETS["sm_90"]).block_t == 64
    assert configs.grouped_config(16, bf16, TARGETS["sm_120"], True).block_d == 16
    assert configs.grouped_config(16, bf16, TARGETS["sm_86"], True).block_d > 16
    assert configs.route_config(32768, 128, TARGETS["sm_120"]).num_warps == 4
    assert configs.route_config(32768, 128, TARGETS["sm_90"]).num_warps == 2
