"""Linear head + cross-entropy in row chunks: the loss of a large vocabulary without the [N, V] logits.

Shape letters: N rows (tokens), H hidden width, V vocabulary, C rows per chunk.

A causal LM's loss materialises float32 logits of N x V (4 GB at 4 x 1024 tokens and a 256k vocabulary), plus their
gradient. Here the head and the loss run C rows at a time, and the gradients are computed in the same pass
(Liger-Kernel's fused linear cross-entropy, in plain PyTorch): per chunk

    z = h W^T (+ s * b)      [C, V]   (optionally soft-capped: cap * tanh(z / cap))
    loss_i = logsumexp(z_i) - z_i[y_i]        (0 where y_i = ignore_index)
    dz = softmax(z) - onehot(y)               (0 on ignored rows; times 1 - tanh^2 when soft-capped)
    dh = dz W,   dW += dz^T h,   db += dz^T s

so at most one chunk of logits (and its gradient) is alive; what is saved for backward is dh [N, H] (and dW, db when
the head trains), scaled by the incoming gradient in backward. Without grad mode only the loss is computed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def default_chunk_rows(num_rows: int, hidden: int, vocab: int) -> int:
    """Liger's rule: chunks whose [C, V] logits are about the size of the [N, H] hidden states, a power of two."""
    chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    return max(1, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(num_rows / chunks))))))


def _chunk_logits(h, weight, bias, scale, softcap):
    z = F.linear(h, weight)
    if bias is not None:
        z = z + (bias if scale is None else scale[:, None].to(z.dtype) * bias)
    z = z.float()
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, bias_scale, targets, softcap, ignore_index, chunk_rows):
        wants = ctx.needs_input_grad[:4]
        grads = [
            torch.zeros_like(hidden) if wants[0] else None,
            torch.zeros_like(weight, dtype=torch.float32) if wants[1] else None,
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and wants[2] else None,
            torch.zeros_like(bias_scale, dtype=torch.float32) if bias_scale is not None and wants[3] else None,
        ]
        grad_hidden, grad_weight, grad_bias, grad_scale = grads
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h, y = hidden[rows], targets[rows]
            scale = None if bias_scale is None else bias_scale[rows]
            z, t = _chunk_logits(h, weight, bias, scale, softcap)
            valid = y != ignore_index
            y = torch.where(valid, y, 0)
            lse = torch.logsumexp(z, dim=-1)
            total = total + torch.where(valid, lse - z.gather(1, y[:, None])[:, 0], 0.0).sum()
            if all(g is None for g in grads):
                continue
            dz = torch.exp(z - lse[:, None])  # softmax(z)
            dz.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
            dz = torch.where(valid[:, None], dz, 0.0)
            if t is not None:
                dz = dz * (1 - t * t)
            if grad_hidden is not None:
                grad_hidden[rows] = dz.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight += dz.t() @ h.float()
            if grad_bias is not None:
                grad_bias += (dz if scale is None else dz * scale[:, None].float()).sum(0)
            if grad_scale is not None:
                grad_scale[rows] = dz @ bias.float()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in grads))
        ctx.has_grad = [g is not None for g in grads]
        ctx.dtypes = (
            hidden.dtype,
            weight.dtype,
            None if bias is None else bias.dtype,
            getattr(bias_scale, "dtype", None),
        )
        return total

    @staticmethod
    def backward(ctx, grad_total):
        out = [None] * 8
        for i, (grad, has, dtype) in enumerate(zip(ctx.saved_tensors, ctx.has_grad, ctx.dtypes)):
            if has:
                out[i] = (grad.float() * grad_total).to(dtype)
        return tuple(out)


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    bias_scale: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Sum over rows of cross_entropy(head(hidden), targets) in float32, never holding more than one chunk of logits.

    hidden [N, H]; weight [V, H] (and bias [V]) of the linear head, in hidden's dtype; targets [N] (ignore_index:
    no loss); bias_scale [N]: the bias counted that many times per row (a mixture of hidden states whose weights do
    not sum to 1); softcap: Gemma-2's final logit soft-capping. Differentiable in hidden, weight, bias and
    bias_scale.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected; got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    args = (hidden, weight, bias, bias_scale, targets.long(), softcap, ignore_index, rows)
    inputs = (t for t in args[:4] if t is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _ChunkedLinearCrossEntropy.apply(*args)
    with torch.no_grad():  # the loss alone: the function's forward skips every gradient when none is wanted
        return _ChunkedLinearCrossEntropy.forward(_NoGradContext(), *args)


class _NoGradContext:
    """Stands in for autograd's ctx when no gradient is wanted."""

    needs_input_grad = (False,) * 8

    def save_for_backward(self, *tensors):
        pass
