"""Run identity of train.py's output folder: one run per folder, resume only from that run's checkpoints.

A fresh run writes ``run.json`` (a random run id and the flags that shape the model) into ``--output_dir``; each
checkpoint carries the same id in its ``trainer_state.json`` (through :class:`~dylora_moe.train.trainer.RunIdentity`, a
stateful Trainer callback) and each ``metrics.jsonl`` row carries it too. Before anything is written:

- a fresh run into a folder that holds a run is refused (``--resume_from_checkpoint`` continues it,
  ``--overwrite_output_dir`` replaces it, removing only the outputs this project wrote for that run, see
  :func:`run_outputs`); a run that stopped before its first checkpoint is replaced by the next one;
- a folder whose run outputs cannot be identified (no run.json, a final/ not written by train.py, another run's
  checkpoint) is refused, with or without ``--overwrite_output_dir``: nothing deletes a file a user may own;
- a resume picks the newest complete checkpoint of the folder's run, and refuses when the model flags differ.

Standard library only: these checks run before the heavy imports, so a refused run answers at once.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluate.report import FIGURE_FILE as CODE_EVAL_FIGURE
from ..evaluate.report import MARKDOWN_FILE as CODE_EVAL_MARKDOWN
from ..evaluate.report import METRICS_FILE as CODE_EVAL_METRICS
from ..evaluate.report import SAMPLES_FILE as CODE_EVAL_SAMPLES
from ..io.atomic_folder import is_staging_name, write_text_atomic

logger = logging.getLogger(__name__)

# What a run writes at the top of its folder, besides checkpoint-N/ (the writers take their names from here).
RUN_FILE = "run.json"  # the run id and the model flags
METRICS_FILE = "metrics.jsonl"  # every log
FINAL_DIR = "final"  # the model kept at the end
SUMMARY_FILE = "summary.md"
LOSS_PLOT, UTIL_PLOT = "loss.png", "utilization.png"
HEATMAP_PLOT, EXAMPLES_PLOT, EXAMPLES_HTML = "specialisation.png", "routing_examples.png", "routing_examples.html"
WANDB_DIR = "wandb"
# train.py --code_eval writes the evaluation's files (CODE_EVAL_*, named by dylora_moe.evaluate.report) here too.
# The one list of a run's outputs (what --overwrite_output_dir removes); the tiny base model cache (tiny-*) is kept.
RUN_OUTPUTS = (
    RUN_FILE, METRICS_FILE, FINAL_DIR, SUMMARY_FILE, LOSS_PLOT, UTIL_PLOT, HEATMAP_PLOT, EXAMPLES_PLOT, EXAMPLES_HTML,
    WANDB_DIR, CODE_EVAL_SAMPLES, CODE_EVAL_METRICS, CODE_EVAL_MARKDOWN, CODE_EVAL_FIGURE,
)  # fmt: skip
TRAINER_STATE = "trainer_state.json"
IDENTITY_CALLBACK = "RunIdentity"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL_MARKER = "training_args.json"  # what the trainer's save_model writes into final/ (it replaces only such a folder)
# What else save_model writes into final/: the model's config (which lists the model's other files) and the tokenizer.
MODEL_CONFIG = "dylora_moe_config.json"  # dylora_moe.io.checkpoint.CONFIG_NAME (this module stays torch-free)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
)  # fmt: skip


class RunConflict(ValueError):
    """The output folder and the flags disagree (another run, other model flags); nothing was written."""


class CheckpointNotFound(FileNotFoundError):
    """Resume was asked for, and the run folder holds no complete checkpoint of its run."""


@dataclass
class RunPlan:
    """What train.py will do with its output folder, decided before anything is written."""

    output_dir: Path
    run_id: str
    fingerprint: dict
    resume_from: str | None = None  # a checkpoint folder
    resume_step: int = 0
    fresh: bool = True
    remove: list[Path] = field(default_factory=list)  # an earlier run's outputs, with --overwrite_output_dir


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoint-N folders, oldest first (staging folders never match)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_identity(checkpoint: Path) -> dict | None:
    """``{"run_id", "fingerprint"}`` recorded in a checkpoint's trainer state; None for a foreign or incomplete one."""
    state = read_json(checkpoint / TRAINER_STATE)
    if state is None:
        return None
    identity = state.get("stateful_callbacks", {}).get(IDENTITY_CALLBACK)
    if isinstance(identity, list):  # the Trainer keeps a list when a callback class is registered twice
        identity = identity[-1] if identity else None
    args = identity.get("args") if isinstance(identity, dict) else None
    return args if isinstance(args, dict) and "run_id" in args else None


def fingerprint_mismatch(recorded: dict, current: dict) -> str | None:
    """``--flag A (this command) vs B (the run)`` for each model flag that differs, or None."""
    diffs = [
        f"--{key} {current.get(key)!r} here vs {recorded.get(key)!r} in the run"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key) != current.get(key)
    ]
    return "; ".join(diffs) or None


def run_outputs(folder: Path, run: dict | None) -> tuple[list[Path], list[str]]:
    """``(ours, in_the_way)``: the outputs in ``folder`` that train.py wrote for the run recorded in ``run``
    (run.json), which ``--overwrite_output_dir`` may remove; and, described, those of a run's names that cannot be
    told apart from a user's files (no run.json, a final/ that save_model did not write, another run's checkpoint),
    which nothing removes."""
    if not folder.is_dir():
        return [], []
    run_id = (run or {}).get("run_id")
    ours, in_the_way = [], []
    present = [folder / name for name in RUN_OUTPUTS if (folder / name).exists()] + [p for _, p in checkpoints(folder)]
    for path in present:
        if run_id is None:
            in_the_way.append(f"{path.name} (no {RUN_FILE}: not a run train.py can identify)")
        elif path.name == FINAL_DIR and path.is_dir() and any(path.iterdir()) and not (path / FINAL_MARKER).is_file():
            in_the_way.append(f"{FINAL_DIR}/ (no {FINAL_MARKER}: not written by train.py)")
        elif path.name == FINAL_DIR and path.is_dir() and (added := _not_saved_by_train_py(path)):
            in_the_way.append(f"{', '.join(added[:5])} (in {FINAL_DIR}/, not written by train.py)")
        elif CHECKPOINT.match(path.name) and (checkpoint_identity(path) or {}).get("run_id") != run_id:
            in_the_way.append(f"{path.name}/ (not a checkpoint of run {run_id})")
        else:
            ours.append(path)
    return ours, in_the_way


def _not_saved_by_train_py(final: Path) -> list[str]:
    """Files in a final/ that save_model wrote but that it did not write itself (added by a user afterwards)."""
    config = read_json(final / MODEL_CONFIG) or {}
    recorded = (config.get("checkpoint") or {}).get("files") or {}
    expected = {FINAL_MARKER, MODEL_CONFIG, *TOKENIZER_FILES, *recorded}
    if not recorded:  # a format-1 config lists no files: its expert folders are the model's
        expected |= {str(p.relative_to(final)) for p in final.glob("expert_*/*")} | {"router.safetensors"}
    found = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    return [f"{FINAL_DIR}/{name}" for name in found if name not in expected]


def _refuse_foreign(folder: Path, in_the_way: list[str]) -> None:
    if in_the_way:
        raise RunConflict(
            f"--output_dir {folder} holds files this project did not write for a run it can identify: "
            f"{'; '.join(in_the_way)}. train.py never deletes them (--overwrite_output_dir neither): move them "
            "elsewhere or pass another --output_dir"
        )


def _has_progress(outputs: list[Path]) -> bool:
    """Whether a run got as far as a checkpoint or final/ (else it failed early and its folder is reused)."""
    return any(p.name == FINAL_DIR or CHECKPOINT.match(p.name) for p in outputs)


def plan_run(
    output_dir: str | Path,
    fingerprint: dict,
    *,
    resume: str | None,
    overwrite: bool,
    check_conflicts: bool = True,
) -> RunPlan:
    """Decide fresh / resume / overwrite for ``output_dir``; raise before anything is written when they conflict.

    ``resume`` is None (fresh), ``"last"`` (the newest checkpoint of the folder's run) or a checkpoint folder.
    ``check_conflicts=False`` (processes other than the main one) skips the refusals the main process makes.
    """
    folder = Path(output_dir)
    run = read_json(folder / RUN_FILE)
    existing, in_the_way = run_outputs(folder, run)

    if resume is None:
        if not check_conflicts:
            return RunPlan(folder, uuid.uuid4().hex[:12], fingerprint)
        _refuse_foreign(folder, in_the_way)
        if _has_progress(existing) and not overwrite:
            names = ", ".join(sorted(p.name for p in existing)[:6])
            raise RunConflict(
                f"--output_dir {folder} already holds run {run['run_id']} ({names}); pass --resume_from_checkpoint "
                "to continue it, --overwrite_output_dir to replace it (removes only that run's outputs: "
                f"{', '.join(RUN_OUTPUTS)}, checkpoint-N; other files stay), or another --output_dir"
            )
        if existing and not overwrite:
            logger.info("%s: run %s stopped before its first checkpoint; starting afresh", folder, run["run_id"])
        return RunPlan(folder, uuid.uuid4().hex[:12], fingerprint, remove=existing)

    if overwrite and resume == "last":
        raise RunConflict("--overwrite_output_dir and a bare --resume_from_checkpoint exclude each other")
    if resume == "last":
        if run is None:
            if checkpoints(folder) and check_conflicts:
                raise RunConflict(
                    f"{folder} has checkpoints but no {RUN_FILE} (a run of an older train.py, or not a run): pass "
                    "the checkpoint folder itself, --resume_from_checkpoint <dir>/checkpoint-N"
                )
            raise CheckpointNotFound(f"--resume_from_checkpoint: no complete checkpoint-N folder in {folder}")
        mismatch = fingerprint_mismatch(run.get("fingerprint", {}), fingerprint)
        if mismatch:
            raise RunConflict(f"--resume_from_checkpoint: the flags differ from the run in {folder}: {mismatch}")
        own = [
            (step, p)
            for step, p in checkpoints(folder)
            if (checkpoint_identity(p) or {}).get("run_id") == run["run_id"]
        ]
        if not own:
            raise CheckpointNotFound(
                f"--resume_from_checkpoint: no complete checkpoint-N folder of run {run['run_id']} in {folder}"
            )
        step, path = own[-1]
        return RunPlan(folder, run["run_id"], fingerprint, resume_from=str(path), resume_step=step, fresh=False)

    path = Path(resume)
    state = read_json(path / TRAINER_STATE)
    if not path.is_dir() or state is None:
        raise CheckpointNotFound(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    identity = checkpoint_identity(path)
    if identity is not None:
        mismatch = fingerprint_mismatch(identity.get("fingerprint", {}), fingerprint)
        if mismatch:
            raise RunConflict(f"--resume_from_checkpoint {path}: the flags differ from its run: {mismatch}")
    else:
        logger.warning("%s records no run id (an older train.py): resuming without checking the model flags", path)
    run_id = (identity or {}).get("run_id") or uuid.uuid4().hex[:12]
    if run is not None and run.get("run_id") != run_id and check_conflicts and not overwrite:
        raise RunConflict(
            f"--output_dir {folder} holds run {run.get('run_id')}, not the run of {path} ({run_id}): pass another "
            "--output_dir, or --overwrite_output_dir to replace the run there"
        )
    if overwrite and check_conflicts:
        _refuse_foreign(folder, [w for w in in_the_way if not w.startswith(path.name + "/")])
    remove = [p for p in existing if p.resolve() != path.resolve()] if overwrite else []
    step = int(state.get("global_step", 0))
    return RunPlan(folder, run_id, fingerprint, resume_from=str(path), resume_step=step, fresh=False, remove=remove)


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """The valid rows of a ``metrics.jsonl`` and the number of lines dropped (a torn last line from a kill)."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    rows, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            dropped += 1
    return rows, dropped


def start_run(plan: RunPlan) -> None:
    """The writes of a planned run, main process only: leftover staging folders go, an overwritten run's outputs go,
    a fresh run records ``run.json``, a resumed run's ``metrics.jsonl`` keeps its valid rows up to the checkpoint."""
    folder = plan.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.iterdir():
        if is_staging_name(leftover.name) and leftover.is_dir():
            logger.info("removing %s (a save cut short)", leftover.name)
            shutil.rmtree(leftover, ignore_errors=True)
    for path in plan.remove:
        logger.info("--overwrite_output_dir: removing %s", path)
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if plan.fresh:
        record = {"run_id": plan.run_id, "fingerprint": plan.fingerprint}
        write_text_atomic(folder / RUN_FILE, json.dumps(record, indent=2) + "\n")
        return
    if not (folder / RUN_FILE).is_file():  # resuming from a checkpoint elsewhere: this folder continues that run
        write_text_atomic(
            folder / RUN_FILE, json.dumps({"run_id": plan.run_id, "fingerprint": plan.fingerprint}) + "\n"
        )
    metrics = folder / METRICS_FILE
    rows, dropped = read_metrics(metrics)
    if dropped:
        logger.warning("%s: dropped %d unreadable line(s) (a write cut short by a kill)", metrics, dropped)
    kept = [r for r in rows if r.get("run_id", plan.run_id) == plan.run_id and r.get("step", 0) <= plan.resume_step]
    if metrics.is_file() and (dropped or len(kept) != len(rows)):
        write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))
