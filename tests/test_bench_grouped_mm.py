"""The grouped-GEMM baseline (kernels/grouped_mm.py) against the eager op's stacked form: values and gradients of
x, A, B, the routing weights and a per-expert scaling, over odd widths, k = 1..E, an expert with no tokens, T = 0,
fp32 and the fp32-master mix (bf16 / fp16 x with fp32 A/B); dropout, base output and leading dims; its refusals;
and the eager backend's choice between the two forms."""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import dylora_moe.kernels as ops
from dylora_moe.kernels import grouped_mm as gmm
from tolerances import assert_close

MIXED = (torch.bfloat16, torch.float16)


def make_inputs(T, d_in, d_out, E, r, k, dtype, weight_dtype, empty_expert=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen).to(dtype).requires_grad_()
    lora_a = (torch.randn(E, r, d_in, generator=gen) / d_in**0.5).to(weight_dtype).requires_grad_()
    lora_b = (torch.randn(E, d_out, r, generator=gen) / r**0.5).to(weight_dtype).requires_grad_()
    pool = [e for e in range(E) if e != empty_expert]
    ids = torch.tensor(pool)[torch.rand(T, len(pool), generator=gen).argsort(dim=1)[:, :k]]
    weights = (torch.rand(T, k, generator=gen) + 0.1).requires_grad_()
    scaling = (torch.rand(E, generator=gen) + 0.5).requires_grad_()
    return x, lora_a, lora_b, ids, weights, scaling


def outputs_and_grads(fn, x, lora_a, lora_b, ids, weights, scaling):
    y = fn(x, lora_a, lora_b, ids, weights, scaling)
    inputs = (x, lora_a, lora_b, weights, scaling)
    if y.numel() == 0:
        return (y, *(torch.zeros_like(t) for t in inputs))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    return (y, *torch.autograd.grad(y, inputs, grad_y))


def eager(x, a, b, ids, w, scaling, **kw):
    """The eager backend in its stacked form (the oracle: at E >= 8k it would otherwise pick grouped_mm itself)."""
    with mock.patch.object(gmm, "eager_path", lambda *args: "stacked"):
        return ops.moe_lora(x, a, b, ids, w, scaling, backend="eager", **kw)


def check(T, d_in, d_out, E, r, k, dtype=torch.float32, weight_dtype=None, **kw):
    args = make_inputs(T, d_in, d_out, E, r, k, dtype, weight_dtype or dtype, **kw)
    got = outputs_and_grads(gmm.moe_lora_grouped_mm_op, *args)
    want = outputs_and_grads(eager, *args)
    # Gradients of A, B and the scaling sum over up to T tokens: widen the bound with the reduction length.
    scales = (1, 1, 1 + T / 64, 1 + T / 64, 1, 1 + T / 64)
    for name, g, e, s in zip(("y", "dx", "dA", "dB", "dw", "dscaling"), got, want, scales):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert_close(g, e, dtype, scale=s, msg=f"grouped_mm {dtype} {name} T={T} d={d_in}x{d_out} E={E} r={r} k={k}")


SWEEP = [
    (T, d_in, d_out, E, r, k)
    for T in (0, 1, 7, 64)
    for d_in, d_out in ((13, 21), (48, 80))
    for E in (1, 3, 8)
    for r in (3, 8)
    for k in sorted({1, min(2, E), E})
]


@pytest.mark.parametrize("T,d_in,d_out,E,r,k", SWEEP)
def test_fp32_matches_eager(T, d_in, d_out, E, r, k):
    check(T, d_in, d_out, E, r, k)


@pytest.mark.parametrize("dtype", MIXED, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,E,r,k", [(0, 48, 80, 4, 8, 2), (7, 13, 21, 3, 3, 3), (64, 48, 80, 8, 16, 2)])
def test_fp32_masters_under_low_precision_x_match_eager(T, d_in, d_out, E, r, k, dtype):
    check(T, d_in, d_out, E, r, k, dtype=dtype, weight_dtype=torch.float32)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_expert_without_tokens_gets_zero_gradient_and_nan_weights_stay_unread(k):
    x, a, b, ids, w, scaling = make_inputs(32, 24, 40, 4, 8, k, torch.float32, torch.float32, empty_expert=2)
    with torch.no_grad():
        a[2], b[2] = float("nan"), float("inf")
    y = gmm.moe_lora_grouped_mm_op(x, a, b, ids, w, scaling)
    da, db = torch.autograd.grad(y, (a, b), torch.randn_like(y))
    assert torch.isfinite(y).all()
    assert (da[2] == 0).all() and (db[2] == 0).all() and da.abs().sum() > 0
    check(32, 24, 40, 4, 8, k, empty_expert=2)


def test_dropout_mask_seed_base_output_leading_dims_and_strided_weights_match_eager():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 24, generator=gen, requires_grad=True)
    a = torch.randn(3, 24, 4, generator=gen).requires_grad_()
    b = torch.randn(3, 4, 16, generator=gen).requires_grad_()
    a_view, b_view = a.transpose(1, 2), b.transpose(1, 2)  # non-contiguous [E, r, d_in] and [E, d_out, r]
    ids = torch.randint(0, 3, (2, 5, 2), generator=gen)
    w = torch.rand(2, 5, 2, generator=gen, requires_grad=True)
    base = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    mask = (torch.rand(2, 5, 24, generator=gen) > 0.3).float() / 0.7
    seed = torch.tensor([7])
    for kw in (dict(dropout_mask=mask), dict(dropout_p=0.25, dropout_seed=seed), dict(base_output=base)):
        got = gmm.moe_lora_grouped_mm_op(x, a_view, b_view, ids, w, 1.5, **kw)
        want = eager(x, a_view, b_view, ids, w, 1.5, **kw)
        assert_close(got, want, torch.float32, msg=str(list(kw)))
        inputs = (x, a, b, w) + ((base,) if "base_output" in kw else ())
        for g, e in zip(
            torch.autograd.grad(got, inputs, torch.ones_like(got)),
            torch.autograd.grad(want, inputs, torch.ones_like(want)),
        ):
            assert_close(g, e, torch.float32, scale=2, msg=str(list(kw)))


def test_weights_off_a_16_byte_boundary_are_copied_not_refused():
    x, a, b, ids, w, scaling = make_inputs(16, 24, 40, 3, 8, 2, torch.float32, torch.float32)
    shifted = torch.empty(a.numel() + 1)[1:].view(a.shape)  # storage starts 4 bytes off the boundary
    shifted.copy_(a.detach())
    assert shifted.data_ptr() % 16 != 0
    copied = gmm._pad_to(shifted, tuple(shifted.shape))  # CUDA's TMA loads (and torch 2.9-2.12 on the CPU) need it
    assert copied.data_ptr() % 16 == 0 and torch.equal(copied, shifted)
    got = gmm.moe_lora_grouped_mm_op(x, shifted, b, ids, w, scaling)
    assert_close(got, eager(x, a, b, ids, w, scaling), torch.float32)


def test_differs_from_eager_when_an_expert_changes():
    """The comparison above can fail: the baseline reads each selected expert's own weights."""
    x, a, b, ids, w, scaling = make_inputs(16, 24, 40, 3, 8, 2, torch.float32, torch.float32)
    before = gmm.moe_lora_grouped_mm_op(x, a, b, ids, w, scaling)
    with torch.no_grad():
        b[1] += 1.0
    after = gmm.moe_lora_grouped_mm_op(x, a, b, ids, w, scaling)
    touched = (ids == 1).any(-1)
    assert not torch.allclose(after[touched], before[touched]) and torch.equal(after[~touched], before[~touched])


def test_float64_is_refused():
    x, a, b, ids, w, scaling = make_inputs(4, 8, 8, 2, 4, 1, torch.float64, torch.float64)
    with pytest.raises(TypeError, match="no float64 kernel"):
        gmm.moe_lora_grouped_mm_op(x, a, b, ids, w, scaling)


def test_torch_without_grouped_mm_is_named(monkeypatch):
    monkeypatch.delattr(F, "grouped_mm", raising=False)
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    with pytest.raises(RuntimeError, match="has no grouped_mm"):
        gmm.grouped_mm_op()


@pytest.mark.parametrize(
    "E,k,dtype,device,want",
    [
        (64, 2, torch.float32, "cpu", "grouped_mm"),
        (16, 2, torch.float32, "cpu", "grouped_mm"),
        (8, 1, torch.float32, "cpu", "grouped_mm"),
        (8, 2, torch.float32, "cpu", "stacked"),  # measured: grouped_mm 1.15x slower (docs/benchmarks.md)
        (4, 2, torch.float32, "cpu", "stacked"),
        (64, 2, torch.float64, "cpu", "stacked"),  # grouped_mm has no float64 kernel
        (64, 2, torch.bfloat16, "cpu", "stacked"),  # not measured
        (64, 2, torch.float32, "cuda", "stacked"),  # the GPU runs triton; eager stays the stacked baseline
    ],
)
def test_eager_path_rule(E, k, dtype, device, want):
    assert gmm.eager_path(E, k, dtype, torch.device(device)) == want


@pytest.mark.parametrize("E,k,grouped", [(16, 2, True), (4, 2, False)])
def test_eager_backend_dispatches_by_the_rule(E, k, grouped):
    x, a, b, ids, w, scaling = make_inputs(16, 24, 40, E, 8, k, torch.float32, torch.float32)
    with mock.patch.object(gmm, "moe_lora_grouped_mm", wraps=gmm.moe_lora_grouped_mm) as spy:
        got = ops.moe_lora(x, a, b, ids, w, scaling, backend="eager")
    assert spy.called == grouped
    assert_close(got, eager(x, a, b, ids, w, scaling), torch.float32)
