"""DyLoRA_MoE: the original's model API on stacked MoE-LoRA layers, with sequence and token routing.

Every forward (E > 1):
  1. Routing pass: the frozen base model with adapters disabled, under no_grad; the router sees the last hidden
     state of every position, padding masked out (weight 0, outside every statistic): static shapes, no host sync.
  2. ``routing="sequence"`` (the original): per-(sequence, expert) weights = routing weights averaged over the real
     tokens of the sequence; ONE batched pass over the (sequence, expert) pairs with non-zero weight (with
     ``sequence_top_k`` = k: each row's k best, B * k pairs), each row using its expert; logits = the weighted sum
     of the pair logits. The output head is linear, so the mixture is taken on the final hidden states and the head
     runs once: the E full logit tensors of the original never exist.
     ``routing="token"``: one pass where every LoRA layer mixes each token's top-k experts.
  3. Loss = shifted cross-entropy over the labelled tokens (+ in training the balance loss and the optional router
     z-loss); with :meth:`DyLoRA_MoE.set_fused_loss`, computed in row chunks from the hidden states, without the
     [B, S, V] logits.

With token routing, and sequence routing with ``sequence_top_k``, a training step issues no host sync and compiles
as one graph (:meth:`DyLoRA_MoE.compile`). The routing decisions live in :mod:`dylora_moe.modules.routing`.

``backend="reference"`` runs the same routing decision through the original algorithm on peft adapters
(:mod:`dylora_moe.modules.reference`): one full pass per expert, or a loop over experts in each layer.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import BACKENDS, BALANCE_FORMS, SETTINGS, DyLoRAMoEConfig, check_setting, original_growth_rank
from .kernels import resolve_backend
from .modules.experts import ExpertManager
from .modules.fused_loss import chunked_linear_cross_entropy
from .modules.router import DynamicHybridRouter, balance_loss, router_entropy, z_loss
from .modules.routing import Routing, RoutingDecision, decide_routing, sequence_pairs, sequence_weights, token_routing
from .modules.skills import NoveltyDetector, SkillLibrary
from .quantized import require_bitsandbytes, uses_bitsandbytes

logger = logging.getLogger(__name__)


@dataclass
class DyLoRAMoEOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus what training logs: ``loss`` = ``lm_loss`` + ``aux_loss`` (the latter only in
    training). ``expert_utilization`` [E]: mean routing weight of each expert over real tokens;
    ``expert_token_fraction`` [E]: share of the (token, slot) picks; ``router_entropy``: mean per-token entropy;
    ``sequence_weights`` [B, E]: the per-sequence weights (sequence routing)."""

    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    balance_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    expert_utilization: torch.FloatTensor | None = None
    expert_token_fraction: torch.FloatTensor | None = None
    router_entropy: torch.FloatTensor | None = None
    sequence_weights: torch.FloatTensor | None = None


class HeadInput(NamedTuple):
    """What the output head turns into logits: ``hidden`` [B, S, H], and for a sequence mixture ``bias_scale`` [B],
    the total weight of each row (the head's bias counts that many times), else None."""

    hidden: torch.Tensor
    bias_scale: torch.Tensor | None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean shifted cross-entropy in float32 over labels != -100 (HF's ForCausalLMLoss without num_items).

    Summed and divided by max(count, 1): the mean when any label counts, and 0 (with a zero gradient) instead of
    NaN for a batch without one (all padding), with no host sync either way.
    """
    vocab = logits.shape[-1]
    targets = labels[:, 1:].reshape(-1).to(logits.device)
    total = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), targets, ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp_min(1)


def load_base_model(model_name, token=None, torch_dtype=None, quantization_config=None) -> PreTrainedModel:
    """An already built PreTrainedModel as is, else a local path or hub id through AutoModelForCausalLM, quantized
    on loading when ``quantization_config`` is given (e.g. ``BitsAndBytesConfig(load_in_4bit=True)``: QLoRA)."""
    if isinstance(model_name, PreTrainedModel):
        if quantization_config is not None:
            raise ValueError(
                "quantization_config applies when the base model is loaded from a hub id or local path; "
                f"{type(model_name).__name__} was passed built: load it quantized yourself, or pass its name"
            )
        return model_name
    if isinstance(model_name, (str, Path)):
        kwargs = {"token": token} if token else {}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        if quantization_config is not None:
            if uses_bitsandbytes(quantization_config):
                require_bitsandbytes("quantization_config")
            kwargs["quantization_config"] = quantization_config
        return AutoModelForCausalLM.from_pretrained(str(model_name), **kwargs)
    raise TypeError(f"model_name must be a hub id, a local path or a PreTrainedModel; got {type(model_name).__name__}")


class _FromConfig:
    """Default of DyLoRA_MoE's setting arguments: the value comes from ``config`` (or DyLoRAMoEConfig's default)."""

    def __repr__(self) -> str:
        return "<from config>"


FROM_CONFIG = _FromConfig()


def _setting(name: str, applied_to_router: bool = False) -> property:
    """A model attribute that is setting ``name`` of the DyLoRAMoEConfig the model keeps (checked when assigned;
    ``applied_to_router``: the router's balancing state follows an assignment)."""

    def get(self):
        return getattr(self._settings, name)

    def set(self, value):
        self._settings = self._settings.replace(**{name: value})
        if applied_to_router:
            self._apply_balance(self._settings)

    return property(get, set, doc=f"The ``{name}`` setting (see DyLoRAMoEConfig).")


class DyLoRA_MoE(nn.Module):
    """A frozen causal LM with E LoRA experts and a router (the original DyLoRA-MoE API; docs/design.md §2).

    Original arguments: ``model_name`` (hub id, local path or a built PreTrainedModel), ``num_experts`` (1),
    ``lora_r`` (16), ``lora_alpha`` (32), ``lora_dropout`` (0.05), ``token``, ``allow_expert_growth`` (True).
    ``config``: a :class:`~dylora_moe.config.DyLoRAMoEConfig` with every setting; setting arguments passed beside it
    override its values. Every setting of the config is also a keyword here (defaults: the config's):

    - ``backend``: "auto" | "triton" | "eager" | "reference" (switch later with :meth:`set_backend`); ``kernel`` is
      its former name and still works.
    - ``routing``: "sequence" (the original's model) | "token"; ``top_k`` experts per token; ``sequence_top_k``: keep
      only each sequence's top experts (renormalised) in sequence routing; ``temperature`` of the router softmax.
    - ``router_weighting``: "softmax" (default: tempered softmax probabilities of the top-k, which trains the gate
      at k = 1) or "original" (softmax over the k selected logits); ``renormalize`` the k probabilities.
      ``DyLoRAMoEConfig.original()`` is the preset reproducing the original.
    - ``balance_loss`` "mse" (the original) | "switch" | "loss_free" | "none", ``balance_coefficient``,
      ``balance_update_rate`` (of "loss_free"), ``global_balance``, ``z_loss_coefficient``. A training loop calls
      :meth:`balance_step` after each optimizer step (the Trainer of ``train.py`` does).
    - ``mature_experts``: mark the initial experts mature so top-k applies (the original did; experts added later
      start immature, which makes routing dense until they are marked mature).
    - ``target_modules`` (default: :func:`~dylora_moe.modules.inject.default_targets`), ``mixture`` ("linear" | "ffn"),
      ``expert_ranks`` / ``expert_alphas`` (per initial expert), ``growth_rank`` ("same" | "original" | int).
    - ``freeze_router``: keep the gate at its initial weights (no gradient, not in ``trainable_parameters``).
    - ``fused_loss``: False | True | "auto" (see :meth:`set_fused_loss`).

    ``torch_dtype`` is the base model's load dtype and ``quantization_config`` (transformers', e.g.
    ``BitsAndBytesConfig(load_in_4bit=True)``: QLoRA; needs ``pip install 'dylora-moe[quant]'``) its quantization
    when it is loaded from a name; neither is a setting. On a quantized base the experts and the gate are float32
    (the compute dtype's masters), the base stays as loaded and frozen; the experts load on the float base too.
    ``moe_config`` gives the current settings back; the settings below are attributes that read (and, assigned,
    check and change) the config the model keeps.
    """

    accepts_loss_kwargs = False  # HF Trainer: the loss is a per-token mean; do not pass num_items_in_batch
    fused_loss_chunk_rows: int | None = None
    routing = _setting("routing")
    sequence_top_k = _setting("sequence_top_k")
    balance_loss_form = _setting("balance_loss", applied_to_router=True)
    balance_coefficient = _setting("balance_coefficient")
    balance_update_rate = _setting("balance_update_rate", applied_to_router=True)
    global_balance = _setting("global_balance", applied_to_router=True)
    z_loss_coefficient = _setting("z_loss_coefficient")
    allow_expert_growth = _setting("allow_expert_growth")
    lora_r = _setting("lora_r")
    lora_alpha = _setting("lora_alpha")
    lora_dropout = _setting("lora_dropout")
    mixture = _setting("mixture")
    growth_rank = _setting("growth_rank")
    mature_experts = _setting("mature_experts")
    fused_loss = _setting("fused_loss")

    def __init__(
        self,
        model_name,
        num_experts: int = FROM_CONFIG,
        lora_r: int = FROM_CONFIG,
        lora_alpha: float = FROM_CONFIG,
        lora_dropout: float = FROM_CONFIG,
        token=None,
        allow_expert_growth: bool = FROM_CONFIG,
        *,
        config: DyLoRAMoEConfig | None = None,
        backend: str = FROM_CONFIG,
        kernel: str | None = None,
        routing: str = FROM_CONFIG,
        top_k: int = FROM_CONFIG,
        temperature: float = FROM_CONFIG,
        router_weighting: str = FROM_CONFIG,
        renormalize: bool = FROM_CONFIG,
        sequence_top_k: int | None = FROM_CONFIG,
        balance_loss: str = FROM_CONFIG,
        balance_coefficient: float = FROM_CONFIG,
        balance_update_rate: float = FROM_CONFIG,
        global_balance: bool = FROM_CONFIG,
        z_loss_coefficient: float = FROM_CONFIG,
        mature_experts: bool = FROM_CONFIG,
        target_modules=FROM_CONFIG,
        mixture: str = FROM_CONFIG,
        expert_ranks=FROM_CONFIG,
        expert_alphas=FROM_CONFIG,
        growth_rank=FROM_CONFIG,
        freeze_router: bool = FROM_CONFIG,
        fused_loss: bool | str = FROM_CONFIG,
        torch_dtype=None,
        quantization_config=None,
    ):
        """Load ``model_name`` (hub id, local path or a built model), inject ``num_experts`` LoRA experts and the
        router. Positional arguments are the original's; every other setting is a keyword, its default taken from
        ``config`` (a :class:`~dylora_moe.config.DyLoRAMoEConfig`, default: its defaults); the class docstring lists
        them. ``kernel`` is the former name of ``backend``; ``torch_dtype`` the base model's dtype when loaded."""
        super().__init__()
        given = {name: value for name, value in locals().items() if name in SETTINGS and value is not FROM_CONFIG}
        if kernel is not None:  # the former name of backend
            given["kernel"] = kernel
        if config is not None and not isinstance(config, DyLoRAMoEConfig):
            raise TypeError(f"config must be a DyLoRAMoEConfig, got {type(config).__name__}")
        cfg = (config or DyLoRAMoEConfig()).replace(**given)
        self._settings = cfg  # the one copy of the settings (the router and experts hold theirs)

        self.foundation_model = load_base_model(model_name, token, torch_dtype, quantization_config)
        self.expert_manager = ExpertManager(
            self.foundation_model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
            target_modules=cfg.target_modules, backend=cfg.backend, mixture=cfg.mixture,
        )  # fmt: skip
        for i in range(cfg.num_experts):
            self.expert_manager.create_expert(
                r=None if cfg.expert_ranks is None else cfg.expert_ranks[i],
                lora_alpha=None if cfg.expert_alphas is None else cfg.expert_alphas[i],
            )
        self.expert_manager.set_active_expert(0)  # as the original: expert 0 is the current expert after construction
        hidden = self.foundation_model.config.get_text_config().hidden_size
        self.router = DynamicHybridRouter(
            hidden, cfg.num_experts, cfg.top_k, cfg.temperature, weighting=cfg.router_weighting,
            renormalize=cfg.renormalize,
        ).to(self.foundation_model.device)  # fmt: skip
        self._apply_balance(cfg)
        if cfg.mature_experts:
            self.router.expert_maturity.fill_(1.0)
        self.router.gate.requires_grad_(not cfg.freeze_router)
        self.skill_library = SkillLibrary(hidden)
        self.novelty_detector = NoveltyDetector(self.skill_library)
        self._reference_model = None  # built on demand by set_backend("reference"); not a registered submodule
        self.set_backend(cfg.backend)

    # ----- configuration -------------------------------------------------------------------------------------

    def _apply_balance(self, cfg: DyLoRAMoEConfig) -> None:
        """The router's balancing state: the loss-free bias, and whether training forwards count the step's load."""
        self.router.use_selection_bias = BALANCE_FORMS[cfg.balance_loss].selection_bias
        self.router.update_rate = float(cfg.balance_update_rate)
        self.router.track_load = BALANCE_FORMS[cfg.balance_loss].selection_bias or cfg.global_balance

    def balance_step(self) -> None:
        """Call once after each optimizer step: moves the loss-free selection bias toward equal load over the step
        (all micro-batches and ranks) and starts the next step's load window (no host sync)."""
        self.router.balance_step()

    @property
    def moe_config(self) -> DyLoRAMoEConfig:
        """The model's current settings (after growth, ``set_backend``, ...) as a validated config: the settings it
        keeps, with what the parts hold now (experts and their ranks, the router's); target modules are the injected
        modules' full names, so a model rebuilt from it has exactly these layers."""
        return self._current_settings()

    def _current_settings(self) -> DyLoRAMoEConfig:
        settings = self.expert_manager.expert_settings
        uniform = all((s.r, s.lora_alpha) == (self.lora_r, self.lora_alpha) for s in settings)
        layers = list(self.handle.layers)
        targets = layers if self.mixture == "linear" else list(dict.fromkeys(n.rsplit(".", 1)[0] for n in layers))
        return self._settings.replace(
            num_experts=self.num_experts, target_modules=targets,
            expert_ranks=None if uniform else [s.r for s in settings],
            expert_alphas=None if uniform else [s.lora_alpha for s in settings],
            top_k=self.router.top_k, temperature=self.router.temperature, router_weighting=self.router.weighting,
            renormalize=self.router.renormalize, freeze_router=not self.router.gate.weight.requires_grad,
        )  # fmt: skip

    @property
    def num_experts(self) -> int:
        return self.expert_manager.num_experts

    @property
    def config(self):
        """The base model's config (as a PreTrainedModel's ``config``; the MoE settings are :attr:`moe_config`)."""
        return self.foundation_model.config

    @property
    def backend(self) -> str:
        """The backend setting: "auto" | "triton" | "eager" | "reference" (change it with :meth:`set_backend`)."""
        return self._settings.backend

    @property
    def kernel(self) -> str:
        """The former name of :attr:`backend`."""
        return self.backend

    @property
    def device(self) -> torch.device:
        return self.foundation_model.device

    @property
    def handle(self):
        return self.expert_manager.handle

    def set_backend(self, name: str) -> None:
        """Run later forwards on backend ``name`` ("auto" | "triton" | "eager" | "reference"), same weights.

        "auto" is resolved at every forward from the device of the tensors (triton for CUDA tensors, eager
        otherwise), so a model still on the CPU of a GPU machine (the usual order: build, then ``.to("cuda")``)
        builds and runs. "triton" is checked now against the model's device, naming the fix.
        """
        self._current_settings().replace(backend=name)  # the config's rules: a known name; "reference" where it fits
        if name == "triton":
            resolve_backend("triton", self.device)  # fail now, naming the fix, rather than in the first forward
        self.handle.set_backend(name)  # the layers' loop; the peft reference is here
        self.router.backend = name if name in ("auto", "triton") else "eager"
        self._settings = self._settings.replace(backend=name)
        if name == "reference":
            self._reference().sync()

    def set_kernel(self, name: str) -> None:
        """The former name of :meth:`set_backend`."""
        if name not in BACKENDS:
            raise ValueError(f"unknown kernel {name!r}; expected one of {', '.join(BACKENDS)}")
        self.set_backend(name)

    def _reference(self):
        from .modules.reference import ReferenceMoE

        ref = self._reference_model
        if ref is None or ref.num_experts != self.num_experts:
            ref = ReferenceMoE(self)
            object.__setattr__(self, "_reference_model", ref)  # keep it out of parameters() and state_dict()
        return ref

    def trainable_parameters(self):
        """LoRA stacks and the gate: what the optimizer must hold."""
        return [p for p in self.parameters() if p.requires_grad]

    # ----- routing ------------------------------------------------------------------------------------------

    def decide_routing(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> RoutingDecision:
        """Route the real tokens of ``hidden`` [B, S, H] (last hidden states of the routing pass); see
        :func:`dylora_moe.modules.routing.decide_routing`."""
        return decide_routing(self.router if self.num_experts > 1 else None, hidden, attention_mask)

    def sequence_weights(self, decision: RoutingDecision) -> torch.Tensor:
        """[B, E] per-sequence weights; see :func:`dylora_moe.modules.routing.sequence_weights`."""
        return sequence_weights(decision, self.num_experts, self.sequence_top_k)

    def token_routing(self, decision: RoutingDecision) -> Routing:
        """[B, S, k] experts of every token; see :func:`dylora_moe.modules.routing.token_routing`."""
        return token_routing(decision)

    # ----- forward ------------------------------------------------------------------------------------------

    def _decoder(self):
        return self.foundation_model.base_model

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.foundation_model.get_output_embeddings()(hidden)
        cap = getattr(self.foundation_model.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _linear_head(self) -> nn.Linear | None:
        """The output head when it is a plain nn.Linear with a float weight (then logits are linear in the hidden
        states and the fused loss may read the weight), else None (e.g. a quantized head: its module computes)."""
        head = self.foundation_model.get_output_embeddings()
        return head if isinstance(head, nn.Linear) and head.weight.is_floating_point() else None

    def _softcap(self) -> float | None:
        return getattr(self.foundation_model.config, "final_logit_softcapping", None)

    def _mixed_hidden(self, hidden: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, batch: int) -> HeadInput:
        """Sequence routing on a linear head: sum over pairs n of weights[n] * hidden[n] into row rows[n] (in
        float32: one rounding to the model's dtype instead of one per pair); the head then runs once, its bias
        counted sum(w) times per row. A row without pairs of non-zero weight (an all-padding row) mixes to 0.

        The sum is a matmul with the [B, N] mixing matrix, not an index_add: rows repeat (one per expert of a
        sequence), and index_add with repeated rows uses atomics on CUDA, so its result would vary run to run."""
        row_ids = torch.arange(batch, device=rows.device)[:, None]
        mixing = (row_ids == rows[None, :]).float() * weights.float()  # [B, N]: weights[n] at (rows[n], n)
        mixed = torch.einsum("bn,nsh->bsh", mixing, hidden.float())
        return HeadInput(mixed.to(hidden.dtype), mixing.sum(1).to(hidden.dtype))

    def _mixed_logits(self, hidden: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, batch: int):
        """A non-linear head (soft-capped, or not an nn.Linear): sum over pairs n of weights[n] * logits(hidden[n])
        into row rows[n], one pair's logits alive at a time. A row without pairs gets logits 0."""
        w = weights.to(hidden.dtype)
        vocab = self.foundation_model.config.get_text_config().vocab_size
        logits = hidden.new_zeros(batch, hidden.shape[1], vocab)
        for n in range(hidden.shape[0]):
            part = self.logits_from_hidden(hidden[n : n + 1]) * w[n]
            logits = logits.index_add(0, rows[n : n + 1], part)
        return logits

    def _head_logits(self, head_input: HeadInput) -> torch.Tensor:
        logits = self.logits_from_hidden(head_input.hidden)
        head = self._linear_head()
        if head_input.bias_scale is not None and head is not None and head.bias is not None:
            logits = logits + (head_input.bias_scale - 1)[:, None, None] * head.bias
        return logits

    def _routing_pass(self, input_ids, attention_mask) -> RoutingDecision:
        if self.num_experts == 1:
            return self.decide_routing(None, attention_mask)
        with torch.no_grad(), self.handle.adapters_disabled():
            hidden = self._decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return self.decide_routing(hidden.last_hidden_state, attention_mask)

    def _fast_pass(self, input_ids, attention_mask, decision: RoutingDecision, seq_weights):
        """The adapted pass: a :class:`HeadInput` (the hidden states the head turns into logits) or, for sequence
        routing on a non-linear head, the mixed logits themselves."""
        ctx = self.handle.context
        if self.routing == "token":
            ctx.set(self.token_routing(decision))
            hidden = self._decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return HeadInput(hidden.last_hidden_state, None)
        rows, experts, weights = sequence_pairs(seq_weights, self.sequence_top_k)
        ctx.set(Routing.per_row(experts))
        if rows.numel() == 0:  # an all-padding batch without sequence_top_k: no pair has weight, no pass to run
            hidden = self.foundation_model.get_input_embeddings()(input_ids[:0])
        else:
            hidden = self._decoder()(
                input_ids=input_ids[rows], attention_mask=attention_mask[rows], use_cache=False
            ).last_hidden_state
        if self._linear_head() is not None and self._softcap() is None:
            return self._mixed_hidden(hidden, rows, weights, input_ids.shape[0])
        return self._mixed_logits(hidden, rows, weights, input_ids.shape[0])

    # ----- fused linear + cross-entropy (large vocabularies) -----------------------------------------------------

    def set_fused_loss(self, mode: bool | str = True, chunk_rows: int | None = None) -> None:
        """Compute the LM loss without the full [B, S, V] logits (:mod:`dylora_moe.modules.fused_loss`: the head and the
        cross-entropy in row chunks, gradients in the same pass). ``mode``: False (off, the default) | True (every
        forward with labels) | "auto" (forwards with labels in training mode). When it applies, the output's
        ``logits`` is None (call again without labels, or in eval mode with "auto", for logits).
        Works for token and sequence routing (the mixture is on hidden states); a head that is not an nn.Linear,
        or sequence routing with soft-capped logits, keeps the plain loss. ``chunk_rows``: rows per chunk
        (default: logits chunks about the size of the hidden states, Liger's rule)."""
        check_setting("fused_loss", mode)
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be None or a positive int, got {chunk_rows!r}")
        self.fused_loss, self.fused_loss_chunk_rows = mode, chunk_rows

    def _fused_loss_applies(self, head_input, labels) -> bool:
        if labels is None or not isinstance(head_input, HeadInput) or self._linear_head() is None:
            return False
        return self.fused_loss is True or (self.fused_loss == "auto" and self.training)

    def _fused_lm_loss(self, head_input: HeadInput, labels: torch.Tensor) -> torch.Tensor:
        """causal_lm_loss(head(hidden), labels) in row chunks (the same value and gradients)."""
        head = self._linear_head()
        hidden, scale = head_input.hidden[:, :-1], head_input.bias_scale
        targets = labels[:, 1:].reshape(-1).to(hidden.device)
        if scale is not None and head.bias is not None:
            scale = scale[:, None].expand(hidden.shape[:2]).reshape(-1)
        else:
            scale = None
        total = chunked_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, bias=head.bias, bias_scale=scale,
            softcap=self._softcap(), chunk_rows=self.fused_loss_chunk_rows,
        )  # fmt: skip
        return total / (targets != -100).sum().clamp_min(1)

    def train(self, mode: bool = True) -> DyLoRA_MoE:
        """nn.Module.train; also refreshes the router's host-side maturity flag (one read, only when the buffer
        changed) so that a compiled forward never has to read it. Training loops (HF Trainer included) call it
        before their steps."""
        super().train(mode)
        self.router.refresh_maturity_if_changed()
        return self

    def compile(self, *args, fullgraph: bool = True, **kwargs) -> None:
        """Compile the forward in place with ``torch.compile`` (``fullgraph=True`` by default; other arguments as
        torch.compile's, e.g. ``mode="reduce-overhead"`` for CUDA graphs on a GPU).

        The step is one graph, forward and backward, with token routing, and with sequence routing when
        ``sequence_top_k`` is set (without it the number of (sequence, expert) pairs depends on the data). Shapes
        that change recompile: pad batches to fixed shapes. Not for ``backend="reference"`` (peft's Python loops).
        """
        if self.backend == "reference":
            raise ValueError("backend='reference' does not compile; use 'eager', 'triton' or 'auto'")
        self.router.refresh_maturity_if_changed()  # now: the compiled graph cannot read the buffer
        self.router.global_window()  # made now, so the graph only updates it in place
        super().compile(*args, fullgraph=fullgraph, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None) -> DyLoRAMoEOutput:
        """Route and run one batch: ``input_ids`` [B, S] (required), ``attention_mask`` [B, S] (padding is neither
        routed nor counted), ``labels`` [B, S] (-100 ignored) for the shifted cross-entropy. Returns a
        :class:`DyLoRAMoEOutput`: logits (None under the fused loss), the LM loss, the auxiliary losses and the
        routing weights."""
        if input_ids is None:
            raise ValueError("input_ids are required")
        check_batch(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm_loss = None
        if self.backend == "reference":
            decision, seq_weights, logits = self._reference().forward(input_ids, attention_mask)
        else:
            decision = self._routing_pass(input_ids, attention_mask)
            seq_weights = self.sequence_weights(decision) if self.routing == "sequence" else None
            head_input = self._fast_pass(input_ids, attention_mask, decision, seq_weights)
            if self._fused_loss_applies(head_input, labels):
                logits, lm_loss = None, self._fused_lm_loss(head_input, labels)
            else:
                logits = head_input if isinstance(head_input, torch.Tensor) else self._head_logits(head_input)
        if lm_loss is None and labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
        return self._output(logits, lm_loss, decision, seq_weights)

    def _output(self, logits, lm_loss, decision: RoutingDecision, seq_weights) -> DyLoRAMoEOutput:
        route = decision.route
        out = DyLoRAMoEOutput(logits=logits, lm_loss=lm_loss, loss=lm_loss, sequence_weights=seq_weights)
        if route is None:
            one = torch.ones(1, device=decision.real.device)
            out.expert_utilization, out.expert_token_fraction = one, one
            out.router_entropy = torch.zeros((), device=decision.real.device)
            return out
        window = self.router.global_window() if self.global_balance and self.training else None
        out.balance_loss = balance_loss(route, self.balance_loss_form, window)
        out.z_loss = z_loss(route.logits, route.mask)
        out.aux_loss = self.z_loss_coefficient * out.z_loss
        if out.balance_loss is not None:
            out.aux_loss = out.aux_loss + self.balance_coefficient * out.balance_loss
        tokens = max(route.dense.shape[0], 1) if route.mask is None else route.mask.sum().clamp_min(1)
        out.expert_utilization = route.dense.detach().sum(0) / tokens  # padding has weight 0
        out.expert_token_fraction = route.counts.float() / route.counts.sum().clamp_min(1)
        out.router_entropy = router_entropy(route).detach()
        if lm_loss is not None and self.training:
            out.loss = lm_loss + out.aux_loss
        return out

    # ----- checkpointing, growth, generation ------------------------------------------------------------------

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Activation checkpointing of the base model's layers (routing stays valid in the recompute)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        base = self.foundation_model
        # transformers 5.2x calls it activation checkpointing; earlier 5.x releases only have the gradient_ names.
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(
                activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
            )
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        base = self.foundation_model
        getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()

    activation_checkpointing_disable = gradient_checkpointing_disable

    def growth_rank_for_next_expert(self) -> int:
        """Rank of the next expert :meth:`add_new_skill` creates: ``growth_rank`` "same" = ``lora_r``, "original" =
        the original's ``min(2 * lora_r, 32)`` (``lora_r`` while there is no expert), or the int itself."""
        if self.growth_rank == "same":
            return self.lora_r
        if self.growth_rank == "original":
            return original_growth_rank(self.lora_r, self.num_experts)
        return int(self.growth_rank)

    def _grow(self) -> int:
        expert_id = self.expert_manager.create_expert(r=self.growth_rank_for_next_expert())
        self.router.add_expert()
        self.expert_manager.set_active_expert(expert_id)  # as the original: the new expert becomes the current one
        return expert_id

    @torch.no_grad()
    def skill_embedding(self, skill_data, batch_size: int = 16) -> torch.Tensor:
        """Mean last hidden state of the base model (adapters disabled) over ``skill_data``: input_ids [N, S] or a
        dict with ``input_ids`` and optional ``attention_mask``."""
        data = skill_data if isinstance(skill_data, dict) else {"input_ids": skill_data}
        ids = torch.as_tensor(data["input_ids"], device=self.device)
        mask = torch.as_tensor(data.get("attention_mask", torch.ones_like(ids)), device=self.device)
        total, count = None, 0
        with self.handle.adapters_disabled():
            for start in range(0, ids.shape[0], batch_size):
                m = mask[start : start + batch_size]
                h = self._decoder()(input_ids=ids[start : start + batch_size], attention_mask=m).last_hidden_state
                part = (h.float() * m[..., None]).sum((0, 1))
                total = part if total is None else total + part
                count += int(m.sum())
        return total / max(count, 1)

    def add_new_skill(self, skill_data=None, force: bool = False, batch_size: int = 16, warmup_steps: int = 50) -> bool:
        """Grow by one expert when ``force``, or when ``skill_data`` is novel to the skill library and growth is
        allowed; returns whether an expert was added. The new expert (rank: :meth:`growth_rank_for_next_expert`,
        alpha ``lora_alpha``) starts immature (routing is dense until it is marked mature with
        ``router.set_expert_maturity``), becomes ``expert_manager.current_expert_id`` and trains with the others;
        the skill embedding is stored under its id whenever ``skill_data`` is given (the original skipped that when
        forced). ``warmup_steps`` is kept for the original's signature and is not used (no separate warm-up loop)."""
        if not force and (not self.allow_expert_growth or skill_data is None):
            return False
        embedding = None if skill_data is None else self.skill_embedding(skill_data, batch_size)
        if not force and not self.novelty_detector.is_novel(embedding):
            return False
        expert_id = self._grow()
        if embedding is not None:
            self.skill_library.add_skill(expert_id, embedding)
        return True

    @torch.no_grad()
    def prompt_expert_weights(self, input_ids, attention_mask=None) -> torch.Tensor:
        """[B, E] per-sequence expert weights the router gives these prompts: what :meth:`generate` uses."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.sequence_weights(self._routing_pass(input_ids, attention_mask))

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, expert_weights=None, **generate_kwargs):
        """Route on the prompt, then decode with the base model's ``generate``.

        Each sequence keeps its per-sequence expert weights (sequence routing, or the token weights averaged over
        the prompt) for every generated token, mixed inside the LoRA layers: exact for one expert per sequence,
        and one pass per token instead of E. Beam search and several returned sequences (``num_beams``,
        ``num_return_sequences``) work: the base model's ``generate`` repeats each prompt that many times, and each
        copy keeps its prompt's weights. ``expert_weights`` [B, E] replaces the router's weights (e.g. one-hot rows
        force one expert).
        """
        check_batch(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if expert_weights is None:
            weights = self.prompt_expert_weights(input_ids, attention_mask)
        elif tuple(expert_weights.shape) != (input_ids.shape[0], self.num_experts):
            raise ValueError(
                f"expert_weights {tuple(expert_weights.shape)} must be [batch, num_experts] = "
                f"{(input_ids.shape[0], self.num_experts)}"
            )
        else:
            weights = expert_weights.to(device=input_ids.device, dtype=torch.float32)
        weights = weights.repeat_interleave(self._generation_copies(generate_kwargs), dim=0)
        experts = torch.arange(self.num_experts, device=input_ids.device).expand(weights.shape[0], 1, -1)
        with self.handle.context.routed(Routing(experts, weights.unsqueeze(1))):
            return self.foundation_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generate_kwargs)

    def _generation_copies(self, generate_kwargs: dict) -> int:
        """How many rows the base model's ``generate`` makes of each prompt (as transformers expands its inputs:
        the larger of ``num_beams`` and ``num_return_sequences``)."""
        config = generate_kwargs.get("generation_config") or self.foundation_model.generation_config
        beams = generate_kwargs.get("num_beams", getattr(config, "num_beams", None)) or 1
        returned = generate_kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", None)) or 1
        return max(int(beams), int(returned))

    def merged(self, expert: int | None = None, weights=None) -> PreTrainedModel:
        """A plain transformers model with the routing fixed and merged into the base weights: ``expert=i`` (one
        expert) or ``weights=[w_0, ..., w_{E-1}]`` (a fixed mix). A copy: this model is untouched. It saves with
        ``save_pretrained`` and loads with ``AutoModelForCausalLM.from_pretrained`` without this package.

        Equal to this model with that routing in every layer (``generate(..., expert_weights=...)``): in float32
        up to the order of the sums; a bf16/fp16 base is merged in float32 and rounded once. Refused: a quantized
        base, and a mix of experts with ``mixture="ffn"``. Sequence routing's training forward mixes logits, which
        no merge reproduces (docs/export.md gives the difference measured). See :mod:`dylora_moe.export.merge`."""
        from .export.merge import merged_model

        return merged_model(self, expert=expert, weights=weights)

    def save_pretrained(self, save_directory, **_ignored) -> None:
        """Write every expert as a peft adapter, the router and a JSON config (atomically); see checkpoint.py."""
        from .io.checkpoint import save_checkpoint

        save_checkpoint(self, save_directory)

    @classmethod
    def from_pretrained(cls, base_model, save_directory, **overrides) -> DyLoRA_MoE:
        """Rebuild a saved model on ``base_model`` (a PreTrainedModel, local path or hub id), in peft's argument
        order: ``DyLoRA_MoE.from_pretrained(base_model, save_directory)``. The former order
        ``(save_directory, base_model)`` still works, with a DeprecationWarning (told apart by which argument is a
        built model or a checkpoint directory). ``overrides``: settings to change (e.g. ``backend="eager"``)."""
        from .io.checkpoint import load_checkpoint_model

        old_order = isinstance(save_directory, nn.Module) or (
            is_checkpoint_dir(base_model) and not is_checkpoint_dir(save_directory)
        )
        if old_order:
            warnings.warn(
                "DyLoRA_MoE.from_pretrained(save_directory, base_model) is deprecated: pass the base model first, as "
                "peft does: DyLoRA_MoE.from_pretrained(base_model, save_directory)",
                DeprecationWarning,
                stacklevel=2,
            )
            base_model, save_directory = save_directory, base_model
        return load_checkpoint_model(cls, save_directory, base_model, **overrides)


def check_batch(input_ids: torch.Tensor) -> None:
    """input_ids must be [batch, length]: a 1-D tensor is refused, naming the fix (it would fail deep inside the
    base model otherwise)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        hint = "; for one sequence pass input_ids[None] (a batch of one)" if getattr(input_ids, "ndim", 0) == 1 else ""
        raise ValueError(f"input_ids must be a [batch, length] tensor, got {shape}{hint}")


def is_checkpoint_dir(path) -> bool:
    """True for a directory holding a DyLoRA_MoE checkpoint (its JSON config or a first expert adapter)."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    from .io.checkpoint import CONFIG_NAME

    path = Path(path)
    return (path / CONFIG_NAME).is_file() or (path / "expert_0" / "adapter_config.json").is_file()
