"""The pieces that make several processes count like one: blank padding rows, token-weighted sums, run.json's
record of the sharding (the 2-process runs themselves are in tests/distributed)."""

import math
from types import SimpleNamespace

import torch

from dylora_moe.train.sharding import PaddedForRanks, sharding_record
from dylora_moe.train.trainer import RoutingStats


def _rows(n: int) -> list[dict]:
    ones = torch.ones(4, dtype=torch.long)
    return [{"input_ids": ones * (i + 3), "attention_mask": ones, "labels": ones * (i + 3)} for i in range(n)]


def test_padding_rows_are_blank_and_fill_the_last_batch_of_every_rank():
    padded = PaddedForRanks(_rows(5), multiple=4)
    assert len(padded) == 8
    assert torch.equal(padded[4]["input_ids"], torch.full((4,), 7))  # the set itself, in order
    for blank in (padded[5], padded[7]):
        assert blank["attention_mask"].sum() == 0 and (blank["labels"] == -100).all()
        assert blank["input_ids"].shape == (4,) and blank["input_ids"].dtype == torch.long
    assert len(PaddedForRanks(_rows(8), multiple=4)) == 8  # nothing to pad


def _output(loss: float, shares: list[float], entropy: float = 0.5):
    return SimpleNamespace(
        lm_loss=torch.tensor(loss), balance_loss=None, router_entropy=torch.tensor(entropy),
        expert_token_fraction=torch.tensor(shares),
    )  # fmt: skip


def test_losses_are_means_over_all_labelled_tokens_however_batched():
    stats = RoutingStats(num_experts=2)
    mask = torch.ones(1, 9, dtype=torch.long)
    labels = torch.arange(9).unsqueeze(0)  # 8 labelled tokens after the shift
    stats.add(_output(1.0, [1.0, 0.0]), mask, labels)
    short = labels.clone()
    short[:, 3:] = -100  # 2 labelled tokens; 9 routed tokens still
    stats.add(_output(4.0, [0.0, 1.0]), mask, short)
    blank = torch.zeros(2, 9, dtype=torch.long)
    stats.add(_output(float("nan"), [0.0, 0.0], entropy=float("nan")), blank, torch.full((2, 9), -100))
    out = stats.read()
    assert math.isclose(out["lm_loss"], (8 * 1.0 + 2 * 4.0) / 10)  # not the mean of the batch means (2.5)
    assert out["util_expert_0"] == out["util_expert_1"] == 0.5 and out["router_entropy"] == 0.5
    assert out["tokens"] == 18 and out["scored_tokens"] == 10  # the blank rows add nothing (not even NaN)


def _trainer(world_size: int, fsdp_plugin=None, deepspeed_plugin=None):
    state = SimpleNamespace(fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin)
    return SimpleNamespace(
        args=SimpleNamespace(world_size=world_size), accelerator=SimpleNamespace(state=state),
        is_fsdp_enabled=fsdp_plugin is not None, is_deepspeed_enabled=deepspeed_plugin is not None,
    )  # fmt: skip


def test_run_json_sharding_record():
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    assert sharding_record(_trainer(1)) == {"world_size": 1, "strategy": "single"}
    assert sharding_record(_trainer(4)) == {"world_size": 4, "strategy": "ddp"}
    fsdp2 = SimpleNamespace(fsdp_version=2, reshard_after_forward=True, auto_wrap_policy=transformer_auto_wrap_policy)
    assert sharding_record(_trainer(4, fsdp_plugin=fsdp2)) == {
        "world_size": 4, "strategy": "fsdp", "fsdp_version": 2, "reshard_after_forward": True,
        "auto_wrap_policy": "transformer_auto_wrap_policy",
    }  # fmt: skip
    zero3 = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 3}})
    assert sharding_record(_trainer(2, deepspeed_plugin=zero3)) == {
        "world_size": 2, "strategy": "deepspeed", "zero_stage": 3,
    }  # fmt: skip
