"""Double backward (create_graph=True): the Triton ops refuse it with an error that names the fix, instead of
returning gradients that are silently wrong; the eager backend stays twice differentiable (issue 24, item 3)."""

import pytest
import torch
from helpers import DEVICE

import dylora_moe.kernels as ops

T, D, E, R, K = 4, 8, 3, 2, 2
TWICE = r"backend 'triton' is not twice differentiable.*use backend='eager'"


def lora_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=gen, dtype=dtype)
    lora_a = torch.randn(E, R, D, generator=gen, dtype=dtype) / D**0.5
    lora_b = torch.randn(E, D, R, generator=gen, dtype=dtype)
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K]
    weights = torch.rand(T, K, generator=gen, dtype=dtype) + 0.1
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, lora_a, lora_b, weights)]
    return (*leaves[:3], ids.to(DEVICE), leaves[3])


@pytest.mark.parametrize("path", ["stacked", "grouped"])
def test_triton_moe_lora_refuses_create_graph(path):
    x, lora_a, lora_b, ids, weights = lora_inputs()
    out = ops.moe_lora(x, lora_a, lora_b, ids, weights, 0.5, backend="triton", triton_path=path)
    with pytest.raises(RuntimeError, match=TWICE):
        (gx,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        gx.sum().backward()
    out = ops.moe_lora(x, lora_a, lora_b, ids, weights, 0.5, backend="triton", triton_path=path)
    assert torch.autograd.grad(out.pow(2).sum(), x)[0].shape == x.shape  # a plain backward is unaffected


def test_triton_router_refuses_create_graph():
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    route = ops.topk_route(logits, 2, temperature=2.0, backend="triton")
    with pytest.raises(RuntimeError, match=TWICE):
        torch.autograd.grad(route.weights.pow(2).sum(), logits, create_graph=True)


def test_eager_is_twice_differentiable():
    x, lora_a, lora_b, ids, weights = lora_inputs(torch.float64)
    torch.autograd.gradgradcheck(
        lambda *t: ops.moe_lora(*t[:3], ids, t[3], 0.5, backend="eager"), (x, lora_a, lora_b, weights)
    )


def second_order(route, logits):
    """d/dlogits of sum(g^2), g = d sum(weights^2) / dlogits (the shape of a gradient penalty)."""
    (g,) = torch.autograd.grad(route(logits).pow(2).sum(), logits, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), logits)[0]


def test_eager_router_double_backward_matches_the_formula():
    """The eager router computes in float32 (gradgradcheck's finite differences need float64): its second-order
    gradient against the same formula written here in float64."""
    logits = torch.randn(T, E, device=DEVICE, requires_grad=True)
    ids = ops.topk_route(logits, 2, temperature=2.0, backend="eager").ids

    def formula(t):
        weights = torch.softmax(t.double() / 2.0, dim=-1).gather(1, ids)
        return weights / weights.sum(-1, keepdim=True)

    got = second_order(lambda t: ops.topk_route(t, 2, temperature=2.0, backend="eager").weights, logits)
    torch.testing.assert_close(got, second_order(formula, logits).float(), rtol=1e-4, atol=1e-6)
