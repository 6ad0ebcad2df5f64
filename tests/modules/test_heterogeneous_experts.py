"""Experts of different rank and alpha on stacked weights: zero-padding to the largest rank with a per-expert
scaling is exact. Logits and gradients equal a stock peft model whose adapters have those ranks."""

import warnings

import pytest
import torch
from moe_models import batch, tiny_llama

from dylora_moe import DyLoRA_MoE, ExpertManager, load_lora_experts, save_lora_experts
from tolerances import assert_close

RANKS, ALPHAS = [2, 6, 4], [4.0, 3.0, 16.0]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@torch.no_grad()
def randomize_valid_b(manager, seed=3):
    """Random B in each expert's own r columns; the padded columns stay zero."""
    gen = torch.Generator().manual_seed(seed)
    for layer in manager.handle.layers.values():
        for e in range(manager.num_experts):
            r = manager.expert_rank(e)
            layer.lora_B[e, :, :r].copy_(torch.randn(layer.lora_B.shape[1], r, generator=gen) * 0.5)


def peft_twin(manager):
    """A peft model on the same base whose adapter expert_i has rank RANKS[i], alpha ALPHAS[i] and our weights."""
    from peft import LoraConfig, get_peft_model

    configs = [LoraConfig(r=r, lora_alpha=a, lora_dropout=0.0, target_modules=TARGETS) for r, a in zip(RANKS, ALPHAS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(tiny_llama(layers=1), configs[0], adapter_name="expert_0")
    for i in range(1, len(RANKS)):
        model.add_adapter(f"expert_{i}", configs[i])
    params = dict(model.named_parameters())
    with torch.no_grad():
        for i in range(len(RANKS)):
            for name, weight in manager.get_expert_weights(i).items():  # our keys ARE peft's parameter names
                params[name].copy_(weight)
    return model.eval(), params


def test_padded_ranks_equal_peft_logits_and_gradients():
    model = tiny_llama(layers=1)
    manager = ExpertManager(model, lora_r=RANKS[0], lora_alpha=ALPHAS[0], lora_dropout=0.0, kernel="eager")
    for r, a in zip(RANKS, ALPHAS):
        manager.create_expert(r=r, lora_alpha=a)
    layer = manager.handle.layers["model.layers.0.self_attn.q_proj"]
    assert layer.expert_ranks == RANKS and layer.lora_A.shape[1] == max(RANKS)
    assert_close(layer.expert_scaling, torch.tensor(ALPHAS) / torch.tensor(RANKS, dtype=torch.float32), torch.float32)
    assert [c.r for c in manager.expert_configs.values()] == RANKS
    randomize_valid_b(manager)
    peft_model, peft_params = peft_twin(manager)
    input_ids = batch()[0]
    probe = torch.randn(*input_ids.shape, 100, generator=torch.Generator().manual_seed(7))
    for i, r in enumerate(RANKS):
        for p in list(model.parameters()) + list(peft_model.parameters()):
            p.grad = None
        manager.set_active_expert(i)
        ours = model(input_ids).logits
        (ours * probe).sum().backward()
        peft_model.set_adapter(f"expert_{i}")
        theirs = peft_model(input_ids).logits
        (theirs * probe).sum().backward()
        assert_close(ours, theirs, torch.float32, msg=f"logits of expert {i}")
        for name, layer in manager.handle.layers.items():
            key = f"base_model.model.{name}.lora_{{}}.expert_{i}.weight"
            assert_close(layer.lora_A.grad[i, :r], peft_params[key.format("A")].grad, torch.float32, msg=name)
            assert_close(layer.lora_B.grad[i, :, :r], peft_params[key.format("B")].grad, torch.float32, msg=name)
            assert not layer.lora_A.grad[i, r:].any() and not layer.lora_B.grad[i, :, r:].any()  # padding stays 0


def test_growth_with_the_original_rank_rule_and_expert_files(tmp_path):
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, growth_rank="original",
                     lora_dropout=0.0, kernel="eager").eval()  # fmt: skip
    randomize_valid_b(moe.expert_manager)
    input_ids, mask, _ = batch()
    with torch.no_grad():
        moe.expert_manager.set_active_expert(1)
        before = moe.foundation_model(input_ids).logits
        assert moe.add_new_skill(force=True)  # rank min(2 * 4, 32) = 8: the stacks are padded from 4 to 8
        moe.expert_manager.set_active_expert(1)
        assert_close(moe.foundation_model(input_ids).logits, before, torch.float32)
    assert moe.moe_config.expert_ranks == [4, 4, 8] and moe.expert_manager.expert_configs[2].r == 8
    with pytest.raises(ValueError, match="their own ranks"):
        moe.set_kernel("reference")  # one peft LoraConfig for all experts cannot hold them
    randomize_valid_b(moe.expert_manager, seed=4)
    save_lora_experts(moe, tmp_path)
    other = DyLoRA_MoE(tiny_llama(layers=1), config=moe.moe_config)
    load_lora_experts(other, tmp_path)
    moe.router.expert_maturity.fill_(1.0)
    other.router.load_state_dict(moe.router.state_dict())
    with torch.no_grad():
        assert torch.equal(other.eval()(input_ids, mask).logits, moe(input_ids, mask).logits)


def test_checkpoint_of_heterogeneous_experts_round_trips(tmp_path):
    moe = DyLoRA_MoE(tiny_llama(layers=1), config=None, num_experts=3, lora_r=4, lora_alpha=8, expert_ranks=[4, 2, 8],
                     expert_alphas=[8, 2, 32], kernel="eager").eval()  # fmt: skip
    randomize_valid_b(moe.expert_manager)
    moe.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt").eval()
    assert loaded.moe_config.expert_ranks == [4, 2, 8]
    input_ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, mask).logits, moe(input_ids, mask).logits)
