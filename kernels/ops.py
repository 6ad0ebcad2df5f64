"""The two public ops and their input checks: :func:`moe_lora` and :func:`topk_route`, the one dispatch point
between backends (re-exported by the package ``dylora_moe.kernels``)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import eager, grouped_mm
from ._launch import resolve_backend
from .routing_meta import RoutingMeta, check_expert_ids, dense_gate

# Imported here, while the package initialises: loading the submodule `topk_route` binds it as the package's
# attribute `topk_route`, which the package's __init__ then rebinds to the op below (`dylora_moe.kernels.topk_route`
# stays the op; a later first import of the submodule would replace it).
from .topk_route import topk_route_triton

__all__ = ["moe_lora", "topk_route", "RouteResult", "RoutingMeta", "resolve_backend", "dense_gate"]


class RouteResult(NamedTuple):
    """Output of :func:`topk_route`. ``weights``/``ids`` are [..., K] and ``dense`` [..., E] with the leading dims
    of the logits; ``counts`` [E] is how many tokens picked each expert; ``mean_prob`` [E] is the mean of the full
    tempered softmax over tokens (for load-balancing losses)."""

    weights: torch.Tensor
    ids: torch.Tensor
    dense: torch.Tensor
    counts: torch.Tensor
    mean_prob: torch.Tensor


def _check_scaling(scaling, num_experts: int) -> None:
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (num_experts,) or not scaling.dtype.is_floating_point:
            raise ValueError(
                f"scaling must be a float or a floating tensor [E={num_experts}] (alpha_e / r_e per expert); "
                f"got a {scaling.dtype} tensor of shape {tuple(scaling.shape)}"
            )
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a float or a tensor [E]; got {type(scaling).__name__}")


def _check_moe_lora_inputs(x, lora_a, lora_b, expert_ids, expert_weights, scaling, dropout_mask, base_output):
    if lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ValueError(
            f"lora_a must be [E, r, d_in] and lora_b [E, d_out, r]; got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}"
        )
    num_experts, rank, d_in = lora_a.shape
    if rank == 0 or lora_b.shape[2] == 0:
        raise ValueError(
            f"lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} have rank 0: every LoRA expert needs "
            "rank r >= 1 (lora_a [E, r, d_in], lora_b [E, d_out, r])"
        )
    if x.shape[-1] != d_in:
        hint = " (did you pass lora_a transposed, [E, d_in, r] instead of [E, r, d_in]?)" if rank == x.shape[-1] else ""
        raise ValueError(f"x has last dim {x.shape[-1]} but lora_a {tuple(lora_a.shape)} expects d_in={d_in}{hint}")
    if lora_b.shape[0] != num_experts or lora_b.shape[2] != rank:
        hint = ""
        if lora_b.shape[0] == num_experts and lora_b.shape[1] == rank:
            hint = " (did you pass lora_b transposed, [E, r, d_out] instead of [E, d_out, r]?)"
        raise ValueError(
            f"lora_b {tuple(lora_b.shape)} does not match lora_a {tuple(lora_a.shape)}: expected [E={num_experts}, "
            f"d_out, r={rank}]{hint}"
        )
    if expert_ids.shape != expert_weights.shape:
        raise ValueError(
            f"expert_ids {tuple(expert_ids.shape)} and expert_weights {tuple(expert_weights.shape)} "
            "must have the same shape"
        )
    if expert_ids.dim() < 1 or expert_ids.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"expert_ids {tuple(expert_ids.shape)} must be [..., k] with the leading dims of x {tuple(x.shape)}; "
            f"expected [{', '.join(map(str, x.shape[:-1]))}, k]"
        )
    if expert_ids.dtype.is_floating_point or expert_ids.dtype == torch.bool:
        raise TypeError(f"expert_ids must be an integer tensor, got {expert_ids.dtype}")
    for name, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b), ("expert_weights", expert_weights)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point; got {t.dtype}")
    if x.dtype == torch.float64 and lora_a.dtype != torch.float64:
        raise TypeError(
            f"x is float64 but lora_a/lora_b are {lora_a.dtype}/{lora_b.dtype}: float64 needs float64 weights "
            "(weights may be float32 masters under float16/bfloat16/float32 activations)"
        )
    _check_scaling(scaling, num_experts)
    tensors = {"x": x, "lora_a": lora_a, "lora_b": lora_b, "expert_ids": expert_ids, "expert_weights": expert_weights}
    if dropout_mask is not None:
        if dropout_mask.shape != x.shape:
            raise ValueError(f"dropout_mask {tuple(dropout_mask.shape)} must have the shape of x {tuple(x.shape)}")
        tensors["dropout_mask"] = dropout_mask
    if base_output is not None:
        expected = (*x.shape[:-1], lora_b.shape[1])
        if base_output.shape != expected:
            raise ValueError(f"base_output {tuple(base_output.shape)} must be [..., d_out] = {expected}")
        tensors["base_output"] = base_output
    if isinstance(scaling, torch.Tensor):
        tensors["scaling"] = scaling
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device; got {devices}")


def _check_dropout_seed(seed, x: torch.Tensor) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        got = f"a {seed.dtype} tensor of shape {tuple(seed.shape)}" if isinstance(seed, torch.Tensor) else repr(seed)
        raise TypeError(f"dropout_seed must be an int64 tensor with one element; got {got}")
    if seed.device != x.device:
        raise ValueError(f"dropout_seed is on {seed.device} but x is on {x.device}; put the seed on x's device")


def moe_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_weights: torch.Tensor,
    scaling: float | torch.Tensor,
    *,
    dropout_mask: torch.Tensor | None = None,
    backend: str = "auto",
    validate_ids: bool = True,
    triton_path: str = "auto",
    routing: RoutingMeta | None = None,
    base_output: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_seed: torch.Tensor | None = None,
    donate_base_output: bool = False,
) -> torch.Tensor:
    """LoRA delta of a mixture of experts: ``y[t] = sum_j w[t,j] * c[e] * B[e] A[e] x~[t]`` with e = ids[t,j].

    Args:
        x: [..., d_in]; leading dims are flattened by the op and restored on the output.
        lora_a: [E, r, d_in] stacked expert A matrices. lora_b: [E, d_out, r] stacked B matrices. They may be
            float32 masters under float16/bfloat16 x (read directly by the kernels; gradients stay float32).
        expert_ids: [..., k] integer expert of each routing slot (k = E is dense routing).
        expert_weights: [..., k] weight of each slot (differentiable; feeds the router).
        scaling: c = alpha / r, a float, or a tensor [E] of per-expert alpha_e / r_e.
        dropout_mask: optional [..., d_in] multiplier on x for the LoRA input (already scaled by 1/(1-p)).
        backend: "auto" | "triton" | "eager" | "loop" (see the module docstring).
        validate_ids: check ids are in [0, E): an IndexError naming the values found on the CPU, a device-side
            assert elsewhere (no host sync). Ignored when ``routing`` is given (its ids were checked, device-side,
            when it was built).
        triton_path: "auto" | "stacked" | "grouped": the Triton formulation (see paths.choose_path).
        routing: per-step metadata built from these very ids/weights tensors (``RoutingMeta(ids.reshape(-1, k),
            weights.reshape(-1, k), E)``); layers share one per step so the gate and sort are not rebuilt
            (the model's Routing.meta builds it). Metadata built from other tensors, or from these before an
            in-place change, is refused with a ValueError (checked by identity, data pointer and version counter:
            no host sync; not checked inside torch.compile).
        base_output: [..., d_out] output of the frozen layer: returns base_output + delta, a new tensor.
        donate_base_output: the caller hands ``base_output`` over: a fresh temporary that nothing else holds (no
            hook kept it, no other op saved it for backward) and that it will not read again. The Triton stacked
            path in eager mode may then write the sum into it (one pass, no extra tensor) when that cannot be
            seen: base_output is not a view, is contiguous, is not a leaf that requires grad and shares no memory
            with another input (x itself in a square layer). Values and gradients are the same either way.
        dropout_p, dropout_seed: LoRA dropout drawn inside the kernels from a Philox stream keyed by
            ``dropout_seed``, an int64 tensor with one element on x's device (no [T, d_in] mask is built or saved
            on the stacked path). The eager and loop backends draw the same mask (eager.philox_dropout_mask).
            Exclusive with ``dropout_mask``.

    Returns the delta (or base_output + delta) [..., d_out] in x's dtype (base_output's dtype when given).
    Gradients flow to x, lora_a, lora_b, expert_weights, base_output and a ``scaling`` tensor that requires grad;
    deterministic on every backend.

    The same rules on every backend: an expert that no token of the call selects (its id appears in no slot)
    contributes nothing: its weights are never read into an output or a gradient, so NaN/Inf there change
    nothing, and its gradient is zero. Non-finite weights of a selected expert give NaN in its tokens' outputs
    (the dense eager and stacked paths may spread it to other tokens of the call). Rank 0 is refused with a
    ValueError on every backend.
    """
    _check_moe_lora_inputs(x, lora_a, lora_b, expert_ids, expert_weights, scaling, dropout_mask, base_output)
    if dropout_p and dropout_mask is not None:
        raise ValueError("pass either dropout_mask or dropout_p/dropout_seed, not both")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    if dropout_p and dropout_seed is None:
        raise ValueError("dropout_p > 0 needs dropout_seed: an int64 tensor with one element on x's device")
    if dropout_seed is not None:
        _check_dropout_seed(dropout_seed, x)
    backend = resolve_backend(backend, x.device)
    num_experts = lora_a.shape[0]
    lead, d_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_in)
    if routing is None:
        k = expert_ids.shape[-1]
        if validate_ids:
            check_expert_ids(expert_ids, num_experts)
        routing = RoutingMeta(expert_ids.reshape(-1, k), expert_weights.reshape(-1, k), num_experts, check_ids=False)
    elif routing.num_tokens != x2.shape[0] or routing.num_experts != num_experts:
        raise ValueError(
            f"routing metadata is for {routing.num_tokens} tokens and {routing.num_experts} experts; "
            f"expected {x2.shape[0]} tokens and {num_experts} experts"
        )
    else:
        routing.check_built_from(expert_ids, expert_weights)
    seed = dropout_seed.reshape(1) if dropout_p else None
    if backend == "triton":
        from .dispatch import moe_lora_triton

        return moe_lora_triton(
            x,
            lora_a,
            lora_b,
            routing,
            scaling,
            dropout_mask,
            seed,
            dropout_p,
            base_output,
            triton_path,
            donate_base_output,
        )
    mask2 = None if dropout_mask is None else dropout_mask.reshape(-1, d_in)
    if seed is not None:
        mask2 = eager.philox_dropout_mask(seed, tuple(x2.shape), dropout_p, x.dtype)
    if backend == "loop":
        out = eager.moe_lora_loop(x2, lora_a, lora_b, routing.ids, routing.weights, scaling, mask2)
    else:
        out = grouped_mm.moe_lora_eager_dispatch(x2, lora_a, lora_b, routing, scaling, mask2)
    out = out.reshape(*lead, lora_b.shape[1])
    return out if base_output is None else base_output + out.to(base_output.dtype)


def topk_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    backend: str = "auto",
    check_finite: bool = True,
) -> RouteResult:
    """Fused top-k router over ``logits`` [..., E]; weights/ids [..., K] and dense [..., E] keep the leading dims.

    Tempered softmax ``p = softmax(logits / temperature)``, the top-k of p (ties: the lowest expert id wins),
    weights = the k probabilities, renormalised to sum to 1 when ``normalize``. Differentiable in ``logits``
    through ``weights``, ``dense`` and ``mean_prob``. ``backend``: "auto" | "triton" | "eager" | "loop" ("loop"
    is the eager router: there is no per-expert loop to run). Non-finite logits fail a device-side assert when
    ``check_finite`` (a RuntimeError naming the problem, with no host sync: a CUDA graph or a sync-free step keeps
    it); otherwise they propagate NaN.
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
    lead = logits.shape[:-1]
    logits2 = logits.reshape(-1, num_experts)
    if check_finite and logits2.numel() > 0:
        message = "router logits contain NaN or Inf; check the gate weights and the hidden states feeding it"
        torch._assert_async(torch.isfinite(logits2).all(), message)
    backend = resolve_backend(backend, logits.device)
    if backend == "triton":
        result = topk_route_triton(logits2, top_k, float(temperature), bool(normalize))
    else:
        result = eager.topk_route_eager(logits2, top_k, temperature, normalize)
    weights, ids, dense, counts, mean_prob = result
    return RouteResult(
        weights.reshape(*lead, top_k), ids.reshape(*lead, top_k), dense.reshape(*lead, num_experts), counts, mean_prob
    )
