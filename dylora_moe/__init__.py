"""dylora_moe: a mixture of LoRA experts on a frozen causal LM, with Triton kernels.

Public API: every name of the original DyLoRA-MoE package (``DyLoRA_MoE``, ``DynamicHybridRouter``,
``ExpertManager``, ``SkillLibrary``, ``NoveltyDetector``, ``TwoPhaseLRScheduler``, ``two_phase_lr_lambda``,
``print_trainable_parameters``, ``save_dylo_moe_state``, ``save_lora_experts``, ``load_lora_experts``; also under
the original's submodule names ``scheduler``, ``utils``, ``skill_library``, ``novelty_detector``, ``expert``), the
settings object ``DyLoRAMoEConfig``, and the drop-in layers ``MoELoRALinear``, ``MoELoRAMLP``, ``inject_moe_lora``.
"""

from importlib import import_module

# Names load on first use (PEP 562), so `import dylora_moe.corpora` or `python train.py --help` does not pay
# for torch.
_EXPORTS = {
    "DyLoRAMoEConfig": ".config",
    "ExpertManager": ".modules.experts",
    "MoELoRAMLP": ".modules.ffn",
    "default_targets": ".modules.inject",
    "DEFAULT_TARGETS": ".modules.inject",
    "MoELoRAHandle": ".modules.inject",
    "find_targets": ".modules.inject",
    "inject_moe_lora": ".modules.inject",
    "MoELoRALinear": ".modules.layer",
    "DyLoRA_MoE": ".model",
    "DyLoRAMoEOutput": ".model",
    "DynamicHybridRouter": ".modules.router",
    "balance_loss": ".modules.router",
    "z_loss": ".modules.router",
    "Routing": ".modules.routing",
    "RoutingContext": ".modules.routing",
    "NoveltyDetector": ".modules.skills",
    "SkillLibrary": ".modules.skills",
    "TwoPhaseLRScheduler": ".scheduler",
    "two_phase_lr_lambda": ".scheduler",
    "load_dylo_moe_state": ".io.original_state",
    "load_lora_experts": ".io.original_state",
    "print_trainable_parameters": ".io.original_state",
    "save_dylo_moe_state": ".io.original_state",
    "save_lora_experts": ".io.original_state",
    "export_checkpoint": ".export",
    "PromptRouter": ".serving",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        try:  # a submodule, as `dylora_moe.kernels` was reachable after `import dylora_moe` before
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":  # the submodule exists, a dependency of it is missing
                raise
            raise AttributeError(f"module 'dylora_moe' has no attribute {name!r}") from None
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


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
    "PromptRouter",
    "Routing",
    "RoutingContext",
    "SkillLibrary",
    "TwoPhaseLRScheduler",
    "balance_loss",
    "default_targets",
    "export_checkpoint",
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
