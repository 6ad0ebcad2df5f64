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
from typing import TYPE_CHECKING

import torch

from ..kernels.routing_meta import RoutingMeta

if TYPE_CHECKING:
    from .router import DynamicHybridRouter, RouterOutput


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


# ----- routing decisions: which experts the model routes each token / sequence to ---------------------------------
#
# Every function here keeps shapes static: the router routes every position (padding included) and padding gets
# weight 0, instead of gathering the real tokens with ``hidden[mask]`` / ``nonzero``. So a training step needs no
# host sync (CUDA graphs, ``torch.compile(fullgraph=True)``); see DyLoRA_MoE's docstring for the one exception.


@dataclass
class RoutingDecision:
    """The router's output over all B*S positions (``route``, None when E = 1; padding has weight 0 there and is
    left out of its statistics) and the mask it came from."""

    route: RouterOutput | None
    real: torch.Tensor  # [B, S] bool, True on real tokens


def decide_routing(router: DynamicHybridRouter | None, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """Route the real tokens of ``hidden`` [B, S, H] (last hidden states of the routing pass); ``router`` None
    means a single expert (no routing)."""
    real = attention_mask.bool()
    if router is None:
        return RoutingDecision(None, real)
    return RoutingDecision(router.route(hidden, mask=real), real)


def sequence_weights(decision: RoutingDecision, num_experts: int, sequence_top_k: int | None = None) -> torch.Tensor:
    """[B, E] per-sequence weights: routing weights averaged over each sequence's real tokens, normalised to sum
    to 1 (optionally only its ``sequence_top_k`` best, renormalised). An all-padding row gets all zeros."""
    real = decision.real
    batch = real.shape[0]
    if decision.route is None:
        return torch.ones(batch, 1, device=real.device)
    sums = decision.route.dense.reshape(batch, -1, num_experts).sum(1)  # padding positions have weight 0
    # Divided by the row's total weight, not its token count: the same mean when every token's weights sum to 1
    # (dense, or renormalised top-k, as in the original), and the logit mixture stays a convex combination with
    # unnormalised top-k probabilities too (else the logits would shrink by the sum of the weights).
    weights = sums / sums.sum(-1, keepdim=True).clamp_min(1e-20)
    if sequence_top_k is not None and sequence_top_k < num_experts:
        top, idx = weights.topk(sequence_top_k, dim=-1)
        weights = torch.zeros_like(weights).scatter(1, idx, top / top.sum(-1, keepdim=True).clamp_min(1e-20))
    return weights


def sequence_pairs(seq_weights: torch.Tensor, sequence_top_k: int | None):
    """The (sequence, expert) pairs the sequence-routing pass runs: (rows [N], experts [N], weights [N]).

    With ``sequence_top_k`` = k: every row's k best experts, N = B * k, a static size (no host sync; a pair of
    weight 0, as in an all-padding row, runs and adds nothing). Without it: the pairs of non-zero weight, found
    with ``nonzero`` (one host sync, and a row count that changes from batch to batch).
    """
    if sequence_top_k is None:
        rows, experts = seq_weights.nonzero(as_tuple=True)
        return rows, experts, seq_weights[rows, experts]
    weights, experts = seq_weights.topk(sequence_top_k, dim=-1)
    rows = torch.arange(seq_weights.shape[0], device=seq_weights.device)[:, None].expand_as(experts)
    return rows.reshape(-1), experts.reshape(-1), weights.reshape(-1)


def token_routing(decision: RoutingDecision) -> Routing:
    """[B, S, k] experts of every token (padding: the router's pick with weight 0; E = 1: expert 0, weight 1)."""
    real = decision.real
    batch, seq = real.shape
    if decision.route is None:
        zeros = torch.zeros(batch, 1, 1, dtype=torch.long, device=real.device)
        return Routing(zeros, torch.ones(zeros.shape, device=real.device))
    k = decision.route.ids.shape[-1]
    return Routing(decision.route.ids.view(batch, seq, k), decision.route.weights.view(batch, seq, k))
