"""Quantized base models (QLoRA): the optional bitsandbytes package, and a 4-bit base kept differentiable on the CPU.

The experts never depend on it: a MoE-LoRA layer takes its dtype from the base layer's compute dtype
(:func:`dylora_moe.modules.layer.compute_dtype`), so a 4-bit or 8-bit bitsandbytes base trains like a float one, and
the experts it trains are adapters that load on the float base too. Standard library only at import (``train.py``
checks its flags before torch is imported).
"""

from __future__ import annotations

QUANT_EXTRA = "pip install 'dylora-moe[quant]'"


def require_bitsandbytes(what: str | None = None) -> None:
    """Raise a one-line ImportError naming ``what`` and the extra to install when bitsandbytes cannot be imported."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        who = f"{what} " if what else ""
        raise ImportError(f"{who}needs bitsandbytes, which does not import here ({err}): {QUANT_EXTRA}") from None


def uses_bitsandbytes(quantization_config) -> bool:
    """Whether a transformers quantization config (a ``BitsAndBytesConfig`` or its dict) is bitsandbytes'."""
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
    else:
        method = getattr(quantization_config, "quant_method", None)
    return str(getattr(method, "value", method)) == "bitsandbytes"


def keep_4bit_layers_differentiable(model) -> list[str]:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its differentiable path on the CPU; returns their names.

    bitsandbytes 0.50 repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first forward in eval mode
    without gradients (an evaluation), and from then on computes that layer with a kernel that has no backward, in
    training too: the gradient stops at the layer's input, so every expert below it silently gets none. The repack
    also fails outright on widths its kernel cannot take (``out_features`` not a multiple of 32, ``in_features`` not
    one of the block, 64). This clears the layer's ``support_avx512bf16_for_cpu`` flag, so bitsandbytes never
    repacks it, and restores a weight already repacked with bitsandbytes' own inverse (what its state-dict save
    does; exact, except that nested quantization constants are quantized again). GPUs never take this path.
    """
    marked = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        marked.append(name)
    return marked
