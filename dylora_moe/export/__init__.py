"""Ship what you trained: exact merges, each expert as a standard adapter, the router for serving.

``python -m dylora_moe.export CHECKPOINT OUT --format peft|merged|vllm`` (docs/export.md):

- ``peft``: ``OUT/expert_<i>/`` a stock peft LoRA adapter per expert, plus the router and a README of how to route;
- ``merged``: ``OUT/expert_<i>/`` one plain transformers model per expert (:mod:`.merge`), with ``--per_domain``
  also ``OUT/domain_<name>/`` per training domain (its average routing merged in);
- ``vllm``: the adapters checked against the fields vLLM's multi-LoRA serving reads, and a README with the
  ``vllm serve --enable-lora --lora-modules ...`` line, the ``--max-lora-rank`` and the target modules.

:func:`export_checkpoint` is the same from Python. Routing at serving time: :mod:`dylora_moe.serving`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .folders import earlier_entries
from .source import ExportError, open_checkpoint
from .writers import FORMATS, export_adapters, export_merged

__all__ = ["FORMATS", "ExportError", "export_checkpoint"]


def export_checkpoint(
    checkpoint,
    out,
    fmt: str,
    *,
    base_model: str | None = None,
    per_domain: bool = False,
    data_dir=None,
    progress: Callable[[str], None] = print,
) -> Path:
    """Export the checkpoint folder ``checkpoint`` (a ``final/`` or ``save_pretrained`` folder) to ``out`` in
    format ``fmt``; returns ``out``. ``base_model``: the base model's path or hub id (default: the one the
    checkpoint records). ``per_domain`` (``merged`` only): also one model per training domain, from its routing
    measured on ``data_dir``'s validation splits, or else from the run's saved statistics. Raises ExportError (one
    line) before writing anything when the checkpoint, format or output folder is wrong."""
    from . import domains

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if per_domain and fmt != "merged":
        raise ExportError(f"--per_domain merges each domain's routing: it needs --format merged, not {fmt}")
    ckpt = open_checkpoint(checkpoint)
    out = Path(out)
    earlier_entries(out)  # a folder that is not ours is refused now, before a base model is loaded
    base = base_model or ckpt.base_model
    if fmt == "merged" and not base:
        raise ExportError(f"{ckpt.path} records no base model; pass --base_model")
    progress(f"exporting {ckpt.path} ({ckpt.num_experts} experts) to {out} as {fmt}")
    if fmt != "merged":
        export_adapters(ckpt, out, fmt, base, progress)
        return out
    weights = None
    if per_domain:
        if data_dir is not None:
            weights = lambda moe, tokenizer: domains.measured(moe, tokenizer, Path(data_dir))  # noqa: E731
        else:
            domains.from_run(ckpt.path, ckpt.num_experts)  # fail now, before loading the base model
            weights = lambda moe, tokenizer: domains.from_run(ckpt.path, ckpt.num_experts)  # noqa: E731
    export_merged(ckpt, out, base, progress, weights)
    return out
