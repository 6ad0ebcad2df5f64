"""ExpertManager (the original's API) over stacked expert weights instead of one peft adapter per expert."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .inject import MoELoRAHandle, inject_moe_lora

# A peft parameter name: ``base_model.model.<layer>.lora_A.<adapter>.weight`` (named_parameters of a PeftModel, the
# original's expert files) or, without the prefix and/or adapter, ``<layer>.lora_A.weight`` (a saved adapter).
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<layer>.+)\.(?P<which>lora_[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)


def expert_adapter_name(expert_id: int) -> str:
    """The original's adapter name of an expert (``expert_0``, ...)."""
    return f"expert_{expert_id}"


@dataclass(frozen=True)
class ExpertSettings:
    """One expert's LoRA settings."""

    r: int
    lora_alpha: float
    lora_dropout: float


class ExpertManager:
    """Creates and addresses the LoRA experts of ``model``; every expert lives in the stacked tensors of each
    injected :class:`~dylora_moe.modules.layer.MoELoRALinear` (expert i = row i of every ``lora_A``/``lora_B``).

    The model is injected with zero experts on construction; :meth:`create_expert` adds one to every layer.
    Experts may have their own rank and alpha (the stacked weights are zero-padded to the largest rank, which is
    exact); they share one ``lora_dropout``, because the stacked layer draws one dropout mask on its input for all
    experts. Differences from the original (which wrapped the model in peft adapters): ``model`` stays the model
    given (injected in place), and ``current_expert_id`` only changes through :meth:`set_active_expert`.
    """

    def __init__(
        self,
        model: nn.Module,
        lora_r: int,
        lora_alpha: float,
        lora_dropout: float,
        *,
        target_modules=None,
        backend: str = "auto",
        mixture: str = "linear",
        kernel: str | None = None,
    ):
        """Inject ``model`` in place with zero experts; :meth:`create_expert` adds them. ``lora_r`` / ``lora_alpha``
        are the defaults of new experts, ``lora_dropout`` is shared; ``backend`` runs the layers (``kernel``: its
        former name), ``target_modules`` and ``mixture`` as :func:`~dylora_moe.modules.inject.inject_moe_lora`."""
        self.model = model
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.handle: MoELoRAHandle = inject_moe_lora(
            model, num_experts=0, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
            target_modules=target_modules, backend=backend, mixture=mixture, kernel=kernel,
        )  # fmt: skip
        self.expert_settings: list[ExpertSettings] = []
        self.current_expert_id: int | None = None

    @property
    def num_experts(self) -> int:
        return len(self.expert_settings)

    @property
    def expert_configs(self) -> dict:
        """{expert id: peft ``LoraConfig``} of every expert, as in the original (built on access from
        :attr:`expert_settings`; editing them does not change the experts)."""
        from peft import LoraConfig
        from transformers.pytorch_utils import Conv1D

        conv = any(isinstance(layer.base_layer, Conv1D) for layer in self.handle.layers.values())
        return {
            i: LoraConfig(
                r=s.r,
                lora_alpha=s.lora_alpha,
                lora_dropout=s.lora_dropout,
                target_modules=list(self.handle.layers),
                fan_in_fan_out=conv,
                bias="none",
                task_type="CAUSAL_LM",
            )  # fmt: skip
            for i, s in enumerate(self.expert_settings)
        }

    def create_expert(self, r=None, lora_alpha=None, lora_dropout=None) -> int:
        """Add an expert (A Kaiming-uniform, B zeros) to every injected layer; returns its id.

        ``r`` / ``lora_alpha`` default to the manager's; a ``lora_dropout`` other than the manager's is refused (see
        the class docstring). Like the original, this does not change :attr:`current_expert_id`.
        """
        if lora_dropout is not None and lora_dropout != self.lora_dropout:
            raise ValueError(
                f"lora_dropout={lora_dropout} differs from the manager's {self.lora_dropout}: experts share one "
                "dropout because the stacked layer draws one dropout mask on its input for all experts; create the "
                "expert with lora_dropout=None"
            )
        settings = ExpertSettings(
            self.lora_r if r is None else r,
            self.lora_alpha if lora_alpha is None else lora_alpha,
            self.lora_dropout,
        )
        if (settings.r, settings.lora_alpha) == (self.lora_r, self.lora_alpha):
            expert_id = self.handle.add_expert()
        else:
            expert_id = self.handle.add_expert(r=settings.r, alpha=settings.lora_alpha)
        self.expert_settings.append(settings)
        return expert_id

    def _check_id(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert {expert_id} does not exist; there are {self.num_experts} experts")

    def set_active_expert(self, expert_id: int) -> None:
        """Route every token to this expert alone until the model sets a routing again."""
        self._check_id(expert_id)
        self.handle.set_active_expert(expert_id)
        self.current_expert_id = expert_id

    def expert_rank(self, expert_id: int) -> int:
        return self.expert_settings[expert_id].r

    def get_expert_weights(self, expert_id: int) -> dict[str, torch.Tensor]:
        """CPU copies of one expert's weights keyed by the original's peft parameter names
        (``base_model.model.<layer>.lora_A.expert_<id>.weight`` [r, d_in], ``....lora_B.expert_<id>.weight``
        [d_out, r], r = this expert's rank). Unlike the original, every expert's weights are returned (it returned
        only those requiring grad)."""
        self._check_id(expert_id)
        r, adapter = self.expert_rank(expert_id), expert_adapter_name(expert_id)
        out = {}
        for name, layer in self.handle.layers.items():
            out[f"base_model.model.{name}.lora_A.{adapter}.weight"] = layer.lora_A[expert_id, :r].detach().cpu().clone()
            out[f"base_model.model.{name}.lora_B.{adapter}.weight"] = (
                layer.lora_B[expert_id, :, :r].detach().cpu().clone()
            )
        return out

    def plan_expert_weights(self, expert_id: int, weights: dict, source: str = "weights") -> list:
        """Validate ``weights`` for expert ``expert_id`` without changing anything; returns the copies to make.

        Keys: the original's peft names (any ``base_model.model.`` prefix; the adapter segment, when present, must be
        this expert's ``expert_<id>``) or short ``<layer>.lora_A.weight`` names. Every injected layer's A and B must
        be present with this expert's shapes. ``source`` names the file in errors."""
        self._check_id(expert_id)
        r = self.expert_rank(expert_id)
        found, unexpected, wrong_adapter = {}, [], []
        for key, tensor in weights.items():
            match = _PEFT_KEY.match(str(key))
            if match is None or match["layer"] not in self.handle.layers:
                unexpected.append(key)
            elif match["adapter"] not in (None, expert_adapter_name(expert_id)):
                wrong_adapter.append(key)
            else:
                found[(match["layer"], match["which"])] = tensor
        missing = [f"{name}.{which}" for name in self.handle.layers for which in ("lora_A", "lora_B")
                   if (name, which) not in found]  # fmt: skip
        if wrong_adapter:
            adapter = expert_adapter_name(expert_id)
            raise KeyError(f"{source}: keys of another adapter than {adapter}: {wrong_adapter[:4]}")
        if missing or unexpected:
            raise KeyError(
                f"{source}: expert weights do not match the injected layers: missing {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''} ({len(missing)}), unexpected {unexpected[:4]}"
                f"{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)})"
            )
        plan = []
        for name, layer in self.handle.layers.items():
            for which, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                target = param[expert_id, :r] if which == "lora_A" else param[expert_id, :, :r]
                tensor = found[(name, which)]
                if not isinstance(tensor, torch.Tensor) or tensor.shape != target.shape:
                    got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                    raise ValueError(
                        f"{source}: {name}.{which} of expert {expert_id} is {got}, expected {tuple(target.shape)} "
                        f"(rank {r})"
                    )
                plan.append((target, tensor))
        return plan

    @staticmethod
    @torch.no_grad()
    def apply_plan(plan) -> None:
        for target, tensor in plan:
            target.copy_(tensor)

    def load_expert_weights(self, expert_id: int, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights keyed as :meth:`get_expert_weights` returns them (or short ``<layer>.lora_A.weight`` keys)
        into expert ``expert_id``; all validated first, nothing changed on an error."""
        self.apply_plan(self.plan_expert_weights(expert_id, weights))
