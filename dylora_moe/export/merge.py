"""Merging experts into the base weights: a plain transformers model equal to the MoE with its routing fixed.

For routing weights w [E] (one-hot for one expert), every MoE-LoRA linear layer of the copy gets

    W' = round(W + sum_e w_e * s_e * B_e A_e)        s_e = alpha_e / r_e

with the sum taken in float32 and added to the float32 value of W, then rounded once to W's dtype (a bf16 base
rounds once, not once per expert or once for the delta and again for the sum). That is exactly what the MoE computes
when the routing is fixed to w in every layer (``DyLoRA_MoE.generate(..., expert_weights=w)``, and the forward of
one expert): ``W x + sum_e w_e s_e B_e A_e x`` is linear in x. In float32 the merged model differs from the MoE by
the order of the sums only (tests/export/test_merge.py).

Not a weight merge, and so not offered:

- a mix of experts with ``mixture="ffn"``: the experts' whole MLP outputs are mixed after the nonlinearity
  (``sum_e w_e MLP_e(x)``), which no single MLP computes; one expert merges exactly;
- sequence routing's training forward (the original's model): it mixes the experts' final hidden states (the
  logits), ``sum_e w_e f_e(x)``, and a merge of a mix is ``f_w(x)``; docs/export.md gives the difference measured;
- quantized base layers (bitsandbytes Linear4bit / Linear8bitLt: a weight whose dtype is not floating point):
  refused, naming the layer (a merge into quantized weights would requantize, which is not exact).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MergeError(ValueError):
    """A merge that cannot be exact (quantized base, a mix of FFN experts) or bad routing weights."""


def routing_weights(num_experts: int, expert: int | None = None, weights=None) -> torch.Tensor:
    """The fixed routing [E] in float32 from ``expert`` (one-hot) or ``weights`` (one finite value per expert)."""
    if (expert is None) == (weights is None):
        raise MergeError("give exactly one of expert=i (one expert) or weights=[w_0, ..., w_{E-1}] (a fixed mix)")
    if expert is not None:
        if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < num_experts:
            raise MergeError(f"expert must be an int in [0, {num_experts}), got {expert!r}")
        return torch.nn.functional.one_hot(torch.tensor(expert), num_experts).float()
    if isinstance(weights, torch.Tensor):
        values = weights.detach().float().cpu().reshape(-1)
    elif isinstance(weights, Sequence) and not isinstance(weights, str):
        try:
            values = torch.tensor([float(w) for w in weights], dtype=torch.float32)
        except (TypeError, ValueError):
            raise MergeError(f"weights must be numbers, got {list(weights)!r}") from None
    else:
        raise MergeError(f"weights must be a list or tensor of {num_experts} numbers, got {type(weights).__name__}")
    if values.numel() != num_experts:
        raise MergeError(f"weights has {values.numel()} values; the model has {num_experts} experts")
    if not torch.isfinite(values).all():
        raise MergeError(f"weights must be finite, got {values.tolist()}")
    return values


def is_one_hot(weights: torch.Tensor) -> bool:
    return bool((weights == 0).sum() == weights.numel() - 1 and (weights == 1).sum() == 1)


def check_mergeable(moe, weights: torch.Tensor) -> None:
    """Refuse what a weight merge cannot reproduce exactly (see the module docstring), naming the reason."""
    for name, layer in moe.handle.layers.items():
        dtype = layer.base_layer.weight.dtype
        if not dtype.is_floating_point:
            raise MergeError(
                f"cannot merge into {name}: its base weight is {dtype} ({type(layer.base_layer).__name__}, a "
                "quantized layer); merging into it would requantize, which is not exact. Load the base model "
                "unquantized to merge, or export the experts as adapters (--format peft / vllm)"
            )
    if moe.mixture == "ffn" and not is_one_hot(weights):
        raise MergeError(
            "mixture='ffn' mixes the experts' whole MLP outputs after the nonlinearity, which no weight merge "
            "reproduces; merge one expert at a time (expert=i)"
        )


def merged_delta(layer, weights: torch.Tensor) -> torch.Tensor:
    """sum_e w_e * s_e * B_e A_e of one MoELoRALinear in float32, laid out like its base weight (Conv1D: [in, out])."""
    scale = (weights.to(layer.expert_scaling.device) * layer.expert_scaling).float()
    delta = torch.einsum("e,eor,eri->oi", scale, layer.lora_B.detach().float(), layer.lora_A.detach().float())
    return delta.t() if isinstance(layer.base_layer, Conv1D) else delta


@torch.no_grad()
def merged_linear(layer, weights: torch.Tensor) -> nn.Module:
    """A copy of ``layer.base_layer`` with the experts merged in, rounded once to the weight's dtype."""
    base = copy.deepcopy(layer.base_layer)
    weight = base.weight
    weight.copy_((weight.float() + merged_delta(layer, weights)).to(weight.dtype))
    return base


def _plain_mlp(skeleton: nn.Module, mlp_name: str, projections: dict[str, nn.Module], act_fn) -> nn.Module:
    """The base model's own MLP at ``mlp_name``, taken from ``skeleton`` (the model built on the meta device from
    its config, which costs no memory), with the merged projections and the activation put in."""
    mlp = skeleton.get_submodule(mlp_name)
    for proj, linear in projections.items():
        setattr(mlp, proj, linear)
    mlp.act_fn = act_fn
    left = [n for n, t in [*mlp.named_parameters(), *mlp.named_buffers()] if t.is_meta]
    if left:
        raise MergeError(f"cannot rebuild the MLP {mlp_name}: it holds tensors besides its projections ({left})")
    return mlp


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def merged_model(moe, expert: int | None = None, weights=None):
    """A plain transformers model (a copy; ``moe`` is untouched) with the routing fixed to ``expert`` or
    ``weights`` merged into the base weights; see the module docstring for what is exact and what is refused."""
    w = routing_weights(moe.num_experts, expert, weights)
    check_mergeable(moe, w)
    source = moe.foundation_model
    layers = moe.handle.layers
    # Everything that is dropped from the copy (the expert stacks, the routing state) is shared, not copied.
    memo = {id(moe.handle.context): moe.handle.context}
    for layer in layers.values():
        memo.update({id(layer.lora_A): layer.lora_A, id(layer.lora_B): layer.lora_B})
    model = copy.deepcopy(source, memo)
    merged = {name: merged_linear(layer, w) for name, layer in layers.items()}
    if moe.mixture == "linear":
        for name, linear in merged.items():
            _set_module(model, name, linear)
    else:
        with torch.device("meta"):
            skeleton = type(source)(copy.deepcopy(source.config))
        for mlp_name in dict.fromkeys(name.rpartition(".")[0] for name in layers):
            projections = {n.rpartition(".")[2]: m for n, m in merged.items() if n.rpartition(".")[0] == mlp_name}
            act_fn = model.get_submodule(mlp_name).act_fn
            _set_module(model, mlp_name, _plain_mlp(skeleton, mlp_name, projections, act_fn))
    model.requires_grad_(True)  # as from_pretrained gives it: the MoE froze the base, the copy is a plain model
    return model.train(source.training)


@torch.no_grad()
def logit_mix_gap(moe, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, weights=None) -> dict:
    """How far the merge of a mix is from sequence routing's forward on these inputs: ``max_abs_logit`` (the largest
    |logit difference| over real tokens) and ``mean_kl`` (mean KL(logit mix || merged mix) per real token), for the
    mix ``weights`` [E]. The logit mix is ``sum_e w_e * logits_e``, each expert's logits from its exact merge."""
    w = routing_weights(moe.num_experts, weights=weights)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    real = mask.bool()

    def logits(model):
        return model(input_ids=input_ids, attention_mask=mask).logits.float()[real]

    mixed = sum(w_e * logits(merged_model(moe, expert=e)) for e, w_e in enumerate(w.tolist()) if w_e != 0)
    merged = logits(merged_model(moe, weights=w))
    p, q = torch.log_softmax(mixed, -1), torch.log_softmax(merged, -1)
    return {
        "max_abs_logit": (merged - mixed).abs().max().item(),
        "mean_kl": (p.exp() * (p - q)).sum(-1).mean().item(),
    }
