"""Op-level benchmarks: the grouped MoE-LoRA op and the fused top-k router, against their baselines
(goals: docs/design.md §5).

MoE-LoRA providers, per shape and mode (``fwd`` = training forward with inputs that require grad; ``bwd`` =
``torch.autograd.grad`` of every differentiable input through one saved forward graph, retained; ``full`` = both):
  - ``triton`` / ``eager`` / ``loop``: ``moe_lora`` on that backend (``loop`` = a Python loop over experts, the
    way most MoE-LoRA code does it; ``eager`` on the CPU picks its form by kernels/grouped_mm.eager_path);
  - ``grouped_mm``: the grouped-GEMM baseline (kernels/grouped_mm.py: pairs sorted by expert, torch's grouped_mm);
  - ``lora_dense``: ONE plain LoRA of the same rank (two matmuls, as peft does it), the cost routing must not exceed;
  - ``base``: the frozen base linear alone (``F.linear``; its backward is dx only);
  - ``base+moe_lora``: the base linear plus the MoE-LoRA delta (triton on a GPU, eager on the CPU), the layer
    whose time the goals bound at 1.15x ``base``.
Every report table states each provider's cost against ``base`` measured in the same run ("adds to base":
a delta-only provider's time / base; ``base+moe_lora``: its time / base - 1).
Dropout is off (p = 0) in every provider: ``moe_lora`` takes a precomputed mask, so mask generation is the layer's
cost, and leaving it out of ``lora_dense`` too makes that comparison the stricter one.

LoRA bytes (``lora_bytes``, for the achieved GB/s): the activations the LoRA part must move at least,
b = bytes per element. Forward reads x and read-modify-writes y: ``T * (d_in + 2 * d_out) * b``. Backward reads
dy and x and read-modify-writes dx: ``T * (d_out + 3 * d_in) * b``. full is the sum,
``T * (4 * d_in + 3 * d_out) * b``. Weights (E * r * (d_in + d_out) elements) and routing are left out: they are
under 3% of it at every benchmarked shape.

``saved_elems`` (mode full): elements the forward saves for backward beyond its inputs, to compare with
the goals' bound of ``T * (E * r + 2 * k)`` per layer.

Router providers (forward, logits without grad, finite-check off so no host sync is timed): ``triton``, ``eager``
(``topk_route``) and ``torch_seq``, the plain softmax / topk / renormalise / scatter / bincount / mean sequence. On a
GPU the Triton router also records its CUDA-graph time (``cudagraph_time``: the kernels without launch cost).

Rows: op ``moe_lora`` / ``router``, x axis ``case`` (the shape label), shape = the OpShape fields (see records.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import DEVICE, DTYPE, HAS_CUDA
from dylora_moe.kernels import moe_lora, topk_route
from dylora_moe.kernels.eager import lora_dense
from dylora_moe.kernels.grouped_mm import moe_lora_grouped_mm_op


@dataclass(frozen=True)
class OpShape:
    tokens: int
    d_in: int
    d_out: int
    experts: int
    rank: int
    top_k: int

    def __str__(self) -> str:
        return f"T{self.tokens}-d{self.d_in}x{self.d_out}-E{self.experts}-r{self.rank}-k{self.top_k}"


# GPU: the goals' reference case (sparse k = 2 and dense k = E), plus many experts (E = 64, where the Triton op
# groups tokens by expert instead of stacking).
GPU_SHAPES = [
    OpShape(8192, 4096, 4096, 8, 16, 2),
    OpShape(8192, 4096, 4096, 8, 16, 8),
    OpShape(8192, 4096, 4096, 64, 16, 2),
]
# CPU: small shapes so the suite runs anywhere; E = 32 with k = 2 is where the eager backend's rule picks grouped_mm.
CPU_SHAPES = [OpShape(512, 256, 256, 4, 8, 2), OpShape(512, 256, 256, 4, 8, 4), OpShape(512, 256, 256, 32, 8, 2)]
# BENCH_QUICK=1 (run_gpu.sh quick): the goal shape and many experts, forward + backward only.
QUICK = os.environ.get("BENCH_QUICK") == "1"
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
SHAPES = [SHAPES[0], SHAPES[-1]] if QUICK else SHAPES
MOE_PROVIDERS = ["triton", "eager", "grouped_mm", "loop", "lora_dense", "base", "base+moe_lora"]
MODES = ["full"] if QUICK else ["fwd", "bwd", "full"]
ROUTER_SHAPES = [(32768, 8, 2), (32768, 64, 2)]  # (T, E, k): the router goal is T = 32k, E <= 64
ROUTER_PROVIDERS = ["triton", "eager", "torch_seq"]
# Rounds: GPU calls take ~0.1-5 ms; the CPU ones tens of ms at most. Warm-up covers Triton compile + autotuning.
OP_ROUNDS, OP_WARMUP = (30, 5) if HAS_CUDA else (15, 2)
SCALING = 2.0  # alpha / r with alpha = 2r


def lora_bytes(shape: OpShape, mode: str, elem_bytes: int) -> int:
    forward = shape.tokens * (shape.d_in + 2 * shape.d_out)
    backward = shape.tokens * (shape.d_out + 3 * shape.d_in)
    return {"fwd": forward, "bwd": backward, "full": forward + backward}[mode] * elem_bytes


def saved_extra_elems(forward, inputs) -> int:
    """Elements the autograd graph of ``forward()`` saves that are not (views of) ``inputs``."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def make_moe_inputs(shape: OpShape):
    """x, stacked A/B, routing (ids, weights from a tempered softmax top-k), the frozen base weight, dy."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)  # on the device: 8192 x 4096 randn on a CPU costs seconds

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen, device=DEVICE) * scale).to(DTYPE)

    x = randn(shape.tokens, shape.d_in).requires_grad_()
    lora_a = randn(shape.experts, shape.rank, shape.d_in, scale=shape.d_in**-0.5).requires_grad_()
    lora_b = randn(shape.experts, shape.d_out, shape.rank, scale=shape.rank**-0.5).requires_grad_()
    route = topk_route(randn(shape.tokens, shape.experts), shape.top_k, backend="eager")
    weights = route.weights.detach().requires_grad_()
    base_w = randn(shape.d_out, shape.d_in, scale=shape.d_in**-0.5)
    dy = randn(shape.tokens, shape.d_out)
    return x, lora_a, lora_b, route.ids, weights, base_w, dy


class OpCase(NamedTuple):
    forward: Callable[[], torch.Tensor]
    inputs: list[torch.Tensor]  # differentiable inputs: what fwd+bwd takes gradients of
    frozen: list[torch.Tensor]  # other inputs (routing ids, the base weight): saving them costs nothing extra
    dy: torch.Tensor


def moe_case(provider: str, shape: OpShape) -> OpCase:
    x, lora_a, lora_b, ids, weights, base_w, dy = make_moe_inputs(shape)
    if provider == "lora_dense":
        a0, b0 = lora_a[0].detach().requires_grad_(), lora_b[0].detach().requires_grad_()
        return OpCase(lambda: lora_dense(x, a0, b0, SCALING), [x, a0, b0], [], dy)
    if provider == "base":
        return OpCase(lambda: F.linear(x, base_w), [x], [base_w], dy)
    if provider == "grouped_mm":
        return OpCase(
            lambda: moe_lora_grouped_mm_op(x, lora_a, lora_b, ids, weights, SCALING),
            [x, lora_a, lora_b, weights],
            [ids, base_w],
            dy,
        )
    backend = provider
    if provider == "base+moe_lora":
        backend = "triton" if HAS_CUDA else "eager"

    def delta():
        return moe_lora(x, lora_a, lora_b, ids, weights, SCALING, backend=backend, validate_ids=False)

    forward = (lambda: F.linear(x, base_w) + delta()) if provider == "base+moe_lora" else delta
    return OpCase(forward, [x, lora_a, lora_b, weights], [ids, base_w], dy)


def shape_dict(shape: OpShape) -> dict:
    return {
        "T": shape.tokens,
        "d_in": shape.d_in,
        "d_out": shape.d_out,
        "E": shape.experts,
        "r": shape.rank,
        "k": shape.top_k,
    }


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", MOE_PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_moe_lora(bench, shape, provider, mode):
    if provider == "triton" and not HAS_CUDA:
        pytest.skip("backend triton is timed on a CUDA GPU only (the CPU interpreter is not a speed path)")
    bench.benchmark.group = f"moe_lora {shape} {mode}"
    case = moe_case(provider, shape)
    saved = None
    if mode == "fwd":
        fn = case.forward
    elif mode == "bwd":
        out = case.forward()

        def fn():
            torch.autograd.grad(out, case.inputs, case.dy, retain_graph=True)
    else:

        def fn():
            torch.autograd.grad(case.forward(), case.inputs, case.dy)

        saved = saved_extra_elems(case.forward, case.inputs + case.frozen)
    lora_only = provider not in ("base", "base+moe_lora")
    bench(
        fn,
        op="moe_lora",
        provider=provider,
        mode=mode,
        x=("case", str(shape)),
        shape=shape_dict(shape),
        rounds=OP_ROUNDS,
        warmup_rounds=OP_WARMUP,
        kernel_clock=True,
        bytes_moved=lora_bytes(shape, mode, DTYPE.itemsize) if lora_only else None,
        saved_elems=saved,
    )


def route_torch(logits: torch.Tensor, top_k: int):
    """The torch sequence a router writes without a fused kernel (what the router's 3x goal is measured against)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    dense = torch.zeros_like(probs).scatter(1, ids, weights)
    counts = torch.bincount(ids.flatten(), minlength=logits.shape[-1])
    return weights, ids, dense, counts, probs.mean(dim=0)


@pytest.mark.parametrize("provider", ROUTER_PROVIDERS)
@pytest.mark.parametrize("tokens,experts,top_k", ROUTER_SHAPES, ids=lambda v: str(v))
def test_router(bench, tokens, experts, top_k, provider):
    if provider == "triton" and not HAS_CUDA:
        pytest.skip("backend triton is timed on a CUDA GPU only (the CPU interpreter is not a speed path)")
    bench.benchmark.group = f"router T{tokens}-E{experts}-k{top_k} fwd"
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = torch.randn(tokens, experts, generator=gen, device=DEVICE).to(DTYPE)
    if provider == "torch_seq":

        def fn():
            return route_torch(logits, top_k)
    else:

        def fn():
            return topk_route(logits, top_k, backend=provider, check_finite=False)

    bench(
        fn,
        op="router",
        provider=provider,
        mode="fwd",
        x=("case", f"T{tokens}-E{experts}-k{top_k}"),
        shape={"T": tokens, "E": experts, "k": top_k},
        rounds=OP_ROUNDS,
        warmup_rounds=OP_WARMUP,
        kernel_clock=True,
        cudagraph=provider == "triton",  # the others sync the host (bincount): they cannot be captured
    )
