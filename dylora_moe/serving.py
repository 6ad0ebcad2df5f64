"""Routing at serving time: which expert(s) for this prompt, from the exported router alone.

The trained router reads the **last hidden state of the base model** (the decoder's output after its final norm,
adapters off) at every real token of the prompt: embeddings alone are not what it was trained on. So routing a
request costs one forward of the base decoder over the prompt (a prefill without the LM head and without decoding),
plus a [tokens, hidden] x [hidden, experts] product. The answer is the per-sequence weights [B, E] that
``DyLoRA_MoE.prompt_expert_weights`` gives (and ``generate`` decodes with): each token's routing weights, averaged
over the prompt's real tokens and normalised (only the ``sequence_top_k`` best, renormalised, when the model was
trained with it).

Sequence routing at serving time (docs/export.md): route once per request with :meth:`PromptRouter.route`, then
serve the request with the adapter of :meth:`PromptRouter.best_experts` (a multi-LoRA server, e.g. vLLM with the
``--format vllm`` export) or with the merged model of that mix.

This module needs torch and safetensors only (not the training stack, not the kernels); the base model is any
transformers causal LM whose ``base_model`` is its decoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROUTER_FILE = "router.safetensors"
ROUTING_FILE = "routing.json"  # written by the export: the routing settings the router file does not hold


@dataclass(frozen=True)
class RoutingSettings:
    """How the trained model turned router logits into per-sequence weights (its settings at export)."""

    top_k: int
    temperature: float
    weighting: str  # "softmax" | "original"
    renormalize: bool
    sequence_top_k: int | None
    use_selection_bias: bool  # balance_loss == "loss_free": top-k of logits / temperature + selection_bias


class PromptRouter:
    """The trained router's gate, maturity and selection bias, with the model's routing rule (see the module
    docstring). Load it with :meth:`load` from an export folder (``router.safetensors`` + ``routing.json``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], settings: RoutingSettings):
        self.weight = tensors["gate.weight"].float()
        self.bias = tensors["gate.bias"].float()
        self.maturity = tensors["expert_maturity"].float()
        self.selection_bias = tensors.get("selection_bias", torch.zeros_like(self.maturity)).float()
        self.settings = settings

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def load(cls, folder) -> PromptRouter:
        """Read ``folder``/router.safetensors and ``folder``/routing.json (what ``python -m dylora_moe.export``
        writes); errors name the file."""
        folder = Path(folder)
        router_path, routing_path = folder / ROUTER_FILE, folder / ROUTING_FILE
        for path in (router_path, routing_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {folder} is not an export of python -m dylora_moe.export")
        try:
            saved = json.loads(routing_path.read_text())
            settings = RoutingSettings(**{k: saved["router"][k] for k in RoutingSettings.__dataclass_fields__})
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{routing_path}: not a routing file of this version ({err!r})") from None
        return cls(load_file(str(router_path)), settings)

    def to(self, device) -> PromptRouter:
        for name in ("weight", "bias", "maturity", "selection_bias"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # ----- the rule ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., E] routing weights of hidden states [..., H] (the router's rule: dense tempered softmax while any
        expert is immature, else the top-k with the model's weighting)."""
        s = self.settings
        logits = hidden.to(self.weight.device, torch.float32) @ self.weight.t() + self.bias
        probs = torch.softmax(logits / s.temperature, dim=-1)
        if not bool((self.maturity > 0).all()):
            return probs
        select = logits / s.temperature
        if s.use_selection_bias:
            select = select + self.selection_bias
        ids = select.topk(s.top_k, dim=-1).indices
        if s.weighting == "original":
            weights = torch.softmax(logits.gather(-1, ids), dim=-1)
        else:
            weights = probs.gather(-1, ids)
            if s.renormalize:
                weights = weights / weights.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, ids, weights)

    @torch.no_grad()
    def sequence_weights(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, E] per-sequence weights of hidden states [B, S, H]: token weights averaged over the real tokens
        (``attention_mask`` 1), normalised; only the ``sequence_top_k`` best when the model kept those."""
        dense = self.token_weights(hidden)
        if attention_mask is not None:
            dense = dense * attention_mask.to(dense.device, dense.dtype)[..., None]
        sums = dense.sum(1)
        weights = sums / sums.sum(-1, keepdim=True).clamp_min(1e-20)
        k = self.settings.sequence_top_k
        if k is not None and k < self.num_experts:
            top, idx = weights.topk(k, dim=-1)
            weights = torch.zeros_like(weights).scatter(1, idx, top / top.sum(-1, keepdim=True).clamp_min(1e-20))
        return weights

    # ----- with the base model -----------------------------------------------------------------------------------

    @staticmethod
    @torch.no_grad()
    def base_hidden_states(base_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Last hidden states [B, S, H] of ``base_model``'s decoder (a plain transformers causal LM, no adapters):
        one forward over the prompt, without the LM head."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = base_model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def route(self, base_model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, E] expert weights for prompts ``input_ids`` [B, S] (one base forward over them)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.sequence_weights(self.base_hidden_states(base_model, input_ids, attention_mask), attention_mask)

    def best_experts(self, base_model, input_ids, attention_mask=None, k: int = 1) -> list[list[int]]:
        """The ``k`` experts of largest weight for each prompt (k = 1: the adapter to serve it with)."""
        return self.route(base_model, input_ids, attention_mask).topk(k, dim=-1).indices.tolist()
