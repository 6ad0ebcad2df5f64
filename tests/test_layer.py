"""MoELoRALinear against a per-slot formula (gathered expert matrices, no stacked trick), on nn.Linear and Conv1D."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import DEVICE
from dylora_moe import MoELoRALinear, Routing, RoutingContext
from tolerances import assert_close

BACKENDS = ("eager", "reference", "triton")


def make_base(kind: str, d_in: int = 12, d_out: int = 10) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    return Conv1D(d_out, d_in)  # GPT-2 order: (nf = d_out, nx = d_in); weight is [d_in, d_out]


def formula(x, base, lora_a, lora_b, ids, weights, scaling, mask=None):
    """y = base(x) + s * sum_j w[t,j] * B[e] A[e] (x * mask)[t], slot by slot with gathered expert matrices."""
    xm = x if mask is None else x * mask
    y = base(x)
    for j in range(ids.shape[-1]):
        a, b = lora_a[ids[..., j]], lora_b[ids[..., j]]  # [..., R, D_in], [..., D_out, R]
        h = torch.einsum("...ri,...i->...r", a, xm)
        y = y + scaling * weights[..., j, None] * torch.einsum("...or,...r->...o", b, h)
    return y


def make_layer(kind, num_experts=3, r=4, alpha=8.0, dropout=0.0, kernel="eager"):
    layer = MoELoRALinear(make_base(kind), num_experts, r, alpha, dropout, kernel=kernel)
    with torch.no_grad():
        layer.lora_B.normal_()  # fresh B = 0 would hide every LoRA term
    return layer


def routing(batch, seq, num_experts, k, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(batch * seq)])
    weights = torch.rand(batch * seq, k, generator=gen)
    return ids.view(batch, seq, k), weights.view(batch, seq, k).requires_grad_()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fresh_layer_equals_base_layer(kind):
    layer = MoELoRALinear(make_base(kind), 3, 4, 8.0, kernel="eager")
    x = torch.randn(2, 5, 12)
    layer.context.set(Routing(*routing(2, 5, 3, 2)))
    assert torch.equal(layer(x), layer.base_layer(x))
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(12)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in)), as LoRA
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.5 * bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("k", [1, 2])
def test_layer_matches_formula_values_and_grads(backend, kind, k):
    device = DEVICE if backend == "triton" else "cpu"
    layer = make_layer(kind, kernel=backend).to(device)
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    ids, weights = (t.detach().to(device) for t in routing(2, 5, 3, k))
    weights.requires_grad_()
    layer.context.set(Routing(ids, weights))
    y = layer(x)
    expected = formula(x, layer.base_layer, layer.lora_A, layer.lora_B, ids, weights, layer.scaling)
    assert_close(y, expected, torch.float32)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, weights), grad_out)
    want = torch.autograd.grad(expected, (x, layer.lora_A, layer.lora_B, weights), grad_out)
    for name, g, w in zip(("x", "A", "B", "weights"), got, want):
        assert_close(g, w, torch.float32, msg=f"d{name} ({backend}, {kind}, k={k})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_is_the_same_on_every_backend(backend):
    """In training the LoRA input is x * mask, mask ~ Bernoulli(1-p)/(1-p), drawn from torch's RNG before the op."""
    device = DEVICE if backend == "triton" else "cpu"
    layer = make_layer("linear", dropout=0.5, kernel=backend).to(device).train()
    x = torch.randn(2, 5, 12, device=device)
    ids, weights = (t.to(device) for t in routing(2, 5, 3, 2))
    layer.context.set(Routing(ids, weights))
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = torch.empty_like(x).bernoulli_(0.5).div_(0.5)
    expected = formula(x, layer.base_layer, layer.lora_A, layer.lora_B, ids, weights, layer.scaling, mask)
    assert_close(y, expected, torch.float32)
    layer.eval()
    assert_close(
        layer(x), formula(x, layer.base_layer, layer.lora_A, layer.lora_B, ids, weights, layer.scaling), torch.float32
    )


def test_per_row_routing_broadcasts_over_positions_and_active_expert_default():
    layer = make_layer("linear")
    x = torch.randn(3, 4, 12)
    rows = torch.tensor([2, 0, 1])
    layer.context.set(Routing.per_row(rows))
    ids = rows.view(3, 1, 1).expand(3, 4, 1)
    expected = formula(x, layer.base_layer, layer.lora_A, layer.lora_B, ids, torch.ones(3, 4, 1), layer.scaling)
    assert_close(layer(x), expected, torch.float32)
    layer.context.set_active_expert(1)  # no routing: every token on expert 1
    ones = torch.ones(3, 4, 1)
    expected = formula(x, layer.base_layer, layer.lora_A, layer.lora_B, ones.long(), ones, layer.scaling)
    assert_close(layer(x), expected, torch.float32)
    with layer.context.adapters_disabled():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_add_expert_keeps_old_experts():
    layer = make_layer("conv1d")
    x = torch.randn(2, 3, 12)
    before = [layer.context.set_active_expert(e) or layer(x) for e in range(3)]
    assert layer.add_expert() == 3 and layer.num_experts == 3 + 1
    assert torch.count_nonzero(layer.lora_B[3]) == 0 and torch.count_nonzero(layer.lora_A[3]) > 0
    for e in range(3):
        layer.context.set_active_expert(e)
        assert_close(layer(x), before[e], torch.float32)  # equal up to summation order (the stack grew)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown kernel"):
        MoELoRALinear(make_base("linear"), 2, 4, 8.0, kernel="cuda")
    with pytest.raises(ValueError, match="rank"):
        MoELoRALinear(make_base("linear"), 2, 0, 8.0)
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        MoELoRALinear(nn.Conv2d(3, 3, 1), 2, 4, 8.0)
    layer = make_layer("linear")
    layer.context.set(Routing(*routing(2, 5, 3, 1)))
    with pytest.raises(ValueError, match="does not fit the layer input"):
        layer(torch.randn(2, 6, 12))
    layer.context.set_active_expert(5)
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.randn(2, 6, 12))
    with pytest.raises(ValueError, match=r"\[B, S, k\]"):
        Routing(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_shared_context_reaches_every_layer():
    context = RoutingContext()
    layers = [MoELoRALinear(make_base("linear"), 2, 4, 8.0, context=context) for _ in range(2)]
    assert all(layer.context is context for layer in layers)


def test_half_precision_base_keeps_float32_experts():
    """LoRA weights stay float32 over an fp16/bf16 base (a 2e-5 update vanishes in bf16); outputs keep x's dtype."""
    layer = MoELoRALinear(nn.Linear(12, 10).half(), 2, 4, 8.0, kernel="eager")
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(2, 3, 12, dtype=torch.float16)
    layer.context.set_active_expert(1)
    y = layer(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
