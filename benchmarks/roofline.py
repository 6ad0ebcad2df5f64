"""Measured time beside the roofline and the compile numbers, for every Triton MoE-LoRA row of a benchmark run.

    python benchmarks/roofline.py --data OUT/all_benchmark_data.csv --run RUN_ID --out OUT/roofline.md
        [--target sm_90] [--no-compile]

For each ``moe_lora`` row of provider ``triton`` (benchmarks/test_ops.py; ``--provider`` names another, for a
CPU rehearsal) it takes the measured kernel time (CUDA events; the host time where a run has none) of that shape
and mode, the time the cost model predicts at the device's peak bandwidth / FLOP/s
(dylora_moe.kernels.cost: the same launches, bytes and FLOPs that choose the path), and, per launch of that
shape, the config the op chose with its registers, spill bytes, shared memory and occupancy, compiled here for the
device's architecture exactly as the compile report does (kernels/compile_report.py). On a GPU the limits are the
device's own (torch.cuda.get_device_properties); ``--target`` reads a row of the compile report's table instead
(a rehearsal on a machine without CUDA). TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmarks.quiet  # noqa: E402, F401  (before torch and triton: no profiler or fp-fusion lines in the table)

# isort: split
import torch  # noqa: E402

from benchmarks.records import read_rows, runs  # noqa: E402
from dylora_moe.kernels import _launch, compile_report, cost, paths  # noqa: E402
from dylora_moe.kernels.device import TARGETS, device_spec, occupancy, pretend_device  # noqa: E402

FORWARD_LAUNCHES = ("forward", "slot sum y", "base + delta")
DTYPES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32", "bfloat16": "bf16",
          "float16": "fp16", "float32": "fp32"}  # fmt: skip


def predicted_ms(costs: list[cost.LaunchCost], mode: str, spec, dtype: torch.dtype) -> float:
    forward = [c for c in costs if any(n in c.name for n in FORWARD_LAUNCHES)]
    backward = [c for c in costs if c not in forward]
    chosen = {"fwd": forward, "bwd": backward, "full": costs}[mode]
    return cost.predicted_seconds(chosen, spec, dtype) * 1e3


def launches_of(case: compile_report.LoraCase, spec) -> list[dict]:
    """The launches the op issues for ``case`` on ``spec``: kernel, config and the compile job of each."""
    with pretend_device(spec):
        launches = compile_report.lora_launches(case)
    out = []
    for launch in launches:
        kwargs = {k: compile_report._describe(v) for k, v in launch.kwargs.items()}
        name = _launch.kernel_name(launch.kernel)
        variant = {"kernel": name, "kwargs": kwargs}
        out.append(dict(kernel=name, config=compile_report._split(kwargs)["config"],
                        job=(launch.kernel.fn.__module__, spec.arch, variant)))  # fmt: skip
    return out


def table(rows: list[dict], spec, compile_kernels: bool) -> list[str]:
    lines = [
        f"# Measured time beside the roofline: {spec.name} (sm_{spec.arch})",
        "",
        f"Roofline: kernels/cost.py at {spec.mem_bandwidth / 1e9:.0f} GB/s and {spec.tensor_flops / 1e12:.0f} "
        f"TFLOP/s (bf16/fp16; fp32 {spec.fp32_flops / 1e12:.0f}), {spec.sm_count} SMs, plus "
        f"{spec.launch_overhead * 1e6:.0f} us per launch. Measured: kernel_time (CUDA events, L2 flushed; host "
        "time where the run has none). "
        "Compile numbers: registers / spill bytes per thread / shared KiB per block / occupancy of each launch's "
        "config, compiled for this architecture.",
        "",
        "| shape | mode | dtype | path | measured ms | roofline ms | measured / roofline "
        "| launches: config (compile) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    compiled: dict[str, dict] = {}
    for row in rows:
        s = row["shape"]
        dtype_name = DTYPES.get(row["dtype"], "bf16")
        dtype = compile_report.DTYPES[dtype_name]
        weight_bytes = dtype.itemsize  # the benchmark's LoRA weights are in the activation dtype
        path = paths.choose_path(s["E"], s["r"], s["k"], num_tokens=s["T"], d_in=s["d_in"], d_out=s["d_out"],
                                dtype=dtype, spec=spec)  # fmt: skip
        shape = cost.Shape(s["T"], s["d_in"], s["d_out"], s["E"], s["r"], s["k"], dtype, weight_bytes, base=False)
        costs = (cost.stacked_costs if path == "stacked" else cost.grouped_costs)(shape, spec)
        roof = predicted_ms(costs, row["mode"], spec, dtype)
        case = compile_report.LoraCase(path, s["T"], s["d_in"], s["d_out"], s["E"], s["r"], s["k"], dtype_name,
                                       "none", False, False)  # fmt: skip
        parts = []
        for launch in launches_of(case, spec):
            if (row["mode"] == "fwd") != ("fwd" in launch["kernel"]) and row["mode"] != "full":
                continue
            cfg = ",".join(f"{k.replace('BLOCK_', '')}{v}" for k, v in launch["config"].items())
            numbers = ""
            if compile_kernels:
                key = repr(launch["job"][2])
                if key not in compiled:
                    compiled[key] = compile_report.compile_variant(launch["job"])
                c = compiled[key]
                if c["error"]:
                    numbers = f" (compile failed: {c['error'][:80]})"
                else:
                    _, occ = occupancy(spec, launch["config"].get("num_warps", 4), c["regs"], c["shared"])
                    numbers = f" ({c['regs']} / {c['spill']} / {c['shared'] / 1024:.0f} / {occ:.2f})"
            parts.append(f"{launch['kernel']} {cfg}{numbers}")
        measured = row["value"]
        ratio = f"{measured / roof:.2f}" if measured and roof else ""
        lines.append(f"| {row['x_value']} | {row['mode']} | {dtype_name} | {path} | {measured:.4g} | {roof:.4g} | "
                     f"{ratio} | {'<br>'.join(parts)} |")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="the run's all_benchmark_data.csv")
    parser.add_argument("--run", default=None, help="run id (default: the newest run in the file)")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print)")
    parser.add_argument("--target", default=None, help=f"one of {', '.join(TARGETS)} instead of this machine's GPU")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile numbers")
    parser.add_argument("--provider", default="triton", help="whose rows (a CPU rehearsal has eager rows only)")
    args = parser.parse_args(argv)
    if _launch.interpreter_enabled():
        parser.error("unset TRITON_INTERPRET: the compile numbers need Triton's compiler")
    if args.target:
        spec = TARGETS[args.target]
    elif torch.cuda.is_available():
        spec = device_spec(torch.device("cuda"))
    else:
        parser.error("no CUDA device: name a --target (e.g. sm_90) to rehearse")
    grouped = runs(read_rows(Path(args.data)), run_id=args.run)
    rows = [r for rs in grouped.values() for r in rs]
    rows = [r for r in rows if r["op"] == "moe_lora" and r["provider"] == args.provider]
    rows = [r for r in rows if r["metric"] == "kernel_time"] or [r for r in rows if r["metric"] == "time"]
    if not rows:
        print(f"roofline: no {args.provider} moe_lora time rows in this run", file=sys.stderr)
        return 1
    text = "\n".join(table(rows, spec, not args.no_compile)) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
