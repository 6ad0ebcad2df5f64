"""inject_moe_lora: target discovery, freezing, the handle (routing, disabling, growth) on tiny Llama and GPT-2."""

import pytest
import torch
from moe_models import VOCAB, tiny_gpt2, tiny_llama
from transformers.pytorch_utils import Conv1D

from dylora_moe import MoELoRALinear, inject_moe_lora
from tolerances import assert_close


def test_default_targets_and_freezing_on_llama():
    model = tiny_llama()
    handle = inject_moe_lora(model, num_experts=2, r=4, alpha=8, kernel="eager")
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert set(handle.layers) == expected
    assert all(isinstance(model.get_submodule(name), MoELoRALinear) for name in expected)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.lora_{ab}" for name in expected for ab in "AB"}
    assert handle.num_experts == 2 and len(list(handle.lora_parameters())) == 2 * len(expected)


def test_gpt2_conv1d_targets():
    model = tiny_gpt2()
    handle = inject_moe_lora(model, num_experts=1, r=4, alpha=8, kernel="eager")
    assert set(handle.layers) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    layer = handle.layers["transformer.h.0.attn.c_attn"]
    assert isinstance(layer.base_layer, Conv1D) and (layer.d_in, layer.d_out) == (32, 96)


def test_explicit_targets_and_not_found_error_lists_found_names():
    model = tiny_llama()
    handle = inject_moe_lora(
        model, num_experts=1, r=2, alpha=2, target_modules=["up_proj", "model.layers.0.mlp.down_proj"]
    )
    assert set(handle.layers) == {
        "model.layers.0.mlp.up_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    }
    with pytest.raises(ValueError, match=r"no target module among \['nope'\].*'gate_proj'.*'q_proj'"):
        inject_moe_lora(tiny_llama(), num_experts=1, r=2, alpha=2, target_modules=["nope"])
    with pytest.raises(ValueError, match="already has MoE-LoRA layers"):
        inject_moe_lora(model, num_experts=1, r=2, alpha=2)
    with pytest.raises(ValueError, match="unknown kernel"):
        inject_moe_lora(tiny_llama(), num_experts=1, r=2, alpha=2, kernel="fast")


def test_handle_routing_disable_and_growth():
    base = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        base_logits = base(ids).logits
    model = tiny_llama()
    handle = inject_moe_lora(model, num_experts=2, r=4, alpha=8, kernel="eager")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits)  # B = 0: the injected model is the base model
        for layer in handle.layers.values():
            layer.lora_B.normal_()
        handle.set_active_expert(1)
        expert1 = model(ids).logits
        handle.set_routing(torch.ones(2, 1, 1, dtype=torch.long), torch.ones(2, 1, 1))
        assert torch.equal(model(ids).logits, expert1)  # per-row routing to expert 1 == active expert 1
        handle.set_routing(torch.zeros(2, 6, 1, dtype=torch.long), torch.zeros(2, 6, 1))
        assert_close(model(ids).logits, base_logits, torch.float32)  # weight 0 on every token
        with handle.adapters_disabled():
            assert torch.equal(model(ids).logits, base_logits)
        assert handle.add_expert() == 2 and all(layer.num_experts == 3 for layer in handle.layers.values())
        handle.set_active_expert(1)
        assert_close(model(ids).logits, expert1, torch.float32)
    with pytest.raises(IndexError, match="out of range"):
        handle.set_active_expert(3)
