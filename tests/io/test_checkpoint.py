"""Checkpoints: outputs survive save/load, each expert loads alone in stock peft, writes are atomic."""

import os

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_gpt2, tiny_llama
from peft import PeftModel

from dylora_moe import DyLoRA_MoE
from dylora_moe.io import checkpoint as ckpt
from tolerances import assert_close


def trained_like(build, num_experts=3, **kwargs):
    moe = DyLoRA_MoE(build(), num_experts=num_experts, lora_r=4, lora_alpha=8, kernel="eager", top_k=2, **kwargs)
    randomize_experts(moe.handle.layers.values())
    with torch.no_grad():
        moe.router.gate.weight.normal_()
    moe.router.set_expert_maturity(num_experts - 1, 0.0)  # maturity is saved too (here: dense routing)
    return moe.eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_same_outputs_and_peft_loads_each_expert(tmp_path, build):
    moe = trained_like(build, routing="token", sequence_top_k=None, z_loss_coefficient=1e-3)
    input_ids, mask, labels = batch()
    moe.save_pretrained(tmp_path / "ckpt")
    files = sorted(p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    experts = [f"expert_{i}/{n}" for i in range(3) for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert files == sorted(experts + ["dylora_moe_config.json", "router.safetensors"])

    loaded = DyLoRA_MoE.from_pretrained(build(), tmp_path / "ckpt", kernel="eager").eval()
    assert (loaded.routing, loaded.router.top_k, loaded.z_loss_coefficient) == ("token", 2, 1e-3)
    assert loaded.router.expert_maturity.tolist() == [1.0, 1.0, 0.0]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids, mask, labels).logits, moe(input_ids, mask, labels).logits)
        for expert in range(3):
            peft_model = PeftModel.from_pretrained(build(), str(tmp_path / "ckpt" / f"expert_{expert}")).eval()
            moe.expert_manager.set_active_expert(expert)
            assert_close(peft_model(input_ids).logits, moe.foundation_model(input_ids).logits, torch.float32)


def test_expert_weights_round_trip_and_count_mismatch(tmp_path):
    moe = trained_like(tiny_llama)
    weights = moe.expert_manager.get_expert_weights(1)
    # the original's keys: peft parameter names with the adapter name
    assert set(weights) == {f"base_model.model.{n}.lora_{ab}.expert_1.weight" for n in moe.handle.layers for ab in "AB"}
    short = {k.replace("base_model.model.", "").replace(".expert_1", ""): v for k, v in weights.items()}
    moe.expert_manager.load_expert_weights(0, short)  # short keys (no adapter name) load into any expert
    key = "model.layers.0.self_attn.q_proj.lora_B"
    assert torch.equal(moe.expert_manager.get_expert_weights(0)[f"base_model.model.{key}.expert_0.weight"],
                       weights[f"base_model.model.{key}.expert_1.weight"])  # fmt: skip
    moe.save_pretrained(tmp_path / "ckpt")
    other = DyLoRA_MoE(tiny_llama(), num_experts=2, lora_r=4, lora_alpha=8, kernel="eager")
    with pytest.raises(ValueError, match="has 3 experts but the model has 2"):
        ckpt.load_checkpoint(other, tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not a DyLoRA_MoE checkpoint"):
        DyLoRA_MoE.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(KeyError, match="missing"):
        moe.expert_manager.load_expert_weights(0, {})


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way leaves the previous checkpoint intact and no temporary directory behind."""
    moe = trained_like(tiny_llama)
    target = tmp_path / "ckpt"
    moe.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with torch.no_grad():
        for layer in moe.handle.layers.values():
            layer.lora_B.add_(1.0)

    def broken_router_save(path):
        raise OSError("disk full")

    monkeypatch.setattr(moe.router, "save", broken_router_save)
    with pytest.raises(OSError, match="disk full"):
        moe.save_pretrained(target)
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert os.listdir(tmp_path) == ["ckpt"]
    monkeypatch.undo()
    moe.save_pretrained(target)  # a complete save replaces the old checkpoint
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} != before
    assert os.listdir(tmp_path) == ["ckpt"]


def test_a_checkpoint_json_with_an_unknown_key_names_the_file(tmp_path):
    import json

    from dylora_moe.io.checkpoint import CONFIG_NAME, CheckpointError

    model = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=4, lora_alpha=8, kernel="eager")
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / CONFIG_NAME
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "lora_alhpa": 8}))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}.*lora_alhpa"):
        DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt")
    path.write_text(json.dumps({**config, "lora_alpha": -1}))
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}.*lora_alpha"):
        DyLoRA_MoE.from_pretrained(tiny_llama(layers=1), tmp_path / "ckpt")
