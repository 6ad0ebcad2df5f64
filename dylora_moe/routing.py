"""The routing context: how a model tells its MoE-LoRA layers which experts each token uses.

HF model code calls ``q_proj(x)`` with no routing argument, so the model sets the routing on a
:class:`RoutingContext` shared by its layers, and each layer reads it in ``forward``. One context belongs to one
injected model (no module-level state).

The routing set by a forward stays in place until the next one replaces it: activation checkpointing recomputes
layer forwards during backward, after the model's forward has returned, and they must see the same routing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .kernels.routing_meta import RoutingMeta


@dataclass(frozen=True)
class Routing:
    """Experts of each token: ``ids`` (integer) and ``weights`` (float), both [B, S, k].

    S may be 1 to give every position of a row the same experts (sequence routing, decoding); the layer broadcasts
    it over the input's sequence length.

    Everything the ops derive from the routing (the dense gate, counts, the grouped path's sort) is built by
    :meth:`meta` on first use and cached here, so all MoE-LoRA layers of one forward, and their backward, share it.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    _meta: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.ids.shape != self.weights.shape or self.ids.dim() != 3:
            raise ValueError(
                f"routing ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} must both be [B, S, k]"
            )

    def token_routing(self, lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights [..., k] for a layer input with leading dims ``lead`` ([B, S] or [B * S])."""
        ids, weights = self.ids, self.weights
        if len(lead) == 2 and ids.shape[0] == lead[0] and ids.shape[1] in (1, lead[1]):
            shape = (*lead, ids.shape[-1])
            return ids.expand(shape), weights.expand(shape)
        if len(lead) == 1 and ids.shape[0] * ids.shape[1] == lead[0]:
            return ids.reshape(lead[0], -1), weights.reshape(lead[0], -1)
        raise ValueError(
            f"routing [B, S, k] = {tuple(ids.shape)} does not fit the layer input {tuple(lead)} + (d_in,); the model "
            "must set one routing per batch row (S = 1) or per token"
        )

    def meta(self, lead: tuple[int, ...], num_experts: int) -> RoutingMeta:
        """The per-step metadata for layer inputs with leading dims ``lead`` over ``num_experts`` experts, built
        once (ids checked against [0, E) then, with a device-side assert off the CPU) and cached on this routing."""
        key = (*lead, num_experts)
        if key not in self._meta:
            ids, weights = self.token_routing(tuple(lead))
            k = ids.shape[-1]
            self._meta[key] = RoutingMeta(ids.reshape(-1, k), weights.reshape(-1, k), num_experts).store
        return RoutingMeta.from_store(self._meta[key])

    @classmethod
    def per_row(cls, expert_of_row: torch.Tensor, weight_of_row: torch.Tensor | None = None) -> Routing:
        """One expert per batch row (sequence routing's batched pass): ids [N] -> [N, 1, 1]."""
        ids = expert_of_row.reshape(-1, 1, 1)
        weights = torch.ones(ids.shape, device=ids.device) if weight_of_row is None else weight_of_row.reshape(-1, 1, 1)
        return cls(ids, weights)


class RoutingContext:
    """Routing state read by every MoE-LoRA layer of one model.

    ``routing``: the current :class:`Routing`, or None to use ``active_expert`` alone with weight 1 (plain LoRA,
    ``ExpertManager.set_active_expert``). ``adapters_enabled``: False runs the frozen base layers only (the
    routing pass).
    """

    def __init__(self):
        self.routing: Routing | None = None
        self.active_expert: int = 0
        self.adapters_enabled: bool = True
        self._active_routing: dict = {}

    def set(self, routing: Routing | None) -> None:
        self.routing = routing

    def set_active_expert(self, expert_id: int) -> None:
        """Route every token to ``expert_id`` alone (clears any per-token routing)."""
        self.active_expert = int(expert_id)
        self.routing = None
        self._active_routing = {}

    def active_routing(self, lead: tuple[int, ...], device: torch.device) -> Routing:
        """The routing of ``active_expert`` alone with weight 1 for inputs of leading dims ``lead`` (cached, so
        layers share it and its metadata)."""
        key = (tuple(lead), device)
        if key not in self._active_routing:
            ids = torch.full((*lead, 1), self.active_expert, dtype=torch.long, device=device)
            ids = ids.view(-1, 1, 1) if len(lead) != 2 else ids
            self._active_routing[key] = Routing(ids, torch.ones(ids.shape, device=device))
        return self._active_routing[key]

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run the base model without any LoRA delta (for the routing pass; restores the previous state)."""
        previous = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield
        finally:
            self.adapters_enabled = previous

    @contextlib.contextmanager
    def routed(self, routing: Routing | None):
        """Use ``routing`` inside the block, then restore the previous routing."""
        previous = self.routing
        self.routing = routing
        try:
            yield
        finally:
            self.routing = previous
