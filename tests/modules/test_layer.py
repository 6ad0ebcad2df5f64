"""MoELoRALinear against a per-slot formula (gathered expert matrices, no stacked trick), on nn.Linear and Conv1D."""

import math

import pytest
import torch
from helpers import DEVICE
from torch import nn
from transformers.pytorch_utils import Conv1D

from dylora_moe import MoELoRALinear, Routing, RoutingContext
from dylora_moe.kernels.eager import philox_dropout_mask
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
def test_dropout_mask_is_the_one_each_backend_draws(backend):
    """In training the LoRA input is x * mask, mask in {0, 1/(1-p)}. Eager and reference draw it with torch's
    RNG (bernoulli); triton draws it inside the kernels from a Philox seed the layer takes from torch's RNG, and
    eager.philox_dropout_mask regenerates exactly that mask from the same seed."""
    device = DEVICE if backend == "triton" else "cpu"
    layer = make_layer("linear", dropout=0.5, kernel=backend).to(device).train()
    x = torch.randn(2, 5, 12, device=device)
    ids, weights = (t.to(device) for t in routing(2, 5, 3, 2))
    layer.context.set(Routing(ids, weights))
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    if backend == "triton":
        seed = torch.randint(0, 2**31 - 1, (1,), device=device)
        mask = philox_dropout_mask(seed, (10, 12), 0.5).view(2, 5, 12)
    else:
        mask = torch.empty_like(x).bernoulli_(0.5).div_(0.5)
    assert 0 < int((mask == 0).sum()) < mask.numel()
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
    layer.context.set(Routing(torch.full((2, 6, 1), 3), torch.ones(2, 6, 1)))  # expert 3 of 3: a device-side assert
    with pytest.raises(RuntimeError, match=r"\[0, 3\)"):
        layer(torch.randn(2, 6, 12))
    with pytest.raises(ValueError, match="one value per expert"):
        MoELoRALinear(make_base("linear"), 2, 4, 8.0, expert_ranks=[4])
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


def test_half_precision_activations_get_float32_weight_grads_of_the_formula():
    """fp16 activations over fp32 master weights: the ops read the fp32 weights directly, and the weight
    gradients are fp32 and match the float64 formula (no rounding of the weights or their gradients to fp16)."""
    for backend in ("eager", "triton"):
        device = DEVICE if backend == "triton" else "cpu"
        layer = MoELoRALinear(nn.Linear(12, 10).half(), 3, 4, 8.0, kernel=backend).to(device)
        with torch.no_grad():
            layer.lora_B.normal_()
        assert layer.lora_A.dtype == torch.float32
        x = torch.randn(2, 5, 12, device=device).half()
        ids, weights = (t.detach().to(device) for t in routing(2, 5, 3, 2))
        layer.context.set(Routing(ids, weights))
        y = layer(x)
        assert y.dtype == torch.float16
        grad_out = torch.randn(y.shape, device=device).half()
        da, db = torch.autograd.grad(y, (layer.lora_A, layer.lora_B), grad_out)
        assert da.dtype == db.dtype == torch.float32
        a64, b64 = layer.lora_A.detach().double().requires_grad_(), layer.lora_B.detach().double().requires_grad_()
        base64 = nn.Linear(12, 10).double().to(device)
        base64.load_state_dict({k: v.double() for k, v in layer.base_layer.state_dict().items()})
        ref = formula(x.double(), base64, a64, b64, ids, weights.double(), layer.scaling)
        want = torch.autograd.grad(ref, (a64, b64), grad_out.double())
        assert_close(y, ref, torch.float16)
        for name, g, w in zip(("A", "B"), (da, db), want):
            assert_close(g, w, torch.float16, msg=f"d{name} {backend}")


def per_expert_formula(x, base, layer, ids, weights):
    """Each expert a separate LoRA of its own rank r_e and scaling alpha_e / r_e (sliced, no padding)."""
    y = base(x)
    for j in range(ids.shape[-1]):
        for e in range(layer.num_experts):
            r, s = layer.expert_ranks[e], layer.expert_alphas[e] / layer.expert_ranks[e]
            lora = (x @ layer.lora_A[e, :r].t()) @ layer.lora_B[e, :, :r].t() * s
            y = y + ((ids[..., j] == e).to(x.dtype) * weights[..., j]).unsqueeze(-1) * lora
    return y


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_expert_ranks_are_exact_and_padding_gets_zero_gradient(backend):
    device = DEVICE if backend == "triton" else "cpu"
    layer = MoELoRALinear(
        make_base("linear"), 2, 4, 8.0, kernel=backend, expert_ranks=[2, 4], expert_alphas=[4.0, 16.0]
    )
    assert layer.add_expert(r=6, alpha=3.0) == 2 and layer.add_expert() == 3
    assert layer.expert_ranks == [2, 4, 6, 4] and layer.expert_alphas == [4.0, 16.0, 3.0, 8.0]
    assert layer.lora_A.shape == (4, 6, 12) and layer.lora_B.shape == (4, 10, 6)
    assert torch.equal(layer.expert_scaling, torch.tensor([2.0, 4.0, 0.5, 2.0]))
    assert torch.count_nonzero(layer.lora_A[0, 2:]) == 0 and torch.count_nonzero(layer.lora_A[2]) > 0
    with torch.no_grad():  # B nonzero only inside each expert's rank
        for e, r in enumerate(layer.expert_ranks):
            layer.lora_B[e, :, :r].normal_()
    layer.to(device)
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    ids, weights = (t.detach().to(device) for t in routing(2, 5, 4, 2))
    weights.requires_grad_()
    layer.context.set(Routing(ids, weights))
    y = layer(x)
    expected = per_expert_formula(x, layer.base_layer, layer, ids, weights)
    assert_close(y, expected, torch.float32)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B, weights), grad_out)
    want = torch.autograd.grad(expected, (x, layer.lora_A, layer.lora_B, weights), grad_out, allow_unused=True)
    for name, g, w in zip(("x", "A", "B", "weights"), got, want):
        assert_close(g, w, torch.float32, msg=f"d{name} ({backend})")
    for e, r in enumerate(layer.expert_ranks):  # the padding stays exactly zero under any optimizer
        assert torch.count_nonzero(got[1][e, r:]) == 0 and torch.count_nonzero(got[2][e, :, r:]) == 0


def test_auto_kernel_follows_the_input_device(monkeypatch):
    """kernel="auto" on a machine with CUDA: a model still on the CPU runs eager (no error at construction)."""
    import dylora_moe.kernels as ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    layer = make_layer("linear", kernel="auto")
    calls = []
    real = ops.eager.moe_lora_eager
    monkeypatch.setattr(ops.eager, "moe_lora_eager", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer.context.set(Routing(*routing(2, 5, 3, 2)))
    layer(torch.randn(2, 5, 12))
    assert calls == [1]
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_routing_metadata_is_built_once_per_step_for_every_layer():
    """Layers sharing a context share one gate (built once, forward and backward) and one metadata object."""
    context = RoutingContext()
    layers = [MoELoRALinear(make_base("linear", 12, 12), 3, 4, 8.0, kernel="eager", context=context) for _ in range(3)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
    ids, weights = routing(2, 5, 3, 2)
    route = Routing(ids, weights)
    context.set(route)
    h = torch.randn(2, 5, 12, requires_grad=True)
    for layer in layers:
        h = layer(h)
    assert len(route._meta) == 1
    store = next(iter(route._meta.values()))
    gate = store["gate"]
    assert route.meta((2, 5), 3).gate is gate and gate.grad_fn is not None
    h.sum().backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_layer_compiles_fullgraph_with_the_same_values_and_grads(backend):
    device = DEVICE if backend == "triton" else "cpu"
    layer = make_layer("linear", kernel=backend).to(device)
    x = torch.randn(2, 5, 12, device=device, requires_grad=True)
    ids, weights = (t.detach().to(device) for t in routing(2, 5, 3, 2))
    weights.requires_grad_()

    def step(x, weights):
        layer.context.set(Routing(ids, weights))
        return layer(x)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_y = compiled(x, weights)
    want_y = step(x, weights)
    assert_close(got_y, want_y, torch.float32)
    grad_out = torch.randn_like(got_y)
    got = torch.autograd.grad(got_y, (x, layer.lora_A, layer.lora_B, weights), grad_out)
    want = torch.autograd.grad(want_y, (x, layer.lora_A, layer.lora_B, weights), grad_out)
    for name, g, w in zip(("x", "A", "B", "weights"), got, want):
        assert_close(g, w, torch.float32, msg=f"d{name} ({backend})")
