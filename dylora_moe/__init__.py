"""dylora_moe: a mixture of LoRA experts on a frozen causal LM, with Triton kernels."""
