"""Behaviour chosen by a name comes from one registry entry: router weightings and balance forms
(dylora_moe.config), the math of each balance loss (dylora_moe.modules.router); training domains are tested in
tests/test_corpora.py."""

import pytest
import torch

from dylora_moe import DynamicHybridRouter, config
from dylora_moe.config import BALANCE_FORMS, WEIGHTING_FORMS, BalanceForm, Weighting
from dylora_moe.modules import router as router_module
from dylora_moe.modules.router import BALANCE_LOSS_MATH, balance_loss


def test_the_names_are_the_registries_keys():
    assert config.WEIGHTINGS == tuple(WEIGHTING_FORMS) == ("original", "softmax")
    assert config.BALANCE_LOSSES == tuple(BALANCE_FORMS) == ("mse", "switch", "loss_free", "none")
    assert config.CHOICES["router_weighting"] == config.WEIGHTINGS
    assert config.CHOICES["balance_loss"] == config.BALANCE_LOSSES


def test_every_balance_form_with_a_loss_has_its_math():
    assert {name for name, form in BALANCE_FORMS.items() if form.loss} == set(BALANCE_LOSS_MATH)


def _route(weighting="softmax"):
    router = DynamicHybridRouter(6, 4, top_k=2, weighting=weighting)
    router.expert_maturity.fill_(1)
    router.refresh_maturity()
    return router, router.route(torch.randn(5, 6))


def test_a_new_weighting_is_one_entry(monkeypatch):
    """A weighting registered under a new name behaves as its entry says (here: the original's rule)."""
    monkeypatch.setitem(WEIGHTING_FORMS, "selected", Weighting(tempered=False))
    monkeypatch.setattr(router_module, "WEIGHTINGS", (*config.WEIGHTINGS, "selected"))
    torch.manual_seed(0)
    _, original = _route("original")
    torch.manual_seed(0)
    _, selected = _route("selected")
    assert torch.equal(original.weights, selected.weights)


def test_a_new_balance_form_is_one_entry_plus_its_math(monkeypatch):
    monkeypatch.setitem(BALANCE_FORMS, "double_mse", BalanceForm(loss=True))
    mse_local, mse_global = BALANCE_LOSS_MATH["mse"]
    monkeypatch.setitem(
        BALANCE_LOSS_MATH, "double_mse", (lambda r, e: 2 * mse_local(r, e), lambda r, w, e: 2 * mse_global(r, w, e))
    )
    _, route = _route()
    assert torch.equal(balance_loss(route, "double_mse"), 2 * balance_loss(route, "mse"))
    assert balance_loss(route, "loss_free") is None and balance_loss(route, "none") is None
    with pytest.raises(ValueError, match="unknown balance loss"):
        balance_loss(route, "entropy")
