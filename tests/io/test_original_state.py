"""The original's expert files (dylora_moe.io.original_state): load_lora_experts on a folder the original wrote,
where experts it never trained were saved as empty files (issue 17)."""

import warnings

import pytest
import torch
from moe_models import tiny_llama

from dylora_moe import DyLoRA_MoE, load_lora_experts, save_lora_experts


def _experts(tmp_path, empty=(1,)):
    """A folder as the original's save_lora_experts left it: experts not trained at save time are empty files."""
    model = DyLoRA_MoE(tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, kernel="eager")
    with torch.no_grad():
        for layer in model.handle.layers.values():
            layer.lora_B.normal_()
    save_lora_experts(model, tmp_path)
    for i in empty:
        (tmp_path / f"expert_{i}.safetensors").unlink()
        torch.save({}, tmp_path / f"expert_{i}.pt")
    return model


def test_an_original_folder_with_empty_expert_files_loads_the_experts_that_have_weights(tmp_path):
    saved = _experts(tmp_path)
    model = DyLoRA_MoE(tiny_llama(layers=1), num_experts=3, lora_r=4, lora_alpha=8, kernel="eager")
    fresh = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_lora_experts(model, tmp_path)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "expert_1.pt" in messages[0]  # warned once, naming the empty file
    for name, p in model.named_parameters():
        if "lora_" in name:
            want = dict(saved.named_parameters())[name]
            assert torch.equal(p[0], want[0]) and torch.equal(p[2], want[2])  # experts 0 and 2 loaded
            assert torch.equal(p[1], fresh[name][1])  # expert 1 kept its weights
    with pytest.raises(ValueError, match=r"expert_1\.pt hold no weights"):
        load_lora_experts(model, tmp_path, strict=True)  # the opt-in refusal
