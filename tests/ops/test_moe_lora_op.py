"""The grouped MoE-LoRA op: eager twin vs a plain per-token formula, Triton vs the same, values and gradients.

The oracle below gathers each token's expert matrices and applies the math of docs/design.md §3 literally, in float64;
it shares no code with the stacked form the op uses.
"""

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, requires_gpu

import dylora_moe.kernels as ops
from dylora_moe.kernels import _launch
from dylora_moe.kernels.configs import BLOCK_M
from dylora_moe.kernels.grouped import grouped_op
from dylora_moe.kernels.routing_meta import RoutingMeta
from dylora_moe.kernels.stacked import stacked_op
from tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def per_token_formula(x, lora_a, lora_b, ids, weights, scaling, mask=None):
    """y[t] = s * sum_j w[t,j] * B[e] (A[e] x~[t]) with e = ids[t,j], in float64."""
    x, lora_a, lora_b, weights = (t.double() for t in (x, lora_a, lora_b, weights))
    x_lora = x if mask is None else x * mask.double()
    h = torch.einsum("tkrd,td->tkr", lora_a[ids], x_lora)
    return scaling * torch.einsum("tk,tkor,tkr->to", weights, lora_b[ids], h)


def make_inputs(T, d_in, d_out, E, r, k, dtype, device=DEVICE, empty_expert=None, seed=0):
    """Random routing with k distinct experts per token; ``empty_expert`` never gets a token (needs k < E)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d_in, generator=gen)
    lora_a = torch.randn(E, r, d_in, generator=gen) / d_in**0.5
    lora_b = torch.randn(E, d_out, r, generator=gen) / r**0.5
    pool = [e for e in range(E) if e != empty_expert]
    ids = torch.tensor(pool)[torch.rand(T, len(pool), generator=gen).argsort(dim=1)[:, :k]]
    weights = torch.rand(T, k, generator=gen) + 0.1
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in (x, lora_a, lora_b)]
    return (*leaves, ids.to(device), weights.to(device).requires_grad_())


def run_with_grads(fn, x, lora_a, lora_b, ids, weights, grad_seed=1):
    """Output and the gradients of x, A, B and the weights for a fixed random upstream gradient."""
    y = fn(x, lora_a, lora_b, ids, weights)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    if y.numel() == 0:
        return (y, *(torch.zeros_like(t) for t in (x, lora_a, lora_b, weights)))
    return (y, *torch.autograd.grad(y, (x, lora_a, lora_b, weights), grad_y))


def check_against_formula(backend, dtype, T, d_in, d_out, E, r, k, scaling=2.0, triton_path="auto", **kw):
    x, a, b, ids, w = make_inputs(T, d_in, d_out, E, r, k, dtype, **kw)
    op = lambda *args: ops.moe_lora(*args, scaling, backend=backend, triton_path=triton_path)  # noqa: E731
    got = run_with_grads(op, x, a, b, ids, w)
    want = run_with_grads(lambda *args: per_token_formula(*args, scaling), x, a, b, ids, w)
    # Gradients of A and B sum over up to T tokens: widen the bound with the reduction length.
    scales = (1, 1, (1 + T / 64), (1 + T / 64), 1)
    for name, g, e, s in zip(("y", "dx", "dA", "dB", "dw"), got, want, scales):
        assert g.shape == e.shape, name
        assert_close(g, e, dtype, scale=s, msg=f"{backend} {dtype} {name} T={T} E={E} r={r} k={k}")


# (T, d_in, d_out, E, r, k): why each shape is here.
EAGER_SWEEP = [
    (T, d_in, d_out, E, r, k)
    for T in (0, 1, 7, 64, 300)
    for d_in, d_out in ((48, 80), (96, 48))
    for E in (1, 2, 4, 8)
    for r in (4, 8, 16)
    for k in sorted({1, min(2, E), E})
]


@pytest.mark.parametrize("T,d_in,d_out,E,r,k", EAGER_SWEEP)
def test_eager_matches_formula(T, d_in, d_out, E, r, k):
    check_against_formula("eager", torch.float32, T, d_in, d_out, E, r, k, device="cpu")


TRITON_CASES = [
    pytest.param(0, 48, 80, 4, 8, 2, id="T0-empty-input"),
    pytest.param(1, 48, 80, 4, 8, 1, id="T1-single-token-k1"),
    pytest.param(7, 96, 48, 1, 4, 1, id="E1-plain-lora"),
    pytest.param(7, 48, 80, 2, 16, 2, id="k=E=2-dense"),
    pytest.param(64, 80, 96, 4, 8, 2, id="T64-odd-widths"),
    pytest.param(64, 48, 80, 8, 4, 8, id="k=E=8-dense"),
    pytest.param(300, 48, 80, 4, 16, 2, id="T300-many-token-blocks"),
    pytest.param(37, 48, 80, 8, 32, 2, id="N=256-two-rank-tiles"),
    pytest.param(29, 33, 45, 3, 12, 2, id="prime-widths-rank12-E3"),
]


# Both Triton formulations: all experts as one stacked rank space, and (token, slot) pairs sorted by expert.
TRITON_PATHS = ("stacked", "grouped")


@pytest.mark.parametrize("path", TRITON_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,d_in,d_out,E,r,k", TRITON_CASES)
def test_triton_matches_formula(T, d_in, d_out, E, r, k, dtype, path):
    check_against_formula("triton", dtype, T, d_in, d_out, E, r, k, triton_path=path)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eager_low_precision_matches_formula(dtype):
    check_against_formula("eager", dtype, 64, 80, 96, 4, 8, 2)


BACKENDS = [("eager", "auto"), ("triton", "stacked"), ("triton", "grouped")]
BACKEND_IDS = ["eager", "triton-stacked", "triton-grouped"]


def _op(backend, path, scaling, **kw):
    return lambda *t: ops.moe_lora(*t, scaling, backend=backend, triton_path=path, **kw)


@pytest.mark.parametrize("backend,path", BACKENDS + [("loop", "auto")], ids=BACKEND_IDS + ["loop"])
def test_expert_without_tokens_gets_zero_gradient(backend, path):
    x, a, b, ids, w = make_inputs(40, 48, 80, 4, 8, 2, torch.float32, empty_expert=2)
    _, _, da, db, _ = run_with_grads(_op(backend, path, 1.0), x, a, b, ids, w)
    assert torch.all(da[2] == 0) and torch.all(db[2] == 0)
    assert torch.isfinite(da).all() and torch.isfinite(db).all()
    assert da[[0, 1, 3]].abs().sum() > 0 and db[[0, 1, 3]].abs().sum() > 0


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_perturbing_one_expert_changes_only_its_tokens(backend, path):
    x, a, b, ids, w = make_inputs(50, 48, 80, 4, 8, 1, torch.float32)
    with torch.no_grad():
        y0 = _op(backend, path, 1.0)(x, a, b, ids, w)
        b2 = b.clone()
        b2[1] += 0.5
        y1 = _op(backend, path, 1.0)(x, a, b2, ids, w)
    changed = (y1 - y0).abs().amax(dim=1) > 1e-4
    assert torch.equal(changed, ids[:, 0] == 1)
    assert changed.any()


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_dropout_mask_applies_to_lora_input(backend, path):
    x, a, b, ids, w = make_inputs(33, 48, 80, 4, 8, 2, torch.float32)
    mask = (torch.rand(33, 48, generator=torch.Generator().manual_seed(3)) > 0.25).float().to(DEVICE) / 0.75
    got = run_with_grads(_op(backend, path, 0.5, dropout_mask=mask), x, a, b, ids, w)
    want = run_with_grads(lambda *t: per_token_formula(*t, 0.5, mask=mask), x, a, b, ids, w)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32, scale=2)


@pytest.mark.parametrize("backend,path", BACKENDS, ids=BACKEND_IDS)
def test_non_contiguous_inputs_and_leading_dims(backend, path):
    x, a, b, ids, w = make_inputs(24, 48, 80, 4, 8, 2, torch.float32)
    # x as a transposed view, A and B stored in a permuted memory layout, batch dims [2, 12].
    x_nc = x.detach().t().contiguous().t().requires_grad_()
    a_nc = a.detach().permute(0, 2, 1).contiguous().permute(0, 2, 1).requires_grad_()
    b_nc = b.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not (x_nc.is_contiguous() or a_nc.is_contiguous() or b_nc.is_contiguous())
    y = _op(backend, path, 2.0)(x_nc.view(2, 12, 48), a_nc, b_nc, ids.view(2, 12, 2), w.view(2, 12, 2))
    assert y.shape == (2, 12, 80)
    got = torch.autograd.grad(y.sum(), (x_nc, a_nc, b_nc, w))
    ref = per_token_formula(x, a, b, ids, w, 2.0)
    want = torch.autograd.grad(ref.sum(), (x, a, b, w))
    assert_close(y.reshape(24, 80), ref, torch.float32)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32, scale=2)


def test_repeated_expert_in_one_token_adds_weights():
    x, a, b, _, w = make_inputs(9, 48, 80, 4, 8, 2, torch.float32)
    ids = torch.full((9, 2), 3, device=DEVICE)
    for backend, path in BACKENDS:
        got = _op(backend, path, 1.0)(x, a, b, ids, w)
        assert_close(got, per_token_formula(x, a, b, ids, w, 1.0), torch.float32)


@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_is_bitwise_deterministic(path):
    x, a, b, ids, w = make_inputs(100, 48, 80, 4, 8, 2, torch.float32)
    first = run_with_grads(_op("triton", path, 1.0), x, a, b, ids, w)
    second = run_with_grads(_op("triton", path, 1.0), x, a, b, ids, w)
    for p, q in zip(first, second):
        assert torch.equal(p, q)


def test_loop_baseline_matches_eager():
    x, a, b, ids, w = make_inputs(64, 48, 80, 4, 8, 2, torch.float32)
    got = run_with_grads(lambda *t: ops.moe_lora(*t, 1.5, backend="loop"), x, a, b, ids, w)
    want = run_with_grads(lambda *t: ops.moe_lora(*t, 1.5, backend="eager"), x, a, b, ids, w)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32)


@requires_gpu
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_bf16_triton_error_is_within_twice_eager_error(path):
    """flash-attention's rule: the kernel's bf16 error vs fp32 math is at most 2x eager bf16's, plus atol."""
    x, a, b, ids, w = make_inputs(512, 256, 384, 8, 16, 2, torch.bfloat16)
    exact = run_with_grads(lambda *t: per_token_formula(*t, 2.0), x, a, b, ids, w)
    tri = run_with_grads(_op("triton", path, 2.0), x, a, b, ids, w)
    eag = run_with_grads(lambda *t: ops.moe_lora(*t, 2.0, backend="eager"), x, a, b, ids, w)
    for name, t, e, ref in zip(("y", "dx", "dA", "dB", "dw"), tri, eag, exact):
        err_t = (t.double() - ref).abs().max().item()
        err_e = (e.double() - ref).abs().max().item()
        assert err_t <= 2 * err_e + 1e-2, f"{name}: triton {err_t:.3g} vs eager {err_e:.3g}"


# --- compile safety -------------------------------------------------------------------------------------------


def test_opcheck_stacked_ops():
    x, a, b, ids, w = make_inputs(20, 48, 80, 4, 8, 2, torch.float32)
    meta = RoutingMeta(ids, w.detach(), 4)
    gate, counts = meta.gate.requires_grad_(), meta.counts
    scale = torch.tensor([2.0, 1.0, 0.5, 3.0])
    base = torch.randn(20, 80)
    torch.library.opcheck(stacked_op.fwd_op, (x, a, b, gate, counts, scale, base, None, None, 1.0, 0.0, True))
    y, s = stacked_op.fwd_op(x, a, b, gate, counts, scale, base, None, None, 1.0, 0.0, True)
    saved = (x.detach(), a.detach(), b.detach(), gate.detach(), counts, scale, None, None, s.detach(), 1.0, 0.0)
    torch.library.opcheck(stacked_op.bwd_op, (torch.randn_like(y.detach()), *saved), dict(needs=[True] * 12))


def test_opcheck_grouped_ops():
    x, a, b, ids, w = make_inputs(20, 48, 80, 4, 8, 2, torch.float32)
    coef = (w.detach() * 2.0).requires_grad_()
    sort = RoutingMeta(ids, w.detach(), 4).blocks(BLOCK_M)
    torch.library.opcheck(grouped_op.fwd_op, (x, a, b, coef, *sort, None, None, 0.0))
    y, h = grouped_op.fwd_op(x, a, b, coef, *sort, None, None, 0.0)
    saved = (x.detach(), a.detach(), b.detach(), coef.detach(), h.detach(), *sort, None, None, 0.0)
    torch.library.opcheck(grouped_op.bwd_op, (torch.randn_like(y.detach()), *saved), dict(needs=[True] * 10))


@pytest.mark.parametrize("path", TRITON_PATHS)
def test_torch_compile_traces_without_graph_break(path):
    x, a, b, ids, w = make_inputs(16, 48, 80, 4, 8, 2, torch.float32)
    torch._dynamo.reset()
    fn = torch.compile(_op("triton", path, 1.0, validate_ids=False), fullgraph=True, backend="aot_eager")
    got = run_with_grads(fn, x, a, b, ids, w)
    want = run_with_grads(lambda *t: per_token_formula(*t, 1.0), x, a, b, ids, w)
    for g, e in zip(got, want):
        assert_close(g, e, torch.float32)


# --- bad input (docs/design.md §6) -----------------------------------------------------------------------------------


def _good():
    x, a, b, ids, w = make_inputs(5, 8, 6, 3, 4, 2, torch.float32, device="cpu")
    return dict(x=x, lora_a=a, lora_b=b, expert_ids=ids, expert_weights=w, scaling=1.0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(lora_b=torch.zeros(3, 6, 5)), ValueError, "does not match lora_a"),
        (dict(lora_b=torch.zeros(2, 6, 4)), ValueError, "does not match lora_a"),
        (dict(lora_a=torch.zeros(3, 4)), ValueError, r"\[E, r, d_in\]"),
        (dict(x=torch.zeros(5, 9)), ValueError, "d_in=8"),
        (dict(expert_weights=torch.rand(5, 3)), ValueError, "same shape"),
        (dict(expert_ids=torch.zeros(4, 2, dtype=torch.long), expert_weights=torch.rand(4, 2)), ValueError, "leading"),
        (dict(expert_ids=torch.full((5, 2), 3)), IndexError, r"\[0, 3\)"),
        (dict(expert_ids=torch.full((5, 2), -1)), IndexError, r"\[0, 3\)"),
        (dict(expert_ids=torch.zeros(5, 2)), TypeError, "integer"),
        (dict(x=torch.zeros(5, 8, dtype=torch.float64)), TypeError, "float64 needs float64 weights"),
        (dict(lora_b=torch.zeros(3, 4, 6)), ValueError, "did you pass lora_b transposed"),
        (dict(lora_a=torch.zeros(3, 8, 4)), ValueError, "did you pass lora_a transposed"),
        (dict(scaling=torch.ones(4)), ValueError, r"scaling must be a float or a floating tensor \[E=3\]"),
        (dict(x=torch.zeros(5, 8, device="meta")), ValueError, "one device"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        ops.moe_lora(**args, backend="eager")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.moe_lora(**_good(), backend="cuda")


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(_launch, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.moe_lora(**_good(), backend="triton")


def test_auto_backend_picks_eager_on_cpu_and_triton_on_cuda():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "eager"
    assert ops.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_unknown_triton_path_is_rejected():
    with pytest.raises(ValueError, match="unknown Triton path 'sorted'"):
        ops.moe_lora(**_good(), backend="triton", triton_path="sorted")


def test_auto_path_groups_only_sparse_routing_over_many_experts():
    from dylora_moe.kernels.paths import choose_path

    assert choose_path(num_experts=8, rank=16, top_k=2) == "stacked"  # the goals' reference case: E * R = 128
    assert choose_path(num_experts=64, rank=16, top_k=2) == "grouped"
    assert choose_path(num_experts=64, rank=16, top_k=64) == "grouped"  # E * R = 1024: wider than the stacked tile
    assert choose_path(num_experts=8, rank=16, top_k=8) == "stacked"  # dense routing uses every expert anyway


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["p0", "dropout"])
@pytest.mark.parametrize("path", TRITON_PATHS)
def test_triton_saves_only_rank_space_for_backward(path, dropout):
    """Memory goal (docs/design.md §5): beyond x, the weights and the step's shared routing metadata, backward keeps
    at most T * (E*R + 2K) elements, never T * K * D, and that holds with LoRA dropout on (the mask is never stored)."""
    T, E, r, k = 40, 4, 8, 2
    x, a, b, ids, w = make_inputs(T, 48, 80, E, r, k, torch.float32)
    meta = RoutingMeta(ids, w, E)
    shared = [meta.gate, *meta.blocks(BLOCK_M), ids, w]  # built once per step for every layer
    seed = torch.tensor([1234])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.moe_lora(
            x, a, b, ids, w, 1.0, backend="triton", triton_path=path, routing=meta,
            dropout_p=dropout, dropout_seed=seed if dropout else None,
        )  # fmt: skip
    inputs = {t.data_ptr() for t in (x, a, b, *shared)}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in inputs)
    if path == "stacked":  # S [T, E*R] (and the one-element seed)
        bound = T * (E * r + 2 * k)
    else:  # h [P, R] per (token, slot) pair and coef [P] (and the seed)
        bound = T * k * (r + 1) + 1
    assert 0 < extra <= bound
    assert all(t.numel() < T * 48 for t in saved if t.data_ptr() not in inputs)  # no [T, d_in] mask


@pytest.mark.parametrize("path", TRITON_PATHS)
def test_in_kernel_dropout_is_the_philox_mask_of_the_eager_twin(path):
    """Triton draws dropout in-register; eager.philox_dropout_mask regenerates the same mask from the seed, and
    the eager backend given the same seed draws it too: values and gradients agree with the formula."""
    from dylora_moe.kernels.eager import philox_dropout_mask

    x, a, b, ids, w = make_inputs(33, 48, 80, 4, 8, 2, torch.float32)
    seed = torch.tensor([987654321])
    mask = philox_dropout_mask(seed, (33, 48), 0.25)
    assert 0.6 < float((mask > 0).float().mean()) < 0.9 and torch.equal(mask.unique(), torch.tensor([0.0, 1 / 0.75]))
    kw = dict(dropout_p=0.25, dropout_seed=seed)
    want = run_with_grads(lambda *t: per_token_formula(*t, 0.5, mask=mask), x, a, b, ids, w)
    for backend, p in (("triton", path), ("eager", "auto")):
        got = run_with_grads(_op(backend, p, 0.5, **kw), x, a, b, ids, w)
        for name, g, e in zip(("y", "dx", "dA", "dB", "dw"), got, want):
            assert_close(g, e, torch.float32, scale=2, msg=f"{backend} {name}")


def test_philox_twin_matches_triton_rand_bit_for_bit():
    import triton
    import triton.language as tl

    @triton.jit
    def _rand_kernel(seed_ptr, out_ptr, N):
        offs = tl.arange(0, 64)
        tl.store(out_ptr + offs, tl.rand(tl.load(seed_ptr), offs.to(tl.int64) + N), mask=offs < 64)

    from dylora_moe.kernels.eager import philox_uniform

    for seed_value, start in ((0, 0), (2**31 - 5, 3), (12345, 2**33 + 7)):
        seed = torch.tensor([seed_value])
        out = torch.empty(64)
        _rand_kernel[(1,)](seed, out, start)
        assert torch.equal(out, philox_uniform(seed, torch.arange(64) + start))


def test_per_expert_scaling_and_mixed_dtypes_match_the_formula():
    """scaling as a tensor [E] (alpha_e / r_e) and fp32 weights under fp16 activations on every backend."""
    x, a, b, ids, w = make_inputs(29, 48, 80, 4, 8, 2, torch.float32)
    scale = torch.tensor([0.5, 2.0, 1.0, 3.0], device=DEVICE)
    x16 = x.detach().half().requires_grad_()

    def formula(x_, a_, b_, ids_, w_):
        return per_token_formula(x_, a_, b_, ids_, w_ * scale.double()[ids_], 1.0)

    want = run_with_grads(formula, x16, a, b, ids, w)
    for backend, path in BACKENDS + [("loop", "auto")]:
        got = run_with_grads(_op(backend, path, scale), x16, a, b, ids, w)
        assert got[0].dtype == torch.float16 and got[2].dtype == got[3].dtype == torch.float32
        for name, g, e in zip(("y", "dx", "dA", "dB", "dw"), got, want):
            assert_close(g, e, torch.float16, scale=2, msg=f"{backend}-{path} {name}")


# fp32 LoRA masters under fp16 (CPU and GPU) / bf16 (GPU) activations: how training runs the ops.
MIXED_DTYPES = [d for d in DTYPES if d != torch.float32]
# (T, d_in, d_out, E, r, k, empty expert): why each shape is here.
MIXED_CASES = [
    pytest.param(0, 48, 80, 4, 8, 2, None, id="T0-empty-input"),
    pytest.param(37, 48, 80, 4, 8, 2, 1, id="odd-T-an-expert-without-tokens"),
    pytest.param(70, 80, 96, 3, 16, 3, None, id="k=E=3-dense-odd-widths"),
    pytest.param(21, 48, 80, 8, 32, 1, None, id="N=256-k1"),
]
# (in-kernel dropout, base output, per-expert scaling vector)
MIXED_FLAGS = [
    (False, False, False),
    (True, False, False),
    (False, True, False),
    (False, False, True),
    (True, True, True),
]


@pytest.mark.parametrize("path", TRITON_PATHS)
@pytest.mark.parametrize("dtype", MIXED_DTYPES, ids=str)
@pytest.mark.parametrize("dropout,base,vector", MIXED_FLAGS, ids=lambda f: str(int(f)))
@pytest.mark.parametrize("T,d_in,d_out,E,r,k,empty", MIXED_CASES)
def test_fp32_weights_under_low_precision_activations_match_eager(T, d_in, d_out, E, r, k, empty, dropout, base,
                                                                   vector, dtype, path):  # fmt: skip
    """The training default: Triton (each path, each flag the compile report compiles) gives eager's values and
    gradients, output in x's dtype, weight gradients fp32."""
    x, a, b, ids, w = make_inputs(T, d_in, d_out, E, r, k, torch.float32, empty_expert=empty)
    x = x.detach().to(dtype).requires_grad_()
    scaling = torch.linspace(0.5, 3.0, E, device=DEVICE) if vector else 2.0
    kw = dict(dropout_p=0.25, dropout_seed=torch.tensor([4321], device=DEVICE)) if dropout else {}
    if base:
        kw["base_output"] = torch.randn(T, d_out, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    got = run_with_grads(_op("triton", path, scaling, **kw), x, a, b, ids, w)
    want = run_with_grads(_op("eager", "auto", scaling, **kw), x, a, b, ids, w)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    scales = (1, 1, 1 + T / 64, 1 + T / 64, 1)
    for name, g, e, s in zip(("y", "dx", "dA", "dB", "dw"), got, want, scales):
        assert_close(g, e, dtype, scale=s, msg=f"{path} {dtype} {name}")
    if empty is not None:
        assert torch.all(got[2][empty] == 0) and torch.all(got[3][empty] == 0)


def test_float64_stays_float64_in_eager():
    x, a, b, ids, w = make_inputs(9, 12, 10, 3, 4, 2, torch.float64, device="cpu")
    y = ops.moe_lora(x, a, b, ids, w.double(), 1.5, backend="eager")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, per_token_formula(x, a, b, ids, w, 1.5), rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="float64"):
        ops.moe_lora(x.cpu(), a, b, ids, w, 1.5, backend="triton")


def test_base_output_is_accumulated_on_every_backend():
    x, a, b, ids, w = make_inputs(17, 48, 80, 4, 8, 2, torch.float32)
    base = torch.randn(17, 80, device=DEVICE)
    want = base + per_token_formula(x, a, b, ids, w, 1.0)
    for backend, path in BACKENDS:
        got = ops.moe_lora(x, a, b, ids, w, 1.0, backend=backend, triton_path=path, base_output=base.clone())
        assert_close(got, want, torch.float32)


@pytest.mark.parametrize("backend,path", BACKENDS + [("loop", "auto")], ids=BACKEND_IDS + ["loop"])
def test_out_of_range_ids_raise_on_every_backend(backend, path):
    x, a, b, ids, w = make_inputs(6, 12, 10, 3, 4, 1, torch.float32)
    for bad in (3, -1):
        with pytest.raises(IndexError, match=r"\[0, 3\)"):
            ops.moe_lora(x, a, b, torch.full_like(ids, bad), w, 1.0, backend=backend, triton_path=path)
        with pytest.raises(RuntimeError, match=r"\[0, 3\)"):  # the per-step metadata: device-side, sync-free
            RoutingMeta(torch.full_like(ids, bad), w, 3)


def test_device_side_id_check_runs_under_compile():
    """Off the CPU (and under torch.compile) the id check is torch._assert_async: no host sync, still an error."""
    from dylora_moe.kernels.routing_meta import check_expert_ids

    fn = torch.compile(lambda ids: check_expert_ids(ids, 3) or ids + 1, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    assert torch.equal(fn(torch.tensor([0, 2])), torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match=r"expert_ids must be in \[0, 3\)"):
        fn(torch.tensor([0, 3]))
