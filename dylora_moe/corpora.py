"""The corpora: Code Alpaca and MBPP, where they are found, read and split as the original did. Both applications
read them here (training packs them, :mod:`dylora_moe.evaluate` takes MBPP's problems), so neither imports the other.

Sources: a local directory (``code_alpaca_2k.json`` + ``mbpp.jsonl``) or the hub (``hub``: ``sahil2801/CodeAlpaca-20k``
and ``google-research-datasets/mbpp``/``full``, cached by ``datasets`` and read from its cache offline afterwards).
:func:`default_data_dir` picks one: ``$DYLORA_DATA_DIR``, else ``../shared/data`` next to the repository when it
exists, else the hub.

Each domain is one :class:`Domain` entry of :data:`REGISTRY` (its hub id, local file names, row text and split);
adding a corpus is one entry there (and its test).

Text of a row, as the original script built it (docs/design.md §2): Code Alpaca ``instruction + "\\n" + output``;
MBPP the problem statement (``text``, or ``prompt`` in the hub's ``sanitized`` config). Splits are the original's, made
with ``datasets.Dataset.train_test_split`` and seed 42, so they match a run of the original on the same rows: Code
Alpaca 90/10 (train/validation), MBPP 80/10/10 (train/validation/test).

Files are read with ``datasets`` (``load_dataset("json", data_files=...)``: a JSON array of objects or JSON lines);
when it cannot read one, the file is scanned line by line to name the line and the problem. ``datasets`` and torch
are imported on first use, so a missing folder or file is reported at once.

"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SPLIT_SEED = 42
HUB_SOURCE = "hub"
DATA_DIR_ENV = "DYLORA_DATA_DIR"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO.parent / "shared" / "data"  # the offline corpora beside a checkout


def default_data_dir() -> str:
    """``$DYLORA_DATA_DIR``, else ``../shared/data`` next to the repository when it exists, else ``hub``."""
    if os.environ.get(DATA_DIR_ENV):
        return os.environ[DATA_DIR_ENV]
    return str(SHARED_DATA_DIR) if SHARED_DATA_DIR.is_dir() else HUB_SOURCE


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


@dataclass(frozen=True)
class Domain:
    """One training corpus: where it lives, the text of a row, and how it is split (seed 42, as the original).

    ``held_out`` is the fraction kept from training; with ``test`` it is halved into validation and test."""

    name: str
    hub_id: str
    hub_config: str | None
    files: tuple[str, ...]  # names looked for in a local data directory, first match wins
    to_text: Callable[[dict, str], str]
    held_out: float
    test: bool = False

    @property
    def split_names(self) -> tuple[str, ...]:
        return ("train", "validation", "test") if self.test else ("train", "validation")


REGISTRY: dict[str, Domain] = {
    domain.name: domain
    for domain in (
        Domain(
            "code_alpaca",
            "sahil2801/CodeAlpaca-20k",
            None,
            ("code_alpaca_2k.json", "code_alpaca_20k.json", "code_alpaca.json"),
            code_alpaca_text,
            held_out=0.1,
        ),
        Domain(
            "mbpp",
            "google-research-datasets/mbpp",
            "full",
            ("mbpp.jsonl", "mbpp.json"),
            mbpp_text,
            held_out=0.2,
            test=True,
        ),
    )
}
DOMAINS = tuple(REGISTRY)


def first_files() -> str:
    """The file each domain is first looked for under, as error messages name them."""
    return " and ".join(domain.files[0] for domain in REGISTRY.values())


class MissingDatasetsError(DataError):
    """The ``datasets`` package, which reads and splits the corpora, is not installed."""


def datasets_package():
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
    to_text = REGISTRY[domain].to_text
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
        REGISTRY[domain].to_text(row, at)


def _local_file(data_dir: Path, domain: str) -> Path:
    files = REGISTRY[domain].files
    for name in files:
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(
        f"data directory {data_dir} has no {domain} file: expected one of {', '.join(files)} "
        f"(found: {', '.join(sorted(p.name for p in data_dir.iterdir())) or 'nothing'})"
    )


def _local_texts(path: Path, domain: str) -> list[str]:
    """A local JSON / JSON-lines file through ``load_dataset("json")``; any problem is named by a line scan."""
    datasets = datasets_package()  # outside the try: a missing package is not a malformed file
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


def load_hub(name: str, config: str | None):
    """``datasets.load_dataset(name, config)`` (cached; offline afterwards), or a one-line DataError saying which
    local files to put where instead."""
    datasets = datasets_package()
    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # the hub raises many types (ConnectionError, OfflineModeIsEnabled, ...)
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        raise DataError(
            f"could not load {name} from the hub ({reason}); without a hub, pass --data_dir with a local copy "
            f"(a folder with {first_files()}), or set {DATA_DIR_ENV} to it"
        ) from err


def _hub_texts(domain: str) -> list[str]:
    name, config = REGISTRY[domain].hub_id, REGISTRY[domain].hub_config
    parts = load_hub(name, config)
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
            f"data directory {data_dir} does not exist; expected a folder with {first_files()} (set --data_dir or "
            f"{DATA_DIR_ENV}, or --data_dir {HUB_SOURCE} to download from the hub)"
        )
    return _local_texts(_local_file(data_dir, domain), domain)


def _split(texts: list[str], test_size: float) -> tuple[list[str], list[str]]:
    """``datasets``' ``train_test_split(test_size, seed=42)``: the original's split of the same rows."""
    parts = datasets_package().Dataset.from_dict({"text": texts}).train_test_split(test_size=test_size, seed=SPLIT_SEED)
    return list(parts["train"]["text"]), list(parts["test"]["text"])


def load_domain(source: str | Path, domain: str) -> Splits:
    """Read one domain and split it as its registry entry says: Code Alpaca 90/10, MBPP 80/10/10 (seed 42)."""
    if domain not in REGISTRY:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    entry = REGISTRY[domain]
    train, held_out = _split(_load_texts(source, domain), entry.held_out)
    if not entry.test:
        return Splits(domain, {"train": train, "validation": held_out})
    validation, test = _split(held_out, 0.5)
    return Splits(domain, {"train": train, "validation": validation, "test": test})
