"""Fused top-k router in Triton: tempered softmax, top-k, renormalisation and routing statistics in one pass.

Shape letters: T tokens, E experts, K experts per token (top-k), NB row blocks (programs of the forward).

Dataflow:
  forward   ``_topk_route_fwd_kernel``, one program per BLOCK_T rows: read logits [T, E] once (any float dtype,
            any strides), p = softmax(logits / tau) in fp32, top-k of p, write weights [T, K], ids [T, K],
            dense [T, E] and this block's per-expert partial counts / probability sums ([NB, E] each).
            ``_route_stats_kernel`` then sums the NB partials in a fixed order (deterministic, no atomics)
            into counts [E] and mean_prob [E].
  backward  ``_topk_route_bwd_kernel``, one program per BLOCK_T rows: recompute p from the logits, scatter
            dweights onto the selected experts via ids, add ddense there, and apply the closed-form softmax
            gradients (no autograd through top-k) plus the mean_prob term through the full softmax Jacobian:
              normalize:  dz = (1/tau) [w * (g - <w, g>) on the selected set + p * (m - <p, m>)]
              otherwise:  dz = (1/tau) [p * (g - <p, g>) + p * (m - <p, m>)]
            with g[t, e] = dweights[t, j] + ddense[t, e] where ids[t, j] = e (0 off the set), m[e] = dmean[e] / T.

Top-k and ties: each probability p >= 0 is packed with its expert id into one int64 key
``(bits(p) << 32) | (BLOCK_E - 1 - id)``; float bits of non-negative numbers order like the numbers, so the
largest key is the largest probability and, among equal probabilities, the lowest expert id (the eager twin's
stable descending sort gives the same order). The kernel takes the max key K times (one int64 row reduction
each). A ``tl.sort`` of the keys could replace the loop for K = E; it was not measured faster on a GPU and is
~10x slower in the interpreter, so there is one code path.
With ``check_finite=False`` a NaN row gives NaN weights but ids that stay in [0, E).

Registered as ``torch.ops.dylora_moe.topk_route`` / ``topk_route_backward`` through _launch.register_fused_op
(custom ops with fake implementations and autograd), so ``torch.compile`` traces through it without a graph break.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import capturing, device_guard, launch, register_fused_op, resolve_backend
from .configs import route_config, route_stats_config
from .device import device_spec

__all__ = ["topk_route_triton", "topk_route_forward", "topk_route_backward", "topk_route_op"]


@triton.jit
def _softmax_rows(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, stride_le, tau):
    """p = softmax(logits / tau) over the real columns of a [BLOCK_T, BLOCK_E] tile, in fp32 (0 in padding)."""
    offs = rows.to(tl.int64)[:, None] * stride_lt + cols[None, :] * stride_le
    z = tl.load(logits_ptr + offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32) / tau
    z = tl.where(col_ok[None, :], z, float("-inf"))
    num = tl.exp(z - tl.max(z, axis=1)[:, None])
    return num / tl.sum(num, axis=1)[:, None]


@triton.jit
def _topk_route_fwd_kernel(
    logits_ptr,  # [T, E] any float dtype, strides (stride_lt, stride_le)
    weights_ptr,  # [T, K] fp32, contiguous
    ids_ptr,  # [T, K] int64, contiguous
    dense_ptr,  # [T, E] fp32, contiguous
    part_counts_ptr,  # [NB, E] int32: tokens of this block that picked each expert
    part_probs_ptr,  # [NB, E] fp32: sum of p over this block's tokens
    T,
    E,
    stride_lt,
    stride_le,
    tau,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    p = _softmax_rows(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, stride_le, tau)

    # Packed keys (see the module docstring); padding columns get -1, below every real key (>= 0).
    keys = (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :].to(tl.int64)
    keys = tl.where(col_ok[None, :], keys, -1)
    top = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(K):
        best = tl.max(keys, axis=1)
        top = tl.where(kcols[None, :] == j, best[:, None], top)
        keys = tl.where(keys == best[:, None], -2, keys)  # taken: -2, distinct from padding's -1
    sel = (keys == -2) & row_ok[:, None]
    top_ids = BLOCK_E - 1 - (top & 0x7FFFFFFF)  # the low word is < BLOCK_E
    top_p = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    top_p = tl.where(kcols[None, :] < K, top_p, 0.0)
    if NORMALIZE:
        denom = tl.sum(top_p, axis=1)[:, None]
        top_w = top_p / denom
        dense = tl.where(sel, p / denom, 0.0)
    else:
        top_w = top_p
        dense = tl.where(sel, p, 0.0)

    rows64 = rows.to(tl.int64)
    kmask = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + rows64[:, None] * K + kcols[None, :], top_w, mask=kmask)
    tl.store(ids_ptr + rows64[:, None] * K + kcols[None, :], top_ids, mask=kmask)
    tl.store(dense_ptr + rows64[:, None] * E + cols[None, :], dense, mask=row_ok[:, None] & col_ok[None, :])
    counts = tl.sum(sel.to(tl.int32), axis=0)
    prob_sum = tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0)
    tl.store(part_counts_ptr + pid * E + cols, counts, mask=col_ok)
    tl.store(part_probs_ptr + pid * E + cols, prob_sum, mask=col_ok)


@triton.jit
def _route_stats_kernel(
    part_counts_ptr,  # [NB, E] int32
    part_probs_ptr,  # [NB, E] fp32
    counts_ptr,  # [E] int64
    mean_ptr,  # [E] fp32
    NB,
    E,
    T,
    BLOCK_N: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    acc_counts = tl.zeros([BLOCK_E], dtype=tl.int64)
    acc_probs = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start in range(0, NB, BLOCK_N):  # fixed order: the same bits on every run
        blocks = start + tl.arange(0, BLOCK_N)
        offs = blocks[:, None] * E + cols[None, :]
        mask = (blocks < NB)[:, None] & col_ok[None, :]
        acc_counts += tl.sum(tl.load(part_counts_ptr + offs, mask=mask, other=0).to(tl.int64), axis=0)
        acc_probs += tl.sum(tl.load(part_probs_ptr + offs, mask=mask, other=0.0), axis=0)
    tl.store(counts_ptr + cols, acc_counts, mask=col_ok)
    tl.store(mean_ptr + cols, acc_probs / T, mask=col_ok)


@triton.jit
def _add_slot(
    g, sel, j, ids_ptr, dweights_ptr, rows64, cols, row_ok, stride_it, stride_ik, stride_wt, stride_wk, HAS_DWEIGHTS
):
    """Mark slot j's expert of each row as selected and add dweights[:, j] to its column of g [BLOCK_T, BLOCK_E]."""
    ids_j = tl.load(ids_ptr + rows64 * stride_it + j * stride_ik, mask=row_ok, other=-1)
    hit = cols[None, :] == ids_j[:, None]
    if HAS_DWEIGHTS:
        dw_j = tl.load(dweights_ptr + rows64 * stride_wt + j * stride_wk, mask=row_ok, other=0.0)
        g += tl.where(hit, dw_j.to(tl.float32)[:, None], 0.0)
    return g, sel | hit


@triton.jit
def _topk_route_bwd_kernel(
    logits_ptr,  # [T, E] any float dtype, strides (stride_lt, stride_le)
    ids_ptr,  # [T, K] int64, strides (stride_it, stride_ik)
    dweights_ptr,  # [T, K] float, strides (stride_wt, stride_wk); stride 0 from expanded grads is fine
    ddense_ptr,  # [T, E] float, strides (stride_dt, stride_de)
    dmean_ptr,  # [E] float, stride stride_m
    # A pointer whose HAS_* flag is False is never read: that output got no gradient (None).
    dlogits_ptr,  # [T, E] logits' dtype, contiguous
    T,
    E,
    stride_lt,
    stride_le,
    stride_it,
    stride_ik,
    stride_wt,
    stride_wk,
    stride_dt,
    stride_de,
    stride_m,
    tau,
    K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_DWEIGHTS: tl.constexpr,
    HAS_DDENSE: tl.constexpr,
    HAS_DMEAN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    p = _softmax_rows(logits_ptr, rows, cols, row_ok, col_ok, stride_lt, stride_le, tau)

    g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)  # gradient of the selected p (0 off the set)
    sel = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
    if HAS_DWEIGHTS or HAS_DDENSE:
        slot_args = (ids_ptr, dweights_ptr, rows64, cols, row_ok, stride_it, stride_ik, stride_wt, stride_wk)
        if K <= 4:  # unrolled, so the loads issue early
            for j in tl.static_range(K):
                g, sel = _add_slot(g, sel, j, *slot_args, HAS_DWEIGHTS)
        else:  # unrolling K = 8..64 hoists every slot's loads and spills (up to 6 KB of stack per thread)
            for j in range(K):
                g, sel = _add_slot(g, sel, j, *slot_args, HAS_DWEIGHTS)
        if HAS_DDENSE:
            ddense_offs = rows64[:, None] * stride_dt + cols[None, :] * stride_de
            ddense = tl.load(ddense_ptr + ddense_offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.where(sel, g + ddense, 0.0)
    m = tl.zeros([1, BLOCK_E], dtype=tl.float32)  # gradient of p through mean_prob: dmean / T for every token
    if HAS_DMEAN:
        m += tl.load(dmean_ptr + cols * stride_m, mask=col_ok, other=0.0).to(tl.float32)[None, :] / T

    dz = p * (m - tl.sum(p * m, axis=1)[:, None])  # mean_prob: through the full softmax Jacobian
    if HAS_DWEIGHTS or HAS_DDENSE:
        if NORMALIZE:  # the k weights are a softmax over the selected logits
            denom = tl.where(row_ok, tl.sum(tl.where(sel, p, 0.0), axis=1), 1.0)  # padding rows select nothing
            w = tl.where(sel, p / denom[:, None], 0.0)
            dz += w * (g - tl.sum(w * g, axis=1)[:, None])
        else:
            dz += p * (g - tl.sum(p * g, axis=1)[:, None])
    dz = dz / tau
    out = dlogits_ptr + rows64[:, None] * E + cols[None, :]
    tl.store(out, dz.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _or_dummy(grad: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if grad is None else grad


def _strides(prefix: str, grad: torch.Tensor | None, names: str) -> dict:
    strides = (0,) * len(names) if grad is None else grad.stride()
    return {f"stride_{prefix}{n}": s for n, s in zip(names, strides)}


def topk_route_forward(
    logits: torch.Tensor, top_k: int, temperature: float, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward: logits [T, E] -> (weights [T, K] fp32, ids [T, K] int64, dense [T, E] fp32,
    counts [E] int64, mean_prob [E] fp32). T = 0 launches nothing and returns zero statistics."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise ValueError(f"expected logits [T, E] and 1 <= top_k <= E; got {tuple(logits.shape)} and top_k={top_k}")
    if not capturing():
        resolve_backend("triton", logits.device)  # the one place that knows when Triton can run; names the fix
    num_tokens, num_experts = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    weights = torch.empty(num_tokens, top_k, **f32)
    ids = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
    dense = torch.empty(num_tokens, num_experts, **f32)
    if num_tokens == 0:
        counts = torch.zeros(num_experts, device=logits.device, dtype=torch.int64)
        return weights, ids, dense, counts, torch.zeros(num_experts, **f32)
    counts = torch.empty(num_experts, device=logits.device, dtype=torch.int64)
    mean_prob = torch.empty(num_experts, **f32)
    block_t, block_e, num_warps = route_config(num_tokens, num_experts, device_spec(logits.device))
    num_blocks = triton.cdiv(num_tokens, block_t)
    part_counts = torch.empty(num_blocks, num_experts, device=logits.device, dtype=torch.int32)
    part_probs = torch.empty(num_blocks, num_experts, **f32)
    with device_guard(logits):
        launch(
            _topk_route_fwd_kernel, (num_blocks,),
            logits_ptr=logits, weights_ptr=weights, ids_ptr=ids, dense_ptr=dense, part_counts_ptr=part_counts,
            part_probs_ptr=part_probs, T=num_tokens, E=num_experts, stride_lt=logits.stride(0),
            stride_le=logits.stride(1), tau=float(temperature), K=top_k, NORMALIZE=bool(normalize),
            BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), num_warps=num_warps,
        )  # fmt: skip
        stats = route_stats_config(num_blocks, block_e)
        launch(
            _route_stats_kernel, (triton.cdiv(num_experts, stats.block_e),),
            part_counts_ptr=part_counts, part_probs_ptr=part_probs, counts_ptr=counts, mean_ptr=mean_prob,
            NB=num_blocks, E=num_experts, T=num_tokens, BLOCK_N=stats.block_n, BLOCK_E=stats.block_e,
            num_warps=stats.num_warps,
        )  # fmt: skip
    return weights, ids, dense, counts, mean_prob


def topk_route_backward(
    logits: torch.Tensor,
    ids: torch.Tensor,
    dweights: torch.Tensor | None,
    ddense: torch.Tensor | None,
    dmean: torch.Tensor | None,
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Launch the backward: dlogits [T, E] in the logits' dtype from the gradients of weights [T, K], dense [T, E]
    and mean_prob [E]; a gradient that is None counts as zero and is never read."""
    if not capturing():
        resolve_backend("triton", logits.device)
    num_tokens, num_experts = logits.shape
    dlogits = torch.empty(num_tokens, num_experts, device=logits.device, dtype=logits.dtype)
    if num_tokens == 0:
        return dlogits
    block_t, block_e, num_warps = route_config(num_tokens, num_experts, device_spec(logits.device), backward=True)
    with device_guard(logits):
        launch(
            _topk_route_bwd_kernel, (triton.cdiv(num_tokens, block_t),),
            logits_ptr=logits, ids_ptr=ids, dweights_ptr=_or_dummy(dweights, logits),
            ddense_ptr=_or_dummy(ddense, logits), dmean_ptr=_or_dummy(dmean, logits), dlogits_ptr=dlogits,
            T=num_tokens, E=num_experts, stride_lt=logits.stride(0), stride_le=logits.stride(1),
            stride_it=ids.stride(0), stride_ik=ids.stride(1), **_strides("w", dweights, "tk"),
            **_strides("d", ddense, "te"), stride_m=0 if dmean is None else dmean.stride(0),
            tau=float(temperature), K=ids.shape[1], NORMALIZE=bool(normalize),
            HAS_DWEIGHTS=dweights is not None, HAS_DDENSE=ddense is not None, HAS_DMEAN=dmean is not None,
            BLOCK_T=block_t, BLOCK_E=block_e, num_warps=num_warps,
        )  # fmt: skip
    return dlogits


def _fake_forward(logits, top_k, temperature, normalize):
    num_tokens, num_experts = logits.shape
    f32, i64 = dict(dtype=torch.float32), dict(dtype=torch.int64)
    return (
        logits.new_empty(num_tokens, top_k, **f32),
        logits.new_empty(num_tokens, top_k, **i64),
        logits.new_empty(num_tokens, num_experts, **f32),
        logits.new_empty(num_experts, **i64),
        logits.new_empty(num_experts, **f32),
    )


def _fake_backward(logits, ids, dweights, ddense, dmean, temperature, normalize):
    return logits.new_empty(logits.shape)


def _save(inputs: dict, outputs: tuple) -> dict:
    # p is recomputed from the logits: no [T, E] fp32 saved
    return dict(logits=inputs["logits"], ids=outputs[1], temperature=inputs["temperature"],
                normalize=inputs["normalize"])  # fmt: skip


def _input_grads(dlogits: torch.Tensor, result_grads: dict, needs: list[bool]) -> dict:
    return dict(logits=dlogits)


# Eager mode goes through an autograd.Function: the custom op's Python dispatcher costs ~5x its host time (116 vs
# 23 us per call measured on this repo's CPU host), which a ~10 us kernel feels; gradients of unused outputs stay
# None there, so the backward skips reading them.
topk_route_op = register_fused_op(
    "topk_route",
    forward=topk_route_forward,
    backward=topk_route_backward,
    fake_forward=_fake_forward,
    fake_backward=_fake_backward,
    save=_save,
    input_grads=_input_grads,
    grad_names=("dweights", None, "ddense", None, "dmean"),
    non_differentiable=(1, 3),
)


def topk_route_triton(logits2d: torch.Tensor, top_k: int, temperature: float, normalize: bool):
    """Fused Triton router on flat logits [T, E]: (weights, ids, dense, counts, mean_prob); see the module docstring.

    Differentiable in ``logits2d`` through weights, dense and mean_prob; deterministic (no atomics)."""
    return topk_route_op(logits2d, int(top_k), float(temperature), bool(normalize))
