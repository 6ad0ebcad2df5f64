"""Load balancing: the loss-free selection bias and the global-batch losses against formulas written here."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE, DynamicHybridRouter
from dylora_moe.router import balance_loss

TAU = 2.0


def make_router(num_experts=4, top_k=2, backend="eager", **kwargs):
    router = DynamicHybridRouter(8, num_experts, top_k=top_k, temperature=TAU, backend=backend, **kwargs)
    router.expert_maturity.fill_(1.0)
    router.use_selection_bias = True
    return router.train()


def expected_route(logits, bias, k, weighting="softmax", renormalize=False):
    """The plain formula: experts = top-k of logits / tau + bias; weights of the UNBIASED logits."""
    ids = (logits / TAU + bias).topk(k, dim=-1).indices
    if weighting == "original":
        weights = torch.softmax(logits.gather(1, ids), dim=-1)
    else:
        weights = torch.softmax(logits / TAU, dim=-1).gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) if renormalize else weights
    return ids, torch.zeros_like(logits).scatter(1, ids, weights)


@pytest.mark.parametrize("backend", ["eager", "triton"])
@pytest.mark.parametrize(
    "weighting, renormalize, k",
    [("softmax", False, 2), ("softmax", True, 2), ("original", False, 1), ("softmax", False, 1)],
)
def test_bias_changes_the_selection_not_the_weights(backend, weighting, renormalize, k):
    router = make_router(top_k=k, backend=backend, weighting=weighting, renormalize=renormalize)
    router.selection_bias.copy_(torch.tensor([1.5, -0.5, 0.0, 0.7]))
    x = torch.randn(13, 8)
    logits = router.gate(x).detach()
    route = router.route(x)
    ids, dense = expected_route(logits, router.selection_bias, k, weighting, renormalize)
    assert torch.equal(route.ids.sort(-1).values, ids.sort(-1).values)
    torch.testing.assert_close(route.dense, dense)
    tau = 1.0 if weighting == "original" else TAU  # the op's temperature (the original's selection has none)
    torch.testing.assert_close(route.mean_prob, torch.softmax(logits / tau, -1).mean(0))
    torch.testing.assert_close(route.counts.float(), torch.bincount(ids.reshape(-1), minlength=4).float())
    # control: the bias did change the choice (else this test could not tell the formulas apart)
    assert not torch.equal(ids.sort(-1).values, logits.topk(k, dim=-1).indices.sort(-1).values)


def test_bias_gradient_reaches_the_gate_through_the_unbiased_weights():
    router = make_router(top_k=1)
    router.selection_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0]))  # expert 0 picked for every token
    x = torch.randn(9, 8)
    upstream = torch.randn(9, 4)
    (router.route(x).dense * upstream).sum().backward()
    got = router.gate.weight.grad.clone()
    router.gate.weight.grad = None
    probs = torch.softmax(router.gate(x) / TAU, dim=-1)
    (probs[:, :1] * upstream[:, :1]).sum().backward()  # the formula: weight = unbiased p_0
    torch.testing.assert_close(got, router.gate.weight.grad)


def test_masked_tokens_are_left_out_of_the_window_and_the_counts():
    router = make_router(top_k=1)
    router.track_load = True
    router.selection_bias.copy_(torch.tensor([0.0, 0.0, 9.0, 0.0]))
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    route = router.route(x, mask=mask)
    assert route.counts.tolist() == [0, 0, 8, 0]
    window = router.load_window
    assert window[:4].tolist() == [0, 0, 8, 0] and window[-1] == 8
    torch.testing.assert_close(window[4:8], route.dense.sum(0))


def test_bias_update_is_sign_of_the_load_gap_over_the_accumulation_window():
    """Two micro-batches, then one step: b += u * sign(mean load - load), loads summed over both; a new window."""
    router = make_router(top_k=1)
    router.track_load, router.update_rate = True, 0.01
    loads = torch.zeros(4)
    for _ in range(2):
        loads += router.route(torch.randn(10, 8)).counts.float()
    assert torch.equal(router.load_window[:4], loads)
    before = router.selection_bias.clone()
    router.balance_step()
    torch.testing.assert_close(router.selection_bias, before + 0.01 * torch.sign(loads.mean() - loads))
    assert router.load_window.abs().sum() == 0
    router.balance_step()  # an empty window (no training forward) leaves the bias alone
    torch.testing.assert_close(router.selection_bias, before + 0.01 * torch.sign(loads.mean() - loads))


def test_eval_forwards_count_no_load():
    router = make_router()
    router.track_load = True
    router.eval().route(torch.randn(6, 8))
    assert router.load_window is None or router.load_window.abs().sum() == 0


def test_a_skewed_router_is_pulled_back_to_balance():
    """The gate strongly prefers expert 0; loss-free steps bring the load to balance (and without the bias, the same
    loop stays skewed: the control)."""

    def loads_after(use_bias, steps=150):
        torch.manual_seed(0)
        router = make_router(top_k=1)
        router.use_selection_bias, router.track_load, router.update_rate = use_bias, True, 0.02
        with torch.no_grad():
            router.gate.bias.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
        for _ in range(steps):
            router.route(torch.randn(64, 8))
            router.balance_step()
        counts = sum(router.route(torch.randn(64, 8)).counts.float() for _ in range(8))
        return counts / counts.sum()

    skewed, balanced = loads_after(False), loads_after(True)
    assert skewed.max() * 4 > 3.0
    assert balanced.max() * 4 < 1.3, balanced


def test_new_expert_gets_a_zero_bias_and_a_new_window():
    router = make_router()
    router.track_load = True
    router.selection_bias.fill_(0.3)
    router.route(torch.randn(4, 8))
    router.add_expert()
    assert router.selection_bias.tolist() == pytest.approx([0.3] * 4 + [0.0])
    router.expert_maturity.fill_(1.0)
    router.route(torch.randn(4, 8))
    assert router.load_window.shape == (11,)


def test_bias_is_saved_and_old_router_files_load_with_a_zero_bias(tmp_path):
    router = make_router()
    router.selection_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    router.save(tmp_path / "r.safetensors")
    assert torch.equal(DynamicHybridRouter.load(tmp_path / "r.safetensors").selection_bias, router.selection_bias)
    state = router.state_dict()
    del state["selection_bias"]  # a router saved before loss-free balancing
    fresh = DynamicHybridRouter(8, 4)
    fresh.selection_bias.fill_(5.0)
    fresh.load_state_dict(state)
    assert fresh.selection_bias.abs().sum() == 0


# ----- global-batch losses ----------------------------------------------------------------------------------------


def _two_routes(track=True):
    router = make_router(top_k=1, num_experts=3)
    router.use_selection_bias, router.track_load = False, track
    x1, x2 = torch.randn(7, 8), torch.randn(5, 8)
    first = router.route(x1)
    second = router.route(x2)
    return router, first, second, x2


def test_global_switch_loss_uses_the_window_fractions_and_local_probabilities():
    router, first, second, _ = _two_routes()
    window = router.global_window()
    f = (first.counts + second.counts).float() / 12
    torch.testing.assert_close(balance_loss(second, "switch", window), 3 * (f * second.mean_prob).sum())


def test_global_mse_loss_value_is_over_the_window_and_gradient_over_this_micro_batch():
    router, first, second, x2 = _two_routes()
    window = router.global_window()
    loss = balance_loss(second, "mse", window)
    mean_weight = (first.dense.sum(0).detach() + second.dense.sum(0)) / 12
    want = ((mean_weight - 1 / 3) ** 2).mean()
    torch.testing.assert_close(loss, want)
    g_got = torch.autograd.grad(loss, router.gate.weight, retain_graph=True)[0]
    g_want = torch.autograd.grad(want, router.gate.weight)[0]
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("form", ["mse", "switch"])
def test_one_micro_batch_global_equals_local(form):
    """Without accumulation or ranks, the global window is the micro-batch itself: the same loss and gradient."""
    router = make_router(top_k=2, num_experts=4)
    router.use_selection_bias, router.track_load = False, True
    route = router.route(torch.randn(2, 6, 8), mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]))
    local, glob = balance_loss(route, form), balance_loss(route, form, router.global_window())
    torch.testing.assert_close(glob, local)
    g_local = torch.autograd.grad(local, router.gate.weight, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(glob, router.gate.weight)[0], g_local)


def test_loss_free_and_none_have_no_balance_loss():
    route = make_router().route(torch.randn(4, 8))
    assert balance_loss(route, "loss_free") is None and balance_loss(route, "none") is None


# ----- the model: routings, backends, accumulation ----------------------------------------------------------------


def build(routing="token", kernel="eager", **kw):
    moe = DyLoRA_MoE(
        tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, lora_dropout=0.0, kernel=kernel,
        routing=routing, top_k=1, balance_loss="loss_free", balance_update_rate=0.01, **kw,
    ).train()  # fmt: skip
    randomize_experts(moe.handle.layers.values())
    return moe


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_every_backend_routes_and_steps_alike(routing):
    """eager, triton and reference: the same biased choice, the same loss, the same bias after a step."""
    inputs = batch(rows=3, length=6)
    results = {}
    for kernel in ("eager", "triton", "reference"):
        moe = build(routing, kernel)
        moe.router.selection_bias.copy_(torch.tensor([0.0, 0.4, -0.4]))
        out = moe(*inputs)
        moe.balance_step()
        results[kernel] = (out.loss.detach(), out.expert_token_fraction, moe.router.selection_bias.clone())
    for kernel in ("triton", "reference"):
        for got, want in zip(results[kernel], results["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert out.balance_loss is None and moe.moe_config.balance_loss == "loss_free"


def test_gradient_accumulation_counts_every_micro_batch_once_per_step():
    moe = build()
    loads = torch.zeros(3)
    for seed in (1, 2, 3):
        ids, mask, labels = batch(rows=2, length=5, seed=seed)
        out = moe(ids, mask, labels)
        out.loss.backward()
        loads += out.expert_token_fraction * mask.sum()
    torch.testing.assert_close(moe.router.load_window[:3], loads)
    moe.balance_step()
    torch.testing.assert_close(moe.router.selection_bias, 0.01 * torch.sign(loads.mean() - loads))


def test_checkpoint_keeps_the_bias(tmp_path):
    moe = build()
    moe.router.selection_bias.copy_(torch.tensor([0.25, -0.5, 0.125]))
    moe.save_pretrained(tmp_path / "ckpt")
    back = DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt")
    assert torch.equal(back.router.selection_bias, moe.router.selection_bias)
    assert back.moe_config.balance_loss == "loss_free" and back.moe_config.balance_update_rate == 0.01


def test_a_checkpoint_saved_before_loss_free_balancing_loads_with_a_zero_bias(tmp_path):
    """A router file without selection_bias (as written before it existed, its checksum recorded): it loads, b = 0;
    a router file with another unexpected tensor is still refused."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dylora_moe.io.checkpoint import CONFIG_NAME, ROUTER_NAME, CheckpointError, load_checkpoint

    moe = build()
    moe.save_pretrained(tmp_path / "ckpt")
    router_file, config_file = tmp_path / "ckpt" / ROUTER_NAME, tmp_path / "ckpt" / CONFIG_NAME

    def rewrite(tensors):
        with safe_open(str(router_file), framework="pt") as f:
            metadata = f.metadata()
        save_file(tensors, str(router_file), metadata=metadata)
        data = router_file.read_bytes()
        config = json.loads(config_file.read_text())
        config["checkpoint"]["files"][ROUTER_NAME] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        config_file.write_text(json.dumps(config))

    tensors = load_file(str(router_file))
    rewrite({k: v for k, v in tensors.items() if k != "selection_bias"})
    target = build()
    target.router.selection_bias.fill_(0.5)
    load_checkpoint(target, tmp_path / "ckpt")
    assert target.router.selection_bias.abs().sum() == 0
    assert torch.equal(target.router.gate.weight, moe.router.gate.weight)
    rewrite({**tensors, "extra": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_checkpoint(target, tmp_path / "ckpt")


# ----- DDP: loads summed over ranks ----------------------------------------------------------------------------


def _ddp_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        router = make_router(top_k=1)
        router.track_load, router.update_rate = True, 0.5
        with torch.no_grad():  # logits = 10 * x[:, :4]: a one-hot token picks its expert
            router.gate.weight.copy_(10 * torch.eye(4, 8))
            router.gate.bias.zero_()
        x = torch.zeros(9 + 2 * rank, 8)
        x[:, rank] = 1.0  # rank 0: 9 tokens to expert 0; rank 1: 11 tokens to expert 1
        router.route(x)
        router.balance_step()
        torch.save(router.selection_bias, os.path.join(folder, f"bias{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_bias_uses_the_loads_summed_over_ranks(tmp_path):
    """Loads [9, 11, 0, 0] summed over two ranks: every rank gets b = 0.5 * sign(5 - load) = [-, -, +, +]
    (rank 0's own load [9, 0, 0, 0] would give [-, +, +, +])."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"bias{rank}.pt").tolist() == [-0.5, -0.5, 0.5, 0.5]


def test_a_frozen_router_keeps_its_selection_bias():
    """freeze_router freezes the routing: the loss-free bias stays where it is (the load window still restarts)."""
    moe = build(freeze_router=True)
    bias = torch.tensor([0.0, 0.4, -0.4])
    moe.router.selection_bias.copy_(bias)
    for seed in (1, 2):
        moe(*batch(rows=3, length=6, seed=seed))
        moe.balance_step()
        torch.testing.assert_close(moe.router.selection_bias, bias)
        assert not moe.router.load_window.any()
