"""Tiny random causal LMs for the module tests, built from configs (no downloads).

Dropout inside the base models is off so backends and runs can be compared number for number.
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 100


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 2, hidden: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2: its attention projection c_attn is a transformers Conv1D (weight stored [d_in, d_out])."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def batch(rows: int = 3, length: int = 7, seed: int = 1):
    """input_ids, attention_mask (row 1 right-padded after 4 tokens), labels (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(input_ids)
    if rows > 1:
        mask[1, 4:] = 0
        input_ids[1, 4:] = 0
    return input_ids, mask, input_ids.masked_fill(mask == 0, -100)


@torch.no_grad()
def randomize_experts(moe_layers, std: float = 0.5, seed: int = 2) -> None:
    """Give every expert a non-zero B (fresh experts have B = 0 and would all look alike)."""
    gen = torch.Generator().manual_seed(seed)
    for layer in moe_layers:
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * std)
