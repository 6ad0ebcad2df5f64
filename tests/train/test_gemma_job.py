"""The original's real job is ``--model_name google/codegemma-2b`` (Gemma architecture). A tiny Gemma checkpoint and
a tokenizer saved to a local folder go through the very same path (``AutoTokenizer`` / ``AutoModelForCausalLM``
.from_pretrained on ``--model_name``) end to end: experts injected into Gemma's attention, trained, saved, reloaded."""

import math
from pathlib import Path

import pytest
import torch
from train_support import DATA_DIR, TINY

from dylora_moe.base_models import train_tokenizer
from dylora_moe.train import cli


def _tiny_gemma(folder: Path) -> Path:
    """A 1-layer Gemma (CodeGemma's architecture: GeGLU MLP, RMSNorm, multi-query attention, tied head) and a
    byte-level BPE tokenizer, saved as a local model folder."""
    from transformers import GemmaConfig, GemmaForCausalLM

    texts = [line for line in (DATA_DIR / "mbpp.jsonl").read_text().splitlines()[:200]]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_train_py_on_a_local_gemma_folder(tmp_path):
    model_dir = _tiny_gemma(tmp_path / "tiny-gemma")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = [*TINY, "--model_name", str(model_dir), "--kernel", "eager", "--gradient_accumulation_steps", "1"]
        result = cli.main([*argv, "--max_steps", "2", "--output_dir", str(out)])
    finally:
        torch.set_num_threads(threads)
    model = result["trainer"].model
    assert type(model.foundation_model).__name__ == "GemmaForCausalLM"
    assert any("self_attn.q_proj" in name and "lora_A" in name for name, _ in model.named_parameters())
    final, initial = result["final"], result["initial"]
    assert math.isfinite(final["eval_code_alpaca_loss"])
    assert final["eval_code_alpaca_loss"] < initial["eval_code_alpaca_loss"]
    assert not list(out.glob("tiny-*"))  # a local folder is used as it is, not rebuilt

    from transformers import AutoModelForCausalLM

    from dylora_moe.model import DyLoRA_MoE

    reloaded = DyLoRA_MoE.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "final").eval()
    batch = result["trainer"].eval_dataset["mbpp"][0]
    with torch.no_grad():
        loss = reloaded(**{k: v[None] for k, v in batch.items()}).loss
    assert math.isfinite(float(loss))
