"""How our experts look to peft: adapter names, LoraConfig, and the weight keys of a saved adapter.

Shared by the checkpoint writer/reader (production) and the reference path (tests), so neither imports the other.
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D


def expert_name(i: int) -> str:
    """peft adapter name and checkpoint folder of expert ``i``."""
    return f"expert_{i}"


def peft_key(layer_name: str, which: str) -> str:
    """Key of ``layer_name``'s ``lora_A``/``lora_B`` weight in a saved peft adapter (relative to the PeftModel,
    without the adapter name)."""
    return f"base_model.model.{layer_name}.{which}.weight"


def uses_conv1d(layers) -> bool:
    """GPT-2 Conv1D targets store their weight transposed: peft needs ``fan_in_fan_out=True``."""
    return any(isinstance(layer.base_layer, Conv1D) for layer in layers)


def lora_config(moe, target_names, r: int | None = None, alpha: float | None = None):
    """peft LoraConfig matching ``moe``'s experts (full module names, fan_in_fan_out for GPT-2 Conv1D); ``r`` and
    ``alpha`` default to the model's shared rank and alpha."""
    from peft import LoraConfig  # deferred: peft is a heavy import that saving needs, reading a config does not

    return LoraConfig(
        r=moe.lora_r if r is None else r,
        lora_alpha=moe.lora_alpha if alpha is None else alpha,
        lora_dropout=moe.lora_dropout,
        target_modules=list(target_names),
        fan_in_fan_out=uses_conv1d(moe.handle.layers.values()),
        bias="none",
        task_type="CAUSAL_LM",
    )
