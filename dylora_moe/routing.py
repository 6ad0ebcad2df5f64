"""The routing context: how a model tells its MoE-LoRA layers which experts each token uses.

HF model code calls ``q_proj(x)`` with no routing argument, so the model sets the routing on a
:class:`RoutingContext` shared by its layers, and each layer reads it in ``forward``. One context belongs to one
injected model (no module-level state).

The routing set by a forward stays in place until the next one replaces it: activation checkpointing recomputes
layer forwards during backward, after the model's forward has returned, and they must see the same routing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """Experts of each token: ``ids`` (integer) and ``weights`` (float), both [B, S, k].

    S may be 1 to give every position of a row the same experts (sequence routing, decoding); the layer broadcasts
    it over the input's sequence length.
    """

    ids: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        if self.ids.shape != self.weights.shape or self.ids.dim() != 3:
            raise ValueError(
                f"routing ids {tuple(self.ids.shape)} and weights {tuple(self.weights.shape)} must both be [B, S, k]"
            )

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

    def set(self, routing: Routing | None) -> None:
        self.routing = routing

    def set_active_expert(self, expert_id: int) -> None:
        """Route every token to ``expert_id`` alone (clears any per-token routing)."""
        self.active_expert = int(expert_id)
        self.routing = None

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
