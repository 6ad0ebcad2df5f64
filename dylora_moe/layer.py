"""MoELoRALinear: a frozen linear layer plus E LoRA experts stored as stacked tensors.

Shape letters: B batch, S sequence, E experts, k experts per token, R rank, D_in / D_out widths.

    y = base(x) + s * sum_j w[t, j] * B[e[t, j]] A[e[t, j]] dropout(x)[t],   s = alpha / R

The LoRA delta is one call of the op :func:`dylora_moe.kernels.moe_lora` (Triton or eager); the layer knows nothing
of Triton. The experts of each token come from the model's :class:`~dylora_moe.routing.RoutingContext`, so HF model
code runs unchanged.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .kernels import moe_lora
from .kernels.routing_meta import dense_gate
from .routing import RoutingContext

logger = logging.getLogger(__name__)

KERNELS = ("auto", "triton", "eager", "reference")


@functools.lru_cache(maxsize=1)
def _auto_backend() -> str:
    """What kernel="auto" means on this machine; logged once per process."""
    backend = "triton" if torch.cuda.is_available() else "eager"
    logger.info("kernel='auto' resolved to %r (CUDA available: %s)", backend, torch.cuda.is_available())
    return backend


def check_kernel(kernel: str) -> str:
    """Validate a module kernel name; return the backend it runs ("auto" resolved)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    return _auto_backend() if kernel == "auto" else kernel


def base_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored transposed, [d_in, d_out])."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    raise TypeError(f"MoELoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")


class MoELoRALinear(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) with ``num_experts`` LoRA experts of rank ``r``.

    Parameters ``lora_A`` [E, R, D_in] (Kaiming-uniform, as LoRA) and ``lora_B`` [E, D_out, R] (zeros, so a fresh
    layer equals its base layer). ``kernel``: "auto" | "triton" | "eager" | "reference" (a Python loop over experts
    with LoRA's two matmuls each; slow, for checks).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        kernel: str = "auto",
        context: RoutingContext | None = None,
    ):
        super().__init__()
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {num_experts}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.d_in, self.d_out = base_dims(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scaling = self.alpha / r
        self.context = context if context is not None else RoutingContext()
        self.kernel = kernel
        self._backend = check_kernel(kernel)
        weight = base_layer.weight
        # Trainable weights stay float32 over a half-precision base (as peft's autocast_adapter_dtype does): an
        # optimizer step of lr 2e-5 is below bf16's resolution. forward casts them to the activations' dtype.
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, self.d_in, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.d_out, r, dtype=dtype, device=weight.device))
        for e in range(num_experts):
            self._init_a(self.lora_A.data[e])

    @staticmethod
    def _init_a(a: torch.Tensor) -> None:
        # peft/torchtune LoRA init: Kaiming-uniform with a = sqrt(5) on [R, D_in] (bound 1/sqrt(D_in)).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def set_kernel(self, kernel: str) -> None:
        self._backend = check_kernel(kernel)
        self.kernel = kernel

    @torch.no_grad()
    def add_expert(self) -> int:
        """Append one expert (A Kaiming-uniform, B zeros); returns its id. Replaces the parameter tensors, so an
        optimizer built before must be rebuilt."""
        a = torch.empty(1, self.r, self.d_in, dtype=self.lora_A.dtype, device=self.lora_A.device)
        self._init_a(a[0])
        b = torch.zeros(1, self.d_out, self.r, dtype=self.lora_B.dtype, device=self.lora_B.device)
        self.lora_A = nn.Parameter(torch.cat([self.lora_A.data, a]), requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(torch.cat([self.lora_B.data, b]), requires_grad=self.lora_B.requires_grad)
        return self.num_experts - 1

    def _routing_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ids and weights [..., k] matching x's leading dims."""
        lead = x.shape[:-1]
        routing = self.context.routing
        if routing is None:
            expert = self.context.active_expert
            if not 0 <= expert < self.num_experts:
                raise IndexError(f"active expert {expert} is out of range for {self.num_experts} experts")
            ids = torch.full((*lead, 1), expert, dtype=torch.long, device=x.device)
            return ids, torch.ones(ids.shape, device=x.device)
        ids, weights = routing.ids, routing.weights
        if x.dim() == 3 and ids.shape[0] == x.shape[0] and ids.shape[1] in (1, x.shape[1]):
            shape = (*lead, ids.shape[-1])
            return ids.expand(shape), weights.expand(shape)
        if x.dim() == 2 and ids.shape[0] * ids.shape[1] == x.shape[0]:
            return ids.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        raise ValueError(
            f"routing [B, S, k] = {tuple(ids.shape)} does not fit the layer input {tuple(x.shape)}; the model must set "
            "one routing per batch row (S = 1) or per token"
        )

    def _dropout_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return torch.empty_like(x).bernoulli_(keep).div_(keep)

    def _reference_delta(self, x, ids, weights, mask):
        """LoRA math one expert at a time (dropout -> A -> B -> scale), weighted by the dense gate."""
        gate = dense_gate(ids.reshape(-1, ids.shape[-1]), weights.reshape(-1, ids.shape[-1]), self.num_experts)
        gate = gate.reshape(*x.shape[:-1], self.num_experts).to(x.dtype)
        x_lora = x if mask is None else x * mask
        delta = x.new_zeros(*x.shape[:-1], self.d_out)
        for e in range(self.num_experts):
            lora = F.linear(F.linear(x_lora, self.lora_A[e].to(x.dtype)), self.lora_B[e].to(x.dtype)) * self.scaling
            delta = delta + gate[..., e : e + 1] * lora
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.context.adapters_enabled or self.num_experts == 0:
            return out
        ids, weights = self._routing_for(x)
        mask = self._dropout_mask(x)
        if self._backend == "reference":
            delta = self._reference_delta(x, ids, weights, mask)
        else:
            delta = moe_lora(
                x,
                self.lora_A.to(x.dtype),
                self.lora_B.to(x.dtype),
                ids,
                weights,
                self.scaling,
                dropout_mask=mask,
                backend=self._backend,
                validate_ids=False,
            )
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, num_experts={self.num_experts}, r={self.r}, alpha={self.alpha}, "
            f"dropout={self.dropout}, kernel={self.kernel!r}"
        )
