"""The original's module name for its ``utils`` functions, now in :mod:`dylora_moe.io.original_state` (``from
dylora_moe.utils import save_lora_experts`` works as ``from dylo_moe.utils import save_lora_experts`` did)."""

from .io.original_state import (
    load_dylo_moe_state,
    load_lora_experts,
    print_trainable_parameters,
    save_dylo_moe_state,
    save_lora_experts,
)

__all__ = [
    "load_dylo_moe_state",
    "load_lora_experts",
    "print_trainable_parameters",
    "save_dylo_moe_state",
    "save_lora_experts",
]
