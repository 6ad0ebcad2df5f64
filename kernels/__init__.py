"""Ops of dylora_moe: the grouped MoE-LoRA matmul and the fused top-k router, in Triton and eager PyTorch.

Installed as ``dylora_moe.kernels`` (the repo folder ``kernels/``):
``from dylora_moe.kernels import moe_lora, topk_route``.
This module is the one dispatch point between backends; it knows nothing of models.

Backends:
  - ``"triton"``: the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
  - ``"eager"``: vectorised PyTorch of the same math (the CPU path, the benchmark baseline, the test oracle).
  - ``"loop"`` (moe_lora only): a Python loop over experts, the way most MoE-LoRA code does it (benchmarks).
  - ``"auto"``: triton for CUDA tensors, eager otherwise.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from . import eager
from .routing_meta import dense_gate

__all__ = ["moe_lora", "topk_route", "RouteResult", "resolve_backend", "dense_gate"]

_BACKENDS = ("auto", "triton", "eager")


class RouteResult(NamedTuple):
    """Output of :func:`topk_route`. ``weights``/``ids`` are [T, K]; ``dense`` is [T, E] (the scatter of
    ``weights``); ``counts`` [E] is how many tokens picked each expert; ``mean_prob`` [E] is the mean of the full
    tempered softmax over tokens (for load-balancing losses)."""

    weights: torch.Tensor
    ids: torch.Tensor
    dense: torch.Tensor
    counts: torch.Tensor
    mean_prob: torch.Tensor


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, extra: tuple[str, ...] = ()) -> str:
    """Map ``backend`` to the one that runs on ``device``; raise a ValueError/RuntimeError naming the fix."""
    if backend not in _BACKENDS + extra:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_BACKENDS + extra)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "eager"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' got tensors on {device.type}, and Triton kernels need a CUDA GPU. "
            "Use backend='eager' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before triton is imported "
            "to run the kernels in Triton's (slow) interpreter."
        )
    return backend


def _check_moe_lora_inputs(x, lora_a, lora_b, expert_ids, expert_weights, dropout_mask, validate_ids):
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            f"lora_a must be [E, r, d_in] and lora_b [E, d_out, r]; got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    num_experts, rank, d_in = lora_a.shape
    if lora_b.shape[0] != num_experts or lora_b.shape[2] != rank:
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: expected [E={num_experts}, "
            f"d_out, r={rank}]"
        )
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dim {x.shape[-1]} but lora_a expects d_in={d_in}")
    if expert_ids.shape != expert_weights.shape:
        raise ValueError(
            f"expert_ids {tuple(expert_ids.shape)} and expert_weights {tuple(expert_weights.shape)} "
            "must have the same shape"
        )
    if expert_ids.dim() < 1 or expert_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"expert_ids {tuple(expert_ids.shape)} must be [..., k] with the leading dims of x {tuple(x.shape)}"
        )
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    if not (x.dtype == lora_a.dtype == lora_b.dtype):
        raise TypeError(f"x, lora_a, lora_b must share a dtype; got {x.dtype}, {lora_a.dtype}, {lora_b.dtype}")
    if not x.dtype.is_floating_point or not expert_weights.dtype.is_floating_point:
        raise TypeError(f"x and expert_weights must be floating point; got {x.dtype} and {expert_weights.dtype}")
    tensors = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "expert_ids": expert_ids, "expert_weights": expert_weights}
    if dropout_mask is not None:
        if dropout_mask.shape != x.shape:
            raise ValueError(f"dropout_mask {tuple(dropout_mask.shape)} must have the shape of x {tuple(x.shape)}")
        tensors["dropout_mask"] = dropout_mask
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device; got {devices}")
    if validate_ids and expert_ids.numel() > 0:
        # One host sync; modules that build ids with topk_route pass validate_ids=False.
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            raise IndexError(f"expert_ids must be in [0, {num_experts}); found values in [{lo}, {hi}]")


def moe_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float,
    *,
    dropout_mask: torch.Tensor | None = None,
    backend: str = "auto",
    validate_ids: bool = True,
    triton_path: str = "auto",
) -> torch.Tensor:
    """LoRA delta of a mixture of experts: ``y[t] = scaling * sum_j w[t,j] * B[e[t,j]] A[e[t,j]] x~[t]``.

    Args:
        x: [..., d_in]; leading dims are flattened by the op and restored on the output.
        lora_a: [E, r, d_in] stacked expert A matrices. lora_b: [E, d_out, r] stacked B matrices.
        expert_ids: [..., k] integer expert of each routing slot (k = E is dense routing).
        expert_weights: [..., k] weight of each slot (differentiable; feeds the router).
        scaling: alpha / r.
        dropout_mask: optional [..., d_in] multiplier on x for the LoRA input (already scaled by 1/(1-p)).
        backend: "auto" | "triton" | "eager" | "loop" (see the module docstring).
        validate_ids: check ids are in [0, E) (one host sync on a GPU).
        triton_path: "auto" | "stacked" | "grouped": the Triton formulation (see moe_lora_triton.choose_path).

    Returns the delta [..., d_out] in x's dtype; add it to the base layer's output.
    Gradients flow to x, lora_a, lora_b and expert_weights (DESIGN 3); deterministic on every backend.
    """
    _check_moe_lora_inputs(x, lora_a, lora_b, expert_ids, expert_weights, dropout_mask, validate_ids)
    backend = resolve_backend(backend, x.device, extra=("loop",))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ids2 = expert_ids.reshape(-1, expert_ids.shape[-1])
    w2 = expert_weights.reshape(-1, expert_weights.shape[-1])
    mask2 = None if dropout_mask is None else dropout_mask.reshape(-1, x.shape[-1])
    if backend == "triton":
        from .moe_lora_triton import moe_lora_triton

        out = moe_lora_triton(x2, lora_a, lora_b, ids2, w2, float(scaling), mask2, path=triton_path)
    elif backend == "loop":
        out = eager.moe_lora_loop(x2, lora_a, lora_b, ids2, w2, scaling, mask2)
    else:
        out = eager.moe_lora_eager(x2, lora_a, lora_b, ids2, w2, scaling, mask2)
    return out.reshape(*lead, lora_b.shape[1])


def topk_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    backend: str = "auto",
    check_finite: bool = True,
) -> RouteResult:
    """Fused top-k router over ``logits`` [T, E] (leading dims are flattened).

    Tempered softmax ``p = softmax(logits / temperature)``, the top-k of p (ties: the lowest expert id wins),
    weights = the k probabilities, renormalised to sum to 1 when ``normalize``. Differentiable in ``logits``
    through ``weights``, ``dense`` and ``mean_prob``. Non-finite logits raise a ValueError when ``check_finite``
    (one host sync on a GPU); otherwise they propagate NaN.
    """
    if logits.dim() < 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating tensor [..., E]; got {logits.dtype} {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if num_experts < 1:
        raise ValueError("logits must have at least one expert (last dim >= 1)")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, {num_experts}] (the number of experts); got {top_k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature!r}")
    logits2 = logits.reshape(-1, num_experts)
    if check_finite and logits2.numel() > 0 and not bool(torch.isfinite(logits2).all()):
        raise ValueError("router logits contain NaN or Inf; check the gate weights and the hidden states feeding it")
    backend = resolve_backend(backend, logits.device)
    if backend == "triton":
        from .router import topk_route_triton

        return RouteResult(*topk_route_triton(logits2, top_k, float(temperature), bool(normalize)))
    return RouteResult(*eager.topk_route_eager(logits2, top_k, temperature, normalize))
