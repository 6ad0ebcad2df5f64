"""Growing the model mid-training (``add_new_skill(force=True)``) keeps an optimizer built before it training every
expert, the new one included: the parameters stay the same objects and their optimizer state is zero-padded."""

import pytest
import torch
from moe_models import batch, tiny_llama

from dylora_moe import DyLoRA_MoE


def build(**kw):
    kw.setdefault("growth_rank", "same")
    return DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      kernel="eager", routing="token", **kw).train()  # fmt: skip


def step(model, optimizer):
    optimizer.zero_grad(set_to_none=True)
    model(*batch(rows=2, length=6)).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("growth_rank", ["same", 8])  # 8: the rank widens, so every stack is padded twice over
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
], ids=["adamw", "sgd-momentum"])  # fmt: skip
def test_an_optimizer_built_before_growth_trains_every_expert(make, growth_rank):
    model = build(growth_rank=growth_rank)
    optimizer = make(model.trainable_parameters())
    step(model, optimizer)  # the state (moments / momentum) now has the 2-expert shapes
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    old_moments = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.trainable_parameters()}
    assert model.add_new_skill(force=True)
    assert model.num_experts == 3
    assert {id(p) for p in model.trainable_parameters()} == held  # the same objects: the optimizer holds them
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step(model, optimizer)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every trainable parameter moved (0 of them before the fix)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            assert not torch.equal(p[2], before[name][2]), f"the new expert's {name} did not train"
    gate = model.router.gate.weight
    assert not torch.equal(gate[2], before["router.gate.weight"][2])
    for p in model.trainable_parameters():  # the old experts kept their moments (padded, not reset)
        for key, old in old_moments[id(p)].items():
            if old.dim():
                region = tuple(slice(0, s) for s in old.shape)
                assert optimizer.state[p][key].shape == p.shape
                assert not torch.equal(optimizer.state[p][key][region], torch.zeros_like(old))


def test_growth_before_any_step_and_a_frozen_gate():
    model = build(freeze_router=True)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model.add_new_skill(force=True)
    assert not model.router.gate.weight.requires_grad  # a frozen gate stays frozen and out of the optimizer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step(model, optimizer)
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_growing_the_expert_manager_or_the_router_directly_keeps_their_parameters():
    model = build()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    step(model, optimizer)
    held = [id(p) for p in model.trainable_parameters()]
    model.expert_manager.create_expert(r=6)  # the ExpertManager path (no router growth)
    model.router.add_expert()
    assert [id(p) for p in model.trainable_parameters()] == held
    step(model, optimizer)  # the padded state fits the new shapes
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in model.trainable_parameters())
