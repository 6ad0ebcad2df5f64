"""dylora_moe: a mixture of LoRA experts on a frozen causal LM, with Triton kernels.

Public API (the original DyLoRA-MoE names, plus the drop-in layer):
``DyLoRA_MoE``, ``DynamicHybridRouter``, ``ExpertManager``, ``SkillLibrary``, ``NoveltyDetector``,
``MoELoRALinear``, ``inject_moe_lora``, ``Routing``.
"""

from .experts import ExpertManager
from .inject import DEFAULT_TARGETS, MoELoRAHandle, find_targets, inject_moe_lora
from .layer import MoELoRALinear
from .model import DyLoRA_MoE, DyLoRAMoEOutput
from .router import DynamicHybridRouter, balance_loss, z_loss
from .routing import Routing, RoutingContext
from .skills import NoveltyDetector, SkillLibrary

__all__ = [
    "DEFAULT_TARGETS",
    "DyLoRAMoEOutput",
    "DyLoRA_MoE",
    "DynamicHybridRouter",
    "ExpertManager",
    "MoELoRAHandle",
    "MoELoRALinear",
    "NoveltyDetector",
    "Routing",
    "RoutingContext",
    "SkillLibrary",
    "balance_loss",
    "find_targets",
    "inject_moe_lora",
    "z_loss",
]
