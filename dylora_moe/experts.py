"""ExpertManager (the original's API) over stacked expert weights instead of one peft adapter per expert."""

from __future__ import annotations

import torch
from torch import nn

from .inject import MoELoRAHandle, inject_moe_lora


class ExpertManager:
    """Creates and addresses the LoRA experts of ``model``; every expert lives in the stacked tensors of each
    injected :class:`~dylora_moe.layer.MoELoRALinear` (expert i = row i of every ``lora_A``/``lora_B``).

    The model is injected with zero experts on construction; :meth:`create_expert` adds one to every layer.
    All experts share one rank, alpha and dropout (the stacked layout needs one rank).
    """

    def __init__(
        self,
        model: nn.Module,
        lora_r: int,
        lora_alpha: float,
        lora_dropout: float,
        *,
        target_modules=None,
        kernel: str = "auto",
    ):
        self.model = model
        self.lora_r, self.lora_alpha, self.lora_dropout = lora_r, lora_alpha, lora_dropout
        self.handle: MoELoRAHandle = inject_moe_lora(
            model, num_experts=0, r=lora_r, alpha=lora_alpha, dropout=lora_dropout,
            target_modules=target_modules, kernel=kernel,
        )  # fmt: skip
        self.expert_configs: list[dict] = []
        self.current_expert_id: int | None = None

    @property
    def num_experts(self) -> int:
        return len(self.expert_configs)

    def create_expert(self, r=None, lora_alpha=None, lora_dropout=None) -> int:
        """Add an expert (A Kaiming-uniform, B zeros) to every injected layer; returns its id."""
        asked = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout}
        default = {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout}
        differing = {k: v for k, v in asked.items() if v is not None and v != default[k]}
        if differing:
            raise ValueError(
                f"per-expert LoRA settings {differing} are not supported: experts are stacked tensors sharing "
                f"r={self.lora_r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}"
            )
        expert_id = self.handle.add_expert()
        self.expert_configs.append(dict(default))
        self.set_active_expert(expert_id)
        return expert_id

    def _check_id(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise IndexError(f"expert {expert_id} does not exist; there are {self.num_experts} experts")

    def set_active_expert(self, expert_id: int) -> None:
        """Route every token to this expert alone until the model sets a routing again."""
        self._check_id(expert_id)
        self.handle.set_active_expert(expert_id)
        self.current_expert_id = expert_id

    def get_expert_weights(self, expert_id: int) -> dict[str, torch.Tensor]:
        """Copies of one expert's weights, keyed like peft (``{layer}.lora_A.weight`` [r, d_in],
        ``{layer}.lora_B.weight`` [d_out, r])."""
        self._check_id(expert_id)
        out = {}
        for name, layer in self.handle.layers.items():
            out[f"{name}.lora_A.weight"] = layer.lora_A[expert_id].detach().clone()
            out[f"{name}.lora_B.weight"] = layer.lora_B[expert_id].detach().clone()
        return out

    @torch.no_grad()
    def load_expert_weights(self, expert_id: int, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights in the format of :meth:`get_expert_weights` into expert ``expert_id``."""
        self._check_id(expert_id)
        expected = self.get_expert_weights(expert_id).keys()
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"expert weights do not match the injected layers: missing {missing}, unexpected {unexpected}"
            )
        for name, layer in self.handle.layers.items():
            for key, param in ((f"{name}.lora_A.weight", layer.lora_A), (f"{name}.lora_B.weight", layer.lora_B)):
                if weights[key].shape != param.shape[1:]:
                    raise ValueError(f"{key}: shape {tuple(weights[key].shape)}, expected {tuple(param.shape[1:])}")
                param[expert_id].copy_(weights[key])
