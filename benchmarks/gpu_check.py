"""First check on a device (part (a) of ``bash benchmarks/run_gpu.sh quick``): every Triton kernel compiles and runs
here, and its values and gradients match the eager op computed in float64, on a few shapes.

    python benchmarks/gpu_check.py --out OUT_DIR        # writes OUT_DIR/check.json and OUT_DIR/check.md

Cases: the MoE-LoRA op on both Triton paths (stacked, grouped; "auto" where the stacked rank width is exceeded),
sparse and dense routing, in bf16 and in the fp32-master mix (bf16 x, fp32 A/B), once plain and once with in-kernel
dropout, a base output and a per-expert scaling tensor; the grouped-GEMM baseline (kernels/grouped_mm.py) in the
mix; the fused router. Each is compared with the eager op on float64 copies of its inputs (the same Philox dropout
mask), with the test suite's tolerances (tests/tolerances.py: the dtype's bound, widened by the reduction length for
the weight gradients). Without CUDA it runs on the CPU under TRITON_INTERPRET=1 on tiny shapes in fp32 and fp16 (a
rehearsal: bf16 math is not exact in the interpreter). The JSON is rewritten after every case, so a time limit
that stops the script leaves the cases that ran; ``--budget`` starts no case after that many seconds (and an
interrupt ends the loop), so the markdown is written too. Exit status 0 when every case ran and passed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # tolerances.py: the suite's one tolerance table
import benchmarks.quiet  # noqa: E402, F401  (before torch and triton)

# isort: split
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import dylora_moe.kernels as ops  # noqa: E402
from dylora_moe.kernels.grouped_mm import moe_lora_grouped_mm_op  # noqa: E402
from dylora_moe.provenance import commit  # noqa: E402
from tolerances import TOL  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (T, d_in, d_out, E, r, k) with the Triton paths each runs: odd sizes, sparse and dense, many experts.
GPU_SHAPES = [((1000, 1024, 768, 8, 16, 2), ("stacked", "grouped")), ((777, 512, 640, 64, 8, 2), ("auto",)),
              ((257, 256, 320, 4, 16, 4), ("stacked", "grouped"))]  # fmt: skip
CPU_SHAPES = [((37, 48, 40, 4, 8, 2), ("stacked", "grouped")), ((29, 32, 24, 40, 8, 2), ("auto",)),
              ((17, 32, 32, 3, 4, 3), ("stacked",))]  # fmt: skip
# (x dtype, A/B dtype): the device's low precision alone and under fp32 master weights.
GPU_MIXES = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
CPU_MIXES = [(torch.float32, torch.float32), (torch.float16, torch.float32)]
ROUTER_CASES = [(4096, 8, 2), (1000, 64, 8)] if HAS_CUDA else [(64, 8, 2), (33, 6, 6)]
DROPOUT_P = 0.1


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else f"CPU {platform.machine()} (TRITON_INTERPRET=1)"


def max_excess(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float) -> tuple[float, str]:
    """(max |got - want| / allowed, message): <= 1 passes; the bound of tests/tolerances.assert_close."""
    if got.shape != want.shape:
        return float("inf"), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return 0.0, ""
    tol = TOL[dtype]
    magnitude = max(1.0, want.abs().max().item())
    allowed = tol["atol"] * scale * magnitude + tol["rtol"] * scale * want.abs()
    err = (got.double() - want).abs()
    ratio = (err / allowed).max().item()
    finite = bool(torch.isfinite(got).all())
    return (ratio if finite else float("inf")), "" if finite else f"{name}: non-finite values"


def moe_inputs(shape, x_dtype, w_dtype, seed=0):
    T, d_in, d_out, E, r, k = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    a = torch.randn(E, r, d_in, generator=gen) / d_in**0.5
    b = torch.randn(E, d_out, r, generator=gen) / r**0.5
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    w = torch.rand(T, k, generator=gen) + 0.1
    scaling = torch.rand(E, generator=gen) + 0.5
    base = torch.randn(T, d_out, generator=gen)
    dy = torch.randn(T, d_out, generator=gen)
    low = [t.to(DEVICE, d) for t, d in ((x, x_dtype), (a, w_dtype), (b, w_dtype), (w, torch.float32))]
    return low, ids.to(DEVICE), scaling.to(DEVICE), base.to(DEVICE, x_dtype), dy.to(DEVICE, x_dtype)


def grads_of(fn, leaves, dy):
    leaves = [t.detach().requires_grad_() for t in leaves]
    y = fn(*leaves)
    if y.numel() == 0:
        return [y, *(torch.zeros_like(t) for t in leaves)]
    return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]


def check_moe(provider: str, shape, path: str, x_dtype, w_dtype, variant: str) -> dict:
    low, ids, scaling, base, dy = moe_inputs(shape, x_dtype, w_dtype)
    extra: dict = {}
    c: float | torch.Tensor = 2.0
    if variant == "dropout+base+scaling":
        c = scaling
        extra = dict(dropout_p=DROPOUT_P, dropout_seed=torch.tensor([1234], device=DEVICE))

    def run(x, a, b, w, c, base, backend):
        kw = dict(extra, base_output=base) if base is not None else extra
        if backend == "grouped_mm":
            return moe_lora_grouped_mm_op(x, a, b, ids, w, c, **kw)
        return ops.moe_lora(x, a, b, ids, w, c, backend=backend, triton_path=path, **kw)

    with_base = variant != "plain"
    leaves = [*low, *([c] if isinstance(c, torch.Tensor) else []), *([base] if with_base else [])]

    def call(backend, cast):
        def fn(*t):
            x, a, b, w = t[:4]
            rest = list(t[4:])
            cc = rest.pop(0) if isinstance(c, torch.Tensor) else c
            bb = rest.pop(0) if with_base else None
            return run(x, a, b, w, cc, bb, backend)

        return grads_of(fn, [cast(t) for t in leaves], dy)

    got = call("triton" if provider == "triton" else "grouped_mm", lambda t: t)
    want = call("eager", lambda t: t.double())
    T = shape[0]
    names = ["y", "dx", "dA", "dB", "dw", *(["dscaling"] if isinstance(c, torch.Tensor) else []),
             *(["dbase"] if with_base else [])]  # fmt: skip
    reduction = {"dA": 1 + T / 64, "dB": 1 + T / 64, "dscaling": 1 + T / 64}
    errors, notes = {}, []
    for name, g, e in zip(names, got, want):
        ratio, note = max_excess(name, g, e, x_dtype, reduction.get(name, 1.0))
        errors[name] = ratio
        if note:
            notes.append(note)
    return {"errors": errors, "error": "; ".join(notes)}


def check_router(tokens: int, experts: int, top_k: int, dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen).to(DEVICE, dtype)
    g = torch.randn(tokens, top_k, generator=gen).to(DEVICE)
    h = torch.randn(experts, generator=gen).to(DEVICE)

    def run(backend, source):
        leaf = source.detach().requires_grad_()
        out = ops.topk_route(leaf, top_k, backend=backend)
        loss = (out.weights.float() * g.to(out.weights.dtype)).sum() + (out.mean_prob.float() * h).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        return out, grad

    got, got_grad = run("triton", logits)
    want, want_grad = run("eager", logits)
    errors = {"ids": 0.0 if torch.equal(got.ids, want.ids) else float("inf"),
              "counts": 0.0 if torch.equal(got.counts, want.counts) else float("inf")}  # fmt: skip
    for name, a, b in (("weights", got.weights, want.weights), ("dense", got.dense, want.dense),
                       ("mean_prob", got.mean_prob, want.mean_prob), ("dlogits", got_grad, want_grad)):  # fmt: skip
        errors[name] = max_excess(name, a.float(), b.double(), dtype, 1.0)[0]  # dlogits come back in dtype
    return {"errors": errors, "error": ""}


def cases():
    """Most value first, as a time limit may stop the list: the plain op in the device's low precision, the router,
    the grouped_mm baseline, the fp32-master mix, then dropout + base output + per-expert scaling."""
    shapes, mixes = (GPU_SHAPES, GPU_MIXES) if HAS_CUDA else (CPU_SHAPES, CPU_MIXES)

    def op_cases(variant, x_dtype, w_dtype):
        for shape, paths in shapes:
            for path in paths:
                yield (dict(check="moe_lora", provider="triton", path=path, shape=shape, x=NAMES[x_dtype],
                            weights=NAMES[w_dtype], variant=variant),
                       lambda s=shape, p=path: check_moe("triton", s, p, x_dtype, w_dtype, variant))  # fmt: skip

    yield from op_cases("plain", *mixes[0])
    for tokens, experts, top_k in ROUTER_CASES:
        dtype = torch.bfloat16 if HAS_CUDA else torch.float32
        yield (dict(check="router", provider="triton", path="-", shape=(tokens, experts, top_k), x=NAMES[dtype],
                    weights="-", variant="-"),
               lambda a=tokens, b=experts, c=top_k, d=dtype: check_router(a, b, c, d))  # fmt: skip
    x_dtype, w_dtype = mixes[-1]
    for shape, _ in shapes:
        yield (dict(check="moe_lora", provider="grouped_mm", path="-", shape=shape, x=NAMES[x_dtype],
                    weights=NAMES[w_dtype], variant="plain"),
               lambda s=shape: check_moe("grouped_mm", s, "-", x_dtype, w_dtype, "plain"))  # fmt: skip
    yield from op_cases("plain", *mixes[1])
    for x_dtype, w_dtype in mixes:
        yield from op_cases("dropout+base+scaling", x_dtype, w_dtype)


def markdown(report: dict) -> str:
    lines = [
        f"# Device check: {report['device']}",
        "",
        f"commit {report['commit']}; torch {report['torch']}, triton {report['triton']}; "
        f"{report['passed']} passed, {report['failed']} failed of {len(report['checks'])} "
        f"({report['seconds']:.0f} s){'; STOPPED: ' + report['stopped'] if report.get('stopped') else ''}. Error: "
        "the largest |got - want| / allowed over the outputs and gradients (<= 1 passes; want = the eager op in "
        "float64).",
        "",
        "| check | provider | path | shape (T, d_in, d_out, E, r, k) | x | A/B | variant | error | s | status |",
        "|---|---|---|---|---|---|---|---:|---:|---|",
    ]
    for c in report["checks"]:
        worst = max(c["errors"].values(), default=float("nan"))
        status = "ok" if c["ok"] else f"**FAIL** {c['error'][:160]}"
        lines.append(
            f"| {c['check']} | {c['provider']} | {c['path']} | {tuple(c['shape'])} | {c['x']} | {c['weights']} "
            f"| {c['variant']} | {worst:.3g} | {c['seconds']:.1f} | {status} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for check.json and check.md")
    parser.add_argument("--limit", type=int, default=None, help="run only the first N cases (a smoke test)")
    parser.add_argument("--budget", type=float, default=None, help="start no case after this many seconds")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import triton

    report = dict(device=device_name(), commit=commit(), torch=torch.__version__, triton=triton.__version__,
                  interpreter=not HAS_CUDA, checks=[], passed=0, failed=0, seconds=0.0)  # fmt: skip
    start = time.perf_counter()
    for number, (meta, run) in enumerate(cases()):
        if args.limit is not None and number >= args.limit:
            break
        if args.budget is not None and time.perf_counter() - start > args.budget:
            report["stopped"] = f"budget of {args.budget:.0f} s spent: {number} cases ran"
            break
        t0 = time.perf_counter()
        try:
            result = run()
        except KeyboardInterrupt:  # the time limit of run_gpu.sh (SIGINT): keep what ran
            report["stopped"] = f"interrupted after {number} cases"
            break
        except Exception as error:  # a kernel that does not compile or launch here: recorded, the others go on
            result = {"errors": {}, "error": f"{type(error).__name__}: {error}"[:600]}
            traceback.print_exc()
        if HAS_CUDA:
            torch.cuda.synchronize()
        ok = not result["error"] and bool(result["errors"]) and max(result["errors"].values()) <= 1.0
        report["checks"].append({**meta, **result, "ok": ok, "seconds": time.perf_counter() - t0})
        report["passed" if ok else "failed"] += 1
        report["seconds"] = time.perf_counter() - start
        (args.out / "check.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"{'ok  ' if ok else 'FAIL'} {meta} {time.perf_counter() - t0:.1f}s {result['error'][:200]}", flush=True)
    text = markdown(report)
    (args.out / "check.md").write_text(text)
    print(text)
    (args.out / "check.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if report["failed"] == 0 and report["checks"] and not report.get("stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
