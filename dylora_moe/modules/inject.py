"""inject_moe_lora: turn the attention projections (or the MLPs) of any HF causal LM into MoE-LoRA layers, in place.

The drop-in entry point for other MoE-LoRA projects::

    handle = inject_moe_lora(model, num_experts=4, r=8, alpha=16, dropout=0.05)
    handle.set_routing(ids, weights)          # [B, S, k] each, from your router
    loss = model(input_ids, labels=labels).loss

``mixture="ffn"`` makes each expert a LoRA on the gate/up/down projections of every MLP, the top-k experts' whole
MLP outputs mixed after the nonlinearity (MixLoRA's model; :class:`~dylora_moe.modules.ffn.MoELoRAMLP`).
"""

from __future__ import annotations

import math
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quantized import keep_4bit_layers_differentiable
from .ffn import MoELoRAMLP, is_gated_mlp
from .growth import keep_parameter_identity
from .layer import MoELoRALinear, backend_argument, check_backend
from .routing import Routing, RoutingContext

# The original DyLoRA-MoE's automatic targets (attention projections of Llama/Gemma, GPT-NeoX/Falcon, GPT-2, MPT).
ORIGINAL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "query_key_value", "c_attn", "Wqkv")
# Fused attention projections that neither the original's list nor peft 0.21's map names for every architecture
# using them (Phi-3 ``qkv_proj`` is absent from peft's map; Baichuan ``W_pack``).
FUSED_TARGETS = ("qkv_proj", "W_pack")
DEFAULT_TARGETS = ORIGINAL_TARGETS + FUSED_TARGETS
MIXTURES = ("linear", "ffn")


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _model_types(model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    types = [getattr(config, "model_type", None)]
    if hasattr(config, "get_text_config"):
        types.append(getattr(config.get_text_config(), "model_type", None))
    return [t for t in types if t]


def peft_default_targets(model: nn.Module) -> list[str] | str | None:
    """peft's LoRA targets for ``model``'s architecture (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``): a
    list of names, a regex over full module names, or None when peft has no entry (or is not installed)."""
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping
    except ImportError:
        return None
    for model_type in _model_types(model):
        if model_type in mapping:
            return mapping[model_type]
    return None


def default_targets(model: nn.Module) -> list[str]:
    """Full names of the linear layers LoRA experts go on by default: those named in :data:`DEFAULT_TARGETS` (the
    original's list plus fused projections such as Phi-3's ``qkv_proj``) or in peft's per-architecture map."""
    names = _linear_names(model)
    peft_targets = peft_default_targets(model)
    wanted = set(DEFAULT_TARGETS)
    pattern = None
    if isinstance(peft_targets, str):
        pattern = re.compile(peft_targets)
    elif peft_targets:
        wanted |= set(peft_targets)
    return [n for n in names if n.rsplit(".", 1)[-1] in wanted or (pattern is not None and pattern.fullmatch(n))]


def find_targets(model: nn.Module, target_modules=None) -> list[str]:
    """Full names of the nn.Linear / Conv1D modules whose last name component (or full name) is in
    ``target_modules``; default: :func:`default_targets`. Raises a ValueError listing the linear layers found when
    none match."""
    names = _linear_names(model)
    if target_modules is None:
        targets, wanted = default_targets(model), set(DEFAULT_TARGETS)
    else:
        wanted = set(target_modules)
        if not wanted:
            raise ValueError("target_modules is empty")
        targets = [name for name in names if name.rsplit(".", 1)[-1] in wanted or name in wanted]
    if not targets:
        found = sorted({name.rsplit(".", 1)[-1] for name in names})
        raise ValueError(
            f"no target module among {sorted(wanted)} in {type(model).__name__}; its linear layers are named "
            f"{found}: pass target_modules= with some of these"
        )
    return targets


def find_mlp_targets(model: nn.Module, target_modules=None) -> list[str]:
    """Full names of the gated MLPs (``gate_proj``/``up_proj``/``down_proj`` + ``act_fn``: Llama, Mistral, Gemma,
    Qwen) for ``mixture="ffn"``; ``target_modules`` filters them by last name component or full name."""
    mlps = [name for name, m in model.named_modules() if name and is_gated_mlp(m)]
    if target_modules is not None:
        wanted = set(target_modules)
        mlps = [name for name in mlps if name.rsplit(".", 1)[-1] in wanted or name in wanted]
    if not mlps:
        raise ValueError(
            f"mixture='ffn' found no gated MLP (a module with gate_proj, up_proj, down_proj linear layers and an "
            f"act_fn) in {type(model).__name__}"
            + ("" if target_modules is None else f" among target_modules={sorted(set(target_modules))}")
        )
    return mlps


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
    def backend(self) -> str:
        """What the layers run (a lone layer's name: "loop" for "reference")."""
        return next(iter(self.layers.values())).backend

    @property
    def kernel(self) -> str:
        """The former name of :attr:`backend`."""
        return self.backend

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

    def set_backend(self, backend: str, *, said: str = "backend") -> None:
        """Switch every injected layer to ``backend`` (see :func:`~dylora_moe.modules.layer.check_backend`)."""
        backend = check_backend(backend, said)
        for layer in self.layers.values():
            layer.set_backend(backend)

    def set_kernel(self, kernel: str) -> None:
        """The former name of :meth:`set_backend`."""
        self.set_backend(kernel, said="kernel")

    def add_expert(self, r: int | None = None, alpha: float | None = None) -> int:
        """Grow every injected layer by one expert (B = 0, so outputs of the others are unchanged); returns its id.

        ``r`` / ``alpha``: this expert's own rank and alpha (default: the layers' ``r`` / ``alpha``); a larger rank
        zero-pads the stacked weights of the other experts, which is exact (see MoELoRALinear.add_expert)."""
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"expert rank r must be an int >= 1, got {r!r}")
        if alpha is not None:
            check_alpha(alpha)
        ids = set()
        for layer in self.layers.values():
            before = dict(layer.named_parameters())
            ids.add(layer.add_expert() if r is None and alpha is None else layer.add_expert(r=r, alpha=alpha))
            keep_parameter_identity(layer, before)  # an optimizer built before keeps training every expert
        return ids.pop()

    def lora_parameters(self):
        for layer in self.layers.values():
            yield layer.lora_A
            yield layer.lora_B


def check_alpha(alpha) -> None:
    """LoRA alpha: a finite number > 0, as DyLoRAMoEConfig requires (NaN would make every output NaN)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be a finite number > 0, got {alpha!r}")


def inject_moe_lora(
    model: nn.Module,
    *,
    num_experts: int,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules=None,
    backend: str = "auto",
    mixture: str = "linear",
    kernel: str | None = None,
) -> MoELoRAHandle:
    """Replace the target layers of ``model`` in place by MoE-LoRA layers and freeze everything else.

    ``mixture="linear"`` (default): each target linear layer becomes a :class:`MoELoRALinear` mixing the token's
    experts inside it; ``target_modules``: last name components (``"q_proj"``) or full module names, default
    :func:`default_targets`. ``mixture="ffn"``: each gated MLP becomes a
    :class:`~dylora_moe.modules.ffn.MoELoRAMLP` (experts = LoRA on gate/up/down, whole MLP outputs mixed);
    ``target_modules`` then selects MLP modules (default: all).
    ``backend``: what runs the layers (:data:`dylora_moe.config.BACKENDS`; ``kernel`` is its former name).
    Returns a :class:`MoELoRAHandle` to set routing and list the injected linear layers.
    """
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    check_alpha(alpha)
    if mixture not in MIXTURES:
        raise ValueError(f"unknown mixture {mixture!r}; expected one of {', '.join(MIXTURES)}")
    backend = check_backend(*backend_argument(backend, kernel))
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("model already has MoE-LoRA layers; inject once and grow with handle.add_expert()")
    targets = find_targets(model, target_modules) if mixture == "linear" else find_mlp_targets(model, target_modules)
    model.requires_grad_(False)
    keep_4bit_layers_differentiable(model)  # a quantized base: gradients must cross its 4-bit layers on the CPU too
    context = RoutingContext()
    layers = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if mixture == "linear":
            layer = MoELoRALinear(getattr(parent, child), num_experts, r, alpha, dropout, backend, context)
            layers[name] = layer
        else:
            layer = MoELoRAMLP(getattr(parent, child), num_experts, r, alpha, dropout, backend, context)
            layers.update({f"{name}.{proj}": getattr(layer, proj) for proj in MoELoRAMLP.PROJECTIONS})
        setattr(parent, child, layer)
    return MoELoRAHandle(model, layers, context)
