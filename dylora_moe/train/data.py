"""The two training corpora of the joint-training job: Code Alpaca and MBPP, split and packed as the original did.

Sources: a local directory (``code_alpaca_2k.json`` + ``mbpp.jsonl``, the layout of ``../shared/data``) or the hub
(``--data_dir hub``: ``sahil2801/CodeAlpaca-20k`` and ``google-research-datasets/mbpp``/``full``).

Text of a row, as the original script built it (docs/design.md §2): Code Alpaca ``instruction + "\\n" + output``;
MBPP the problem statement (``text``, or ``prompt`` in the hub's ``sanitized`` config). Splits are the original's, made
with ``datasets.Dataset.train_test_split`` and seed 42, so they match a run of the original on the same rows: Code
Alpaca 90/10 (train/validation), MBPP 80/10/10 (train/validation/test).

Files are read with ``datasets`` (``load_dataset("json", data_files=...)``: a JSON array of objects or JSON lines);
when it cannot read one, the file is scanned line by line to name the line and the problem. ``datasets`` and torch
are imported on first use, so a missing folder or file is reported at once.

Rows are tokenised, each followed by EOS, concatenated and cut into ``max_length`` blocks ("packing"); only the last
block of a split is padded, and padding is masked out of the attention and of the loss (label -100).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


REQUIRED = {"code_alpaca": "instruction, output", "mbpp": "text (or prompt)"}


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


TO_TEXT = {"code_alpaca": code_alpaca_text, "mbpp": mbpp_text}


class MissingDatasetsError(DataError):
    """The ``datasets`` package, which reads and splits the corpora, is not installed."""


def _datasets():
    """The ``datasets`` module, its progress bars off (a training log gets one bar per phase, not per file)."""
    try:
        import datasets
    except ModuleNotFoundError as err:
        raise MissingDatasetsError(
            "reading the corpora needs the 'datasets' package: pip install datasets (it is in this project's "
            "[train] extra: pip install -e '.[train]')"
        ) from err

    datasets.disable_progress_bars()
    return datasets


@contextlib.contextmanager
def _quiet(logger_name: str):
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _texts(table, domain: str, where) -> list[str]:
    """The texts of a ``datasets.Dataset`` (column-wise: no per-row Python dict); ``where(i)`` names row i."""
    columns = {name: table[name] for name in ("instruction", "output", "text", "prompt") if name in table.column_names}
    to_text = TO_TEXT[domain]
    return [to_text({name: values[i] for name, values in columns.items()}, where(i)) for i in range(len(table))]


def _scan_json_rows(path: Path, domain: str) -> None:
    """Read ``path`` with the standard library and raise a DataError naming the first bad line, row or field."""
    raw = path.read_text(encoding="utf-8", errors="replace")
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
        TO_TEXT[domain](row, at)


def _local_file(data_dir: Path, domain: str) -> Path:
    for name in LOCAL_FILES[domain]:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"data directory {data_dir} has no {domain} file: expected one of {', '.join(LOCAL_FILES[domain])} "
        f"(found: {', '.join(sorted(p.name for p in data_dir.iterdir())) or 'nothing'})"
    )


def _local_texts(path: Path, domain: str) -> list[str]:
    """A local JSON / JSON-lines file through ``load_dataset("json")``; any problem is named by a line scan."""
    datasets = _datasets()  # outside the try: a missing package is not a malformed file
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: no rows")
        with _quiet("datasets"):  # its own ERROR line would precede ours, which names the line
            table = datasets.load_dataset("json", data_files=str(path), split="train")
        if len(table) == 0:
            raise DataError(f"{path}: no rows")
        return _texts(table, domain, lambda i: f"{path} row {i}")
    except DataError:
        _scan_json_rows(path, domain)  # names the line when the row numbering of the table is not the file's
        raise
    except Exception as err:  # datasets / pyarrow raise many types for a malformed file
        _scan_json_rows(path, domain)
        raise DataError(
            f"{path}: cannot be read as JSON lines or a JSON array of objects ({type(err).__name__}: {err})"
        ) from err


def _hub_texts(domain: str) -> list[str]:
    datasets = _datasets()
    name, config = HUB_IDS[domain]
    try:
        parts = datasets.load_dataset(name, config)
    except Exception as err:  # the hub raises many types (ConnectionError, OfflineModeIsEnabled, ...)
        raise DataError(
            f"could not load {name} from the hub ({type(err).__name__}: {err}); without a hub, pass "
            f"--data_dir with a local copy ({' + '.join(names[0] for names in LOCAL_FILES.values())})"
        ) from err
    # MBPP `full` ships train/test/validation/prompt splits: pool them, then split 80/10/10 as the original did.
    texts = []
    for split in parts:
        texts += _texts(parts[split], domain, lambda i, split=split: f"{name}[{split}] row {i}")
    return texts


def _load_texts(source: str | Path, domain: str) -> list[str]:
    if str(source) == HUB_SOURCE:
        return _hub_texts(domain)
    data_dir = Path(source)
    if not data_dir.is_dir():
        raise DataError(
            f"data directory {data_dir} does not exist; expected a folder with "
            f"{' and '.join(names[0] for names in LOCAL_FILES.values())} (set --data_dir or DYLORA_DATA_DIR, "
            f"or --data_dir {HUB_SOURCE} to download from the hub)"
        )
    return _local_texts(_local_file(data_dir, domain), domain)


def _split(texts: list[str], test_size: float) -> tuple[list[str], list[str]]:
    """``datasets``' ``train_test_split(test_size, seed=42)``: the original's split of the same rows."""
    parts = _datasets().Dataset.from_dict({"text": texts}).train_test_split(test_size=test_size, seed=SPLIT_SEED)
    return list(parts["train"]["text"]), list(parts["test"]["text"])


def load_domain(source: str | Path, domain: str) -> Splits:
    """Read one domain and split it: Code Alpaca 90/10, MBPP 80/10/10 (seed 42)."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    texts = _load_texts(source, domain)
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
