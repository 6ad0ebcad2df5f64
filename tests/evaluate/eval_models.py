"""The tiny base model of the evaluation tests: a seeded Llama of 32 hidden units on the tests' BPE tokenizer."""

from dylora_moe.base_models import TinyConfig, build_tiny_model


def tiny_base(tokenizer):
    """The same weights at every call (build_tiny_model is seeded), never injected."""
    return build_tiny_model(TinyConfig(hidden_size=32, num_layers=2, num_heads=2, vocab_size=400), tokenizer).eval()
