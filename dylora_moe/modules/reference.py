"""The original DyLoRA-MoE algorithm on peft adapters: the slow reference the fast paths are checked against.

One peft LoRA adapter per expert (``expert_i``), added with ``get_peft_model`` / ``add_adapter`` on a copy of the
base model that shares its frozen parameters. Minus the original's training defects (docs/design.md §2): every adapter
trains. Each adapter's ``lora_A``/``lora_B`` weight IS row i of the fast model's stacked tensors (a view taken at
every call), so both backends read and train the same parameters and an optimizer built on the fast model holds
them all.

- Routing pass: the peft model with ``disable_adapter()``.
- ``routing="sequence"``: one full forward per expert with that adapter active; logits = sum_i w[b, i] * logits_i
  (the original's E full logit tensors).
- ``routing="token"``: one forward in which each peft LoRA layer loops over the experts, adding each expert's LoRA
  output weighted by the token's routing weight (the original's later generation).
"""

from __future__ import annotations

import copy
import types
import warnings

import torch
from peft import get_peft_model

from ..io.peft_format import expert_name, lora_config
from ..kernels.routing_meta import dense_gate
from .routing import RoutingContext


def _tie_to_stack(linear: torch.nn.Linear, layer, which: str, i: int) -> None:
    """Make ``linear.weight`` row i of ``layer.<which>`` at every call (no parameter of its own)."""
    del linear.weight
    linear.weight = getattr(layer, which)[i]

    def hook(module, args):
        module.weight = getattr(layer, which)[i]

    linear.register_forward_pre_hook(hook)


class ReferenceMoE:
    """peft adapters over a DyLoRA_MoE's stacked experts; see the module docstring."""

    def __init__(self, moe):
        self.moe = moe
        self.num_experts = moe.num_experts
        self.context = RoutingContext()
        fast = moe.foundation_model
        shared = {id(t): t for t in list(fast.parameters()) + list(fast.buffers())}
        shared[id(moe.handle.context)] = self.context  # not the fast model's routing state (it may hold a graph)
        base = copy.deepcopy(fast, shared)  # shares every tensor with the fast model; only modules are copied
        names = list(moe.handle.layers)
        for name in names:  # undo the MoE-LoRA injection in the copy: back to the plain linear layers
            parent_name, _, child = name.rpartition(".")
            parent = base.get_submodule(parent_name)
            setattr(parent, child, getattr(parent, child).base_layer)
        config = lora_config(moe, names)
        with warnings.catch_warnings():  # peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing
            warnings.simplefilter("ignore", FutureWarning)
            self.peft_model = get_peft_model(base, config, adapter_name=expert_name(0))
        for i in range(1, self.num_experts):
            self.peft_model.add_adapter(expert_name(i), config)
        inner = self.peft_model.base_model.model
        for name, layer in moe.handle.layers.items():
            lora_layer = inner.get_submodule(name)
            for i in range(self.num_experts):
                _tie_to_stack(lora_layer.lora_A[expert_name(i)], layer, "lora_A", i)
                _tie_to_stack(lora_layer.lora_B[expert_name(i)], layer, "lora_B", i)
            lora_layer.forward = types.MethodType(_routed_forward(lora_layer.forward, self), lora_layer)

    def sync(self) -> None:
        """Match the fast model's train/eval mode (weights are shared, nothing to copy)."""
        self.peft_model.train(self.moe.training)

    def _decoder_hidden(self, input_ids, attention_mask):
        decoder = self.peft_model.base_model.model.base_model
        return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def forward(self, input_ids, attention_mask):
        """(routing decision, sequence weights or None, logits) for one batch, the original way."""
        self.sync()
        with torch.no_grad(), self.peft_model.disable_adapter():
            hidden = self._decoder_hidden(input_ids, attention_mask)
        decision = self.moe.decide_routing(hidden, attention_mask)
        if self.moe.routing == "token":
            self.context.set(self.moe.token_routing(decision))
            hidden = self._decoder_hidden(input_ids, attention_mask)
            return decision, None, self.moe.logits_from_hidden(hidden)
        self.context.set(None)
        seq_weights = self.moe.sequence_weights(decision)
        logits = 0
        for i in range(self.num_experts):  # the original: one full pass and one full logit tensor per expert
            self.peft_model.set_adapter(expert_name(i))
            hidden = self._decoder_hidden(input_ids, attention_mask)
            logits = logits + seq_weights[:, i, None, None].to(hidden.dtype) * self.moe.logits_from_hidden(hidden)
        return decision, seq_weights, logits


def _routed_forward(peft_forward, reference: ReferenceMoE):
    """A peft LoRA layer forward that, under token routing, sums every expert's LoRA output times its weight.

    peft's ``disable_adapter()`` (the routing pass) wins over the routing: the routing set by the previous forward
    stays in the context (activation checkpointing needs it), and must not leak into the next batch's base pass.
    """

    def forward(self, x, *args, **kwargs):
        routing = reference.context.routing
        if routing is None or self.disable_adapters:
            return peft_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        k = routing.ids.shape[-1]
        ids = routing.ids.expand(*x.shape[:-1], k).reshape(-1, k)
        gate = dense_gate(ids, routing.weights.expand(*x.shape[:-1], k).reshape(-1, k), reference.num_experts)
        gate = gate.reshape(*x.shape[:-1], -1)
        for i in range(reference.num_experts):
            name = expert_name(i)
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            x_lora = self.lora_dropout[name](x.to(lora_a.weight.dtype))
            lora = lora_b(lora_a(x_lora)) * self.scaling[name]
            result = result + (gate[..., i : i + 1] * lora).to(result.dtype)
        return result

    return forward
