"""Property tests (hypothesis, bounded examples) of moe_lora and topk_route against the float64 formulas, and of
the launch configuration (chosen once per shape bucket, pinned in deterministic mode)."""

import dataclasses

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dylora_moe.kernels as ops
from dylora_moe.kernels import configs
from dylora_moe.kernels.device import TARGETS, device_spec
from tolerances import assert_close

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def formula(x, lora_a, lora_b, ids, weights, scaling):
    x, lora_a, lora_b, weights = (t.double() for t in (x, lora_a, lora_b, weights))
    h = torch.einsum("tkrd,td->tkr", lora_a[ids], x)
    return torch.einsum("tk,tkor,tkr->to", weights * scaling, lora_b[ids], h)


@st.composite
def moe_cases(draw, max_tokens):
    T = draw(st.integers(0, max_tokens))
    E = draw(st.integers(1, 5))
    k = draw(st.integers(1, E))
    r = draw(st.sampled_from([1, 3, 4, 8]))
    d_in, d_out = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    used = draw(st.integers(1, E))  # experts beyond `used` get no token; ids may repeat within a token
    seed = draw(st.integers(0, 2**16))
    per_expert = draw(st.booleans())
    transposed_x = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(d_in, T, generator=gen).t() if transposed_x else torch.randn(T, d_in, generator=gen)
    lora_a = torch.randn(E, r, d_in, generator=gen) / (d_in**0.5)
    lora_b = torch.randn(E, d_out, r, generator=gen)
    ids = torch.randint(0, used, (T, k), generator=gen)
    weights = torch.rand(T, k, generator=gen)
    scaling = torch.rand(E, generator=gen) + 0.5 if per_expert else 1.5
    return x, lora_a, lora_b, ids, weights, scaling


def _check(backend, case, dtype=torch.float32):
    x, lora_a, lora_b, ids, weights, scaling = case
    x = x.to(dtype).requires_grad_()
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32  # fp32 masters, or all float64
    leaves = [lora_a.to(wdtype).requires_grad_(), lora_b.to(wdtype).requires_grad_(), weights.requires_grad_()]
    y = ops.moe_lora(x, *leaves[:2], ids, leaves[2], scaling, backend=backend)
    s = scaling.double()[ids] if isinstance(scaling, torch.Tensor) else scaling
    want = formula(x, *leaves[:2], ids, leaves[2], s)
    assert y.shape == want.shape and y.dtype == dtype
    tol = torch.float32 if dtype == torch.float64 else dtype
    assert_close(y, want, tol)
    if y.numel():
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        got = torch.autograd.grad(y, (x, *leaves), g)
        exp = torch.autograd.grad(want, (x, *leaves), g.double())
        for name, a, b in zip(("dx", "dA", "dB", "dw"), got, exp):
            assert a.dtype == b.dtype if name != "dx" else a.dtype == dtype
            assert_close(a, b, tol, scale=1 + x.shape[0] / 16, msg=f"{backend} {name}")


@settings(max_examples=40, **SETTINGS)
@given(case=moe_cases(max_tokens=24), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_eager_moe_lora_matches_the_formula(case, dtype):
    _check("eager", case, dtype)


@settings(max_examples=8, **SETTINGS)
@given(case=moe_cases(max_tokens=12))
def test_triton_moe_lora_matches_the_formula(case):
    _check("triton", case)


@settings(max_examples=30, **SETTINGS)
@given(
    lead=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    E=st.integers(1, 6),
    data=st.data(),
)
def test_topk_route_keeps_leading_dims_and_matches_the_softmax(lead, E, data):
    k = data.draw(st.integers(1, E))
    logits = torch.randn(*lead, E, generator=torch.Generator().manual_seed(len(lead) * 7 + E)).double()
    for backend in ("eager", "loop"):
        out = ops.topk_route(logits, k, backend=backend, normalize=False)
        assert out.weights.shape == out.ids.shape == (*lead, k) and out.dense.shape == (*lead, E)
        probs = torch.softmax(logits, -1)
        assert torch.allclose(out.weights.double(), probs.gather(-1, out.ids), atol=1e-6)
        assert int(out.counts.sum()) == logits.numel() // E * k


def test_launch_config_is_chosen_once_per_shape_bucket():
    configs.stacked_config.cache_clear()
    first = configs.stacked_config(64, 32, torch.float16, TARGETS["sm_86"])
    assert configs.stacked_config(64, 32, torch.float16, TARGETS["sm_86"]) is first
    assert configs.stacked_config.cache_info().hits == 1


def test_deterministic_mode_pins_the_split_of_the_weight_gradients(monkeypatch):
    """DYLORA_MOE_DETERMINISTIC=1: the T split (hence the summation order) no longer depends on the GPU model."""
    monkeypatch.setenv("DYLORA_MOE_DETERMINISTIC", "1")
    pinned = configs.grad_splits(8192, 4, TARGETS["sm_90"])
    assert pinned == configs.grad_splits(8192, 4, TARGETS["sm_86"])  # another SM count, the same split
    monkeypatch.setenv("DYLORA_MOE_DETERMINISTIC", "0")
    assert configs.grad_splits(8192, 4, dataclasses.replace(TARGETS["sm_90"], sm_count=16)) != pinned


def test_several_splits_of_the_weight_gradients_match_the_formula(monkeypatch):
    """The fixed-order reduction over splits of T (GPU sizes) is exercised on the CPU by forcing splits."""
    monkeypatch.setattr(configs, "GRAD_SPLIT_ALIGN", 16)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(70, 24, generator=gen, requires_grad=True)
    a = torch.randn(3, 4, 24, generator=gen, requires_grad=True)
    b = torch.randn(3, 20, 4, generator=gen, requires_grad=True)
    ids = torch.randint(0, 3, (70, 2), generator=gen)
    w = torch.rand(70, 2, generator=gen, requires_grad=True)
    assert configs.grad_splits(70, 2, device_spec(x.device)) < 70
    y = ops.moe_lora(x, a, b, ids, w, 0.5, backend="triton", triton_path="stacked")
    want = formula(x, a, b, ids, w, 0.5)
    got = torch.autograd.grad(y.sum(), (x, a, b, w))
    exp = torch.autograd.grad(want.sum(), (x, a, b, w))
    for g, e in zip(got, exp):
        assert_close(g, e, torch.float32, scale=4)
