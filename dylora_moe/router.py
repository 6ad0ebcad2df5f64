"""DynamicHybridRouter (the original's API) on the fused top-k op, and the auxiliary router losses.

Shape letters: T tokens, E experts, k experts per token, H router input width.

Routing rule (DESIGN 2): while any expert is immature (maturity 0) every token uses all experts with
``softmax(logits / temperature)``; once all are mature, each token keeps its top-k experts, weighted by

  - ``weighting="original"``: softmax over the k selected logits, no temperature (the original). With k = 1 the
    weight is the constant 1, so the language-model loss gives the gate no gradient.
  - ``weighting="softmax"``: the k largest probabilities of the full tempered softmax, renormalised over the k
    when ``renormalize`` (Switch/Mixtral). Without renormalisation k = 1 trains the gate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .kernels import topk_route
from .original_files import is_safetensors_file, load_torch_file, require_keys

WEIGHTINGS = ("original", "softmax")
ORIGINAL_ROUTER_KEYS = ("gate_state_dict", "expert_maturity", "num_experts", "input_size", "top_k", "temperature")


@dataclass
class RouterOutput:
    """One routing decision for T tokens: ``logits`` [T, E]; ``ids``/``weights`` [T, k] (k = E in dense mode);
    ``dense`` [T, E] the scattered weights; ``counts`` [E] tokens per expert; ``mean_prob`` [E] mean of the tempered
    softmax (Switch loss); ``dense_mode`` whether the dense (immature) rule was used."""

    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    dense: torch.Tensor
    counts: torch.Tensor
    mean_prob: torch.Tensor
    dense_mode: bool


class DynamicHybridRouter(nn.Module):
    """Gate ``nn.Linear(input_size, num_experts)`` with per-expert maturity; dense while any expert is new, top-k after.

    Extra keywords: ``weighting`` ("softmax", the default | "original"), ``renormalize`` (for "softmax"),
    ``backend`` of the fused router op ("auto" | "triton" | "eager"). The original's sparse rule, whose k = 1 weight
    gives the gate no gradient, is ``weighting="original"`` (see the module docstring).
    """

    def __init__(
        self,
        input_size: int,
        num_experts: int,
        top_k: int = 1,
        temperature: float = 2.0,
        *,
        weighting: str = "softmax",
        renormalize: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        self.input_size = input_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.weighting = weighting
        self.renormalize = bool(renormalize)
        self.backend = backend
        self.gate = nn.Linear(input_size, num_experts)
        self.register_buffer("expert_maturity", torch.zeros(num_experts))

    @property
    def all_mature(self) -> bool:
        return bool((self.expert_maturity > 0).all())

    def route(self, x: torch.Tensor) -> RouterOutput:
        """Route the tokens of ``x`` [..., H] (flattened to [T, H])."""
        logits = self.gate(x.reshape(-1, x.shape[-1]).to(self.gate.weight.dtype))
        dense_mode = not self.all_mature
        if dense_mode:
            # k = E of the tempered softmax without renormalisation is the dense softmax itself.
            res = topk_route(
                logits, self.num_experts, temperature=self.temperature, normalize=False, backend=self.backend
            )
        elif self.weighting == "original":
            # The original, literally: the fused op picks the top-k (of the logits: temperature 1), then the weights
            # are a softmax over the k selected logits, whose gradient is exactly 0 at k = 1.
            res = topk_route(logits, self.top_k, temperature=1.0, normalize=True, backend=self.backend)
            weights = torch.softmax(logits.gather(1, res.ids).float(), dim=-1)
            dense = torch.zeros_like(res.dense).scatter(1, res.ids, weights)
            return RouterOutput(logits, res.ids, weights, dense, res.counts, res.mean_prob, False)
        else:
            res = topk_route(
                logits, self.top_k, temperature=self.temperature, normalize=self.renormalize, backend=self.backend
            )
        return RouterOutput(logits, res.ids, res.weights, res.dense, res.counts, res.mean_prob, dense_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights with the shape of ``x`` but last dim ``num_experts`` (the original's output)."""
        return self.route(x).dense.reshape(*x.shape[:-1], self.num_experts)

    @torch.no_grad()
    def add_expert(self, device=None) -> int:
        """Grow the gate by one output (old rows kept, the new row initialised like nn.Linear); returns its id."""
        old = self.gate
        device = old.weight.device if device is None else device
        new = nn.Linear(self.input_size, self.num_experts + 1, device=device, dtype=old.weight.dtype)
        new.weight[: self.num_experts].copy_(old.weight)
        new.bias[: self.num_experts].copy_(old.bias)
        new.requires_grad_(old.weight.requires_grad)  # a frozen gate stays frozen as it grows
        self.gate = new
        self.expert_maturity = torch.cat([self.expert_maturity.to(device), torch.zeros(1, device=device)])
        self.num_experts += 1
        return self.num_experts - 1

    def set_expert_maturity(self, expert_id: int, maturity: float) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert {expert_id} is out of range for {self.num_experts} experts")
        self.expert_maturity[expert_id] = float(maturity)

    def config(self) -> dict:
        return {
            "input_size": self.input_size,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "weighting": self.weighting,
            "renormalize": self.renormalize,
        }

    def save(self, path, original_format: bool = False) -> None:
        """One safetensors file: gate weight/bias and maturity, with the constructor arguments in its metadata.

        ``original_format=True`` writes the original's ``torch.save`` dict instead (readable by the original code;
        it has no field for ``weighting``/``renormalize``, which the original did not have)."""
        if original_format:
            torch.save(self._original_state(), str(path))
            return
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"config": json.dumps(self.config())})

    def _original_state(self) -> dict:
        gate = {k: v.detach().cpu() for k, v in self.gate.state_dict().items()}
        return {
            "gate_state_dict": gate,
            "expert_maturity": self.expert_maturity.detach().cpu(),
            "num_experts": self.num_experts,
            "input_size": self.input_size,
            "top_k": self.top_k,
            "temperature": self.temperature,
        }

    @classmethod
    def load(cls, path, device=None) -> DynamicHybridRouter:
        """Read a router saved by :meth:`save` (safetensors) or by the original (a ``torch.save`` dict, read with
        ``weights_only=True``; the router then uses ``weighting="original"``). The file format is told by content."""
        router = cls._load_safetensors(path) if is_safetensors_file(path) else cls._load_original(path)
        return router.to(device) if device is not None else router

    @classmethod
    def _load_safetensors(cls, path) -> DynamicHybridRouter:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" not in meta:
            raise ValueError(f"{path} is not a DynamicHybridRouter file (no 'config' in its safetensors metadata)")
        router = cls(**json.loads(meta["config"]))
        router.load_state_dict(load_file(str(path)))
        return router

    @classmethod
    def _load_original(cls, path) -> DynamicHybridRouter:
        state = load_torch_file(path)
        require_keys(state, ORIGINAL_ROUTER_KEYS, path, "DynamicHybridRouter (original torch.save)")
        router = cls(
            int(state["input_size"]), int(state["num_experts"]), int(state["top_k"]), float(state["temperature"]),
            weighting="original",
        )  # fmt: skip
        gate = state["gate_state_dict"]
        require_keys(gate, ("weight", "bias"), path, "DynamicHybridRouter gate_state_dict")
        maturity = torch.as_tensor(state["expert_maturity"], dtype=torch.float32).reshape(-1)
        expected = (router.num_experts, router.input_size)
        if tuple(gate["weight"].shape) != expected or maturity.numel() != router.num_experts:
            raise ValueError(
                f"{path}: gate weight {tuple(gate['weight'].shape)} and maturity of {maturity.numel()} experts do not "
                f"match num_experts={router.num_experts}, input_size={router.input_size} (expected {expected})"
            )
        router.gate.load_state_dict({"weight": gate["weight"], "bias": gate["bias"]})
        router.expert_maturity.copy_(maturity)
        return router


def balance_loss(route: RouterOutput, form: str = "mse") -> torch.Tensor:
    """Load-balancing loss over the routed (non-padding) tokens.

    ``"mse"`` (the original): mean over experts of (mean routing weight - 1/E)^2.
    ``"switch"``: E * sum_e f_e * P_e, f_e the fraction of (token, slot) picks of expert e, P_e its mean probability.
    """
    num_experts = route.dense.shape[-1]
    if route.dense.shape[0] == 0:
        return route.dense.sum() * 0.0
    if form == "mse":
        return ((route.dense.mean(0) - 1.0 / num_experts) ** 2).mean()
    if form == "switch":
        picks = route.counts.to(route.mean_prob.dtype)
        return num_experts * (picks / picks.sum() * route.mean_prob).sum()
    raise ValueError(f"unknown balance loss {form!r}; expected 'mse' or 'switch'")


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2; keeps the gate's logits small."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return (torch.logsumexp(logits.float(), dim=-1) ** 2).mean()


def router_entropy(route: RouterOutput) -> torch.Tensor:
    """Mean entropy (nats) of the per-token routing weights: log E for uniform, 0 for one expert."""
    w = route.dense.clamp_min(1e-12)
    return -(route.dense * w.log()).sum(-1).mean() if route.dense.shape[0] else w.sum() * 0.0
