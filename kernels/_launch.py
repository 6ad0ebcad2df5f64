"""Shared host helpers of the Triton ops: backend choice, dot flags, the launch point, op registration.

Every Triton kernel of this package is launched through :func:`launch`, with every argument by name, so tests
count launches in one place (:func:`count_launches`) and the compile report records them (:func:`capture_launches`).
Every op is registered through :func:`register_fused_op`: a ``torch.library`` custom op with a fake implementation
and autograd (what ``torch.compile`` traces without a graph break; a ``triton_op`` would break under the
interpreter), plus an ``autograd.Function`` over the same forward and backward for eager mode, where the custom-op
dispatcher's host cost would exceed the kernels' own time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

BACKENDS = ("auto", "triton", "eager", "loop")
ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """Whether Triton runs its CPU interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def deterministic_mode() -> bool:
    """DYLORA_MOE_DETERMINISTIC=1 pins every launch config (same inputs, same bits, in every process)."""
    return os.environ.get("DYLORA_MOE_DETERMINISTIC", "0") == "1"


def resolve_backend(backend: str, device: torch.device, allowed: tuple[str, ...] = BACKENDS) -> str:
    """Map ``backend`` to the one that runs on ``device``; raise a ValueError/RuntimeError naming the fix.

    "auto" is triton for CUDA tensors and eager otherwise, decided from the tensor's device at call time.
    """
    if backend not in allowed:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(allowed)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "eager"
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            f"backend='triton' got tensors on {device.type}, and Triton kernels need a CUDA GPU. "
            "Use backend='eager' (or 'auto') on the CPU, or set TRITON_INTERPRET=1 before triton is imported "
            "to run the kernels in Triton's (slow) interpreter."
        )
    return backend


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_flags(dtype: torch.dtype) -> dict:
    """Operand dtype and precision of every tl.dot for activations of ``dtype``.

    Weights of any dtype (fp32 masters under bf16/fp16 activations) are cast to DOT_DTYPE on load. The
    interpreter has no bf16 arithmetic, so there everything is fp32. fp32 dots follow torch's TF32 switch.
    """
    return _dot_flags(dtype, torch.backends.cuda.matmul.allow_tf32, interpreter_enabled())


@functools.lru_cache(maxsize=16)
def _dot_flags(dtype: torch.dtype, allow_tf32: bool, interpret: bool) -> dict:
    upcast = interpret and dtype == torch.bfloat16
    dot_dtype = tl.float32 if upcast or dtype == torch.float32 else {torch.float16: tl.float16}.get(dtype, tl.bfloat16)
    tf32 = dtype == torch.float32 and allow_tf32 and not interpret
    return dict(DOT_DTYPE=dot_dtype, DOT_PRECISION="tf32" if tf32 else "ieee")


def strides3(w: torch.Tensor, rank_dim: int) -> tuple[int, int, int]:
    """Strides (s_e, s_r, s_d) that address an [E, R, D] or [E, D, R] tensor as the stacked W[e * R + r, d]."""
    return w.stride(0), w.stride(rank_dim), w.stride(3 - rank_dim)


def device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


# --- the one launch point ------------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One kernel launch as the host code issued it: what :func:`capture_launches` records."""

    kernel: Any
    grid: tuple[int, ...]
    kwargs: dict[str, Any]  # every kernel argument and constexpr by name, plus num_warps / num_stages


_launch_log: list[str] | None = None
_captured: list[Launch] | None = None


def kernel_name(kernel) -> str:
    return kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__


def launch(kernel, grid: tuple[int, ...], **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` with every argument by name (configs are chosen by the host, never by an
    autotuner)."""
    if _captured is not None:
        _captured.append(Launch(kernel, grid, kwargs))
        return
    if _launch_log is not None:
        _launch_log.append(kernel_name(kernel))
        # Torch ops the interpreter runs to emulate memory are not ours: hide them from a counting dispatch mode.
        with torch.utils._python_dispatch._disable_current_modes():
            kernel[grid](**kwargs)
        return
    kernel[grid](**kwargs)


@contextlib.contextmanager
def count_launches():
    """Collect the name of every Triton launch inside the block (tests of the launch budget)."""
    global _launch_log
    previous, _launch_log = _launch_log, []
    try:
        yield _launch_log
    finally:
        _launch_log = previous


@contextlib.contextmanager
def capture_launches():
    """Record every launch inside the block instead of running it (the compile report runs the host code on meta
    tensors to learn exactly which kernels, arguments and configs a shape gets)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def capturing() -> bool:
    return _captured is not None


# --- one registration for every fused op ---------------------------------------------------------------------


class FusedOp:
    """A forward/backward pair registered once for torch.compile (a ``torch.library`` custom op with a fake
    implementation and autograd, which ``torch.compile`` traces without a graph break) and for eager mode (an
    ``autograd.Function`` over the same functions: the custom-op dispatcher's host cost would exceed the kernels'
    own time). Built by :func:`register_fused_op`; calling it runs the op on the inputs, by position or name.
    """

    def __init__(self, name, forward, backward, fake_forward, fake_backward, save, input_grads, grad_names,
                 non_differentiable, dirty):  # fmt: skip
        self.name, self.forward, self.backward, self.save = name, forward, backward, save
        self.input_grads, self.grad_names, self.dirty = input_grads, tuple(grad_names), dirty
        self.results = len(self.grad_names)
        self.non_differentiable = tuple(non_differentiable)
        self.input_names = tuple(inspect.signature(forward).parameters)[: _positional_count(forward)]
        self.backward_takes_needs = "needs" in inspect.signature(backward).parameters
        self.fwd_op = torch.library.custom_op(f"dylora_moe::{name}", forward, mutates_args=())
        self.fwd_op.register_fake(fake_forward)
        self.bwd_op = torch.library.custom_op(f"dylora_moe::{name}_backward", backward, mutates_args=())
        self.bwd_op.register_fake(fake_backward)
        op = self

        def setup_context(ctx, inputs, output, keyword_only_inputs=None):
            _stash(ctx, op.save(dict(zip(op.input_names, inputs)), output))

        def compiled_backward(ctx, *grads):
            return op._input_grads(ctx, grads, op.bwd_op)

        self.fwd_op.register_autograd(compiled_backward, setup_context=setup_context)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                ctx.set_materialize_grads(False)
                outputs = op._forward(inputs)
                written = None if op.dirty is None else dict(zip(op.input_names, inputs))[op.dirty]
                if written is not None and outputs[0] is written:
                    ctx.mark_dirty(written)
                ctx.mark_non_differentiable(*(outputs[i] for i in op.non_differentiable))
                _stash(ctx, op.save(dict(zip(op.input_names, inputs)), outputs))
                return outputs[0] if op.results == 1 else tuple(outputs[: op.results])

            @staticmethod
            def backward(ctx, *grads):
                if torch.is_grad_enabled():  # create_graph=True: the kernels' backward has no backward of its own
                    raise RuntimeError(
                        f"{op.name}: backend 'triton' is not twice differentiable (create_graph=True, e.g. a "
                        "gradient penalty); use backend='eager'"
                    )
                return op._input_grads(ctx, grads, op.backward)

        Eager.__name__ = Eager.__qualname__ = f"{name}_function"
        self.eager = Eager

    def _forward(self, inputs: tuple) -> tuple:
        if self.dirty is None:
            return self.forward(*inputs)
        return self.forward(*inputs, inplace=True)

    def _input_grads(self, ctx, grads: tuple, backward: Callable) -> tuple:
        needs = list(ctx.needs_input_grad)
        saved = _unstash(ctx)
        grads = {n: g for n, g in zip(self.grad_names, grads) if n is not None}
        kwargs = {**grads, **saved}
        if self.backward_takes_needs:
            kwargs["needs"] = needs
        named = self.input_grads(backward(**kwargs), grads, needs)
        unknown = set(named) - set(self.input_names)
        assert not unknown, f"{self.name}: gradients for unknown inputs {unknown}"
        return tuple(named.get(n) if need else None for n, need in zip(self.input_names, needs))

    def __call__(self, *args: Any, **kwargs: Any):
        inputs = self._bind(args, kwargs)
        if torch.compiler.is_compiling():
            outputs = self.fwd_op(*inputs)
            return outputs[0] if self.results == 1 else tuple(outputs[: self.results])
        if not torch.is_grad_enabled() or not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            outputs = self._forward(inputs)  # nothing to differentiate: skip the autograd.Function's host cost
            return outputs[0] if self.results == 1 else tuple(outputs[: self.results])
        return self.eager.apply(*inputs)

    def _bind(self, args: tuple, kwargs: dict) -> tuple:
        if not kwargs:
            return args
        bound = dict(zip(self.input_names, args))
        bound.update(kwargs)
        missing = [n for n in self.input_names if n not in bound]
        if missing:
            raise TypeError(f"{self.name}: missing inputs {missing}")
        return tuple(bound[n] for n in self.input_names)


def register_fused_op(
    name: str,
    *,
    forward: Callable,
    backward: Callable,
    fake_forward: Callable,
    fake_backward: Callable,
    save: Callable[[dict, tuple], dict],
    input_grads: Callable[[tuple, dict, list], dict],
    grad_names: tuple[str | None, ...] = ("grad",),
    non_differentiable: tuple[int, ...] = (),
    dirty: str | None = None,
) -> FusedOp:
    """Register the op ``dylora_moe::<name>`` and its backward ``dylora_moe::<name>_backward``; every Triton op of
    this package goes through here.

    ``forward(*inputs)`` returns a tuple of outputs: the first ``len(grad_names)`` are what the op returns (those at
    the indices ``non_differentiable`` get no gradient), the rest are kept for backward only. ``save(inputs,
    outputs)``: a dict, by the names of ``backward``'s parameters, of what backward needs (tensors, None, or Python
    scalars), given the inputs by ``forward``'s parameter names. ``backward`` also receives each result's gradient
    under the parameter name ``grad_names`` gives it (None: not passed; the gradient itself is None in eager mode
    when that result got none) and, if it has a ``needs`` parameter, which inputs need a gradient.
    ``input_grads(backward_outputs, result_grads, needs)``: a dict of gradients by input name
    (inputs left out get None). ``dirty``: the input that ``forward(..., inplace=True)`` may return as its first
    output, written in place (eager mode only).
    """
    return FusedOp(name, forward, backward, fake_forward, fake_backward, save, input_grads, grad_names,
                   non_differentiable, dirty)  # fmt: skip


def _positional_count(fn: Callable) -> int:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in inspect.signature(fn).parameters.values())


def _stash(ctx, items: dict) -> None:
    """Save tensors with save_for_backward (version-checked) and everything else on ctx, by name."""
    tensors = {k: v for k, v in items.items() if v is None or isinstance(v, torch.Tensor)}
    ctx.save_for_backward(*tensors.values())
    ctx.stash_tensor_names = tuple(tensors)
    ctx.stash_scalars = {k: v for k, v in items.items() if k not in tensors}


def _unstash(ctx) -> dict:
    return {**dict(zip(ctx.stash_tensor_names, ctx.saved_tensors)), **ctx.stash_scalars}


# --- in-kernel dropout ----------------------------------------------------------------------------------------


@triton.jit
def dropout_scale(seed_ptr, rows, cols, width, p):
    """[rows, cols] multiplier of inverted dropout: 1/(1-p) where kept, 0 where dropped.

    Philox (tl.rand) keyed by the int64 seed at ``seed_ptr``, counter = row * width + col: the same element gets
    the same draw in every kernel (forward, both backward passes) and in the eager twin
    (eager.philox_dropout_mask), so no [T, D] mask is ever stored.
    """
    seed = tl.load(seed_ptr)
    offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    keep = tl.rand(seed, offsets) >= p
    return tl.where(keep, 1.0 / (1.0 - p), 0.0)
