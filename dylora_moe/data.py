"""The two training corpora of the joint-training job: Code Alpaca and MBPP, split and packed as the original did.

Sources: a local directory (``code_alpaca_2k.json`` + ``mbpp.jsonl``, the layout of ``../shared/data``) or the hub
(``--data_dir hub``: ``sahil2801/CodeAlpaca-20k`` and ``google-research-datasets/mbpp``/``full``).

Text of a row, as the original script built it (DESIGN 2): Code Alpaca ``instruction + "\\n" + output``; MBPP the
problem statement (``text``, or ``prompt`` in the hub's ``sanitized`` config). Splits are the original's, made with
``datasets.Dataset.train_test_split`` and seed 42, so they match a run of the original on the same rows: Code Alpaca
90/10 (train/validation), MBPP 80/10/10 (train/validation/test).

Rows are tokenised, each followed by EOS, concatenated and cut into ``max_length`` blocks ("packing"); only the last
block of a split is padded, and padding is masked out of the attention and of the loss (label -100).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DOMAINS = ("code_alpaca", "mbpp")
SPLIT_SEED = 42
HUB_SOURCE = "hub"
HUB_IDS = {"code_alpaca": ("sahil2801/CodeAlpaca-20k", None), "mbpp": ("google-research-datasets/mbpp", "full")}
# File names looked for in a local data directory, first match wins.
LOCAL_FILES = {
    "code_alpaca": ("code_alpaca_2k.json", "code_alpaca_20k.json", "code_alpaca.json"),
    "mbpp": ("mbpp.jsonl", "mbpp.json"),
}


class DataError(ValueError):
    """A data file or directory is missing or malformed; the message names the file and what was expected."""


@dataclass
class Splits:
    """Texts of one domain per split name (``train``, ``validation``, and ``test`` for MBPP)."""

    domain: str
    texts: dict[str, list[str]]


def code_alpaca_text(row: dict, where: str) -> str:
    """``instruction + "\\n" + output``: the original script's text (its ``input`` field is not used)."""
    for field in ("instruction", "output"):
        if not isinstance(row.get(field), str):
            raise DataError(
                f"{where}: missing or non-string field {field!r} (Code Alpaca rows need instruction, output)"
            )
    return row["instruction"] + "\n" + row["output"]


def mbpp_text(row: dict, where: str) -> str:
    """The problem statement (``text`` in MBPP ``full``, ``prompt`` in ``sanitized``), as the original trained on."""
    for field in ("text", "prompt"):
        if isinstance(row.get(field), str):
            return row[field].replace("\r\n", "\n")
    raise DataError(f"{where}: missing string field 'text' (or 'prompt') with the MBPP problem statement")


def _read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON lines (one object a line); errors name the file and the line."""
    raw = path.read_text(encoding="utf-8")
    if raw.lstrip().startswith("["):
        try:
            rows = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON ({err}); expected one JSON array of objects") from err
        where = [f"{path} row {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {number}: invalid JSON ({err}); expected one JSON object a line") from err
            where.append(f"{path} line {number}")
    if not rows:
        raise DataError(f"{path}: no rows")
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object, got {type(row).__name__}")
    return [dict(row, _where=at) for row, at in zip(rows, where)]


def _local_file(data_dir: Path, domain: str) -> Path:
    for name in LOCAL_FILES[domain]:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"data directory {data_dir} has no {domain} file: expected one of {', '.join(LOCAL_FILES[domain])} "
        f"(found: {', '.join(sorted(p.name for p in data_dir.iterdir())) or 'nothing'})"
    )


def _load_rows(source: str | Path, domain: str) -> list[dict]:
    if str(source) == HUB_SOURCE:
        import datasets

        name, config = HUB_IDS[domain]
        try:
            parts = datasets.load_dataset(name, config)
        except Exception as err:  # the hub raises many types (ConnectionError, OfflineModeIsEnabled, ...)
            raise DataError(
                f"could not load {name} from the hub ({type(err).__name__}: {err}); without a hub, pass "
                f"--data_dir with a local copy ({' + '.join(names[0] for names in LOCAL_FILES.values())})"
            ) from err
        # MBPP `full` ships train/test/validation/prompt splits: pool them, then split 80/10/10 as the original did.
        return [dict(row, _where=f"{name}[{split}] row {i}") for split in parts for i, row in enumerate(parts[split])]
    data_dir = Path(source)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist; expected a folder with "
            f"{' and '.join(names[0] for names in LOCAL_FILES.values())} (set --data_dir or DYLORA_DATA_DIR, "
            f"or --data_dir {HUB_SOURCE} to download from the hub)"
        )
    return _read_json_rows(_local_file(data_dir, domain))


def _split(texts: list[str], test_size: float) -> tuple[list[str], list[str]]:
    """``datasets``' ``train_test_split(test_size, seed=42)``: the original's split of the same rows."""
    import datasets

    parts = datasets.Dataset.from_dict({"text": texts}).train_test_split(test_size=test_size, seed=SPLIT_SEED)
    return list(parts["train"]["text"]), list(parts["test"]["text"])


def load_domain(source: str | Path, domain: str) -> Splits:
    """Read one domain and split it: Code Alpaca 90/10, MBPP 80/10/10 (seed 42)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    rows = _load_rows(source, domain)
    to_text = code_alpaca_text if domain == "code_alpaca" else mbpp_text
    texts = [to_text(row, row["_where"]) for row in rows]
    if domain == "code_alpaca":
        train, validation = _split(texts, 0.1)
        return Splits(domain, {"train": train, "validation": validation})
    train, rest = _split(texts, 0.2)
    validation, test = _split(rest, 0.5)
    return Splits(domain, {"train": train, "validation": validation, "test": test})


def subset(texts: list[str], percent: float) -> list[str]:
    """The first ``percent`` % of a split (splits are already shuffled), at least one row."""
    if not 0 < percent <= 100:
        raise ValueError(f"subset percent must be in (0, 100]; got {percent}")
    return texts[: max(1, math.ceil(len(texts) * percent / 100))]


class PackedDataset(torch.utils.data.Dataset):
    """Rows of ``max_length`` tokens: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""

    def __init__(self, input_ids: torch.Tensor, lengths: torch.Tensor, pad_id: int):
        self.input_ids, self.lengths, self.pad_id = input_ids, lengths, pad_id

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        mask = (torch.arange(ids.shape[0]) < self.lengths[index]).long()
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())


def pack(texts: Sequence[str], tokenizer, max_length: int) -> PackedDataset:
    """Tokenise ``texts`` (each followed by EOS), concatenate, cut into ``max_length`` rows; pad only the last."""
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
