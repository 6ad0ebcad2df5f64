"""Compile report: every launch configuration the config choosers return, compiled for real GPU targets on the CPU.

    python -m dylora_moe.kernels.compile_report [--grid full|ci] [--targets sm_86,sm_90] [--jobs 2] [--out PREFIX]

Triton compiles for any NVIDIA architecture without a GPU; the wheel's ``cuobjdump`` then reads registers and the
local-memory stack (spills) per thread from the cubin, and the compiled metadata gives shared memory per block. So
this module runs the ops' own host code on meta tensors, with the config choosers planning for each target
(device.pretend_device), records the launches it would issue (_launch.capture_launches), compiles each distinct
kernel variant once per target, and reports registers, spill bytes, shared memory and occupancy, beside the
roofline time the cost model predicts for representative layer shapes (cost.py). TRITON_INTERPRET must be unset.

The grid (``--grid full``): MoE-LoRA on every registered path (paths.PATHS, where the layer fits it) with E in {1,
2, 4, 8, 16, 32, 64} experts of rank r in {4, 8, 16, 32, 64, 128} (per-expert ranks are padded to the largest, so
they are covered by r), k in {1, 2, 8} and k = E (dense), T in {64, 8192} tokens, widths d in {64, 4096} and 4096 ->
14336, precisions (activations, LoRA weights) fp32, bf16, fp16 and the training default of fp32 weights under bf16 /
fp16 activations (PRECISIONS; weight gradients fp32), dropout none / in-kernel / a given mask, with and without a
base output and a per-expert scaling vector; the router with E in {2, 4, 8, 16, 32, 64, 128, 256}, k in {1, 2, 4,
8} (k <= E), T = 32768 (smaller T only shrink BLOCK_T), logits in fp32 / bf16 / fp16. ``--grid ci`` compiles, per
kernel, precision and flag set, only the variant with the largest tiles (the one closest to spilling): what
tests/test_compile_report.py checks.

A variant passes when it compiles, uses at most the target's shared memory per block, and spills nothing in
bf16/fp16; fp32 may spill at most FP32_SPILL_BOUND bytes per thread (fp32 is a correctness mode, not a fast one).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import _launch
from .configs import MAX_RANK_WIDTH
from .cost import Shape, predicted_seconds
from .device import TARGETS, DeviceSpec, occupancy, pretend_device
from .paths import PATHS, choose_path
from .provenance import commit

# Bytes of spill stores per thread allowed in fp32 (a correctness mode, not a fast one): the grouped fp32 kernels at
# rank 128 with dropout spill 24-36 B on sm_100/sm_120 even at one pipeline stage. bf16/fp16 must spill nothing.
FP32_SPILL_BOUND = 64
DEFAULT_TARGETS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120")
CI_TARGETS = ("sm_86", "sm_90")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (activations, LoRA weights): one dtype throughout, and the training default of fp32 masters under bf16/fp16.
PRECISIONS = (("fp32", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"), ("bf16", "fp32"), ("fp16", "fp32"))


# --- which launches the host code issues ---------------------------------------------------------------------


@dataclass(frozen=True)
class LoraCase:
    path: str
    T: int
    d_in: int
    d_out: int
    E: int
    r: int
    k: int
    dtype: str
    dropout: str  # "none" | "seed" | "mask"
    base: bool
    scale_vec: bool
    weights: str | None = None  # the LoRA weights' dtype (a DTYPES key); None: the activations' (``dtype``)


@dataclass(frozen=True)
class RouterCase:
    T: int
    E: int
    k: int
    dtype: str


def _meta(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def lora_launches(case: LoraCase) -> list[_launch.Launch]:
    """The launches of one MoE-LoRA forward + backward (every gradient needed) on ``case.path``, recorded, not run."""
    dt = DTYPES[case.dtype]
    wt = DTYPES[case.weights or case.dtype]
    x = _meta(case.T, case.d_in, dtype=dt)
    a, b = _meta(case.E, case.r, case.d_in, dtype=wt), _meta(case.E, case.d_out, case.r, dtype=wt)
    mask = _meta(case.T, case.d_in, dtype=dt) if case.dropout == "mask" else None
    seed = _meta(1, dtype=torch.int64) if case.dropout == "seed" else None
    scale = _meta(case.E) if case.scale_vec else None
    base = _meta(case.T, case.d_out, dtype=dt) if case.base else None
    with _launch.capture_launches() as launches:
        PATHS[case.path].record(x, a, b, case.k, scale, base, mask, seed)
    return launches


def router_launches(case: RouterCase) -> list[_launch.Launch]:
    from .topk_route import topk_route_backward, topk_route_forward

    logits = _meta(case.T, case.E, dtype=DTYPES[case.dtype])
    with _launch.capture_launches() as launches:
        _, ids, *_ = topk_route_forward(logits, case.k, 1.0, True)
        grads = _meta(case.T, case.k), _meta(case.T, case.E), _meta(case.E)
        topk_route_backward(logits, ids, *grads, 1.0, True)
    return launches


def lora_grid() -> list[LoraCase]:
    cases = []
    widths = [(64, 64), (4096, 14336)]
    for E, r, T, (d_in, d_out), (dtype, weights), dropout, base, scale_vec in itertools.product(
        (1, 2, 4, 8, 16, 32, 64), (4, 8, 16, 32, 64, 128), (64, 8192), widths, PRECISIONS, ("none", "seed", "mask"),
        (True, False), (True, False),
    ):  # fmt: skip
        for k, path in itertools.product(sorted({min(k, E) for k in (1, 2, 8)} | {E}), PATHS.values()):
            if path.fits(E, r):
                cases.append(LoraCase(path.name, T, d_in, d_out, E, r, k, dtype, dropout, base, scale_vec, weights))
    return cases


def router_grid() -> list[RouterCase]:
    return [
        RouterCase(T, E, k, dtype)
        for E, k, T, dtype in itertools.product((2, 4, 8, 16, 32, 64, 128, 256), (1, 2, 4, 8), (32768,), DTYPES)
        if k <= E
    ]


# --- distinct kernel variants --------------------------------------------------------------------------------


def _describe(value: Any) -> Any:
    """A picklable, printable stand-in for one launch argument."""
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", "")}
    if hasattr(value, "primitive_bitwidth"):  # a triton.language dtype (DOT_DTYPE)
        return {"tl": value.name}
    return value


def variant_key(kernel: str, kwargs: dict) -> str:
    """Kernel, dtypes, tiles and flags: what decides registers and shared memory. Launches that differ only in how
    Triton specialises an integer argument (== 1, divisible by 16) share a key; the first one seen is compiled."""
    top_k = kwargs.get("K") if kernel.startswith("_topk") else None  # a constexpr only in the router
    v = {"kwargs": kwargs}
    return json.dumps([kernel, _dtype_of(v), _weights_of(v), _split(kwargs), top_k], sort_keys=True)


def collect_variants(target: str, grid: str) -> dict[str, dict]:
    """{variant key: {"kernel", "kwargs", "module", "cases"}} of every launch the grid's shapes get on ``target``."""
    variants: dict[str, dict] = {}
    spec = TARGETS[target]
    with pretend_device(spec):
        for case in lora_grid() if grid == "full" else _ci_lora_cases():
            for launch in lora_launches(case):
                _add(variants, launch, case)
        for case in router_grid() if grid == "full" else _ci_router_cases():
            for launch in router_launches(case):
                _add(variants, launch, case)
    if grid == "ci":
        variants = _largest_tiles(variants)
    return variants


def _add(variants: dict, launch: _launch.Launch, case) -> None:
    kwargs = {k: _describe(v) for k, v in launch.kwargs.items()}
    name = _launch.kernel_name(launch.kernel)
    key = variant_key(name, kwargs)
    entry = variants.setdefault(
        key, {"kernel": name, "module": launch.kernel.fn.__module__ if hasattr(launch.kernel, "fn") else
              launch.kernel.__module__, "kwargs": kwargs, "cases": 0, "example": repr(case)}
    )  # fmt: skip
    entry["cases"] += 1


def _ci_lora_cases() -> list[LoraCase]:
    """Every path, precision and flag set, over the ranks and expert counts that give the largest tiles."""
    cases = []
    for (dtype, weights), dropout, base, scale_vec, path in itertools.product(
        PRECISIONS, ("none", "seed", "mask"), (True, False), (True, False), PATHS.values()
    ):
        for E, r in ((1, 4), (4, 8), (8, 16), (4, 128), (1, 128), (MAX_RANK_WIDTH // 128, 128)):
            if path.fits(E, r):
                cases.append(LoraCase(path.name, 8192, 4096, 4096, E, r, 1, dtype, dropout, base, scale_vec, weights))
    return cases


def _ci_router_cases() -> list[RouterCase]:
    return [RouterCase(32768, E, k, dtype) for dtype in DTYPES for E, k in ((8, 2), (64, 4), (256, 8), (256, 1))]


def _live_elements(kwargs: dict) -> int:
    """Elements of the live tiles per thread (what decides a spill): rank tile, activation tile, weight tile."""
    warps = kwargs.get("num_warps", 4)
    m = kwargs.get("BLOCK_T", kwargs.get("BLOCK_M", 1))
    n = kwargs.get("BLOCK_N", kwargs.get("BLOCK_R", kwargs.get("BLOCK_E", 1)))
    d = kwargs.get("BLOCK_D", 0)
    return (m * n + m * d + n * d) // (32 * warps)


def _largest_tiles(variants: dict) -> dict:
    """Per kernel and flag set (everything but the tile sizes and warps), the variant with the most live elements."""
    best: dict[str, tuple[int, str]] = {}
    for key, v in variants.items():
        top_k = v["kwargs"].get("K") if v["kernel"].startswith("_topk") else None
        group = json.dumps([v["kernel"], _dtype_of(v), _weights_of(v), _split(v["kwargs"])["flags"], top_k])
        size = _live_elements(v["kwargs"])
        if group not in best or size > best[group][0]:
            best[group] = (size, key)
    return {key: variants[key] for _, key in best.values()}


# --- compiling -------------------------------------------------------------------------------------------------


def compile_variant(job: tuple[str, int, dict]) -> dict:
    """Compile one variant for one architecture (in a worker process): registers, stack and spill-store bytes per
    thread, shared memory per block, or the compiler's error."""
    module, arch, variant = job
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    kernel = getattr(importlib.import_module(module), variant["kernel"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = {}
    for name, value in variant["kwargs"].items():
        if isinstance(value, dict) and "tensor" in value:
            value = MockTensor(getattr(torch, value["tensor"]))
        elif isinstance(value, dict) and "tl" in value:
            value = getattr(triton.language, value["tl"].replace("fp", "float").replace("bf16", "bfloat16"))
        kwargs[name] = value
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    start = time.perf_counter()
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, opts = binder(**kwargs, **options)
        opts, signature, constexprs, attrs = kernel._pack_args(backend, options, bound, specialization, opts)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=opts.__dict__)
        regs, stack = _res_usage(compiled.asm["cubin"])
        spill = _spill_stores(compiled.asm["ptx"], arch) if stack else 0
        result = dict(regs=regs, stack=stack, spill=spill, shared=compiled.metadata.shared, error=None)
    except Exception as error:  # the report names every failure; the test asserts there is none
        message = f"{type(error).__name__}: {str(error)[:300]}"
        result = dict(regs=None, stack=None, spill=None, shared=None, error=message)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _res_usage(cubin: bytes) -> tuple[int, int]:
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(regs), int(stack)


def _split(kwargs: dict) -> dict:
    """{"config": tile sizes, warps, stages; "flags": the boolean constexprs and the dot dtype / precision}."""
    config = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages")}
    flags = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
    flags.update({k: (v["tl"] if isinstance(v, dict) else v) for k, v in kwargs.items() if k.startswith("DOT_")})
    return dict(config=config, flags=flags)


def _spill_stores(ptx: str, arch: int) -> int:
    """Bytes of spill stores per thread that ptxas reports for ``ptx`` (run again with -v, as Triton runs it): a
    stack frame without spill stores is a local array, not register pressure."""
    import re

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "kernel.o")]  # fmt: skip
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return int(re.search(r"(\d+) bytes spill stores", log).group(1))


def _weights_of(variant: dict) -> str | None:
    """The LoRA weights' dtype of a variant; None for a kernel that reads no LoRA weight (the router's, the grouped
    weights pass)."""
    w = variant["kwargs"].get("a_ptr") or variant["kwargs"].get("b_ptr")
    return w["tensor"] if w else None


def _dtype_of(variant: dict) -> str:
    for name in ("x_ptr", "dy_ptr", "logits_ptr"):
        if name in variant["kwargs"]:
            return variant["kwargs"][name]["tensor"]
    return "float32"


def check(row: dict, spec: DeviceSpec) -> list[str]:
    """The problems of one compiled variant on ``spec`` (empty: it fits)."""
    if row["error"]:
        return [f"compile failed: {row['error']}"]
    problems = []
    if row["shared"] > spec.shared_per_block:
        problems.append(f"shared {row['shared']} B > {spec.shared_per_block} B per block")
    bound = FP32_SPILL_BOUND if row["dtype"] == "float32" else 0
    if row["spill"] > bound:
        problems.append(f"spills {row['spill']} B per thread (bound {bound})")
    return problems


def run(targets: tuple[str, ...], grid: str, jobs: int) -> dict:
    """Compile the grid's variants for ``targets``; returns the report (rows per target and variant, shapes)."""
    if _launch.interpreter_enabled():
        raise SystemExit("compile_report: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    import triton

    rows, work = [], []
    for target in targets:
        for key, variant in collect_variants(target, grid).items():
            work.append((target, key, variant))
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        jobs_ = [(v["module"], TARGETS[t].arch, v) for t, _, v in work]
        from tqdm.auto import tqdm  # a count and time left on a terminal (minutes for the full grid); quiet in a log

        done = pool.map(compile_variant, jobs_)
        results = list(tqdm(done, total=len(jobs_), desc="compile", unit="variant", disable=not sys.stderr.isatty()))
    for (target, _key, variant), result in zip(work, results):
        spec = TARGETS[target]
        kw = variant["kwargs"]
        row = dict(
            target=target,
            kernel=variant["kernel"],
            dtype=_dtype_of(variant),
            weights=_weights_of(variant),
            **_split(kw),
            cases=variant["cases"],
            example=variant["example"],
            **result,
        )
        if result["error"] is None:
            blocks, occ = occupancy(spec, kw.get("num_warps", 4), result["regs"], result["shared"])
            row.update(blocks_per_sm=blocks, occupancy=round(occ, 3))
        row["problems"] = check(row, spec)
        rows.append(row)
    return dict(
        triton=triton.__version__,
        torch=torch.__version__,
        commit=commit("kernels"),
        grid=grid,
        targets={t: TARGETS[t].__dict__ for t in targets},
        fp32_spill_bound=FP32_SPILL_BOUND,
        compile_seconds=round(time.perf_counter() - started, 1),
        rows=rows,
        shapes=shape_table(targets, rows),
    )


# --- representative shapes: path, configs and roofline time -------------------------------------------------------

# (label, T, d_in, d_out, E, r, k): the default model, the reference benchmark case, many experts, a large rank.
SHAPES = (
    ("default model (4 experts r 8, k 1)", 4096, 2048, 2048, 4, 8, 1),
    ("reference case (E 8 r 16 k 2)", 8192, 4096, 4096, 8, 16, 2),
    ("dense routing (E 8 r 16 k 8)", 8192, 4096, 4096, 8, 16, 8),
    ("many experts (E 64 r 16 k 2)", 8192, 4096, 4096, 64, 16, 2),
    ("large rank (E 4 r 128 k 1)", 8192, 4096, 4096, 4, 128, 1),
    ("MLP up (E 8 r 16 k 2, 4096 -> 14336)", 8192, 4096, 14336, 8, 16, 2),
)


def shape_table(targets: tuple[str, ...], rows: list[dict]) -> list[dict]:
    """Per representative shape and target, as training runs it (bf16 activations, fp32 LoRA weights, in-kernel
    dropout, a base output, per-expert scaling): the chosen path and its config, each launch's config with its
    compile numbers (when the grid compiled it) and the roofline time the cost model predicts."""
    table = []
    index = {(r["target"], r["kernel"], json.dumps(r["config"], sort_keys=True), r["dtype"], r.get("weights"),
              json.dumps(r["flags"], sort_keys=True)): r for r in rows}  # fmt: skip
    for (label, T, d_in, d_out, E, r, k), target in itertools.product(SHAPES, targets):
        spec = TARGETS[target]
        path = choose_path(E, r, k, num_tokens=T, d_in=d_in, d_out=d_out, spec=spec, dropout=True)
        shape = Shape(T, d_in, d_out, E, r, k, torch.bfloat16, dropout=True)
        costs = PATHS[path].costs(shape, spec)
        case = LoraCase(path, T, d_in, d_out, E, r, k, "bf16", "seed", True, True, "fp32")
        with pretend_device(spec):
            launches = lora_launches(case)
        kernels = []
        for launch in launches:
            name = _launch.kernel_name(launch.kernel)
            described = {k2: _describe(v) for k2, v in launch.kwargs.items()}
            parts = _split(described)
            config, flags = parts["config"], parts["flags"]
            found = index.get((target, name, json.dumps(config, sort_keys=True), "bfloat16",
                               _weights_of({"kwargs": described}), json.dumps(flags, sort_keys=True)))  # fmt: skip
            kernels.append(dict(kernel=name, config=config, grid=list(launch.grid),
                                compiled=None if found is None else {k2: found.get(k2) for k2 in
                                ("regs", "spill", "shared", "occupancy")}))  # fmt: skip
        table.append(dict(
            shape=label, target=target, T=T, d_in=d_in, d_out=d_out, E=E, r=r, k=k, dtype="bf16", weights="fp32",
            path=path, config=PATHS[path].config(shape, spec)._asdict(), kernels=kernels,
            predicted_us={c.name: round(c.seconds(spec, torch.bfloat16) * 1e6, 1) for c in costs},
            predicted_total_us=round(predicted_seconds(costs, spec, torch.bfloat16) * 1e6, 1),
        ))  # fmt: skip
    return table


# --- output ------------------------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    lines = [
        "# Compile report: Triton kernels compiled for each GPU target on a CPU",
        "",
        f"Triton {report['triton']}, torch {report['torch']}, commit {report['commit']}, grid `{report['grid']}` "
        f"(kernels/compile_report.py), {len(report['rows'])} compilations ({report['compile_seconds']} s wall clock, "
        f"{sum(r['seconds'] for r in report['rows']):.0f} s of compiler time summed over the workers, warm Triton "
        "cache included). "
        "Registers and stack bytes per thread from `cuobjdump -res-usage`, spill stores (bytes per thread) from "
        "ptxas -v where the stack is not empty, shared memory per block from the "
        "compiled metadata, occupancy = resident warps / the SM's warp slots. Pass: compiles, shared memory within "
        f"the target's per-block limit, no spill in bf16/fp16 (fp32: at most {report['fp32_spill_bound']} B).",
        "",
        "## Targets",
        "",
        "| target | card | SMs | shared / block | bandwidth | bf16 peak |",
        "|---|---|---|---|---|---|",
    ]
    for t, s in report["targets"].items():
        lines.append(f"| {t} | {s['name']} | {s['sm_count']} | {s['shared_per_block'] // 1024} KiB | "
                     f"{s['mem_bandwidth'] / 1e9:.0f} GB/s | {s['tensor_flops'] / 1e12:.0f} TFLOP/s |")  # fmt: skip
    failures = [r for r in report["rows"] if r["problems"]]
    lines += ["", f"## Problems: {len(failures)}", ""]
    for r in failures:
        lines.append(
            f"- {r['target']} {r['kernel']} {_dtypes(r)} {r['config']} {r['flags']}: {'; '.join(r['problems'])}"
        )
    lines += ["", "## Summary per target and kernel (worst case over its variants)", "",
              "| target | kernel | variants | max regs | max spill B bf16/fp16 | max spill B fp32 | max shared KiB "
              "| min occupancy |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in report["rows"]:
        groups.setdefault((r["target"], r["kernel"]), []).append(r)
    for (target, kernel), rs in sorted(groups.items()):
        ok = [r for r in rs if r["error"] is None]
        if not ok:
            lines.append(f"| {target} | {kernel} | {len(rs)} | failed | | | | |")
            continue
        half = [r["spill"] for r in ok if r["dtype"] != "float32"] or [0]
        full = [r["spill"] for r in ok if r["dtype"] == "float32"] or [0]
        lines.append(
            f"| {target} | {kernel} | {len(rs)} | {max(r['regs'] for r in ok)} | {max(half)} | {max(full)} | "
            f"{max(r['shared'] for r in ok) / 1024:.1f} | {min(r['occupancy'] for r in ok):.2f} |"
        )
    lines += [
        "",
        "## Representative shapes (bf16 activations, fp32 LoRA weights, in-kernel dropout, base output, per-expert "
        "scaling): path, configs, roofline",
        "",
    ]
    lines += ["Predicted time: the cost model's roofline (kernels/cost.py) at the target's peak bandwidth / FLOP/s, "
              "forward + backward; measured times on a GPU come from benchmarks/run_gpu.sh.", ""]  # fmt: skip
    lines += ["| shape | target | path | predicted us | launches: config (regs / spill / shared KiB / occupancy) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for s in report["shapes"]:
        parts = []
        for k in s["kernels"]:
            cfg = ",".join(f"{n.replace('BLOCK_', '')}{v}" for n, v in k["config"].items())
            c = k["compiled"]
            numbers = (
                "not in grid"
                if c is None
                else (f"{c['regs']} / {c['spill']} / {c['shared'] / 1024:.0f} / {c['occupancy']}")
            )
            parts.append(f"{k['kernel']} {cfg} ({numbers})")
        lines.append(f"| {s['shape']} | {s['target']} | {s['path']} | {s['predicted_total_us']} | "
                     f"{'<br>'.join(parts)} |")  # fmt: skip
    lines += ["", "## Every variant", "",
              "| target | kernel | dtype | config | flags | regs | stack B | spill B | shared KiB | occupancy "
              "| problems |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(report["rows"], key=lambda r: (r["target"], r["kernel"], _dtypes(r), str(r["config"]))):
        cfg = ",".join(f"{n.replace('BLOCK_', '')}{v}" for n, v in r["config"].items())
        flags = ",".join(f"{n}" for n, v in r["flags"].items() if v is True)
        shared = "" if r["shared"] is None else f"{r['shared'] / 1024:.1f}"
        lines.append(f"| {r['target']} | {r['kernel']} | {_dtypes(r)} | {cfg} | {flags} | {r['regs']} | "
                     f"{r['stack']} | {r['spill']} | {shared} | {r.get('occupancy', '')} | "
                     f"{'; '.join(r['problems'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _dtypes(row: dict) -> str:
    """``bfloat16`` (one dtype, or a kernel that reads no LoRA weight) or ``bfloat16 x, float32 weights``."""
    weights = row.get("weights")
    return row["dtype"] if weights in (None, row["dtype"]) else f"{row['dtype']} x, {weights} weights"


def merge(reports: list[dict]) -> dict:
    """One report from several compiled separately (e.g. one per target) with one Triton; each keeps its grid."""
    first = reports[0]
    if any(r["triton"] != first["triton"] for r in reports):
        raise SystemExit("compile_report --merge: reports of different Triton versions")
    merged = dict(first, rows=[row for r in reports for row in r["rows"]], fp32_spill_bound=FP32_SPILL_BOUND)
    merged["commit"] = ", ".join(dict.fromkeys(r["commit"] for r in reports))
    grids: dict[str, list[str]] = {}
    for r in reports:
        grids.setdefault(r["grid"], []).extend(r["targets"])
    merged["grid"] = "; ".join(f"{g} ({', '.join(ts)})" for g, ts in grids.items())
    for row in merged["rows"]:  # checked again with this module's bounds
        row["problems"] = check(row, TARGETS[row["target"]])
    merged["targets"] = {t: spec for r in reports for t, spec in r["targets"].items()}
    merged["shapes"] = shape_table(tuple(merged["targets"]), merged["rows"])
    merged["compile_seconds"] = round(sum(r["compile_seconds"] for r in reports), 1)
    return merged


def write(report: dict, out: str | None) -> int:
    """Write PREFIX.json.gz / PREFIX.md (or print the report); exit status 1 when a variant has a problem. The rows
    go gzipped: the full grid's are 3.6 MB of JSON (73 kB compressed); the markdown is the one to read."""
    text = markdown(report)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with gzip.open(out + ".json.gz", "wt") as f:
            json.dump(report, f, separators=(",", ":"))
        with open(out + ".md", "w") as f:
            f.write(text)
    problems = [r for r in report["rows"] if r["problems"]]
    print(text if not out else text.split("## Summary")[0], end="")
    print(f"{len(report['rows'])} compilations, {len(problems)} with problems")
    return 1 if problems else 0


def read(path: str) -> dict:
    """A report written by :func:`write` (``.json.gz``), or a plain ``.json`` one."""
    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", choices=("full", "ci"), default="full")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated, e.g. sm_86,sm_90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", default=None, help="write PREFIX.json.gz and PREFIX.md (default: print the summary)")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine reports (e.g. one per target) instead of compiling")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        return write(merge([read(p) for p in args.merge]), args.out)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    return write(run(targets, args.grid, args.jobs), args.out)


if __name__ == "__main__":
    sys.exit(main())
