"""The router freeze switch and the gradient-coverage check (issue 12, items 2 and 3).

A 1-layer tiny Llama with 3 experts on the eager backend; an expert is "frozen on purpose" by a gradient hook that
zeroes its rows of one layer's LoRA gradients, which is exactly what a detached routing weight or a name-filtered
freeze looks like to the optimizer.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dylora_moe.model import DyLoRA_MoE
from dylora_moe.train.gradient_coverage import GradientCoverage, GradientCoverageError, find_gradient_gaps


def _model(num_experts=3, **kwargs) -> DyLoRA_MoE:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    kwargs = {"routing": "token", "top_k": 1, **kwargs}
    return DyLoRA_MoE(LlamaForCausalLM(config), num_experts, 4, 8, 0.0, kernel="eager", **kwargs)


def _batch(rows=4, seq=12):
    ids = torch.randint(0, 64, (rows, seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _freeze_expert(model, expert: int, layer_name: str) -> None:
    """Zero ``expert``'s gradient rows in one layer: that expert learns nowhere in it."""
    layer = model.handle.layers[layer_name]
    for param in (layer.lora_A, layer.lora_B):
        param.register_hook(lambda grad: grad.index_fill(0, torch.tensor([expert]), 0.0))


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**_batch()).loss.backward()
        opt.step()
        opt.zero_grad()


# ----- freeze_router -----------------------------------------------------------------------------------------------


def test_freeze_router_keeps_the_gate_and_trains_the_experts():
    model = _model(freeze_router=True)
    gate = {k: v.clone() for k, v in model.router.gate.state_dict().items()}
    b_before = [layer.lora_B.detach().clone() for layer in model.handle.layers.values()]
    assert not any(p is model.router.gate.weight for p in model.trainable_parameters())
    _train_steps(model)
    for key, value in model.router.gate.state_dict().items():
        assert torch.equal(value, gate[key]), key
    assert model.router.gate.weight.grad is None
    for before, layer in zip(b_before, model.handle.layers.values()):
        assert not torch.equal(before, layer.lora_B.detach())  # the experts moved


def test_unfrozen_gate_trains_and_growth_keeps_a_frozen_gate_frozen():
    model = _model()
    gate = model.router.gate.weight.detach().clone()
    _train_steps(model, steps=2)
    assert not torch.equal(gate, model.router.gate.weight.detach())  # control: the same loop moves a trainable gate

    frozen = _model(freeze_router=True)
    frozen.add_new_skill(force=True)
    assert frozen.num_experts == 4 and not frozen.router.gate.weight.requires_grad


def test_parameter_breakdown_says_the_router_is_frozen():
    from test_train import train

    text = train.parameter_breakdown(_model(freeze_router=True))
    assert "router:            0 trainable (99 frozen: --freeze_router)" in text  # 3 x 32 weights + 3 biases
    assert "(base model + router)" in text
    assert "frozen" not in train.parameter_breakdown(_model()).splitlines()[1]


# ----- gradient coverage ---------------------------------------------------------------------------------------------


def _backward(model):
    model.train()
    out = model(**_batch())
    out.loss.backward()
    return out


def test_no_gap_when_everything_trains():
    model = _model()
    out = _backward(model)
    received = out.expert_token_fraction > 0
    assert received.all()  # 48 tokens over 3 experts at init: each gets some (seeded)
    assert find_gradient_gaps(model, received) == []


def test_a_frozen_expert_is_named_with_its_layer():
    model = _model()
    layer = "model.layers.0.self_attn.v_proj"
    _freeze_expert(model, 1, layer)
    out = _backward(model)
    gaps = find_gradient_gaps(model, out.expert_token_fraction > 0)
    assert gaps == [f"expert 1 received tokens but has a zero gradient in 1 of 4 adapted layers: {layer}"]
    # an expert that received no tokens is not expected to have a gradient
    assert find_gradient_gaps(model, torch.tensor([True, False, True])) == []


def test_gate_without_gradient_is_named():
    # The original's weighting at k = 1: the weight is the constant softmax over one logit, so no gradient reaches
    # the gate through the LM loss, and the MSE balance loss over those constant weights gives none either.
    model = _model(router_weighting="original", balance_loss="mse")
    out = _backward(model)
    gaps = find_gradient_gaps(model, out.expert_token_fraction > 0)
    assert len(gaps) == 1 and gaps[0].startswith("the gate (router.gate) is trainable but has a zero gradient")
    frozen = _model(router_weighting="original", balance_loss="mse", freeze_router=True)
    out = _backward(frozen)
    assert find_gradient_gaps(frozen, out.expert_token_fraction > 0) == []  # a frozen gate is not a gap


def test_sequence_routing_counts_the_experts_with_weight():
    model = _model(routing="sequence", sequence_top_k=1)
    _freeze_expert(model, 0, "model.layers.0.self_attn.q_proj")
    out = _backward(model)
    picked = (out.sequence_weights > 0).any(0)
    gaps = find_gradient_gaps(model, picked)
    assert ("expert 0" in " ".join(gaps)) == bool(picked[0])
    assert all("expert 0" in gap for gap in gaps)


def _drive_callback(callback, model, micro_batches=2):
    """What the Trainer does around one optimizer step: train begin, forwards + backwards, the step events."""
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, state, None, model=model)
    model.train()
    for _ in range(micro_batches):
        model(**_batch()).loss.backward()
    callback.on_pre_optimizer_step(None, state, None, model=model)
    callback.on_optimizer_step(None, state, None, model=model)


def test_callback_warns_naming_the_expert_and_layer(caplog):
    model = _model()
    _freeze_expert(model, 2, "model.layers.0.self_attn.o_proj")
    callback = GradientCoverage()
    with caplog.at_level(logging.WARNING, logger="dylora_moe.train.gradient_coverage"):
        _drive_callback(callback, model)
    assert len(callback.gaps) == 1
    assert "optimizer step 1: expert 2 received tokens in 2 micro-batches but has" in caplog.text
    assert "zero gradient in 1 of 4 adapted layers: model.layers.0.self_attn.o_proj" in caplog.text
    assert callback._hook is None  # checked once, then the hook is gone
    _drive_callback(callback, model)  # the next steps are not checked
    assert callback.checked == 1


def test_callback_strict_raises():
    model = _model()
    _freeze_expert(model, 0, "model.layers.0.self_attn.k_proj")
    with pytest.raises(GradientCoverageError, match=r"optimizer step 1: expert 0 received tokens .*k_proj"):
        _drive_callback(GradientCoverage(strict=True), model)


@pytest.mark.slow
def test_strict_gradients_stops_train_py(tmp_path, monkeypatch):
    """The wiring in train.py: a frozen expert stops the Trainer at its first optimizer step."""
    from test_train import TINY, train

    stock = GradientCoverage.on_train_begin

    def begin_with_a_frozen_expert(self, args, state, control, model=None, **kwargs):
        _freeze_expert(model, 1, "model.layers.0.self_attn.q_proj")
        return stock(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(GradientCoverage, "on_train_begin", begin_with_a_frozen_expert)
    torch.set_num_threads(1)
    argv = [*TINY, "--kernel", "eager", "--max_steps", "2", "--freeze_router", "--strict_gradients"]
    with pytest.raises(GradientCoverageError, match=r"expert 1 received tokens .*layers.0.self_attn.q_proj"):
        train.main([*argv, "--output_dir", str(tmp_path)])


def test_loss_free_gate_at_initialisation_is_not_a_gap():
    """Loss-free balancing has no auxiliary loss, and at initialisation every B = 0, so no gradient can reach the
    gate in the first step: not a gap. Once some B is non-zero, a missing gate gradient is one again."""
    model = _model(balance_loss="loss_free")
    out = _backward(model)
    assert model.router.gate.weight.grad.abs().max() == 0  # control: the gradient is really zero
    assert find_gradient_gaps(model, out.expert_token_fraction > 0) == []
    original = _model(balance_loss="loss_free", router_weighting="original")  # k = 1: the gate never learns
    with torch.no_grad():
        next(iter(original.handle.layers.values())).lora_B.normal_()
    out = _backward(original)
    assert any(g.startswith("the gate") for g in find_gradient_gaps(original, out.expert_token_fraction > 0))
