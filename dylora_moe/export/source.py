"""The checkpoint an export reads: a DyLoRA_MoE ``final/`` (or any ``save_pretrained`` folder), checked first.

Every file the export copies is checked against the size and sha256 the checkpoint recorded, so a damaged
checkpoint is refused before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from ..io.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ROUTER_NAME, CheckpointError, _read_file, read_config
from ..io.peft_format import expert_name


class ExportError(ValueError):
    """An export that cannot be done as asked; the message is one line naming the path, flag or value."""


@dataclass
class Checkpoint:
    """A checked checkpoint folder: its config (read_config's) and verified file reads."""

    path: Path
    config: dict

    @property
    def num_experts(self) -> int:
        return self.config["checkpoint"]["num_experts"]

    @property
    def layers(self) -> list[str]:
        return list(self.config["checkpoint"]["layers"])

    @property
    def base_model(self) -> str:
        return self.config.get("base_model_name_or_path") or ""

    def read(self, name: str) -> bytes:
        """A checkpoint file's bytes, checked against its recorded size and sha256."""
        records = self.config["checkpoint"].get("files")
        try:
            return _read_file(self.path, name, None if records is None else records[name])
        except CheckpointError as err:
            raise ExportError(str(err)) from None

    def adapter_config(self, expert: int) -> dict:
        return json.loads(self.read(f"{expert_name(expert)}/{ADAPTER_CONFIG}"))

    def adapter_weights(self, expert: int) -> bytes:
        return self.read(f"{expert_name(expert)}/{ADAPTER_WEIGHTS}")

    def router_config(self) -> dict:
        """The router's constructor arguments (input_size, num_experts, top_k, temperature, weighting, ...)."""
        self.read(ROUTER_NAME)  # checked before it is trusted
        with safe_open(str(self.path / ROUTER_NAME), framework="pt") as f:
            return json.loads((f.metadata() or {})["config"])


def open_checkpoint(path) -> Checkpoint:
    """The checkpoint at ``path``, its config checked; an ExportError (one line) when it is not one."""
    path = Path(path)
    try:
        return Checkpoint(path, read_config(path))
    except CheckpointError as err:
        raise ExportError(str(err)) from None
