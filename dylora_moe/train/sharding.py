"""Several training processes: evaluation sets that split over the ranks without counting a row twice, and what
``run.json`` records about the sharding.

Evaluation under DDP or FSDP: the Trainer hands each rank every ``world_size``-th batch of an evaluation set, and when
the set does not fill the last batch of every rank, accelerate fills it with rows from the start of the set (each
rank must run as many forwards as the others: FSDP's forwards are collectives). Those repeated rows would count twice
in every token-weighted statistic. :class:`PaddedForRanks` pads the set to a multiple of ``world_size x batch`` with
blank rows (no attention, no label) instead, which add zero tokens to every sum, so the sums over all ranks are the
sums over the set, as in one process.
"""

from __future__ import annotations

import json

import torch

BLANK_LABEL = -100


class PaddedForRanks(torch.utils.data.Dataset):
    """``dataset`` followed by blank rows up to a multiple of ``multiple`` rows: a blank row has the first row's
    keys and shapes, ``attention_mask`` 0, ``labels`` -100 and every other value 0 (the model routes and scores
    none of its tokens)."""

    def __init__(self, dataset, multiple: int):
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        self.dataset, self.size = dataset, len(dataset)
        self.padded = -(-self.size // multiple) * multiple if self.size else 0

    def __len__(self) -> int:
        return self.padded

    def __getitem__(self, index: int) -> dict:
        if index < self.size:
            return self.dataset[index]
        if not 0 <= index < self.padded:
            raise IndexError(index)
        return {
            key: torch.full_like(torch.as_tensor(value), BLANK_LABEL if key == "labels" else 0)
            for key, value in self.dataset[0].items()
        }


def sharding_record(trainer) -> dict:
    """What ``run.json`` says about a run's processes, from its Trainer (after the accelerator is set up, so a
    strategy chosen by ``accelerate launch``'s config file counts too): ``world_size`` and ``strategy`` (``single``,
    ``ddp``, ``fsdp`` or ``deepspeed``); for FSDP its ``fsdp_version``, ``reshard_after_forward`` (FSDP2) or
    ``sharding_strategy`` (FSDP1) and ``auto_wrap_policy``; for DeepSpeed its ZeRO ``zero_stage``."""
    world = int(trainer.args.world_size)
    record: dict = {"world_size": world, "strategy": "ddp" if world > 1 else "single"}
    if trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        version = int(getattr(plugin, "fsdp_version", 1))
        record.update(strategy="fsdp", fsdp_version=version)
        if version == 2:
            record["reshard_after_forward"] = bool(plugin.reshard_after_forward)
        else:
            record["sharding_strategy"] = str(getattr(plugin.sharding_strategy, "name", plugin.sharding_strategy))
        policy = plugin.auto_wrap_policy
        policy = getattr(policy, "func", policy)  # a functools.partial of the policy function
        record["auto_wrap_policy"] = getattr(policy, "__name__", str(policy)) if policy else None
    elif trainer.is_deepspeed_enabled:
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        record.update(strategy="deepspeed", zero_stage=config.get("zero_optimization", {}).get("stage"))
    return json.loads(json.dumps(record, default=str))  # plain JSON values only
