"""moe_lora means the same on every backend (eager, loop, Triton stacked, Triton grouped), optimisations included.

The in-place add of the stacked path is never observable (a base output aliasing x, hooked, saved by another op or
a leaf gives the plain path's values and gradients); a scaling tensor gets its gradient everywhere; an expert no
token selects is never read (NaN/Inf in its weights change nothing); rank 0, a bad dropout seed and stale routing
metadata are refused with a clear error. The oracle is the per-token formula in float64.
"""

import pytest
import torch
from helpers import DEVICE
from torch import nn

import dylora_moe.kernels as ops
from dylora_moe.kernels.routing_meta import RoutingMeta
from dylora_moe.modules.layer import MoELoRALinear
from dylora_moe.modules.routing import Routing
from tolerances import assert_close

BACKENDS = [("eager", "auto"), ("loop", "auto"), ("triton", "stacked"), ("triton", "grouped")]
BACKEND_IDS = ["eager", "loop", "stacked", "grouped"]
T, D, E, R, K = 6, 16, 4, 2, 2


def formula(x, lora_a, lora_b, ids, weights, scaling):
    """y[t] = sum_j w[t,j] * s[e] * B[e] (A[e] x[t]) with e = ids[t,j], in float64; reads selected experts only."""
    x, lora_a, lora_b, weights = (t.double() for t in (x, lora_a, lora_b, weights))
    scale = scaling.double()[ids] if isinstance(scaling, torch.Tensor) else scaling
    h = torch.einsum("tkrd,td->tkr", lora_a[ids], x)
    return torch.einsum("tk,tkor,tkr->to", weights * scale, lora_b[ids], h)


def inputs(d_out=D, unused_expert=None, seed=0):
    """x [T, D], A [E, R, D], B [E, d_out, R], ids [T, K] (distinct per token; ``unused_expert`` never picked), w."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    lora_a = torch.randn(E, R, D, generator=gen) / D**0.5
    lora_b = torch.randn(E, d_out, R, generator=gen)
    pool = torch.tensor([e for e in range(E) if e != unused_expert])
    ids = pool[torch.rand(T, len(pool), generator=gen).argsort(dim=1)[:, :K]]
    weights = torch.rand(T, K, generator=gen) + 0.1
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, lora_a, lora_b, weights)]
    return leaves[0], leaves[1], leaves[2], ids.to(DEVICE), leaves[3]


def grads(y, tensors, seed=1):
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y)
    return torch.autograd.grad(y, tensors, grad_y)


def donated(donate):
    """The keyword of a caller that donates its base output; none for the default (kept) case."""
    return {"donate_base_output": True} if donate else {}


def assert_all_close(got, want, names):
    for g, w, name in zip(got, want, names):
        assert_close(g, w, torch.float32, msg=name)


# --- the in-place add is never observable ---------------------------------------------------------------------


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_base_output_that_is_x_itself(backend, path, donate):
    """A square layer with base_output=h, the very x: backward must read the x of the forward, not x + delta."""
    x0, a, b, ids, w = inputs()
    h = x0 * 1.0  # a non-leaf, as a hidden state is
    y = ops.moe_lora(h, a, b, ids, w, 2.0, backend=backend, triton_path=path, base_output=h, **donated(donate))
    want = x0.double() + formula(x0, a, b, ids, w, 2.0)
    assert_close(y, want, torch.float32, msg="y")
    assert_close(h, x0, torch.float32, msg="x was written in place")
    names = ("dx", "dA", "dB", "dw")
    assert_all_close(grads(y, (x0, a, b, w)), grads(want, (x0, a, b, w)), names)


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_base_output_saved_by_another_op(backend, path):
    """Another op (sin) saved the base output for its backward: no 'modified by an inplace operation' error."""
    x, a, b, ids, w = inputs()
    lin = torch.randn(D, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    base = x @ lin
    side = base.sin()
    y = ops.moe_lora(x, a, b, ids, w, 2.0, backend=backend, triton_path=path, base_output=base)
    got = grads(y.sum() + side.sum(), (x, a, b, w))
    base64 = x.double() @ lin.double()
    want = grads((base64 + formula(x, a, b, ids, w, 2.0)).sum() + base64.sin().sum(), (x, a, b, w))
    assert_all_close(got, want, ("dx", "dA", "dB", "dw"))


@pytest.mark.parametrize("donate", [False, True], ids=["kept", "donated"])
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_leaf_base_output_that_requires_grad(backend, path, donate):
    x, a, b, ids, w = inputs()
    base = torch.randn(T, D, generator=torch.Generator().manual_seed(4)).to(DEVICE).requires_grad_()
    before = base.detach().clone()
    y = ops.moe_lora(x, a, b, ids, w, 2.0, backend=backend, triton_path=path, base_output=base, **donated(donate))
    want = base.double() + formula(x, a, b, ids, w, 2.0)
    assert_close(y, want, torch.float32, msg="y")
    assert torch.equal(base.detach(), before)
    got, expected = grads(y, (base, x, a)), grads(want, (base, x, a))
    assert_all_close(got, expected, ("dbase", "dx", "dA"))


def test_a_donated_fresh_base_output_still_takes_the_in_place_path():
    """The optimisation is kept where nobody can see it: the sum lands in the donated tensor, same gradients."""
    x, a, b, ids, w = inputs()
    lin = torch.randn(D, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for donate in (False, True):
        base = x @ lin
        ptr = base.data_ptr()
        y = ops.moe_lora(x, a, b, ids, w, 2.0, backend="triton", triton_path="stacked", base_output=base,
                         donate_base_output=donate)  # fmt: skip
        assert (y.data_ptr() == ptr) == donate
        want = x.double() @ lin.double() + formula(x, a, b, ids, w, 2.0)
        assert_close(y, want, torch.float32)
        assert_all_close(grads(y, (x, a, b, w)), grads(want, (x, a, b, w)), ("dx", "dA", "dB", "dw"))


def _layer(kernel):
    torch.manual_seed(5)
    layer = MoELoRALinear(nn.Linear(D, D), num_experts=E, r=R, alpha=4.0, kernel=kernel).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
    gen = torch.Generator().manual_seed(6)
    ids = torch.rand(1, T, E, generator=gen).argsort(-1)[..., :K]
    layer.context.set(Routing(ids.to(DEVICE), (torch.rand(1, T, K, generator=gen) + 0.1).to(DEVICE)))
    return layer


def test_forward_hook_on_the_base_layer_sees_an_output_that_never_changes():
    layer, eager = _layer("triton"), _layer("eager")
    captured = []
    layer.base_layer.register_forward_hook(lambda module, args, output: captured.append(output))
    x = torch.randn(1, T, D, device=DEVICE)
    y = layer(x)
    assert_close(captured[0], layer.base_layer(x.reshape(T, D)), torch.float32, msg="the hook's tensor changed")
    assert_close(y, eager(x), torch.float32)


def test_hooked_q_proj_of_an_injected_model_gives_eager_logits():
    """The issue's case: a hook keeps q_proj.base_layer's output in a model running the Triton kernels."""
    from moe_models import batch, randomize_experts, tiny_llama

    from dylora_moe import inject_moe_lora

    input_ids, mask, _ = batch(rows=2, length=3)
    logits = {}
    for kernel in ("triton", "eager"):
        model = tiny_llama(layers=1, hidden=16).to(DEVICE)
        handle = inject_moe_lora(model, num_experts=2, r=2, alpha=4, kernel=kernel, target_modules=["q_proj"])
        randomize_experts(handle.layers.values())
        q_proj = model.model.layers[0].self_attn.q_proj
        kept = []
        q_proj.base_layer.register_forward_hook(lambda module, args, output: kept.append((args[0], output)))
        logits[kernel] = model(input_ids.to(DEVICE), attention_mask=mask.to(DEVICE)).logits
        ((inp, out),) = kept
        assert torch.equal(out, q_proj.base_layer(inp)), f"{kernel}: the hooked output changed"
    assert_close(logits["triton"], logits["eager"], torch.float32)


def test_layer_donates_its_base_output_only_when_nobody_else_can_hold_it(monkeypatch):
    layer = _layer("triton")
    assert layer._base_output_is_private()
    donations = []

    def spy(*args, **kwargs):
        donations.append(kwargs["donate_base_output"])
        return ops.moe_lora(*args, **kwargs)

    monkeypatch.setattr("dylora_moe.modules.layer.moe_lora", spy)
    layer(torch.randn(1, T, D, device=DEVICE))
    assert donations == [True]  # the fast path stays where nobody can see it
    handle = layer.base_layer.register_forward_hook(lambda *args: None)
    assert not layer._base_output_is_private()
    handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert not layer._base_output_is_private()
    finally:
        handle.remove()
    assert layer._base_output_is_private()
    layer.base_layer.forward = layer.base_layer.forward  # replaced on the instance, as accelerate's hooks do
    assert not layer._base_output_is_private()


# --- one documented rule per corner, on every backend -----------------------------------------------------------


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_scaling_tensor_gets_its_gradient(backend, path):
    x, a, b, ids, w = inputs()
    scaling = torch.tensor([0.5, 1.0, 2.0, 3.0], device=DEVICE, requires_grad=True)
    y = ops.moe_lora(x, a, b, ids, w, scaling, backend=backend, triton_path=path)
    want = formula(x, a, b, ids, w, scaling)
    assert_close(y, want, torch.float32, msg="y")
    names = ("dscaling", "dx", "dA", "dB", "dw")
    assert_all_close(grads(y, (scaling, x, a, b, w)), grads(want, (scaling, x, a, b, w)), names)


@pytest.mark.parametrize("poison", ["nan-A", "inf-B", "nan-scaling"])
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_an_expert_no_token_selects_is_never_read(backend, path, poison):
    """NaN/Inf in an unselected expert change no output or gradient, and its gradient is zero (not NaN)."""
    unused = 2
    x, a, b, ids, w = inputs(unused_expert=unused)
    scaling = torch.tensor([0.5, 1.0, 2.0, 3.0], device=DEVICE, requires_grad=True)
    with torch.no_grad():
        target = {"nan-A": a, "inf-B": b, "nan-scaling": scaling}[poison]
        target[unused] = float("nan") if poison.startswith("nan") else float("inf")
    y = ops.moe_lora(x, a, b, ids, w, scaling, backend=backend, triton_path=path)
    want = formula(x, a, b, ids, w, scaling)
    assert_close(y, want, torch.float32, msg="y")
    got = grads(y, (x, a, b, w, scaling))
    expected = grads(want, (x, a, b, w, scaling))
    for g, e, name in zip(got, expected, ("dx", "dA", "dB", "dw", "dscaling")):
        assert torch.isfinite(g).all(), name
        assert_close(g, e, torch.float32, msg=name)
    assert not got[1][unused].any() and not got[2][unused].any() and got[4][unused] == 0


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_rank_zero_is_refused(backend, path):
    x, _, _, ids, w = inputs()
    with pytest.raises(ValueError, match="rank 0"):
        ops.moe_lora(x, torch.zeros(E, 0, D), torch.zeros(E, D, 0), ids, w, 1.0, backend=backend, triton_path=path)


# --- op-level input errors --------------------------------------------------------------------------------------

BAD_SEEDS = {
    "float": torch.tensor([1.5]),
    "int32": torch.tensor([7], dtype=torch.int32),
    "two-elements": torch.tensor([1, 2]),
    "python-int": 7,
}


@pytest.mark.parametrize("seed", BAD_SEEDS, ids=list(BAD_SEEDS))
@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_bad_dropout_seed_is_refused(backend, path, seed):
    x, a, b, ids, w = inputs()
    seed = BAD_SEEDS[seed]
    seed = seed.to(DEVICE) if isinstance(seed, torch.Tensor) else seed
    with pytest.raises(TypeError, match="dropout_seed must be an int64 tensor with one element"):
        ops.moe_lora(x, a, b, ids, w, 1.0, backend=backend, triton_path=path, dropout_p=0.1, dropout_seed=seed)


def test_dropout_seed_on_another_device_is_refused():
    x, a, b, ids, w = inputs()
    seed = torch.tensor([7], device="meta")
    with pytest.raises(ValueError, match="dropout_seed is on meta"):
        ops.moe_lora(x, a, b, ids, w, 1.0, backend="eager", dropout_p=0.1, dropout_seed=seed)


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_stale_routing_metadata_is_refused(backend, path):
    x, a, b, ids, w = inputs()
    call = lambda i, wt, meta: ops.moe_lora(x, a, b, i, wt, 1.0, backend=backend, triton_path=path, routing=meta)  # noqa: E731
    other_ids = (ids + 1) % E
    with pytest.raises(ValueError, match="built from other expert_ids"):
        call(other_ids, w, RoutingMeta(ids, w, E))
    with pytest.raises(ValueError, match="built from other expert_ids"):
        call(ids, w.detach() * 2, RoutingMeta(ids, w, E))
    meta = RoutingMeta(other_ids, w, E)
    _ = meta.gate  # cached from the old values
    other_ids.copy_(ids)
    with pytest.raises(ValueError, match="changed in place"):
        call(other_ids, w, meta)


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_routing_metadata_of_a_reshape_of_the_ids_is_accepted(backend, path):
    """The metadata of ids [B, S, K] flattened to [T, K] (views of the same memory) belongs to those ids."""
    x, a, b, ids, w = inputs()
    x3, ids3, w3 = x.view(2, T // 2, D), ids.view(2, T // 2, K), w.view(2, T // 2, K)
    meta = RoutingMeta(ids3.reshape(-1, K), w3.reshape(-1, K), E)
    y = ops.moe_lora(x3, a, b, ids3, w3, 2.0, backend=backend, triton_path=path, routing=meta)
    assert_close(y.reshape(T, D), formula(x, a, b, ids, w, 2.0), torch.float32)


def test_routing_metadata_under_inference_mode():
    """Inference tensors have no version counter: the metadata check still works (identity and memory only)."""
    x, a, b, ids, w = (t.detach() for t in inputs())
    with torch.inference_mode():
        ids, w = ids.clone(), w.clone()
        y = ops.moe_lora(x, a, b, ids, w, 2.0, backend="eager", routing=RoutingMeta(ids, w, E))
        with pytest.raises(ValueError, match="built from other expert_ids"):
            ops.moe_lora(x, a, b, ids.flip(0), w, 2.0, backend="eager", routing=RoutingMeta(ids, w, E))
    assert_close(y, formula(x, a, b, ids, w, 2.0), torch.float32)


def test_routing_metadata_of_a_router_output_is_accepted():
    """topk_route's ids and weights are strided slices (not contiguous): their flat views still match."""
    x, a, b, _, _ = inputs()
    route = ops.topk_route(torch.randn(2, T // 2, E, device=DEVICE), K, backend="eager")
    assert not route.ids.is_contiguous()
    meta = RoutingMeta(route.ids.reshape(-1, K), route.weights.reshape(-1, K), E)
    y = ops.moe_lora(x.view(2, T // 2, D), a, b, route.ids, route.weights, 2.0, backend="eager", routing=meta)
    want = formula(x, a, b, route.ids.reshape(-1, K), route.weights.reshape(-1, K), 2.0)
    assert_close(y.reshape(T, D), want, torch.float32)
