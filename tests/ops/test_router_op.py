"""The fused top-k router: eager twin vs a plain per-token formula, Triton vs the eager twin, values and gradients.

The oracle below walks the tokens one by one in float64 and picks the k largest probabilities with Python's
``sorted`` (ties: lowest expert id first); it shares no code with either backend.
"""

import warnings

import pytest
import torch
from helpers import DEVICE, HAS_CUDA, requires_gpu

import dylora_moe.kernels as ops
from dylora_moe.kernels import _launch
from dylora_moe.kernels.topk_route import _route_stats_kernel, topk_route_triton
from tolerances import CPU_DTYPES, GPU_DTYPES, assert_close

OUTPUTS = ("weights", "ids", "dense", "counts", "mean_prob")
DTYPES = GPU_DTYPES if HAS_CUDA else CPU_DTYPES


def per_token_formula(logits, top_k, temperature, normalize):
    """The router math of docs/design.md §3 literally, one token at a time in float64: returns the five router
    outputs (differentiable)."""
    z = logits.double()
    num_tokens, num_experts = z.shape
    weights, ids, dense, probs = [], [], [], []
    for t in range(num_tokens):
        p = torch.softmax(z[t] / temperature, dim=0)
        chosen = sorted(range(num_experts), key=lambda e: (-p[e].item(), e))[:top_k]
        w = p[chosen] / p[chosen].sum() if normalize else p[chosen]
        row = [w[chosen.index(e)] if e in chosen else p.new_zeros(()) for e in range(num_experts)]
        weights.append(w), ids.append(chosen), dense.append(torch.stack(row)), probs.append(p)
    counts = torch.tensor([sum(e in row for row in ids) for e in range(num_experts)], dtype=torch.int64)
    if num_tokens == 0:
        empty = z.new_zeros(0, top_k)
        return empty, empty.long(), z.new_zeros(0, num_experts), counts, z.new_zeros(num_experts)
    mean_prob = torch.stack(probs).mean(dim=0)
    return torch.stack(weights), torch.tensor(ids), torch.stack(dense), counts, mean_prob


def run_with_grads(fn, logits, top_k, grad_seed=1):
    """The five outputs and d(logits) of a random linear combination of weights, dense and mean_prob."""
    out = fn(logits, top_k)
    gen = torch.Generator().manual_seed(grad_seed)
    coeffs = [torch.randn(out[i].shape, generator=gen, dtype=torch.float64) for i in (0, 2, 4)]
    loss = sum((out[i] * c.to(out[i])).sum() for i, c in zip((0, 2, 4), coeffs))
    grad = torch.autograd.grad(loss, logits)[0] if logits.numel() else torch.zeros_like(logits)
    return (*out, grad)


def make_logits(T, E, dtype, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(T, E, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()


def assert_same_routing(got, want, dtype, msg):
    """ids and counts exactly; float outputs with the table's fp32 bound (both compute in fp32); d(logits) with
    the bound of the logits' dtype (it is returned in that dtype)."""
    for name, g, w in zip(OUTPUTS, got[:5], want[:5]):
        assert g.shape == w.shape, f"{msg} {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        if name in ("ids", "counts"):
            assert g.dtype == torch.int64 and torch.equal(g.cpu(), w.cpu()), f"{msg} {name}"
        else:
            assert g.dtype == torch.float32, f"{msg} {name} dtype {g.dtype}"
            assert_close(g, w.to(g.device), torch.float32, msg=f"{msg} {name}")
    assert got[5].dtype == dtype
    assert_close(got[5], want[5].to(got[5].device), dtype, msg=f"{msg} dlogits")


def route_fn(backend, temperature, normalize):
    return lambda z, k: tuple(ops.topk_route(z, k, temperature=temperature, normalize=normalize, backend=backend))


# (T, E): why each shape is here. Every (T, E) runs k in {1, 2, E} x normalize x temperature {1, 2}.
SHAPES = [
    (0, 4),  # empty input: empty outputs, zero counts and mean_prob, nothing launched
    (1, 1),  # one token, one expert: weight 1 (normalised) or p = 1
    (1, 3),  # one token: two experts get no token
    (7, 2),  # T below one row block
    (7, 5),  # prime E: padded to 8 columns
    (7, 64),  # the largest E of the router goal (docs/design.md §5); k = E = 64 iterations of the top-k loop
    (64, 3),  # E = 3: padded to 4
    (64, 8),  # power-of-two E
    (300, 4),  # several row blocks, the last one partial
]
CASES = [
    pytest.param(T, E, k, normalize, tau, id=f"T{T}-E{E}-k{k}-{'norm' if normalize else 'raw'}-tau{tau:g}")
    for T, E in SHAPES
    for k in sorted({1, min(2, E), E})
    for normalize in (True, False)
    for tau in (1.0, 2.0)
]


@pytest.mark.parametrize("T,E,k,normalize,tau", CASES)
def test_eager_matches_formula(T, E, k, normalize, tau):
    logits = make_logits(T, E, torch.float32, device="cpu")
    got = run_with_grads(route_fn("eager", tau, normalize), logits, k)
    want = run_with_grads(lambda z, k: per_token_formula(z, k, tau, normalize), logits, k)
    assert_same_routing(got, want, torch.float32, f"eager T={T} E={E} k={k}")


@pytest.mark.parametrize("T,E,k,normalize,tau", CASES)
def test_triton_matches_eager(T, E, k, normalize, tau):
    logits = make_logits(T, E, torch.float32)
    got = run_with_grads(route_fn("triton", tau, normalize), logits, k)
    want = run_with_grads(route_fn("eager", tau, normalize), logits, k)
    assert_same_routing(got, want, torch.float32, f"triton T={T} E={E} k={k}")


@pytest.mark.parametrize("dtype", DTYPES[1:])  # fp16 (and bf16 on a GPU); fp32 runs in the sweep above
@pytest.mark.parametrize("T,E,k", [(64, 8, 2), (7, 5, 5)])
def test_triton_low_precision_logits(dtype, T, E, k):
    logits = make_logits(T, E, dtype)
    got = run_with_grads(route_fn("triton", 2.0, True), logits, k)
    want = run_with_grads(route_fn("eager", 2.0, True), logits, k)
    assert_same_routing(got, want, dtype, f"triton {dtype} T={T} E={E} k={k}")
    oracle = run_with_grads(lambda z, k: per_token_formula(z, k, 2.0, True), logits.detach().cpu().requires_grad_(), k)
    assert_same_routing(got, oracle, dtype, f"triton {dtype} vs formula")


@requires_gpu
def test_triton_bf16_gradients_within_twice_eager_error():
    """bf16 d(logits): the kernel's error vs an fp32 run is at most 2x the eager bf16 error, plus the table's atol."""
    logits = make_logits(512, 64, torch.bfloat16)
    ref = run_with_grads(route_fn("eager", 1.0, True), logits.detach().float().requires_grad_(), 2)[5]
    got = run_with_grads(route_fn("triton", 1.0, True), logits, 2)[5].float()
    eager = run_with_grads(route_fn("eager", 1.0, True), logits, 2)[5].float()
    assert (got - ref).abs().max() <= 2 * (eager - ref).abs().max() + 1.6e-2


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_ties_go_to_the_lowest_expert_id(backend):
    logits = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal: 0, 1, 2
            [0.0, 2.0, 2.0, 1.0, 2.0],  # three-way tie at the top: 1, 2, then 4
            [3.0, 1.0, 1.0, 1.0, 3.0],  # tie for the first and for the third place: 0, 4, 1
        ],
        device=DEVICE,
    )
    out = ops.topk_route(logits, 3, backend=backend)
    assert out.ids.tolist() == [[0, 1, 2], [1, 2, 4], [0, 4, 1]]
    assert out.counts.tolist() == [2, 3, 2, 0, 2]


@pytest.mark.parametrize("output", ["weights", "dense", "mean_prob"])
@pytest.mark.parametrize("normalize", [True, False])
def test_each_output_alone_carries_its_gradient(output, normalize):
    """Only one output in the loss: the others get no gradient (None), and sum() hands a stride-0 gradient."""
    logits = make_logits(33, 6, torch.float32)
    grads = []
    for backend in ("triton", "eager"):
        out = ops.topk_route(logits, 2, temperature=1.5, normalize=normalize, backend=backend)
        grads.append(torch.autograd.grad(getattr(out, output).sum() + (getattr(out, output) ** 2).sum(), logits)[0])
    assert_close(grads[0], grads[1], torch.float32)
    if output == "weights" and normalize:
        assert grads[1].abs().max() > 1e-3  # the squared term gives a non-trivial gradient even though sum(w) = 1


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_empty_input_returns_empty_result(backend):
    logits = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    out = ops.topk_route(logits, 2, backend=backend)
    assert [tuple(t.shape) for t in out] == [(0, 2), (0, 2), (0, 5), (5,), (5,)]
    assert out.counts.dtype == torch.int64 and not out.counts.any() and not out.mean_prob.any()
    (out.weights.sum() + out.mean_prob.sum()).backward()
    assert logits.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", ["eager", "triton", "loop"])
def test_non_contiguous_and_batched_logits(backend):
    base = torch.randn(6, 2, 40, device=DEVICE)
    logits = base[:, :, ::2].transpose(0, 2)  # [20, 2, 6], no unit stride anywhere
    logits.requires_grad_()
    out = ops.topk_route(logits, 2, backend=backend)
    dense = logits.detach().contiguous().requires_grad_()
    want = ops.topk_route(dense, 2, backend="eager")
    # The leading dims of the logits are kept, so ids fit moe_lora's x [20, 2, d_in] directly.
    assert out.weights.shape == out.ids.shape == (20, 2, 2) and out.dense.shape == (20, 2, 6)
    assert out.counts.shape == out.mean_prob.shape == (6,)
    assert torch.equal(out.ids, want.ids)
    assert_close(out.dense, want.dense, torch.float32)
    (g,) = torch.autograd.grad((out.dense * torch.arange(6.0, device=DEVICE)).sum(), logits)
    (w,) = torch.autograd.grad((want.dense * torch.arange(6.0, device=DEVICE)).sum(), dense)
    assert_close(g, w, torch.float32)


def test_pinned_small_block_spans_many_programs(monkeypatch):
    """BLOCK_T = 4: eight row blocks, the last one partial; E = 33 gives the statistics kernel a masked last program."""
    monkeypatch.setenv("DYLORA_ROUTER_BLOCK_T", "4")
    logits = make_logits(30, 33, torch.float32)
    got = run_with_grads(route_fn("triton", 1.0, False), logits, 2)
    want = run_with_grads(route_fn("eager", 1.0, False), logits, 2)
    assert_same_routing(got, want, torch.float32, "BLOCK_T=4")
    monkeypatch.setenv("DYLORA_ROUTER_BLOCK_T", "3")
    with pytest.raises(ValueError, match="DYLORA_ROUTER_BLOCK_T='3' must be a power of two"):
        ops.topk_route(logits, 2, backend="triton")


def test_stats_kernel_sums_partials_in_several_steps():
    """The fixed-order reduction over row blocks, driven directly: 10 blocks in steps of 4 (the last one masked)."""
    num_blocks, num_experts, num_tokens = 10, 33, 37
    part_counts = torch.randint(0, 5, (num_blocks, num_experts), device=DEVICE, dtype=torch.int32)
    part_probs = torch.rand(num_blocks, num_experts, device=DEVICE)
    counts = torch.full((num_experts,), -1, device=DEVICE, dtype=torch.int64)
    mean_prob = torch.full((num_experts,), -1.0, device=DEVICE)
    _route_stats_kernel[(2,)](
        part_counts, part_probs, counts, mean_prob, num_blocks, num_experts, num_tokens, BLOCK_N=4, BLOCK_E=32
    )
    assert torch.equal(counts, part_counts.sum(dim=0).long())
    assert_close(mean_prob, part_probs.sum(dim=0) / num_tokens, torch.float32)


def test_triton_is_bitwise_deterministic():
    logits = make_logits(300, 8, torch.float32)
    first, second = (run_with_grads(route_fn("triton", 1.0, True), logits, 2) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_bad_inputs_raise_clear_errors(backend):
    logits = torch.randn(4, 3, device=DEVICE)
    for top_k in (0, 4, 2.0):
        with pytest.raises(ValueError, match=r"top_k must be an int in \[1, 3\]"):
            ops.topk_route(logits, top_k, backend=backend)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.topk_route(logits, 1, temperature=0.0, backend=backend)
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = logits.clone()
        poisoned[2, 1] = bad
        # A device-side assert (no host sync, on the CPU too): a RuntimeError with the message.
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            ops.topk_route(poisoned, 1, backend=backend)
    if backend == "triton":  # the custom op checks too, for callers that skip topk_route
        with pytest.raises(ValueError, match="1 <= top_k <= E"):
            topk_route_triton(logits, 5, 1.0, True)


def test_nan_rows_without_the_check_keep_ids_in_range():
    logits = torch.randn(5, 4, device=DEVICE)
    logits[1, 2] = float("nan")
    out = ops.topk_route(logits, 2, backend="triton", check_finite=False)
    assert out.weights[1].isnan().all() and out.ids.min() >= 0 and out.ids.max() < 4
    assert not out.weights[[0, 2, 3, 4]].isnan().any()


def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(_launch, "interpreter_enabled", lambda: False)
    logits = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.topk_route(logits, 1, backend="triton")
    with pytest.raises(RuntimeError, match="backend='eager'"):
        topk_route_triton(logits, 1, 1.0, True)


def test_opcheck_forward_and_backward_ops():
    logits = make_logits(9, 5, torch.float32)
    torch.library.opcheck(torch.ops.dylora_moe.topk_route.default, (logits, 2, 1.5, True))
    torch.library.opcheck(torch.ops.dylora_moe.topk_route.default, (logits, 5, 1.0, False))
    ids = ops.topk_route(logits, 2, backend="eager").ids
    grads = (torch.randn(9, 2, device=DEVICE), torch.randn(9, 5, device=DEVICE), torch.randn(5, device=DEVICE))
    torch.library.opcheck(torch.ops.dylora_moe.topk_route_backward.default, (logits.detach(), ids, *grads, 1.5, True))


def test_torch_compile_fullgraph_through_topk_route():
    torch._dynamo.reset()

    def route(z):
        out = ops.topk_route(z, 2, temperature=1.5, backend="triton", check_finite=False)
        return out.weights, out.dense, out.mean_prob

    logits = make_logits(33, 6, torch.float32)
    compiled = torch.compile(route, backend="aot_eager", fullgraph=True)
    got, want = compiled(logits), route(logits)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    loss = lambda out: (out[0] ** 2).sum() + (out[1] * 3).sum() + (out[2] ** 2).sum()  # noqa: E731
    assert torch.equal(torch.autograd.grad(loss(got), logits)[0], torch.autograd.grad(loss(want), logits)[0])


def test_eager_twin_gradcheck():
    """Finite differences, independent of any autograd formula. The twin computes in fp32 (its contract), so the
    check runs in fp32 with eps = 1e-3: truncation ~1e-6, rounding ~1e-4, far below the bound."""
    logits = torch.randn(5, 4, dtype=torch.float32, requires_grad=True)
    for normalize in (True, False):
        fn = lambda z: route_fn("eager", 2.0, normalize)(z, 2)[0:5:2]  # noqa: E731  weights, dense, mean_prob
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not double precision": intended, see the docstring
            assert torch.autograd.gradcheck(fn, (logits,), eps=1e-3, atol=2e-3, rtol=1e-2)
