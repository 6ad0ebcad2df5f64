"""Reading the files of the original DyLoRA-MoE (``torch.save`` dicts) safely, beside our safetensors files.

The original saved its router, skill library and experts with ``torch.save`` (``router.pt``, ``skill_library.pt``,
``expert_i.pt``); we write safetensors. Loaders tell the two apart by content, not by file name, and read ``.pt``
files with ``torch.load(weights_only=True)`` only: plain containers of tensors and numbers load, arbitrary pickled
objects are refused (never unpickled).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def is_safetensors_file(path) -> bool:
    """True when ``path`` starts like a safetensors file: an 8-byte little-endian header length, then ``{``."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 8 + int.from_bytes(head[:8], "little") <= os.path.getsize(path)


def load_torch_file(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with an error that names the file and says why it was refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        raise ValueError(
            f"{path} could not be read as a torch.save file with weights_only=True (only tensors, numbers, strings "
            f"and plain containers are accepted; arbitrary pickled objects are never loaded): {err}"
        ) from err


def require_keys(data, keys, path, what: str) -> None:
    """Raise a ValueError naming ``path`` when ``data`` is not a dict holding every key of ``keys``."""
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a {what} file: it holds a {type(data).__name__}, expected a dict")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path} is not a {what} file: missing {missing} (it has {sorted(map(str, data))})")
