"""A reader loading a checkpoint while a writer keeps saving over it gets the old or the new checkpoint, never a
false "corrupted" (issue 24, item 2): the writer swaps whole folders in (atomic_folder.publish), and a read that
fails while its folder was swapped is started again."""

import multiprocessing
import time

import torch
from moe_models import randomize_experts, tiny_llama

from dylora_moe import DyLoRA_MoE
from dylora_moe.io import checkpoint as ckpt


def _model(seed: int) -> DyLoRA_MoE:
    torch.manual_seed(seed)
    moe = DyLoRA_MoE(tiny_llama(layers=1), num_experts=2, lora_r=2, lora_alpha=4, kernel="eager")
    randomize_experts(moe.handle.layers.values(), seed=seed)
    return moe


def _write_in_a_loop(folder, stop, saves) -> None:
    versions = [_model(1), _model(2)]  # two different checkpoints, saved in turn
    while not stop.is_set():
        ckpt.save_checkpoint(versions[saves.value % 2], folder)
        saves.value += 1


def _signature(moe: DyLoRA_MoE) -> float:
    return float(moe.handle.layers[next(iter(moe.handle.layers))].lora_B.double().sum())


def test_a_reader_during_saves_gets_a_whole_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    _model(1).save_pretrained(folder)
    signatures = {_signature(_model(1)), _signature(_model(2))}
    context = multiprocessing.get_context("fork")
    stop, saves = context.Event(), context.Value("i", 0)
    writer = context.Process(target=_write_in_a_loop, args=(folder, stop, saves))
    writer.start()
    reader, loads = _model(3), 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and (loads < 400 or saves.value < 40):
            ckpt.load_checkpoint(reader, folder)  # raises on a mixed or half-seen checkpoint
            assert _signature(reader) in signatures
            loads += 1
    finally:
        stop.set()
        writer.join(30)
    assert saves.value >= 20 and loads >= 20, (saves.value, loads)  # the two really overlapped
