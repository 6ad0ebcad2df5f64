"""dylora_moe.serving.PromptRouter: the exported router alone gives the model's per-prompt expert weights."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_models import batch, randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE
from dylora_moe.export import export_checkpoint
from dylora_moe.serving import PromptRouter

REPO = Path(__file__).resolve().parents[2]

SETTINGS = {
    "softmax top-2": dict(top_k=2),
    "softmax top-1 renormalised, loss-free bias": dict(top_k=1, renormalize=True, balance_loss="loss_free"),
    "original weighting top-2": dict(top_k=2, router_weighting="original", balance_loss="mse"),
    "sequence_top_k 1": dict(top_k=2, sequence_top_k=1, temperature=0.7),
    "token routing": dict(top_k=2, routing="token"),
    "dense (an immature expert)": dict(top_k=1, mature_experts=False),
}


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_exported_router_gives_the_models_prompt_weights(tmp_path, settings):
    moe = DyLoRA_MoE(tiny_llama(), num_experts=4, lora_r=4, lora_alpha=8, backend="eager", **settings).eval()
    randomize_experts(moe.handle.layers.values())
    with torch.no_grad():
        moe.router.gate.weight.normal_()
        moe.router.selection_bias.copy_(torch.tensor([0.5, -0.5, 0.2, 0.0]))  # used by loss-free balancing only
    moe.save_pretrained(tmp_path / "ckpt")
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", "peft", progress=lambda _: None)
    router = PromptRouter.load(tmp_path / "out")
    input_ids, mask, _ = batch(rows=4, length=9)  # row 1 right-padded
    expected = moe.prompt_expert_weights(input_ids, mask)
    base = tiny_llama()  # the same base weights (seeded), with no adapter layers
    torch.testing.assert_close(router.route(base, input_ids, mask), expected)
    assert router.best_experts(base, input_ids, mask) == expected.argmax(-1)[:, None].tolist()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="router.safetensors not found"):
        PromptRouter.load(tmp_path)


def test_serving_needs_neither_the_kernels_nor_the_training_stack():
    code = (
        "import sys, dylora_moe.serving\n"
        "bad = [m for m in sys.modules if m.startswith(('triton', 'dylora_moe.kernels', 'dylora_moe.train', 'peft'))]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
