"""MoELoRALinear: a frozen linear layer plus E LoRA experts stored as stacked tensors.

Shape letters: B batch, S sequence, E experts, k experts per token, R rank, D_in / D_out widths.

    y = base(x) + sum_j w[t, j] * s_e * B[e] A[e] dropout(x)[t],   e = e[t, j],  s_e = alpha_e / r_e

The LoRA delta is one call of the op :func:`dylora_moe.kernels.moe_lora` (Triton or eager); the layer knows nothing
of Triton. The experts of each token come from the model's :class:`~dylora_moe.modules.routing.RoutingContext`, so HF
model code runs unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks
from transformers.pytorch_utils import Conv1D

from ..config import LAYER_BACKENDS
from ..kernels import moe_lora, resolve_backend
from .routing import RoutingContext


def check_backend(backend: str, said: str = "backend") -> str:
    """Validate a backend name (:data:`dylora_moe.config.BACKENDS`, or "loop") and return what a layer runs for it
    ("reference" gives "loop", the per-expert loop). "auto" stays "auto": each forward resolves it from the device
    of its input (triton for CUDA tensors, eager otherwise), so a CPU model on a GPU machine runs eager. ``said``:
    the argument's name in the error (``kernel`` where the caller used the former name)."""
    if backend not in LAYER_BACKENDS:
        raise ValueError(f"unknown {said} {backend!r}; expected one of {', '.join(LAYER_BACKENDS)}")
    return LAYER_BACKENDS[backend]


def check_kernel(kernel: str) -> str:
    """The former name of :func:`check_backend`."""
    return check_backend(kernel, said="kernel")


def backend_argument(backend: str, kernel: str | None) -> tuple[str, str]:
    """(name, the argument it came from): ``kernel=``, the former name of ``backend=``, wins when given."""
    return (kernel, "kernel") if kernel is not None else (backend, "backend")


def base_dims(base_layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored transposed, [d_in, d_out])."""
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    if isinstance(base_layer, Conv1D):
        return base_layer.weight.shape[0], base_layer.weight.shape[1]
    raise TypeError(f"MoELoRALinear wraps nn.Linear or transformers Conv1D, got {type(base_layer).__name__}")


def compute_dtype(base_layer: nn.Module) -> torch.dtype:
    """The float dtype ``base_layer`` computes in, which is not always its weight's storage dtype: a quantized layer
    (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``) stores packed integers and computes in its ``compute_dtype``
    (4-bit) or in its float bias's dtype; failing both, torch's default float dtype (8-bit casts its input itself)."""
    weight = base_layer.weight
    if weight.is_floating_point():
        return weight.dtype
    declared = getattr(base_layer, "compute_dtype", None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    bias = getattr(base_layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        return bias.dtype
    return torch.get_default_dtype()


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """The dtype of the trainable experts over ``base_layer``: its compute dtype (:func:`compute_dtype`), except
    float32 over a half-precision one (as peft's autocast_adapter_dtype keeps adapters): an optimizer step of lr 2e-5
    is below bf16's resolution. The ops read them as they are (no per-step cast)."""
    dtype = compute_dtype(base_layer)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    return r


class MoELoRALinear(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) with ``num_experts`` LoRA experts.

    Parameters ``lora_A`` [E, R, D_in] (Kaiming-uniform, as LoRA) and ``lora_B`` [E, D_out, R] (zeros, so a fresh
    layer equals its base layer), R = the largest expert rank. Expert e has its own rank ``expert_ranks[e]`` and
    alpha ``expert_alphas[e]``: rows/columns past its rank are zero (and get zero gradient), and the float32
    buffer ``expert_scaling`` [E] holds alpha_e / r_e. ``r``/``alpha``/``scaling`` are the defaults of new experts.
    ``backend``: "auto" (triton for CUDA inputs, eager otherwise, per forward) | "triton" | "eager" |
    "reference" or "loop" (a Python loop over experts with LoRA's two matmuls each; slow, for checks); ``kernel`` is
    its former name.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        backend: str = "auto",
        context: RoutingContext | None = None,
        expert_ranks: list[int] | None = None,
        expert_alphas: list[float] | None = None,
        *,
        kernel: str | None = None,
    ):
        """Wrap ``base_layer`` (frozen in place) with ``num_experts`` experts of rank ``r`` and alpha ``alpha``
        (``expert_ranks`` / ``expert_alphas``: one value per expert instead), LoRA ``dropout`` on the input, the
        ``backend`` that runs the mixture, and the routing ``context`` shared with the model's other layers (a new
        one when None)."""
        super().__init__()
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {num_experts}")
        _check_rank(r)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        ranks = [r] * num_experts if expert_ranks is None else [_check_rank(x) for x in expert_ranks]
        alphas = [float(alpha)] * num_experts if expert_alphas is None else [float(a) for a in expert_alphas]
        if len(ranks) != num_experts or len(alphas) != num_experts:
            raise ValueError(
                f"expert_ranks ({len(ranks)}) and expert_alphas ({len(alphas)}) must give one value per expert "
                f"(num_experts={num_experts})"
            )
        self.d_in, self.d_out = base_dims(base_layer)
        self.base_layer = base_layer.requires_grad_(False)
        self.r, self.alpha, self.dropout = r, float(alpha), float(dropout)
        self.scaling = self.alpha / r
        self.context = context if context is not None else RoutingContext()
        self.backend = check_backend(*backend_argument(backend, kernel))
        self.expert_ranks, self.expert_alphas = ranks, alphas
        weight = base_layer.weight
        dtype = adapter_dtype(base_layer)
        max_rank = max(ranks, default=r)
        self.lora_A = nn.Parameter(torch.zeros(num_experts, max_rank, self.d_in, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.d_out, max_rank, dtype=dtype, device=weight.device))
        for e, rank in enumerate(ranks):
            self._init_a(self.lora_A.data[e, :rank])
        # Not persistent: checkpoints carry ranks and alphas per expert (checkpoint.py), and state dicts written
        # before per-expert ranks existed still load.
        self.register_buffer("expert_scaling", self._scaling_vector(weight.device), persistent=False)

    @staticmethod
    def _init_a(a: torch.Tensor) -> None:
        # peft/torchtune LoRA init: Kaiming-uniform with a = sqrt(5) on [R, D_in] (bound 1/sqrt(D_in)).
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def _scaling_vector(self, device) -> torch.Tensor:
        values = [a / r for a, r in zip(self.expert_alphas, self.expert_ranks)]
        return torch.tensor(values, dtype=torch.float32, device=device)

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def kernel(self) -> str:
        """The former name of :attr:`backend`."""
        return self.backend

    def set_backend(self, backend: str) -> None:
        self.backend = check_backend(backend)

    def set_kernel(self, kernel: str) -> None:
        """The former name of :meth:`set_backend`."""
        self.backend = check_kernel(kernel)

    @torch.no_grad()
    def add_expert(self, r: int | None = None, alpha: float | None = None) -> int:
        """Append one expert of rank ``r`` and alpha ``alpha`` (default: the layer's r and alpha); A
        Kaiming-uniform, B zeros. A rank above the current largest zero-pads every expert's A rows / B columns
        (exact: the padding stays zero). Returns its id. Replaces the parameter tensors, so an optimizer built
        before must be rebuilt."""
        r = self.r if r is None else _check_rank(r)
        alpha = self.alpha if alpha is None else float(alpha)
        old_a, old_b = self.lora_A.data, self.lora_B.data
        max_rank = max(old_a.shape[1], r)
        a = old_a.new_zeros(self.num_experts + 1, max_rank, self.d_in)
        b = old_b.new_zeros(self.num_experts + 1, self.d_out, max_rank)
        a[:-1, : old_a.shape[1]] = old_a
        b[:-1, :, : old_b.shape[2]] = old_b
        self._init_a(a[-1, :r])
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)
        self.expert_ranks.append(r)
        self.expert_alphas.append(alpha)
        self.expert_scaling = self._scaling_vector(a.device)
        return self.num_experts - 1

    def _routing(self, x: torch.Tensor):
        """The step's routing for x (the model's, or the active expert alone)."""
        routing = self.context.routing
        if routing is None:
            expert = self.context.active_expert
            if not 0 <= expert < self.num_experts:
                raise IndexError(f"active expert {expert} is out of range for {self.num_experts} experts")
            routing = self.context.active_routing(x.shape[:-1], x.device)
        return routing

    def _loop_delta(self, x, routing, mask):
        """LoRA math one expert at a time (dropout -> A -> B -> scale), weighted by the dense gate."""
        gate = routing.meta(x.shape[:-1], self.num_experts).gate
        gate = gate.reshape(*x.shape[:-1], self.num_experts).to(x.dtype)
        x_lora = x if mask is None else x * mask
        delta = x.new_zeros(*x.shape[:-1], self.d_out)
        for e in range(self.num_experts):
            r, scaling = self.expert_ranks[e], self.expert_alphas[e] / self.expert_ranks[e]
            a, b = self.lora_A[e, :r].to(x.dtype), self.lora_B[e, :, :r].to(x.dtype)
            delta = delta + gate[..., e : e + 1] * (F.linear(F.linear(x_lora, a), b) * scaling)
        return delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base_layer(x)`` plus each token's routed mixture of expert deltas (experts and weights from the routing
        context); the base layer alone when adapters are disabled or there are no experts."""
        if not self.context.adapters_enabled or self.num_experts == 0:
            return self.base_layer(x)
        routing = self._routing(x)
        backend = resolve_backend(self.backend, x.device) if self.backend != "loop" else "loop"
        dropout = self.training and self.dropout > 0.0
        if backend == "triton":
            # Dropout drawn inside the kernels from a per-forward seed (activation checkpointing replays the
            # RNG, so a recomputed forward draws the same mask); nothing of size [T, d_in] is built or saved.
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device) if dropout else None
            mask = None
        else:
            seed = None
            keep = 1.0 - self.dropout
            mask = torch.empty_like(x).bernoulli_(keep).div_(keep) if dropout else None
        if backend == "loop":
            out = self.base_layer(x)
            return out + self._loop_delta(x, routing, mask).to(out.dtype)
        meta = routing.meta(x.shape[:-1], self.num_experts)
        # The base layer on flat tokens: nn.Linear then returns a fresh [T, d_out] tensor (not a view), which the
        # op may write the sum into when nobody else can hold it (donated).
        x2 = x.reshape(-1, self.d_in)
        out = moe_lora(
            x2,
            self.lora_A,
            self.lora_B,
            meta.ids,
            meta.weights,
            self.expert_scaling,
            dropout_mask=None if mask is None else mask.reshape(x2.shape),
            backend=backend,
            routing=meta,
            base_output=self.base_layer(x2),
            dropout_p=self.dropout if seed is not None else 0.0,
            dropout_seed=seed,
            donate_base_output=self._base_output_is_private(),
        )
        return out.view(*x.shape[:-1], self.d_out)

    def _base_output_is_private(self) -> bool:
        """Whether the base layer's output is a temporary that only this layer sees, so the op may write into it:
        a plain nn.Linear / Conv1D forward (its backward saves its input and weight, never its output), not
        replaced on the instance (as accelerate's hooks do), and no forward hook, of the module or global, that
        could keep the output or feed it to an op that saves it for backward. Attribute reads only."""
        base = self.base_layer
        return (
            type(base) in (nn.Linear, Conv1D)
            and "forward" not in base.__dict__
            and not base._forward_hooks
            and not _global_forward_hooks
        )

    def extra_repr(self) -> str:
        ranks = "" if len(set(self.expert_ranks)) <= 1 else f", expert_ranks={self.expert_ranks}"
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, num_experts={self.num_experts}, r={self.r}, alpha={self.alpha}"
            f"{ranks}, dropout={self.dropout}, backend={self.backend!r}"
        )
