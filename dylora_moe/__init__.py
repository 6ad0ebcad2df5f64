"""dylora_moe: a mixture of LoRA experts on a frozen causal LM, with Triton kernels.

Public API (the original DyLoRA-MoE names, plus the drop-in layer):
``DyLoRA_MoE``, ``DynamicHybridRouter``, ``ExpertManager``, ``SkillLibrary``, ``NoveltyDetector``,
``MoELoRALinear``, ``inject_moe_lora``, ``Routing``.
"""

from importlib import import_module

# Names load on first use (PEP 562), so `import dylora_moe.data` or `python train.py --help` does not pay for torch.
_EXPORTS = {
    "ExpertManager": ".experts",
    "DEFAULT_TARGETS": ".inject",
    "MoELoRAHandle": ".inject",
    "find_targets": ".inject",
    "inject_moe_lora": ".inject",
    "MoELoRALinear": ".layer",
    "DyLoRA_MoE": ".model",
    "DyLoRAMoEOutput": ".model",
    "DynamicHybridRouter": ".router",
    "balance_loss": ".router",
    "z_loss": ".router",
    "Routing": ".routing",
    "RoutingContext": ".routing",
    "NoveltyDetector": ".skills",
    "SkillLibrary": ".skills",
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
