"""Run identity of train.py's output folder: one run per folder, resume only from that run's checkpoints.

A fresh run writes ``run.json`` (a random run id and the flags that shape the model) into ``--output_dir``; each
checkpoint carries the same id in its ``trainer_state.json`` (through :class:`~dylora_moe.train.trainer.RunIdentity`, a
stateful Trainer callback) and each ``metrics.jsonl`` row carries it too. Before anything is written:

- a fresh run into a folder that holds a run is refused (``--resume_from_checkpoint`` continues it,
  ``--overwrite_output_dir`` replaces it, removing only the outputs this project wrote for that run, see
  :func:`run_outputs`); a run that stopped before its first checkpoint is replaced by the next one;
- a folder whose run outputs cannot be identified (no run.json, a final/ not written by train.py, another run's
  checkpoint) is refused, with or without ``--overwrite_output_dir``: nothing deletes a file a user may own;
- a resume picks the newest intact checkpoint of the folder's run (a damaged newer one is named and skipped), and
  refuses when a setting that changes what the model computes differs (unless the caller allows those changes) or
  when another run's checkpoint sits where this run would save next.

While it runs, a run holds a lock on its folder (:class:`RunFolderLock`): a second run into the folder is refused.
Each checkpoint lists the files train.py wrote into it, with their sizes and sha256 (:data:`MANIFEST`): rotation
(``--save_total_limit``) and ``--overwrite_output_dir`` remove only checkpoints of the run whose files are all
listed, and a resume checks the files against the list. See docs/runs.md.

Standard library only: these checks run before the heavy imports, so a refused run answers at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
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
LOCK_FILE = ".train.lock"  # held (flock) by the run writing the folder; never removed
MANIFEST = "checkpoint_files.json"  # in each checkpoint-N: {relative path: {"size", "sha256"}} of what train.py wrote
# What a checkpoint written before the manifest holds (the stock Trainer's files, the model's, the tokenizer's).
_UNLISTED_CHECKPOINT_FILE = re.compile(
    r"trainer_state\.json|training_args\.(json|bin)|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|"
    r"router\.safetensors|dylora_moe_config\.json|expert_\d+/adapter_(config\.json|model\.safetensors)|"
    + "|".join(re.escape(name) for name in TOKENIZER_FILES)
)


class RunConflict(ValueError):
    """The output folder and the flags disagree (another run, other model flags); nothing was written."""


class CheckpointNotFound(FileNotFoundError):
    """Resume was asked for, and the run folder holds no complete checkpoint of its run."""


class RunFolderLock:
    """An exclusive lock on a run folder for as long as the run lives: ``fcntl.flock`` on :data:`LOCK_FILE` inside
    it (the file holds the holder's process id). The kernel drops the lock when the process ends, however it ends (a
    kill included), so a stale lock never blocks the next run; a second run while the first is alive is refused with
    :class:`RunConflict`. Under torchrun only the main process takes it (the others stop when it exits)."""

    def __init__(self, folder: str | Path):
        self.folder, self.fd = Path(folder), None

    @staticmethod
    def _take(fd: int, folder: Path) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunConflict(
                f"--output_dir {folder} is in use by another run (process {holder} holds {folder / LOCK_FILE}): one "
                "run per folder; wait for it to end, or pass another --output_dir"
            ) from None

    def __enter__(self) -> RunFolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._take(fd, self.folder)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None


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


def fingerprint_mismatch(recorded: dict, current: dict, allowed=frozenset(), changeable=frozenset()) -> str | None:
    """``--flag A here vs B in the run`` for each model flag that differs and is not ``allowed`` to, or None; a flag
    the run did not record (an older train.py) is not compared. When every refused flag is ``changeable``, the
    message says how to continue with the new values."""
    changed = [key for key in sorted(set(recorded) & set(current)) if recorded[key] != current[key]]
    refused = [key for key in changed if key not in allowed]
    if not refused:
        return None
    diffs = "; ".join(f"--{key} {current[key]!r} here vs {recorded[key]!r} in the run" for key in refused)
    if set(refused) <= set(changeable):
        diffs += " (pass --allow_setting_changes to continue the run with the new values)"
    return diffs


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def write_manifest(checkpoint: Path) -> None:
    """List every file of a checkpoint being written (a staging folder) with its size and sha256, as :data:`MANIFEST`:
    what rotation and overwrite may remove, and what a resume checks."""
    files = {name: _file_record(checkpoint / name) for name in _files_in(checkpoint) if name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(files, indent=1) + "\n")


def foreign_files(checkpoint: Path) -> list[str]:
    """Files inside a checkpoint that train.py did not write there (a user's notes): not in its manifest, or, for a
    checkpoint written before the manifest, not named as the Trainer's, the model's or the tokenizer's files."""
    listed = read_json(checkpoint / MANIFEST)
    if listed is not None:
        return [name for name in _files_in(checkpoint) if name not in listed and name != MANIFEST]
    return [name for name in _files_in(checkpoint) if not _UNLISTED_CHECKPOINT_FILE.fullmatch(name)]


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a file missing, truncated or changed since it was saved), or None.
    Checks the manifest's sizes and sha256; a checkpoint written before the manifest, the model files' checksums
    recorded in its model config."""
    if read_json(checkpoint / TRAINER_STATE) is None:
        return f"no readable {TRAINER_STATE}"
    records = read_json(checkpoint / MANIFEST)
    if records is None:
        records = ((read_json(checkpoint / MODEL_CONFIG) or {}).get("checkpoint") or {}).get("files") or {}
    for name, record in sorted(records.items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if not isinstance(record, dict) or _file_record(path) != {k: record.get(k) for k in ("size", "sha256")}:
            return f"{name} does not match the size and sha256 recorded when it was saved"
    return None


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
        elif CHECKPOINT.match(path.name) and (added := foreign_files(path)):
            in_the_way.append(f"{', '.join(added[:5])} (in {path.name}/, not written by train.py)")
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


def own_checkpoints(folder: Path, run_id: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints of run ``run_id`` in ``folder``, oldest first."""
    return [(step, p) for step, p in checkpoints(folder) if (checkpoint_identity(p) or {}).get("run_id") == run_id]


def newest_intact(candidates: list[tuple[int, Path]]) -> tuple[tuple[int, Path] | None, list[str]]:
    """The newest checkpoint of ``candidates`` (oldest first) whose files are as saved, and the damaged newer ones
    (described)."""
    damaged = []
    for step, path in reversed(candidates):
        problem = checkpoint_problem(path)
        if problem is None:
            return (step, path), damaged
        damaged.append(f"{path} is damaged ({problem})")
    return None, damaged


def _refuse_later_foreign(folder: Path, run_id: str, step: int) -> None:
    """A resumed run saves checkpoint-N for steps after ``step``: another run's checkpoint there would be in its way."""
    ours = {p for _, p in own_checkpoints(folder, run_id)}
    later = [p.name for s, p in checkpoints(folder) if s > step and p not in ours]
    if later:
        raise RunConflict(
            f"--output_dir {folder} holds {', '.join(later[:5])}, not of run {run_id}, where the resumed run would "
            "save its next checkpoints; train.py never replaces them: move them elsewhere or resume into another "
            "--output_dir"
        )


def plan_run(
    output_dir: str | Path,
    fingerprint: dict,
    *,
    resume: str | None,
    overwrite: bool,
    check_conflicts: bool = True,
    allow_changes=frozenset(),
    changeable=frozenset(),
) -> RunPlan:
    """Decide fresh / resume / overwrite for ``output_dir``; raise before anything is written when they conflict.

    ``resume`` is None (fresh), ``"last"`` (the newest intact checkpoint of the folder's run) or a checkpoint folder.
    ``check_conflicts=False`` (processes other than the main one) skips the refusals the main process makes.
    ``allow_changes``: fingerprint keys a resume may change (``--allow_setting_changes``); ``changeable``: those the
    user could allow (named in the refusal).
    """
    folder = Path(output_dir)
    run = read_json(folder / RUN_FILE)
    existing, in_the_way = run_outputs(folder, run)

    def mismatch(recorded: dict) -> str | None:
        if allowed := fingerprint_mismatch(recorded, fingerprint, changeable=()):
            if refused := fingerprint_mismatch(recorded, fingerprint, allow_changes, changeable):
                return refused
            logger.warning("--allow_setting_changes: continuing the run with %s", allowed)
        return None

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
        own = own_checkpoints(folder, run["run_id"])
        if not own:
            raise CheckpointNotFound(
                f"--resume_from_checkpoint: no complete checkpoint-N folder of run {run['run_id']} in {folder}"
            )
        chosen, damaged = newest_intact(own)
        if chosen is None:
            raise CheckpointNotFound(
                f"--resume_from_checkpoint: no intact checkpoint of run {run['run_id']}: {'; '.join(damaged)}"
            )
        step, path = chosen
        if damaged:
            logger.warning("%s; resuming from %s, the newest intact checkpoint", "; ".join(damaged), path.name)
        recorded = (checkpoint_identity(path) or {}).get("fingerprint") or run.get("fingerprint", {})
        if changes := mismatch(recorded):
            raise RunConflict(f"--resume_from_checkpoint: the flags differ from the run in {folder}: {changes}")
        if check_conflicts:
            _refuse_later_foreign(folder, run["run_id"], step)
        return RunPlan(folder, run["run_id"], fingerprint, resume_from=str(path), resume_step=step, fresh=False)

    path = Path(resume)
    state = read_json(path / TRAINER_STATE)
    if not path.is_dir() or state is None:
        raise CheckpointNotFound(f"--resume_from_checkpoint {path}: not a complete checkpoint (no {TRAINER_STATE})")
    identity = checkpoint_identity(path)
    if problem := checkpoint_problem(path):
        siblings = own_checkpoints(path.parent, identity["run_id"]) if identity else []
        intact, _ = newest_intact([(s, p) for s, p in siblings if p.resolve() != path.resolve()])
        hint = f"; the newest intact checkpoint of its run is {intact[1]}" if intact else ""
        raise CheckpointNotFound(f"--resume_from_checkpoint {path}: the checkpoint is damaged ({problem}){hint}")
    if identity is not None:
        if changes := mismatch(identity.get("fingerprint", {})):
            raise RunConflict(f"--resume_from_checkpoint {path}: the flags differ from its run: {changes}")
    else:
        logger.warning("%s records no run id (an older train.py): resuming without checking the model flags", path)
    run_id = (identity or {}).get("run_id") or uuid.uuid4().hex[:12]
    if run is not None and run.get("run_id") != run_id and check_conflicts and not overwrite:
        raise RunConflict(
            f"--output_dir {folder} holds run {run.get('run_id')}, not the run of {path} ({run_id}): pass another "
            "--output_dir, or --overwrite_output_dir to replace the run there"
        )
    inside = (folder / path.name).resolve() == path.resolve()  # resuming a checkpoint of this very folder
    if overwrite and check_conflicts:
        _refuse_foreign(folder, [w for w in in_the_way if not (inside and w.startswith(path.name + "/"))])
    step = int(state.get("global_step", 0))
    if check_conflicts and not overwrite:
        _refuse_later_foreign(folder, run_id, step)
    remove = [p for p in existing if p.resolve() != path.resolve()] if overwrite else []
    return RunPlan(folder, run_id, fingerprint, resume_from=str(path), resume_step=step, fresh=False, remove=remove)


def rotation_victims(candidates: list[Path], limit: int | None, keep: tuple = ()) -> list[Path]:
    """The checkpoints of a run (``candidates``, oldest first) that ``--save_total_limit`` removes: all but the newest
    ``limit``, where ``keep`` (the newest and the best) always stay. A checkpoint holding a file train.py did not
    write is kept, with a warning, and not counted."""
    if not limit or limit <= 0:
        return []
    own = []
    for path in candidates:
        if added := foreign_files(path):
            logger.warning("keeping %s: it holds %s, not written by train.py", path, ", ".join(added[:5]))
        else:
            own.append(path)
    protected = {Path(p).resolve() for p in keep if p}
    excess = len(own) - max(limit, len([p for p in own if p.resolve() in protected]))
    return [p for p in own if p.resolve() not in protected][: max(excess, 0)]


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
    record = {"run_id": plan.run_id, "fingerprint": plan.fingerprint}
    if read_json(folder / RUN_FILE) != record:  # a checkpoint from elsewhere, or settings changed on purpose
        write_text_atomic(folder / RUN_FILE, json.dumps(record, indent=2) + "\n")
    metrics = folder / METRICS_FILE
    rows, dropped = read_metrics(metrics)
    if dropped:
        logger.warning("%s: dropped %d unreadable line(s) (a write cut short by a kill)", metrics, dropped)
    kept = [r for r in rows if r.get("run_id", plan.run_id) == plan.run_id and r.get("step", 0) <= plan.resume_step]
    if metrics.is_file() and (dropped or len(kept) != len(rows)):
        write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in kept))


def record_sharding(output_dir: str | Path, sharding: dict) -> None:
    """Add ``sharding`` (world size and strategy: :func:`~dylora_moe.train.sharding.sharding_record`) to the run's
    ``run.json``, main process only. A resumed run records the processes of its latest segment."""
    path = Path(output_dir) / RUN_FILE
    record = read_json(path) or {}
    record["sharding"] = sharding
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
