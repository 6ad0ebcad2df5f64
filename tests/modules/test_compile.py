"""Whole-step torch.compile(fullgraph=True) of DyLoRA_MoE: one graph for forward + backward (no graph break, no
data-dependent guard), with the loss and every gradient of the eager model.

The CPU runs the graphs with backend "aot_eager" (traces forward and backward through AOTAutograd, as inductor does,
without inductor's C++ code generation: inductor also passes, at ~3 min per model on a shared 2-core CPU instead of
~10-25 s). The triton case runs its kernels in Triton's interpreter.
"""

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE
from dylora_moe.router import DynamicHybridRouter
from tolerances import assert_close


def build(routing, backend, dropout=0.0, **kw):
    moe = DyLoRA_MoE(
        tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, lora_dropout=dropout, kernel=backend,
        routing=routing, top_k=2, z_loss_coefficient=1e-3, **kw,
    ).train()  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    return moe


def padded_batch():
    input_ids, mask, labels = batch(rows=3, length=6)
    mask[2, :3] = 0  # row 1 right-padded (moe_models.batch), row 2 left-padded
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


def loss_and_grads(model, params, inputs):
    for p in params.values():
        p.grad = None
    out = model(*inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize(
    "routing, backend, kw",
    [
        pytest.param("token", "eager", {}, id="token-eager"),
        pytest.param("token", "triton", {}, id="token-triton"),
        pytest.param("sequence", "eager", {"sequence_top_k": 2}, id="sequence-top2-eager"),
    ],
)
def test_fullgraph_compile_matches_eager(routing, backend, kw):
    moe = build(routing, backend, **kw)
    params = dict(moe.named_parameters())
    inputs = padded_batch()
    want, want_grads = loss_and_grads(moe, params, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    got, got_grads = loss_and_grads(compiled, params, inputs)
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    assert_close(got.logits, want.logits, torch.float32, msg="logits")
    assert_close(got.aux_loss, want.aux_loss, torch.float32, msg="aux loss")
    assert set(got_grads) == set(want_grads) and "router.gate.weight" in got_grads
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")


def test_compile_method_with_dropout_and_a_second_batch():
    """DyLoRA_MoE.compile(): in place, fullgraph, first call compiled straight after construction (the maturity
    flag is refreshed by compile()); LoRA dropout on; a second batch of the same shape reuses the graph."""
    moe = build("token", "eager", dropout=0.1)
    torch._dynamo.reset()
    moe.compile(backend="aot_eager")
    for seed in (1, 2):
        input_ids, mask, labels = batch(rows=3, length=6, seed=seed)
        out = moe(input_ids, mask, labels)
        out.loss.backward()
        assert torch.isfinite(out.loss) and moe.handle.layers[next(iter(moe.handle.layers))].lora_A.grad is not None


def test_compiled_router_reads_the_maturity_flag():
    """Under compile the router reads its host-side flag: never read -> an error naming the fix; refreshed after a
    direct buffer edit -> the new routing rule (a recompile, no graph break)."""
    router = DynamicHybridRouter(8, 3, top_k=1, backend="eager")
    route = torch.compile(lambda x: router.route(x).dense, fullgraph=True, backend="eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="refresh_maturity"):
        route(torch.randn(4, 8))
    router.refresh_maturity()
    assert (route(torch.randn(4, 8)) > 0).sum() == 12  # dense while experts are immature
    router.expert_maturity.fill_(1.0)
    router.refresh_maturity()
    assert (route(torch.randn(4, 8)) > 0).sum() == 4  # top-1 now that every expert is mature


def test_reference_backend_refuses_to_compile():
    moe = build("token", "eager")
    moe.set_kernel("reference")
    with pytest.raises(ValueError, match="reference"):
        moe.compile()


def test_fullgraph_compile_with_the_fused_loss():
    """The chunked linear + cross-entropy compiles into the same graph: same loss and gradients as eager."""
    moe = build("token", "eager")
    moe.set_fused_loss(True, chunk_rows=8)
    params = dict(moe.named_parameters())
    inputs = padded_batch()
    want, want_grads = loss_and_grads(moe, params, inputs)
    torch._dynamo.reset()
    got, got_grads = loss_and_grads(torch.compile(moe, fullgraph=True, backend="aot_eager"), params, inputs)
    assert got.logits is None and want.logits is None
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")


@pytest.mark.parametrize(
    "kw",
    [
        pytest.param({"balance_loss": "loss_free", "balance_update_rate": 0.1}, id="loss-free"),
        pytest.param({"balance_loss": "switch", "global_balance": True}, id="switch-global"),
    ],
)
def test_fullgraph_compile_with_balancing(kw):
    """Loss-free selection bias and the global-batch load window compile into the one graph: the same loss,
    gradients and load window as eager (the window's in-place update happens in the compiled step), and the same
    bias after balance_step."""
    moe = build("token", "eager", **kw)
    bias = torch.tensor([0.3, -0.2, 0.0])
    moe.router.selection_bias.copy_(bias)
    params = dict(moe.named_parameters())
    inputs = padded_batch()
    want, want_grads = loss_and_grads(moe, params, inputs)
    want_window = moe.router.load_window.clone()
    moe.balance_step()
    want_bias = moe.router.selection_bias.clone()
    moe.router.selection_bias.copy_(bias)
    torch._dynamo.reset()
    got, got_grads = loss_and_grads(torch.compile(moe, fullgraph=True, backend="aot_eager"), params, inputs)
    assert_close(got.loss, want.loss, torch.float32, msg="loss")
    torch.testing.assert_close(moe.router.load_window, want_window)
    assert want_window.abs().sum() > 0
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], torch.float32, msg=f"grad of {name}")
    moe.balance_step()
    torch.testing.assert_close(moe.router.selection_bias, want_bias)
