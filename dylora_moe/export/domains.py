"""Per-domain routing for ``--per_domain``: each training domain's average routing weights over its tokens.

Two sources of the same quantity, each expert's mean routing weight over the domain's real evaluation tokens (what
the model's ``expert_utilization`` output reports), normalised to sum to 1:

- measured now on the validation split of each domain in ``--data_dir`` (the split train.py evaluates on);
- read from the training run the checkpoint belongs to: the last evaluation in ``metrics.jsonl`` beside ``final/``
  (its ``eval_<domain>_util_expert_<e>`` values, which summary.md's utilisation table shows).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .source import ExportError

UTIL_KEY = re.compile(r"eval_(?P<domain>.+)_util_expert_(?P<expert>\d+)")
METRICS_FILE = "metrics.jsonl"  # dylora_moe.train.runs.METRICS_FILE


def _normalised(values: list[float], where: str) -> list[float]:
    total = sum(values)
    if not all(v >= 0 for v in values) or total <= 0:
        raise ExportError(f"{where}: routing weights {values} are not a distribution")
    return [v / total for v in values]


def _records(path: Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` (a torn or foreign line is skipped); none if there is no file."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def from_run(checkpoint: Path, num_experts: int) -> tuple[dict[str, list[float]], str]:
    """``{domain: weights}`` from the last evaluation record of the run folder holding ``checkpoint``, and a line
    naming the source; an ExportError when the run has none."""
    path = checkpoint.resolve().parent / METRICS_FILE
    for record in reversed(_records(path)):
        found: dict[str, dict[int, float]] = {}
        for key, value in record.items():
            match = UTIL_KEY.fullmatch(key)
            if match and isinstance(value, (int, float)):
                found.setdefault(match["domain"], {})[int(match["expert"])] = float(value)
        complete = {d: v for d, v in found.items() if sorted(v) == list(range(num_experts))}
        if complete:
            step = record.get("step", "?")
            where = f"{path} (evaluation at step {step})"
            weights = {d: _normalised([v[e] for e in range(num_experts)], where) for d, v in complete.items()}
            return weights, f"routing statistics of the run's last evaluation, {where}"
    raise ExportError(
        f"--per_domain: no per-domain routing statistics for {num_experts} experts in {path}; pass --data_dir to "
        "measure them on the evaluation data"
    )


@torch.no_grad()
def measured(moe, tokenizer, data_dir: Path, max_length: int = 512) -> tuple[dict[str, list[float]], str]:
    """``{domain: weights}`` measured with ``moe``'s router on each domain's validation split in ``data_dir``
    (one routing pass of the base model per row, rows truncated to ``max_length`` tokens)."""
    from ..corpora import DOMAINS, load_domain

    if tokenizer is None:
        raise ExportError("--per_domain --data_dir needs a tokenizer: none in the checkpoint or the base model folder")
    out = {}
    for domain in DOMAINS:
        try:
            texts = load_domain(data_dir, domain).texts["validation"]
        except (OSError, ValueError) as err:
            raise ExportError(f"--data_dir {data_dir}: {err}") from None
        total = torch.zeros(moe.num_experts, dtype=torch.float64)
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                continue
            route = moe._routing_pass(ids.to(moe.device), torch.ones_like(ids, device=moe.device)).route
            total += 1.0 if route is None else route.dense.double().sum(0).cpu()
        out[domain] = _normalised(total.tolist(), f"--data_dir {data_dir}, domain {domain}")
    return out, f"measured now on the validation splits in {data_dir} ({', '.join(DOMAINS)})"
