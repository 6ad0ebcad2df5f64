"""The whole tensors a checkpoint holds, from a model whose parameters may be sharded over processes.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a DTensor holding this rank's shard (the
expert stacks ``lora_A`` [E, r, d_in] / ``lora_B`` [E, d_out, r] split along the experts). A checkpoint is written
from the whole tensors, so a sharded run writes the same files as one process and any process count reads them:
:func:`checkpoint_tensors` gathers them (a collective: every rank calls it), or takes them from a full state dict
that was gathered already (the Trainer's under FSDP, keyed as ``moe.state_dict()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # torch.distributed may be built without DTensor support
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = ()


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (sharded by FSDP2 or another DTensor plan)."""
    return bool(DTensor) and any(isinstance(p, DTensor) for p in module.parameters())


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached on the host, gathered from every rank first when it is a DTensor (a collective)."""
    if DTensor and isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().contiguous().cpu()


@torch.no_grad()
def write_whole(target: torch.Tensor, source: torch.Tensor) -> None:
    """Copy the whole tensor ``source`` into ``target``, a parameter or buffer; a DTensor ``target`` takes its own
    shard of ``source`` (every rank must call this with the same ``source``)."""
    if DTensor and isinstance(target, DTensor):
        source = distribute_tensor(source.to(target.dtype), target.device_mesh, target.placements)
    target.copy_(source)


@dataclass
class CheckpointTensors:
    """Per adapted layer (by its name in ``moe.handle.layers``) the whole ``(lora_A, lora_B)`` stacks, and the
    router's state dict, all on the host."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    router: dict[str, torch.Tensor]


def checkpoint_tensors(moe, state_dict: dict[str, torch.Tensor] | None = None) -> CheckpointTensors:
    """The whole tensors of ``moe``'s experts and router: from ``state_dict`` (a full state dict of ``moe``) when
    given, else from the live parameters (gathered when sharded: every rank must call this then)."""
    router = moe.router.state_dict()
    if state_dict is None:
        layers = {name: (whole(layer.lora_A), whole(layer.lora_B)) for name, layer in moe.handle.layers.items()}
        return CheckpointTensors(layers, {key: whole(value) for key, value in router.items()})
    names = {id(param): name for name, param in moe.named_parameters()}

    def look_up(param: torch.Tensor) -> torch.Tensor:
        name = names[id(param)]
        if name not in state_dict:
            raise KeyError(f"the state dict to save has no {name!r} (is it a full state dict of this model?)")
        return whole(state_dict[name])

    layers = {name: (look_up(layer.lora_A), look_up(layer.lora_B)) for name, layer in moe.handle.layers.items()}
    return CheckpointTensors(layers, {key: whole(state_dict[f"router.{key}"]) for key in router})
