"""Gradient coverage: after the first optimizer step, did every part of the mixture that should learn get a gradient?

A frequent silent bug of MoE-LoRA training stacks is an expert or a gate that never receives a gradient (a routing
weight detached, an adapter frozen by a name filter, k = 1 with weights that are a constant 1). Training then runs,
the loss falls a little, and nothing says that part of the model never moved. This check reads the gradients once,
just before the first optimizer step(s), and names what is missing:

- every expert that received tokens in that step has a non-zero gradient (in ``lora_A`` or ``lora_B``; at
  initialisation B = 0, so only B's gradient is non-zero) in every adapted layer;
- the gate has a non-zero gradient when it is trainable (and the model has more than one expert).

:func:`find_gradient_gaps` is the check itself (any training loop can call it after ``backward``);
:class:`GradientCoverage` runs it in the HF Trainer: it counts, per expert, the micro-batches of the step that sent
it tokens (a forward hook on the model's output) and checks in ``on_pre_optimizer_step``, where the step's gradients
are complete and not yet cleared. A gap is a warning, or a :class:`GradientCoverageError` when ``strict``.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..config import BALANCE_FORMS

logger = logging.getLogger(__name__)


class GradientCoverageError(RuntimeError):
    """Some expert or the gate got no gradient in a checked optimizer step (raised with ``strict=True``)."""


def experts_receiving_tokens(output) -> torch.Tensor:
    """[E] bool: the experts this forward sent tokens to. Sequence routing: a non-zero weight for some sequence
    (the batched pass runs exactly those (sequence, expert) pairs); token routing: a non-zero share of the picks."""
    weights = getattr(output, "sequence_weights", None)
    if weights is not None:
        return (weights.detach() > 0).any(0)
    return output.expert_token_fraction.detach().reshape(-1) > 0


def _has_gradient(param: torch.Tensor, expert: int | None = None) -> bool:
    grad = param.grad
    if grad is None:
        return False
    return bool((grad if expert is None else grad[expert]).ne(0).any())


def _gate_should_learn(model) -> bool:
    """Whether a gradient can reach the gate: through an auxiliary loss, or through the LM loss once some expert's
    LoRA delta is non-zero (at initialisation every B = 0, so with loss-free balancing and no z-loss the first
    step's gate gradient is rightly zero)."""
    form = BALANCE_FORMS[getattr(model, "balance_loss_form", "mse")]
    aux = form.loss and getattr(model, "balance_coefficient", 1)
    if aux or getattr(model, "z_loss_coefficient", 0):
        return True
    return any(bool(layer.lora_B.ne(0).any()) for layer in model.handle.layers.values())


def find_gradient_gaps(model, received: torch.Tensor) -> list[str]:
    """What lacks a gradient in ``model`` (a DyLoRA_MoE after ``backward``), given ``received`` [E] (bool, or the
    number of micro-batches in which each expert received tokens): one line per expert with the layers where its
    gradient is all zero, and one for a trainable gate without a gradient. Empty when everything that should learn
    has a gradient. Layers whose LoRA weights are not trainable are not checked (freezing them is a choice, and the
    parameter breakdown shows it)."""
    gaps = []
    layers = model.handle.layers
    for expert in torch.nonzero(received.reshape(-1) > 0).flatten().tolist():
        missing = [
            name
            for name, layer in layers.items()
            if (layer.lora_A.requires_grad or layer.lora_B.requires_grad)
            and not (_has_gradient(layer.lora_A, expert) or _has_gradient(layer.lora_B, expert))
        ]
        if missing:
            count = int(received.reshape(-1)[expert])
            where = "" if received.dtype == torch.bool else f" in {count} micro-batch{'es' if count > 1 else ''}"
            gaps.append(
                f"expert {expert} received tokens{where} but has a zero gradient in {len(missing)} of {len(layers)} "
                f"adapted layers: {', '.join(missing)}"
            )
    gate = model.router.gate
    learns = model.num_experts > 1 and gate.weight.requires_grad and _gate_should_learn(model)
    if learns and not _has_gradient(gate.weight):
        gaps.append(
            "the gate (router.gate) is trainable but has a zero gradient: the routing weights do not reach the loss "
            "(router_weighting='original' with top_k=1 does this; use 'softmax', or freeze the router on purpose)"
        )
    return gaps


class GradientCoverage(TrainerCallback):
    """Checks :func:`find_gradient_gaps` before each of the first ``steps`` optimizer steps of ``Trainer.train``;
    logs a warning per gap, or raises :class:`GradientCoverageError` when ``strict``. Costs one host sync per checked
    step and nothing afterwards (its forward hook is removed)."""

    def __init__(self, strict: bool = False, steps: int = 1):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.strict, self.steps = strict, steps
        self.checked = 0
        self.received: torch.Tensor | None = None  # [E] forwards of the current step that sent the expert tokens
        self.gaps: list[str] = []  # every gap found, kept for callers and tests
        self._hook = None

    def _record(self, module, args, kwargs, output) -> None:
        if module.training:
            got = experts_receiving_tokens(output).long()
            self.received = got if self.received is None or self.received.shape != got.shape else self.received + got

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._hook is None and self.checked < self.steps:
            self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self._hook is None or self.received is None:
            return
        self.check(model, self.received, step=state.global_step + 1)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.received = None
        if self.checked >= self.steps and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def check(self, model, received: torch.Tensor, step: int) -> list[str]:
        """Run the check on ``model``'s current gradients; warn or raise as configured; returns the gaps."""
        self.checked += 1
        gaps = find_gradient_gaps(model, received)
        self.gaps.extend(gaps)
        if gaps and self.strict:
            raise GradientCoverageError(
                f"gradient coverage, optimizer step {step}: " + "; ".join(gaps) + " (--strict_gradients)"
            )
        for gap in gaps:
            logger.warning("gradient coverage, optimizer step %d: %s", step, gap)
        if not gaps:
            logger.info("gradient coverage, optimizer step %d: every expert that received tokens has gradients", step)
        return gaps
