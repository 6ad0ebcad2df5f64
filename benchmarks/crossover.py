"""Where the grouped-GEMM baseline (kernels/grouped_mm.py) beats the eager stacked form (kernels/eager.py): fwd+bwd
time of both over a grid of layer shapes, on this machine, as a markdown table; the data of the eager backend's
rule (kernels/grouped_mm.eager_path).

    python benchmarks/crossover.py [--threads 1] [--dtype float32] [--rounds 5] [--out FILE]

Times are the median of ``--rounds`` calls after one warm-up (host clock; a CUDA sync ends each call on a GPU);
the gradients of x, A, B and the routing weights are taken, as in benchmarks/test_ops.py. The measured table is in
docs/benchmarks.md ("eager vs grouped_mm").
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from dylora_moe.kernels import RoutingMeta, topk_route  # noqa: E402
from dylora_moe.kernels.eager import moe_lora_eager, unselected_experts_zeroed  # noqa: E402
from dylora_moe.kernels.grouped_mm import moe_lora_grouped_mm  # noqa: E402
from dylora_moe.provenance import commit  # noqa: E402

# (T, d, E, r, k): the grid at T = 2048, d = 1024, then fewer tokens and many sparse experts.
GRID = [
    (2048, 1024, 4, 8, 2),
    (2048, 1024, 8, 16, 2),
    (2048, 1024, 16, 16, 2),
    (2048, 1024, 64, 16, 2),
    (2048, 1024, 64, 16, 8),
    (512, 1024, 64, 16, 1),
    (256, 256, 64, 8, 1),
]


def fwd_bwd_ms(provider: str, shape, dtype, device, rounds: int) -> float:
    T, d, E, r, k = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, d, generator=gen, device=device).to(dtype).requires_grad_()
    a = (torch.randn(E, r, d, generator=gen, device=device) * d**-0.5).requires_grad_()
    b = (torch.randn(E, d, r, generator=gen, device=device) * r**-0.5).requires_grad_()
    route = topk_route(torch.randn(T, E, generator=gen, device=device), k, backend="eager")
    w = route.weights.detach().requires_grad_()
    dy = torch.randn(T, d, generator=gen, device=device).to(dtype)

    def stacked():
        routing = RoutingMeta(route.ids, w, E, check_ids=False)
        a0, b0, c = unselected_experts_zeroed(a, b, 2.0, routing.counts)
        return moe_lora_eager(x, a0, b0, routing.gate, c)

    fn = stacked if provider == "stacked" else lambda: moe_lora_grouped_mm(x, a, b, route.ids, w, 2.0)
    times = []
    for i in range(rounds + 1):
        start = time.perf_counter()
        torch.autograd.grad(fn(), (x, a, b, w), dy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on the CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"eager stacked form vs grouped_mm, fwd+bwd, {args.dtype} x, fp32 A/B, {name}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, commit {commit()}",
        "",
        "| T | d | E | r | k | eager stacked ms | grouped_mm ms | grouped_mm / stacked |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for shape in GRID:
        eager_ms = fwd_bwd_ms("stacked", shape, dtype, device, args.rounds)
        gmm_ms = fwd_bwd_ms("grouped_mm", shape, dtype, device, args.rounds)
        cells = " | ".join(map(str, shape))
        lines.append(f"| {cells} | {eager_ms:.1f} | {gmm_ms:.1f} | {gmm_ms / eager_ms:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
