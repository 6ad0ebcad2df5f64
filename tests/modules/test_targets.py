"""Default LoRA targets: the original's list, peft's per-architecture map and fused projections (Phi-3 qkv_proj)."""

import torch
from moe_models import VOCAB, batch, randomize_experts, tiny_gpt2, tiny_llama
from transformers import Phi3Config, Phi3ForCausalLM, PhiConfig, PhiForCausalLM

from dylora_moe import DEFAULT_TARGETS, DyLoRA_MoE, default_targets, inject_moe_lora
from dylora_moe.modules.inject import ORIGINAL_TARGETS, peft_default_targets


def tiny_phi3():
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Phi3ForCausalLM(config).eval()


def tiny_phi():
    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return PhiForCausalLM(config).eval()


def short(names):
    return {n.rsplit(".", 1)[-1] for n in names}


def test_original_list_is_part_of_the_defaults():
    assert set(ORIGINAL_TARGETS) <= set(DEFAULT_TARGETS)
    assert short(default_targets(tiny_llama())) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert short(default_targets(tiny_gpt2())) == {"c_attn"}


def test_phi3_fused_qkv_proj_is_found():
    model = tiny_phi3()
    assert peft_default_targets(model) is None  # peft 0.21 has no phi3 entry: our fused list finds qkv_proj
    handle = inject_moe_lora(model, num_experts=2, r=4, alpha=8, kernel="eager")
    assert set(handle.layers) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("qkv_proj", "o_proj")}


def test_peft_map_adds_architecture_targets():
    model = tiny_phi()
    assert peft_default_targets(model) == ["q_proj", "v_proj", "fc1", "fc2"]
    assert short(default_targets(model)) == {"q_proj", "k_proj", "v_proj", "fc1", "fc2"}


def test_phi3_model_trains_every_expert():
    moe = DyLoRA_MoE(tiny_phi3(), num_experts=2, lora_r=4, lora_alpha=8, routing="token", top_k=2, kernel="eager")
    randomize_experts(moe.handle.layers.values())
    input_ids, mask, labels = batch()
    moe(input_ids, mask, labels).loss.backward()
    qkv = moe.handle.layers["model.layers.0.self_attn.qkv_proj"]
    assert all(qkv.lora_A.grad[e].abs().sum() > 0 for e in range(2))
