"""dylora_moe: a mixture of LoRA experts on a frozen causal LM, with Triton kernels.

Public API: every name of the original DyLoRA-MoE package (``DyLoRA_MoE``, ``DynamicHybridRouter``,
``ExpertManager``, ``SkillLibrary``, ``NoveltyDetector``, ``TwoPhaseLRScheduler``, ``two_phase_lr_lambda``,
``print_trainable_parameters``, ``save_dylo_moe_state``, ``save_lora_experts``, ``load_lora_experts``; also under
the original's submodule names ``scheduler``, ``utils``, ``skill_library``, ``novelty_detector``, ``expert``), the
settings object ``DyLoRAMoEConfig``, and the drop-in layers ``MoELoRALinear``, ``MoELoRAMLP``, ``inject_moe_lora``.
"""

from .config import DyLoRAMoEConfig
from .experts import ExpertManager
from .ffn import MoELoRAMLP
from .inject import DEFAULT_TARGETS, MoELoRAHandle, default_targets, find_targets, inject_moe_lora
from .layer import MoELoRALinear
from .model import DyLoRA_MoE, DyLoRAMoEOutput
from .router import DynamicHybridRouter, balance_loss, z_loss
from .routing import Routing, RoutingContext
from .scheduler import TwoPhaseLRScheduler, two_phase_lr_lambda
from .skills import NoveltyDetector, SkillLibrary
from .utils import (
    load_dylo_moe_state,
    load_lora_experts,
    print_trainable_parameters,
    save_dylo_moe_state,
    save_lora_experts,
)

__all__ = [
    "DEFAULT_TARGETS",
    "DyLoRAMoEConfig",
    "DyLoRAMoEOutput",
    "DyLoRA_MoE",
    "DynamicHybridRouter",
    "ExpertManager",
    "MoELoRAHandle",
    "MoELoRALinear",
    "MoELoRAMLP",
    "NoveltyDetector",
    "Routing",
    "RoutingContext",
    "SkillLibrary",
    "TwoPhaseLRScheduler",
    "balance_loss",
    "default_targets",
    "find_targets",
    "inject_moe_lora",
    "load_dylo_moe_state",
    "load_lora_experts",
    "print_trainable_parameters",
    "save_dylo_moe_state",
    "save_lora_experts",
    "two_phase_lr_lambda",
    "z_loss",
]
