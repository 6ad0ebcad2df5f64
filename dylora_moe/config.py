"""DyLoRAMoEConfig: every setting of a DyLoRA_MoE in one validated dataclass (in the style of peft's LoraConfig).

``DyLoRA_MoE(base, config=DyLoRAMoEConfig(...))`` or the original's keywords (``DyLoRA_MoE(base, num_experts=4)``);
``model.moe_config`` gives the settings back, ``to_dict``/``from_dict`` round-trip them through JSON (the
checkpoint's config file). ``DyLoRAMoEConfig.original()`` reproduces the original DyLoRA-MoE's numbers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .modules.layer import KERNELS
from .modules.router import WEIGHTINGS

ROUTINGS = ("sequence", "token")
BALANCE_LOSSES = ("mse", "switch", "loss_free", "none")
MIXTURES = ("linear", "ffn")
GROWTH_RANKS = ("same", "original")


def original_growth_rank(lora_r: int, num_experts: int) -> int:
    """The original's rank for a grown expert: ``lora_r`` for the first expert, else ``min(2 * lora_r, 32)``."""
    return lora_r if num_experts == 0 else min(2 * lora_r, 32)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DyLoRAMoEConfig:
    """Settings of a :class:`~dylora_moe.DyLoRA_MoE` (the table in the README says which give which semantics).

    The original's: ``num_experts``, ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``allow_expert_growth``.
    Experts: ``target_modules`` (None: the architecture's defaults, see :func:`~dylora_moe.inject.default_targets`),
    ``mixture`` ("linear": LoRA experts mixed inside each target linear layer | "ffn": MixLoRA-style experts on the
    MLPs, mixed after the nonlinearity), ``expert_ranks`` / ``expert_alphas`` (per-expert r and alpha, one per
    initial expert; None: ``lora_r`` / ``lora_alpha`` for all), ``growth_rank`` (rank of experts added by
    ``add_new_skill``: "same" = ``lora_r``, "original" = the original's rule ``min(2 * lora_r, 32)``, or an int).
    Routing: ``routing`` ("sequence" | "token"), ``top_k``, ``temperature``, ``router_weighting`` ("softmax" |
    "original"), ``renormalize``, ``sequence_top_k``, ``mature_experts``, ``freeze_router`` (keep the gate at its
    initial weights: no gradient, not trained). Balance: ``balance_loss`` ("mse" | "switch" | "loss_free": a per-expert
    selection bias moved by ``balance_update_rate`` after each optimizer step, no loss | "none"),
    ``global_balance`` (count the load over the gradient-accumulation window and all ranks, not per micro-batch; see
    :mod:`dylora_moe.modules.balance`). Losses: ``balance_coefficient`` (of "mse" / "switch"),
    ``z_loss_coefficient``, ``fused_loss`` (False | True | "auto": the LM loss in row chunks without the full
    logits, see ``DyLoRA_MoE.set_fused_loss``). Backend: ``kernel``.
    """

    num_experts: int = 1
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.05
    allow_expert_growth: bool = True
    target_modules: list[str] | None = None
    mixture: str = "linear"
    expert_ranks: list[int] | None = None
    expert_alphas: list[float] | None = None
    growth_rank: str | int = "same"
    kernel: str = "auto"
    routing: str = "sequence"
    top_k: int = 1
    temperature: float = 2.0
    router_weighting: str = "softmax"
    renormalize: bool = False
    sequence_top_k: int | None = None
    balance_loss: str = "loss_free"  # measured: the only form that kept the default job balanced (README, Sweeps)
    balance_coefficient: float = 0.01
    balance_update_rate: float = 0.05
    global_balance: bool = False
    z_loss_coefficient: float = 0.0
    mature_experts: bool = True
    freeze_router: bool = False
    fused_loss: bool | str = False

    def __post_init__(self):
        self._check_experts()
        self._check_routing()
        self._check_losses()

    def _check_experts(self) -> None:
        if not _is_int(self.num_experts) or self.num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {self.num_experts!r}")
        if not _is_int(self.lora_r) or self.lora_r < 1:
            raise ValueError(f"lora_r must be an int >= 1, got {self.lora_r!r}")
        if not _is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.allow_expert_growth, bool):
            raise ValueError(f"allow_expert_growth must be a bool, got {self.allow_expert_growth!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
                raise ValueError(f"target_modules must be None or a list of module names, got {self.target_modules!r}")
            if not self.target_modules:
                raise ValueError("target_modules is empty; pass None for the architecture's defaults")
            self.target_modules = list(self.target_modules)
        if self.mixture not in MIXTURES:
            raise ValueError(f"unknown mixture {self.mixture!r}; expected one of {', '.join(MIXTURES)}")
        for name, check, what in (("expert_ranks", _is_int, "int >= 1"), ("expert_alphas", _is_number, "number > 0")):
            values = getattr(self, name)
            if values is None:
                continue
            values = list(values)
            if len(values) != self.num_experts or not all(check(v) and v > 0 for v in values):
                raise ValueError(f"{name} must be None or {self.num_experts} values (one per expert), each an {what}; "
                                 f"got {values!r}")  # fmt: skip
            setattr(self, name, values)
        if self.growth_rank not in GROWTH_RANKS and not (_is_int(self.growth_rank) and self.growth_rank >= 1):
            raise ValueError(f"growth_rank must be 'same', 'original' or an int >= 1, got {self.growth_rank!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown kernel {self.kernel!r}; expected one of {', '.join(KERNELS)}")
        if self.kernel == "reference" and self.mixture == "ffn":
            raise ValueError("kernel='reference' (peft adapters on linear layers) has no mixture='ffn'")

    def _check_routing(self) -> None:
        if not (isinstance(self.fused_loss, bool) or self.fused_loss == "auto"):  # 1 == True: no plain `in`
            raise ValueError(f"fused_loss must be False, True or 'auto', got {self.fused_loss!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown routing {self.routing!r}; expected one of {', '.join(ROUTINGS)}")
        if not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}], got {self.top_k!r}")
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.router_weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown router_weighting {self.router_weighting!r}; expected one of {', '.join(WEIGHTINGS)}"
            )
        if self.sequence_top_k is not None and (
            not _is_int(self.sequence_top_k) or not 1 <= self.sequence_top_k <= self.num_experts
        ):
            raise ValueError(
                f"sequence_top_k must be None or an int in [1, {self.num_experts}], got {self.sequence_top_k!r}"
            )
        for name in ("renormalize", "mature_experts", "freeze_router"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if (
            self.mixture == "ffn"
            and self.routing == "token"
            and self.router_weighting == "softmax"
            and not (self.renormalize or self.top_k == self.num_experts)
        ):
            raise ValueError(
                "mixture='ffn' with token routing needs routing weights that sum to 1 per token (every expert holds "
                "the frozen MLP, so unnormalised weights would scale the base model's MLP output): set "
                "renormalize=True or router_weighting='original'"
            )

    def _check_losses(self) -> None:
        if self.balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"unknown balance_loss {self.balance_loss!r}; expected one of {', '.join(BALANCE_LOSSES)}")
        if not isinstance(self.global_balance, bool):
            raise ValueError(f"global_balance must be a bool, got {self.global_balance!r}")
        for name in ("balance_coefficient", "balance_update_rate", "z_loss_coefficient"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")

    # ----- presets and serialisation ---------------------------------------------------------------------------

    @classmethod
    def original(cls, routing: str = "sequence", **overrides) -> DyLoRAMoEConfig:
        """The original DyLoRA-MoE's semantics (DESIGN 2).

        ``routing="sequence"`` (the seed's model): routing weights of the original rule (dense tempered softmax while
        any expert is new; else softmax over the top-k logits, no temperature), averaged over each sequence, mixing
        the logits of the experts; loss = shifted cross-entropy alone. ``routing="token"`` (its later
        generation): the same per-token weights mixed inside every LoRA layer, plus the MSE balance loss with
        coefficient 0.01. Both grow experts with the original's rank rule. One deliberate difference stays: the
        sequence average is over real tokens, not padding (identical for unpadded batches).
        """
        settings = dict(
            routing=routing, top_k=1, temperature=2.0, router_weighting="original", renormalize=False,
            sequence_top_k=None, balance_loss="mse", balance_coefficient=0.0 if routing == "sequence" else 0.01,
            z_loss_coefficient=0.0, mature_experts=True, growth_rank="original", mixture="linear",
        )  # fmt: skip
        settings.update(overrides)
        return cls(**settings)

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every setting."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> DyLoRAMoEConfig:
        """Build from :meth:`to_dict`'s output; unknown keys are an error naming them (a typo is not ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown DyLoRAMoEConfig settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes) -> DyLoRAMoEConfig:
        """A validated copy with ``changes`` applied."""
        return self.from_dict({**self.to_dict(), **changes})
