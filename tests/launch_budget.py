"""Counting tools for the per-layer launch budget (issue 8): ATen compute ops seen by a TorchDispatchMode and
Triton launches seen at the package's one launch point (kernels._launch.launch).

Run as a script to print the counts and host time per layer (the figures of benchmarks/results/NOTES.md):
``TRITON_INTERPRET=1 python tests/launch_budget.py``.
"""

from __future__ import annotations

import importlib
import time

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dylora_moe import MoELoRALinear, Routing
from dylora_moe.kernels import _launch, grouped, stacked

topk_route = importlib.import_module("dylora_moe.kernels.topk_route")  # the package's `topk_route` is the op

# Views, allocations and metadata: not compute (issue 8's budget counts compute ops only).
NOT_COMPUTE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "reshape",
    "expand", "t", "transpose", "permute", "detach", "alias", "as_strided", "select", "slice", "unsqueeze", "squeeze",
    "unbind", "split", "lift_fresh", "_reshape_alias", "set_", "zeros", "new_zeros", "zeros_like", "ones_like",
}  # fmt: skip


class CountOps(TorchDispatchMode):
    """Records the name of every ATen compute op dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NOT_COMPUTE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def make_layer(kernel: str, T: int = 48, d: int = 64, E: int = 4, r: int = 8, k: int = 2, dropout: float = 0.0):
    """A layer with routing set for the step and its metadata already built (as a previous layer would have)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(d, d), E, r, 16.0, dropout=dropout, kernel=kernel)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, T // 2, d, requires_grad=True)
    ids = torch.rand(2, T // 2, E).argsort(-1)[..., :k]
    weights = torch.rand(2, T // 2, k, requires_grad=True)
    route = Routing(ids, weights)
    layer.context.set(route)
    route.meta(x.shape[:-1], E).gate  # noqa: B018 - built once per step, before this layer
    return layer, x


def count_step(layer: MoELoRALinear, x: torch.Tensor) -> tuple[list[str], list[str], list[str]]:
    """(layer ops, base-layer-alone ops, Triton launches) of one forward + backward."""
    layer(x).sum().backward(retain_graph=True)  # warm: configs chosen and cached
    with CountOps() as base_ops:
        layer.base_layer(x).sum().backward()
    with CountOps() as ops, _launch.count_launches() as launches:
        layer(x).sum().backward(retain_graph=True)
    return ops.ops, base_ops.ops, list(launches)


def host_time_us(layer: MoELoRALinear, x: torch.Tensor, stub: bool, repeats: int = 30) -> tuple[float, float]:
    """Mean wall time per layer forward + backward and per base-layer forward + backward, in us. With ``stub`` the
    Triton launches are skipped (the CPU interpreter's kernel time is not a GPU's), leaving the host cost."""
    modules = [stacked, grouped, topk_route]
    real = [m.launch for m in modules]
    if stub:
        for m in modules:
            m.launch = lambda *a, **k: None
    try:
        for _ in range(3):
            layer(x).sum().backward(retain_graph=True)
        start = time.perf_counter()
        for _ in range(repeats):
            layer(x).sum().backward(retain_graph=True)
        middle = time.perf_counter()
        for _ in range(repeats):
            layer.base_layer(x).sum().backward()
        end = time.perf_counter()
    finally:
        for m, launch in zip(modules, real):
            m.launch = launch
    return (middle - start) / repeats * 1e6, (end - middle) / repeats * 1e6


if __name__ == "__main__":
    for kernel, dropout in (("triton", 0.0), ("triton", 0.1), ("eager", 0.0)):
        layer, x = make_layer(kernel, dropout=dropout)
        layer.train()
        ops, base, launches = count_step(layer, x)
        extra = list(ops)
        for op in base:
            if op in extra:
                extra.remove(op)
        layer_us, base_us = host_time_us(layer, x, stub=kernel == "triton")
        print(
            f"{kernel} p={dropout}: {len(launches)} launches {launches}; {len(extra)} ATen compute ops beyond the base "
            f"layer {extra}; host {layer_us:.0f} us per layer fwd+bwd (base alone {base_us:.0f} us)"
        )
