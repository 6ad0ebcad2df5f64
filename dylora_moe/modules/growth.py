"""Growth that keeps training: a grown model keeps its parameter objects, and optimizers keep stepping them.

Adding an expert makes every LoRA stack and the gate one row larger (and may widen the rank). The layers build new
tensors; :func:`keep_parameter_identity` puts the grown values back into the *same* ``nn.Parameter`` objects, so an
optimizer built before the growth (the Trainer's, a user's AdamW) still holds the model's parameters. Its state
(AdamW moments, SGD momentum) still has the old shapes: a step pre-hook on every optimizer zero-pads the state of
grown parameters to their new shapes before the step reads it, so the old experts keep their moments and the new
expert starts from zero, as a parameter the optimizer has never seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

_GROWN = "_dylora_moe_grown"  # attribute marking a parameter whose shape grew: its optimizer state is padded
_HOOK = None


def keep_parameter_identity(module: nn.Module, before: dict[str, nn.Parameter]) -> None:
    """After growth: every parameter of ``module`` that existed under the same name in ``before`` but is now a
    different object gets its old object back, holding the new values (shape, requires_grad)."""
    _install_hook()
    for name, new in list(module.named_parameters()):
        old = before.get(name)
        if old is None or old is new:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        with torch.no_grad():
            # A graph still alive (e.g. the last forward's routing) keeps the old gradient accumulator, which checks
            # gradients against the old shape; assigning data of another dtype first is what makes torch drop it.
            other = torch.float64 if old.dtype != torch.float64 else torch.float32
            old.data = torch.empty(0, dtype=other, device=old.device)
            old.data = new.data
        old.requires_grad_(new.requires_grad)
        setattr(owner, attr, old)
        setattr(old, _GROWN, True)


def pad_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Zero-pad the state tensors of the grown parameters held by ``optimizer`` to their parameters' new shapes
    (growth appends along each dimension: experts, rank, gate rows)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not getattr(param, _GROWN, False) or param not in optimizer.state:
                continue
            state = optimizer.state[param]
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim() == param.dim() and value.shape != param.shape:
                    if any(s > p for s, p in zip(value.shape, param.shape)):
                        raise RuntimeError(
                            f"optimizer state {key!r} {tuple(value.shape)} is larger than its parameter "
                            f"{tuple(param.shape)}: the model shrank; build a new optimizer"
                        )
                    pad = [x for s, p in zip(reversed(value.shape), reversed(param.shape)) for x in (0, p - s)]
                    state[key] = F.pad(value, pad)


def _install_hook() -> None:
    global _HOOK
    if _HOOK is None:
        _HOOK = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: pad_optimizer_state(optimizer))
