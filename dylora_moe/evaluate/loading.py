"""The model to evaluate: a base model alone (hub id or local folder), or a saved DyLoRA_MoE checkpoint on its base.

A training run's output folder holds ``final/`` (experts, router, config) and ``run.json`` (the
model flags, among them ``model_name``); with ``--model_name tiny`` also the tiny base model in ``tiny-<hash>/``.
So ``--checkpoint RUN/final`` (or the run folder itself) finds its base model without ``--model_name``.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..base_models import TINY, ModelLoadError, load_pretrained
from ..model import DyLoRA_MoE, is_checkpoint_dir


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder itself, or ``final/`` of a run folder."""
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    if is_checkpoint_dir(path / "final"):
        return path / "final"
    raise ModelLoadError(f"{path} is neither a DyLoRA_MoE checkpoint nor a run folder with one in final/")


def base_model_of(checkpoint: Path) -> str:
    """The base model a run trained on: ``model_name`` in its ``run.json``; for ``tiny``, the run's one tiny-<hash>/."""
    run_file = checkpoint.parent / "run.json"
    try:
        name = json.loads(run_file.read_text())["fingerprint"]["model_name"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(
            f"cannot tell the base model of {checkpoint}: {run_file} is missing or has no model_name; pass --model_name"
        ) from err
    if name != TINY:
        return name
    tiny = sorted(p for p in checkpoint.parent.glob("tiny-*") if (p / "config.json").is_file())
    if len(tiny) != 1:
        found = ", ".join(p.name for p in tiny) or "none"
        raise ModelLoadError(
            f"the run trained on the tiny model, but {checkpoint.parent} has {found}; pass --model_name"
        )
    return str(tiny[0])


def load_for_evaluation(
    checkpoint=None, model_name=None, *, backend: str = "auto", dtype=None, device=None, kernel: str | None = None
):
    """(model, tokenizer): the checkpoint on its base model (``model_name`` or the run's), or the base model alone.
    The tokenizer is the base model's (the one the run trained with); ``backend`` runs the experts (``kernel``: its
    former name)."""
    if checkpoint is None and model_name is None:
        raise ValueError("give a checkpoint, a base model, or both")
    folder = checkpoint_folder(checkpoint) if checkpoint is not None else None
    base, tokenizer = load_pretrained(str(model_name or base_model_of(folder)), dtype=dtype)
    if device is not None:
        base = base.to(device)
    if folder is None:
        return base.eval(), tokenizer
    model = DyLoRA_MoE.from_pretrained(base, folder, backend=kernel if kernel is not None else backend)
    return model.eval(), tokenizer
