"""The training corpus of the joint-training job: the domains' training splits combined and packed.

Rows are tokenised, each followed by EOS, concatenated and cut into ``max_length`` blocks ("packing"); only the last
block of a split is padded, and padding is masked out of the attention and of the loss (label -100). The corpora
themselves (files, hub, splits) are read by :mod:`dylora_moe.corpora`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..corpora import SPLIT_SEED, Splits

if TYPE_CHECKING:
    import torch


def subset(texts: list[str], percent: float) -> list[str]:
    """The first ``percent`` % of a split (splits are already shuffled), at least one row."""
    if not 0 < percent <= 100:
        raise ValueError(f"subset percent must be in (0, 100]; got {percent}")
    return texts[: max(1, math.ceil(len(texts) * percent / 100))]


class PackedDataset:
    """Rows of ``max_length`` tokens: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding).
    A map-style dataset (``len`` and indexing), as ``torch.utils.data.DataLoader`` and the Trainer take it."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, pad_id: int):
        self.input_ids, self.lengths, self.pad_id = input_ids, lengths, pad_id

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        import torch

        ids = self.input_ids[index]
        mask = (torch.arange(ids.shape[0]) < self.lengths[index]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def pack(texts: Sequence[str], tokenizer, max_length: int) -> PackedDataset:
    """Tokenise ``texts`` (each followed by EOS), concatenate, cut into ``max_length`` rows; pad only the last."""
    import torch

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2; got {max_length}")
    if not texts:
        raise ValueError("no texts to pack")
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer needs an EOS and a pad token for packing")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    stream = torch.tensor([tok for ids in encoded for tok in (*ids, tokenizer.eos_token_id)], dtype=torch.long)
    rows = math.ceil(stream.numel() / max_length)
    padded = torch.full((rows * max_length,), tokenizer.pad_token_id, dtype=torch.long)
    padded[: stream.numel()] = stream
    lengths = torch.full((rows,), max_length, dtype=torch.long)
    lengths[-1] = stream.numel() - (rows - 1) * max_length
    return PackedDataset(padded.view(rows, max_length), lengths, tokenizer.pad_token_id)


@dataclass
class Corpus:
    """What train.py needs: the combined training set and one evaluation set per domain."""

    train: PackedDataset
    eval: dict[str, PackedDataset]
    train_texts: list[str]


def training_texts(splits: Sequence[Splits], percent: float = 100.0) -> list[str]:
    """The combined training texts (each domain subset by ``percent``), shuffled with seed 42 so packed rows
    mix both domains."""
    texts = [text for split in splits for text in subset(split.texts["train"], percent)]
    random.Random(SPLIT_SEED).shuffle(texts)
    return texts


def build_corpus(
    splits: Sequence[Splits], tokenizer, max_length: int, training_subset: float = 100.0, eval_subset: float = 100.0
) -> Corpus:
    """Pack the combined training set and each domain's validation split (subsets in percent)."""
    texts = training_texts(splits, training_subset)
    evals = {s.domain: pack(subset(s.texts["validation"], eval_subset), tokenizer, max_length) for s in splits}
    return Corpus(train=pack(texts, tokenizer, max_length), eval=evals, train_texts=texts)
