"""MoELoRAMLP: FFN experts in the MixLoRA style, each expert a LoRA on the gate/up/down projections of a gated MLP.

Shape letters: T tokens, k experts per token, D model width, F the MLP's hidden width.

    y[t] = sum_j w[t, j] * MLP_e(x[t]),   e = e[t, j],
    MLP_e(x) = down_e(act(gate_e(x)) * up_e(x)),   proj_e(x) = proj(x) + s_e * B_e A_e x

Unlike the linear mixture (each projection mixes the experts' LoRA deltas), the experts' whole MLP outputs are mixed
after the nonlinearity. The weights should sum to 1 per token (renormalised top-k, as MixLoRA): the frozen MLP is
inside every expert, so unnormalised weights would scale the base model's MLP output too.

Computation: one row per (token, slot) [T * k, D]; each row goes through the three projections with its own expert
(routing k = 1, weight 1 on that row), which are ordinary :class:`~dylora_moe.modules.layer.MoELoRALinear` layers
running the ``moe_lora`` op; the k rows of a token are then summed with its routing weights. The frozen gate/up GEMMs
run on the T * k rows too (k times a plain MLP's).
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import MoELoRALinear, backend_argument, check_backend
from .routing import Routing, RoutingContext


def is_gated_mlp(module: nn.Module) -> bool:
    """A Llama-style MLP: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with nn.Linear projections."""
    return all(isinstance(getattr(module, p, None), nn.Linear) for p in MoELoRAMLP.PROJECTIONS) and callable(
        getattr(module, "act_fn", None)
    )


class MoELoRAMLP(nn.Module):
    """A frozen gated MLP with ``num_experts`` FFN experts (see the module docstring).

    ``gate_proj``, ``up_proj``, ``down_proj`` are :class:`MoELoRALinear` layers over the MLP's own projections (so a
    saved expert is a plain peft LoRA on the three projections); ``act_fn`` is the MLP's. The experts of each token
    come from ``context`` like every MoE-LoRA layer's ([B, S, k] routing, per-row routing, or the active expert).
    """

    PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

    def __init__(
        self,
        mlp: nn.Module,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        backend: str = "auto",
        context: RoutingContext | None = None,
        *,
        kernel: str | None = None,
    ):
        """Put ``num_experts`` LoRA experts (rank ``r``, alpha ``alpha``, input ``dropout``) on each projection of the
        gated ``mlp``, run by ``backend`` (``kernel``: its former name), routed by ``context`` (a new one when
        None)."""
        super().__init__()
        if not is_gated_mlp(mlp):
            raise TypeError(
                f"MoELoRAMLP wraps a gated MLP (gate_proj, up_proj, down_proj nn.Linear and act_fn), got "
                f"{type(mlp).__name__}"
            )
        self.context = context if context is not None else RoutingContext()
        backend = check_backend(*backend_argument(backend, kernel))
        for proj in self.PROJECTIONS:
            layer = MoELoRALinear(getattr(mlp, proj), num_experts, r, alpha, dropout, backend, self.context)
            setattr(self, proj, layer)
        self.act_fn = mlp.act_fn

    @property
    def num_experts(self) -> int:
        return self.gate_proj.num_experts

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    def _routing_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights [T, k] for the T = x.numel() / D tokens of ``x``."""
        lead = x.shape[:-1]
        routing = self.context.routing
        if routing is None:
            expert = self.context.active_expert
            if not 0 <= expert < self.num_experts:
                raise IndexError(f"active expert {expert} is out of range for {self.num_experts} experts")
            ids = torch.full((lead.numel(), 1), expert, dtype=torch.long, device=x.device)
            return ids, torch.ones(ids.shape, device=x.device)
        ids, weights = routing.ids, routing.weights
        if x.dim() == 3 and ids.shape[0] == x.shape[0] and ids.shape[1] in (1, x.shape[1]):
            shape = (*lead, ids.shape[-1])
            return ids.expand(shape).reshape(-1, shape[-1]), weights.expand(shape).reshape(-1, shape[-1])
        if x.dim() == 2 and ids.shape[0] * ids.shape[1] == x.shape[0]:
            return ids.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        raise ValueError(
            f"routing [B, S, k] = {tuple(ids.shape)} does not fit the MLP input {tuple(x.shape)}; the model must set "
            "one routing per batch row (S = 1) or per token"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP of each token under each of its experts, summed with its routing weights (the frozen MLP alone
        when adapters are disabled or there are no experts)."""
        if not self.context.adapters_enabled or self.num_experts == 0:
            return self._mlp(x)  # the projections run their frozen base layers alone
        ids, weights = self._routing_for(x)
        k = ids.shape[-1]
        rows = x.reshape(-1, x.shape[-1]).repeat_interleave(k, dim=0)  # [T * k, D]: one row per (token, slot)
        per_row = Routing(ids.reshape(-1, 1, 1), torch.ones(ids.numel(), 1, 1, device=x.device))
        with self.context.routed(per_row):
            out = self._mlp(rows)
        out = out.view(-1, k, out.shape[-1]) * weights.reshape(-1, k, 1).to(out.dtype)
        return out.sum(1).view(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, mixture='ffn'"
