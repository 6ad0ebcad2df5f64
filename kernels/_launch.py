"""Shared host helpers of the Triton ops: backend choice, launch configs, the launch point, op registration.

Every Triton kernel of this package is launched through :func:`launch`, so tests count launches in one place
(:func:`count_launches`). Every fused op is registered through :func:`register_fused_op`: a ``torch.library``
custom op with a fake implementation and autograd (what ``torch.compile`` traces without a graph break; a
``triton_op`` would break under the interpreter), plus an ``autograd.Function`` over the same forward and
backward for eager mode, where the custom-op dispatcher's host cost would exceed the kernels' own time.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

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


@functools.cache
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


# --- the one launch point ------------------------------------------------------------------------------------

_launch_log: list[str] | None = None


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """Launch ``kernel`` on ``grid`` (a tuple: configs are chosen by the host, never by an autotuner)."""
    if _launch_log is not None:
        _launch_log.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        # Torch ops the interpreter runs to emulate memory are not ours: hide them from a counting dispatch mode.
        with torch.utils._python_dispatch._disable_current_modes():
            kernel[grid](*args, **meta)
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def count_launches():
    """Collect the name of every Triton launch inside the block (tests of the launch budget)."""
    global _launch_log
    previous, _launch_log = _launch_log, []
    try:
        yield _launch_log
    finally:
        _launch_log = previous


# --- one registration for every fused op ---------------------------------------------------------------------


class FusedOp:
    """A forward/backward pair registered once for both eager mode and torch.compile.

    ``forward(*inputs, inplace=False) -> tuple``: outputs; the first is the op's result, the rest are kept for
    backward. With ``inplace`` (eager mode only) it may write its result into the input ``dirty(inputs)`` names.
    ``save(inputs, outputs) -> tuple`` of what backward needs: tensors (or None) and plain Python scalars.
    ``backward(grad, *saved, needs=[...]) -> tuple`` of tensors (placeholders where ``needs`` says no);
    ``to_input_grads(grad, grads, needs) -> tuple`` maps them onto the inputs (None where not needed).
    ``fake_forward`` / ``fake_backward``: shapes only, for tracing.
    """

    def __init__(
        self,
        name: str,
        forward: Callable,
        fake_forward: Callable,
        backward: Callable,
        fake_backward: Callable,
        save: Callable,
        to_input_grads: Callable,
        dirty: Callable | None = None,
    ):
        self.forward, self.backward, self.save, self.dirty = forward, backward, save, dirty
        self.to_input_grads = to_input_grads
        self.fwd_op = torch.library.custom_op(f"dylora_moe::{name}", forward, mutates_args=())
        self.fwd_op.register_fake(fake_forward)
        self.bwd_op = torch.library.custom_op(f"dylora_moe::{name}_backward", backward, mutates_args=())
        self.bwd_op.register_fake(fake_backward)
        op = self

        def setup_context(ctx, inputs, output, keyword_only_inputs=None):
            _stash(ctx, op.save(inputs, output))

        def compiled_backward(ctx, grad, *_unused):
            needs = list(ctx.needs_input_grad)
            return _needed(op.to_input_grads(grad, op.bwd_op(grad, *_unstash(ctx), needs=needs), needs), needs)

        self.fwd_op.register_autograd(compiled_backward, setup_context=setup_context)

        class Eager(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                outputs = op.forward(*inputs, inplace=op.dirty is not None)
                written = None if op.dirty is None else op.dirty(inputs)
                if written is not None and outputs[0] is written:
                    ctx.mark_dirty(written)
                _stash(ctx, op.save(inputs, outputs))
                return outputs[0]

            @staticmethod
            def backward(ctx, grad):
                needs = list(ctx.needs_input_grad)
                return _needed(op.to_input_grads(grad, op.backward(grad, *_unstash(ctx), needs=needs), needs), needs)

        Eager.__name__ = Eager.__qualname__ = f"{name}_function"
        self.eager = Eager

    def __call__(self, *inputs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.fwd_op(*inputs)[0]
        return self.eager.apply(*inputs)


def _needed(grads: tuple, needs: list[bool]) -> tuple:
    return tuple(g if need else None for g, need in zip(grads, needs))


def _stash(ctx, items: tuple) -> None:
    """Save tensors with save_for_backward (version-checked) and scalars on ctx, remembering the order."""
    is_tensor = [item is None or isinstance(item, torch.Tensor) for item in items]
    ctx.save_for_backward(*(item for item, t in zip(items, is_tensor) if t))
    ctx.stash_kinds = is_tensor
    ctx.stash_scalars = [item for item, t in zip(items, is_tensor) if not t]


def _unstash(ctx) -> list:
    tensors, scalars = iter(ctx.saved_tensors), iter(ctx.stash_scalars)
    return [next(tensors) if t else next(scalars) for t in ctx.stash_kinds]


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
