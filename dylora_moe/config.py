"""DyLoRAMoEConfig: every setting of a DyLoRA_MoE in one validated dataclass (in the style of peft's LoraConfig).

``DyLoRA_MoE(base, config=DyLoRAMoEConfig(...))`` or the original's keywords (``DyLoRA_MoE(base, num_experts=4)``);
``model.moe_config`` gives the settings back, ``to_dict``/``from_dict`` round-trip them through JSON (the
checkpoint's config file). ``DyLoRAMoEConfig.original()`` reproduces the original DyLoRA-MoE's numbers.

This is the one place a setting is defined and checked: the model keeps one of these, checkpoints save it, and
train.py's expert flags are its fields (their help is each field's ``help``; a bad flag value is refused by the same
rule, worded as a flag error). Torch-free, so ``python train.py --help`` answers without importing torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from types import SimpleNamespace

BACKENDS = ("auto", "triton", "eager", "reference")  # the one list of backends (model, layers, train.py, evaluate)
# What a MoE-LoRA layer runs for each backend: the op's backend of that name (dylora_moe.kernels), except
# "reference": the model runs peft adapters for it, a lone layer its per-expert loop (the op's "loop", also taken by
# that name).
LAYER_BACKENDS = {**{name: name for name in BACKENDS}, "reference": "loop", "loop": "loop"}


@dataclass(frozen=True)
class Weighting:
    """How a router weighs its top-k experts (the behaviour behind a ``router_weighting`` name).

    ``tempered``: pick the top-k of ``logits / temperature`` and take their probabilities of the full tempered softmax
    (renormalised with ``renormalize``); else pick on the raw logits and weigh by a softmax over the k selected logits
    (weights sum to 1; at k = 1 the weight is the constant 1 and the gate gets no gradient)."""

    tempered: bool


@dataclass(frozen=True)
class BalanceForm:
    """What a ``balance_loss`` name does: ``loss`` (an auxiliary loss, its math in
    :data:`dylora_moe.modules.router.BALANCE_LOSS_MATH`), or the router's loss-free ``selection_bias``, or neither."""

    loss: bool = False
    selection_bias: bool = False


# Registries: a new router weighting or balance form is one entry here (plus, for a loss, its math in router.py).
WEIGHTING_FORMS = {"original": Weighting(tempered=False), "softmax": Weighting(tempered=True)}
BALANCE_FORMS = {
    "mse": BalanceForm(loss=True),
    "switch": BalanceForm(loss=True),
    "loss_free": BalanceForm(selection_bias=True),
    "none": BalanceForm(),
}
WEIGHTINGS = tuple(WEIGHTING_FORMS)
ROUTINGS = ("sequence", "token")
BALANCE_LOSSES = tuple(BALANCE_FORMS)
MIXTURES = ("linear", "ffn")
GROWTH_RANKS = ("same", "original")
# Former setting names, still accepted where settings go in (keywords, checkpoint files): old name -> new name.
RENAMED = {"kernel": "backend"}


def original_growth_rank(lora_r: int, num_experts: int) -> int:
    """The original's rank for a grown expert: ``lora_r`` for the first expert, else ``min(2 * lora_r, 32)``."""
    return lora_r if num_experts == 0 else min(2 * lora_r, 32)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SettingError(ValueError):
    """A setting with a value its rule refuses. ``str()`` words it for Python callers (``top_k must be an int in
    [1, num_experts=2], got 3``); :meth:`as_flag` for train.py (``expected an integer in [1, --num_experts=2]``).
    ``others``: the values of the settings the rule refers to."""

    def __init__(self, setting: str, value, expected: str, others: dict):
        self.setting, self.value, self.expected, self._others = setting, value, expected, others
        super().__init__(f"{setting} must be {self._words(flag=False)}, got {value!r}")

    def _words(self, flag: bool) -> str:
        refs = {name: f"{'--' if flag else ''}{name}={value}" for name, value in self._others.items()}
        kinds = {"int": "integer" if flag else "int", "number": "number" if flag else "finite number"}
        kinds["probability"] = "a probability " if flag else ""
        return self.expected.format(**kinds, **refs)

    def as_flag(self) -> str:
        return f"expected {self._words(flag=True)}, got {self.value!r}"


def check_setting(name: str, value, **others) -> None:
    """Check one setting by its rule (:data:`RULES`) outside a config, e.g. a router built on its own; ``others``:
    the settings the rule refers to (``num_experts`` for ``top_k``)."""
    holds, expected = RULES[name]
    if not holds(value, SimpleNamespace(**others)):
        raise SettingError(name, value, expected, others)


# One rule per scalar setting: (holds(value, config), what is expected). ``{int}``, ``{number}``, ``{probability}``
# and ``{<setting>}`` are worded for the reader (a Python caller or a train.py user). Checked in this order.
RULES = {
    "num_experts": (lambda v, c: _is_int(v) and v >= 1, "an {int} >= 1"),
    "lora_r": (lambda v, c: _is_int(v) and v >= 1, "an {int} >= 1"),
    "lora_alpha": (lambda v, c: _is_number(v) and v > 0, "a {number} > 0"),
    "lora_dropout": (lambda v, c: _is_number(v) and 0.0 <= v < 1.0, "{probability}in [0, 1)"),
    "top_k": (lambda v, c: _is_int(v) and 1 <= v <= c.num_experts, "an {int} in [1, {num_experts}]"),
    "temperature": (lambda v, c: _is_number(v) and v > 0, "a {number} > 0"),
    "sequence_top_k": (
        lambda v, c: v is None or (_is_int(v) and 1 <= v <= c.num_experts),
        "None or an {int} in [1, {num_experts}]",
    ),
    "balance_coefficient": (lambda v, c: _is_number(v) and v >= 0, "a {number} >= 0"),
    "z_loss_coefficient": (lambda v, c: _is_number(v) and v >= 0, "a {number} >= 0"),
    "balance_update_rate": (lambda v, c: _is_number(v) and v >= 0, "a {number} >= 0"),
    "fused_loss": (lambda v, c: isinstance(v, bool) or v == "auto", "False, True or 'auto'"),  # 1 == True: no `in`
    **{
        name: (lambda v, c: isinstance(v, bool), "a bool")
        for name in ("allow_expert_growth", "renormalize", "mature_experts", "freeze_router", "global_balance")
    },  # fmt: skip
}
CHOICES = {
    "mixture": MIXTURES,
    "backend": BACKENDS,
    "routing": ROUTINGS,
    "router_weighting": WEIGHTINGS,
    "balance_loss": BALANCE_LOSSES,
}


def _setting(default, help: str):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DyLoRAMoEConfig:
    """Settings of a :class:`~dylora_moe.DyLoRA_MoE`; each field's ``help`` says what it does (docs/model.md's table
    says which give which semantics). ``kernel=`` is the former name of ``backend=`` and still works."""

    # The original's settings.
    num_experts: int = _setting(1, "LoRA experts created up front")
    lora_r: int = _setting(16, "LoRA rank of every expert")
    lora_alpha: float = _setting(32, "LoRA alpha (scaling alpha / r)")
    lora_dropout: float = _setting(0.05, "dropout on the LoRA input, in [0, 1)")
    allow_expert_growth: bool = _setting(True, "add_new_skill may add an expert")
    # Experts.
    target_modules: list[str] | None = _setting(None, "module names to adapt (None: the architecture's defaults)")
    mixture: str = _setting(
        "linear",
        "linear: LoRA experts mixed inside each target linear layer; ffn: MixLoRA-style experts on the MLPs, "
        "mixed after the nonlinearity",
    )
    expert_ranks: list[int] | None = _setting(None, "one rank per initial expert (None: lora_r for all)")
    expert_alphas: list[float] | None = _setting(None, "one alpha per initial expert (None: lora_alpha for all)")
    growth_rank: str | int = _setting(
        "same", "rank of experts added later: same (lora_r), original (min(2 * lora_r, 32)) or an int"
    )
    backend: str = _setting(
        "auto",
        "triton kernels (GPU), eager PyTorch, reference (the original per-expert algorithm on peft adapters, "
        "slow), or auto (triton for CUDA tensors, else eager)",
    )
    # Routing.
    routing: str = _setting(
        "sequence",
        "token: each token's top-k experts mixed in every LoRA layer (one pass; the fast path); "
        "sequence: the seed's per-sequence expert mixture (routing pass + one batched pass)",
    )
    top_k: int = _setting(1, "experts per token, in [1, num_experts]")
    temperature: float = _setting(2.0, "router softmax temperature, > 0 (the original's 2.0)")
    router_weighting: str = _setting(
        "softmax",
        "softmax: top-k probabilities of the tempered softmax (k=1 trains the gate); original: softmax over "
        "the k selected logits (k=1 gives the gate no gradient)",
    )
    renormalize: bool = _setting(False, "renormalise the k routing probabilities to sum to 1")
    sequence_top_k: int | None = _setting(
        None, "sequence routing: keep each sequence's best k experts, renormalised (default: all)"
    )
    # Losses.
    balance_loss: str = _setting(
        "loss_free",  # measured: the only form that kept the default job balanced (docs/sweeps.md)
        "load balancing: mse or switch (an auxiliary loss), loss_free (a per-expert selection bias moved by "
        "balance_update_rate after each optimizer step, no loss), none",
    )
    balance_coefficient: float = _setting(0.01, "weight of the mse / switch load-balancing loss, >= 0")
    balance_update_rate: float = _setting(
        0.05, "loss_free: how far each optimizer step moves an expert's selection bias toward equal load, >= 0"
    )
    global_balance: bool = _setting(
        False, "count the load over the gradient-accumulation window and all ranks, not per micro-batch"
    )
    z_loss_coefficient: float = _setting(0.0, "weight of the router z-loss, >= 0")
    mature_experts: bool = _setting(True, "mark the initial experts mature, so top-k applies from the start")
    freeze_router: bool = _setting(False, "keep the gate at its initial weights; experts train")
    fused_loss: bool | str = _setting(
        False,
        "the LM loss in row chunks from the hidden states, never the full [batch, length, vocabulary] logits "
        "(for large vocabularies such as CodeGemma's 256k); auto: in training only, evaluation keeps the logits",
    )
    kernel: InitVar[str | None] = None  # the former name of `backend`

    def __post_init__(self, kernel):
        if kernel is not None:
            self.backend = kernel
        for name, (holds, expected) in RULES.items():
            if not holds(getattr(self, name), self):
                raise SettingError(name, getattr(self, name), expected, self.to_dict())
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                said = "kernel" if name == "backend" and kernel is not None else name
                raise ValueError(f"unknown {said} {getattr(self, name)!r}; expected one of {', '.join(choices)}")
        self.balance_coefficient = float(self.balance_coefficient)
        self.z_loss_coefficient = float(self.z_loss_coefficient)
        self.balance_update_rate = float(self.balance_update_rate)
        self._check_experts()
        self._check_combinations()

    def _check_experts(self) -> None:
        if self.target_modules is not None:
            if isinstance(self.target_modules, str) or not all(isinstance(t, str) for t in self.target_modules):
                raise ValueError(f"target_modules must be None or a list of module names, got {self.target_modules!r}")
            if not self.target_modules:
                raise ValueError("target_modules is empty; pass None for the architecture's defaults")
            self.target_modules = list(self.target_modules)
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

    def _check_combinations(self) -> None:
        if self.backend == "reference" and self.mixture == "ffn":
            raise ValueError(
                "backend='reference' runs the original algorithm on peft adapters of linear layers: no FFN-expert "
                "mixture, so no mixture='ffn' (use backend='eager' or 'triton')"
            )
        if self.backend == "reference" and (self.expert_ranks is not None or self.expert_alphas is not None):
            raise ValueError(
                "backend='reference' builds one peft LoraConfig for all experts; these experts have their own ranks "
                "or alphas: use backend='eager' or 'triton'"
            )
        if (
            self.mixture == "ffn"
            and self.routing == "token"
            and WEIGHTING_FORMS[self.router_weighting].tempered
            and not (self.renormalize or self.top_k == self.num_experts)
        ):
            raise ValueError(
                "mixture='ffn' with token routing needs routing weights that sum to 1 per token (every expert holds "
                "the frozen MLP, so unnormalised weights would scale the base model's MLP output): set "
                "renormalize=True or router_weighting='original'"
            )

    # ----- presets and serialisation ---------------------------------------------------------------------------

    @classmethod
    def original(cls, routing: str = "sequence", **overrides) -> DyLoRAMoEConfig:
        """The original DyLoRA-MoE's semantics (docs/design.md, "The original's semantics").

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
        return {f.name: getattr(self, f.name) for f in _fields()}

    @classmethod
    def from_dict(cls, data: dict) -> DyLoRAMoEConfig:
        """Build from :meth:`to_dict`'s output (a former name such as ``kernel`` is read as its new one and wins
        over it); unknown keys are an error naming them (a typo is not ignored)."""
        names = {f.name for f in _fields()}
        unknown = sorted(set(data) - names - set(RENAMED))
        if unknown:
            raise ValueError(f"unknown DyLoRAMoEConfig settings {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes) -> DyLoRAMoEConfig:
        """A validated copy with ``changes`` applied."""
        return self.from_dict({**self.to_dict(), **changes})


def _fields():
    return dataclasses.fields(DyLoRAMoEConfig)


SETTINGS = tuple(f.name for f in _fields())
