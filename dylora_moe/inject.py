"""inject_moe_lora: turn the attention projections of any HF causal LM into MoE-LoRA layers, in place.

The drop-in entry point for other MoE-LoRA projects::

    handle = inject_moe_lora(model, num_experts=4, r=8, alpha=16, dropout=0.05)
    handle.set_routing(ids, weights)          # [B, S, k] each, from your router
    loss = model(input_ids, labels=labels).loss
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import MoELoRALinear, check_kernel
from .routing import Routing, RoutingContext

# The original DyLoRA-MoE's automatic targets (attention projections of Llama/Gemma, GPT-NeoX/Falcon, GPT-2, MPT).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "c_attn", "Wqkv")


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def find_targets(model: nn.Module, target_modules=None) -> list[str]:
    """Full names of the nn.Linear / Conv1D modules whose last name component is in ``target_modules``
    (default: :data:`DEFAULT_TARGETS`). Raises a ValueError listing the linear layers found when none match."""
    wanted = set(DEFAULT_TARGETS if target_modules is None else target_modules)
    if not wanted:
        raise ValueError("target_modules is empty")
    names = _linear_names(model)
    targets = [name for name in names if name.rsplit(".", 1)[-1] in wanted or name in wanted]
    if not targets:
        found = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ValueError(
            f"no target module among {sorted(wanted)} in {type(model).__name__}; its linear layers are named "
            f"{found}: pass target_modules= with some of these"
        )
    return targets


class MoELoRAHandle:
    """What :func:`inject_moe_lora` returns: the injected layers and the routing context they share."""

    def __init__(self, model: nn.Module, layers: dict[str, MoELoRALinear], context: RoutingContext):
        self.model = model
        self.layers = layers
        self.context = context

    @property
    def num_experts(self) -> int:
        return next(iter(self.layers.values())).num_experts

    @property
    def kernel(self) -> str:
        return next(iter(self.layers.values())).kernel

    def set_routing(self, ids, weights) -> None:
        """Experts of every token for the next forward passes: ids and weights [B, S, k] (S = 1: per row)."""
        self.context.set(Routing(ids, weights))

    def clear_routing(self) -> None:
        self.context.set(None)

    def set_active_expert(self, expert_id: int) -> None:
        """Route every token to one expert with weight 1 (plain LoRA with that adapter)."""
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert {expert_id} is out of range for {self.num_experts} experts")
        self.context.set_active_expert(expert_id)

    def adapters_disabled(self):
        """Context manager running the frozen base model alone."""
        return self.context.adapters_disabled()

    def set_kernel(self, kernel: str) -> None:
        check_kernel(kernel)
        for layer in self.layers.values():
            layer.set_kernel(kernel)

    def add_expert(self) -> int:
        """Grow every injected layer by one expert (B = 0, so outputs of the others are unchanged); returns its id."""
        ids = {layer.add_expert() for layer in self.layers.values()}
        return ids.pop()

    def lora_parameters(self):
        for layer in self.layers.values():
            yield layer.lora_A
            yield layer.lora_B


def inject_moe_lora(
    model: nn.Module,
    *,
    num_experts: int,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules=None,
    kernel: str = "auto",
) -> MoELoRAHandle:
    """Replace the target linear layers of ``model`` in place by :class:`MoELoRALinear` and freeze everything else.

    ``target_modules``: last name components (``"q_proj"``) or full module names; default: the original's list
    (:data:`DEFAULT_TARGETS`). Returns a :class:`MoELoRAHandle` to set routing and list the injected layers.
    """
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    check_kernel(kernel)
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("model already has MoE-LoRA layers; inject once and grow with handle.add_expert()")
    targets = find_targets(model, target_modules)
    model.requires_grad_(False)
    context = RoutingContext()
    layers = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = MoELoRALinear(getattr(parent, child), num_experts, r, alpha, dropout, kernel, context)
        setattr(parent, child, layer)
        layers[name] = layer
    return MoELoRAHandle(model, layers, context)
