"""DynamicHybridRouter and the auxiliary losses against formulas written here."""

import pytest
import torch

from dylora_moe import DynamicHybridRouter
from dylora_moe.router import balance_loss, router_entropy, z_loss


def make_router(num_experts=4, top_k=2, mature=True, **kwargs):
    router = DynamicHybridRouter(8, num_experts, top_k=top_k, temperature=2.0, backend="eager", **kwargs)
    if mature:
        router.expert_maturity.fill_(1.0)
    return router


def test_dense_softmax_while_any_expert_is_immature():
    router = make_router(mature=False)
    router.set_expert_maturity(0, 1.0)  # one immature expert left is enough for dense routing
    x = torch.randn(2, 5, 8)
    weights = router(x)
    assert weights.shape == (2, 5, 4)
    torch.testing.assert_close(weights, torch.softmax(router.gate(x) / 2.0, dim=-1))


def test_original_sparse_weighting_is_softmax_over_selected_logits():
    router = make_router(weighting="original")
    x = torch.randn(6, 8)
    logits = router.gate(x)
    top, idx = logits.topk(2, dim=-1)
    expected = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=-1))  # no temperature
    torch.testing.assert_close(router(x), expected)


@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_weighting_takes_topk_of_tempered_probabilities(renormalize):
    router = make_router(weighting="softmax", renormalize=renormalize)
    x = torch.randn(6, 8)
    probs = torch.softmax(router.gate(x) / 2.0, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True) if renormalize else top
    torch.testing.assert_close(router(x), torch.zeros_like(probs).scatter(1, idx, top))


@pytest.mark.parametrize("weighting, trains", [("softmax", True), ("original", False)])
def test_gate_gradient_at_k1(weighting, trains):
    """k = 1: the original's selected weight is the constant 1 (no gradient); the tempered probability is not."""
    router = make_router(top_k=1, weighting=weighting)
    x = torch.randn(16, 8)
    (router(x) * torch.randn(16, 4)).sum().backward()
    grad = router.gate.weight.grad.abs().max()
    assert (grad > 1e-3) if trains else (grad == 0)


def test_add_expert_keeps_rows_and_starts_immature(tmp_path):
    router = make_router()
    old_w, old_b = router.gate.weight.detach().clone(), router.gate.bias.detach().clone()
    assert router.add_expert() == 4
    assert router.gate.weight.shape == (5, 8) and router.num_experts == 5
    assert torch.equal(router.gate.weight[:4], old_w) and torch.equal(router.gate.bias[:4], old_b)
    assert router.expert_maturity.tolist() == [1, 1, 1, 1, 0] and not router.all_mature
    router.save(tmp_path / "r.safetensors")
    loaded = DynamicHybridRouter.load(tmp_path / "r.safetensors")
    assert loaded.config() == router.config()
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), router(x), rtol=0, atol=0)


def test_losses_match_formulas():
    router = make_router(num_experts=4, top_k=2, weighting="softmax", renormalize=True)
    x = torch.randn(10, 8)
    route = router.route(x)
    probs = torch.softmax(route.logits / 2.0, dim=-1)
    dense = route.dense
    mse = ((dense.mean(0) - 0.25) ** 2).mean()
    torch.testing.assert_close(balance_loss(route, "mse"), mse)
    f = torch.stack([(route.ids == e).sum() for e in range(4)]).float() / 20  # 10 tokens x 2 slots
    torch.testing.assert_close(balance_loss(route, "switch"), 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(z_loss(route.logits), (torch.logsumexp(route.logits, -1) ** 2).mean())
    entropy = -(dense * dense.clamp_min(1e-12).log()).sum(-1).mean()
    torch.testing.assert_close(router_entropy(route), entropy)
    with pytest.raises(ValueError, match="unknown balance loss"):
        balance_loss(route, "l2")


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        DynamicHybridRouter(8, 4, top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        DynamicHybridRouter(8, 4, top_k=0)
    with pytest.raises(ValueError, match="num_experts"):
        DynamicHybridRouter(8, 0)
    with pytest.raises(ValueError, match="weighting"):
        DynamicHybridRouter(8, 2, weighting="gumbel")
    with pytest.raises(ValueError, match="temperature"):
        DynamicHybridRouter(8, 2, temperature=0.0)
    with pytest.raises(IndexError):
        DynamicHybridRouter(8, 2).set_expert_maturity(2, 1.0)
    router = make_router()
    # A device-side assert (no host sync on a GPU); on the CPU it raises a RuntimeError at once.
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        router(torch.full((2, 8), float("nan")))
    x = torch.randn(2, 3, 8)
    x[1, 2] = float("nan")  # a NaN on a masked-out (padding) position is not routed and raises nothing
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    route = router.route(x, mask=mask)
    assert torch.isfinite(route.dense).all() and route.dense[5].abs().sum() == 0
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        router.route(x, mask=torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("mature", [True, False])
@pytest.mark.parametrize("weighting, renormalize", [("softmax", False), ("softmax", True), ("original", True)])
def test_masked_route_equals_routing_only_the_real_tokens(weighting, renormalize, mature):
    """route(x, mask) keeps shapes static (padding rows: weight 0) and gives the statistics and losses of routing
    x[mask] alone: what the model relies on to route padded batches without a host sync."""
    router = make_router(num_experts=4, top_k=2, mature=mature, weighting=weighting, renormalize=renormalize)
    x = torch.randn(3, 5, 8)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    mask[2, 4] = False
    full, real = router.route(x, mask=mask), router.route(x[mask])
    keep = mask.reshape(-1)
    assert full.dense.shape == (15, 4) and full.dense[~keep].abs().sum() == 0 and full.weights[~keep].abs().sum() == 0
    torch.testing.assert_close(full.dense[keep], real.dense)
    torch.testing.assert_close(full.weights[keep], real.weights)
    assert torch.equal(full.ids[keep], real.ids) and torch.equal(full.counts, real.counts)
    torch.testing.assert_close(full.mean_prob, real.mean_prob)
    for form in ("mse", "switch"):
        torch.testing.assert_close(balance_loss(full, form), balance_loss(real, form))
    torch.testing.assert_close(z_loss(full.logits, full.mask), z_loss(real.logits))
    torch.testing.assert_close(router_entropy(full), router_entropy(real))


def test_all_padding_route_gives_zero_weights_and_losses():
    router = make_router(num_experts=4, top_k=2)
    route = router.route(torch.randn(2, 3, 8), mask=torch.zeros(2, 3, dtype=torch.bool))
    assert route.dense.abs().sum() == 0 and route.counts.sum() == 0 and route.mean_prob.abs().sum() == 0
    for value in (balance_loss(route, "mse"), balance_loss(route, "switch"), z_loss(route.logits, route.mask)):
        assert value.item() == 0.0
    assert router_entropy(route).item() == 0.0


def test_maturity_flag_follows_every_way_the_buffer_changes():
    """all_mature is a host-side flag (no host sync per step) that still sees fill_, load_state_dict and growth."""
    router = make_router(mature=False)
    assert not router.all_mature
    router.expert_maturity.fill_(1.0)  # direct buffer edit: the version counter moved, the flag follows
    assert router.all_mature
    router.set_expert_maturity(2, 0.0)
    assert not router.all_mature
    state = make_router(mature=True).state_dict()
    router.load_state_dict(state)
    assert router.all_mature
    router.add_expert()
    assert not router.all_mature and router._all_mature is False  # refreshed at once, for torch.compile
    router.set_expert_maturity(4, 1.0)
    assert router._all_mature is True
