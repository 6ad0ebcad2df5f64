"""The HF Trainer around DyLoRA_MoE: routing metrics, per-domain evaluation, expert-only atomic checkpoints.

What the stock Trainer (transformers 5) does not do for this model, and this module adds:

- Logging: each logging step gets the LM loss, the load-balance loss, the router entropy and each expert's share of
  the routed tokens (token-weighted over the steps since the last log and over all processes; a warning when one
  expert keeps most of them, :mod:`~dylora_moe.train.collapse`), the loss-free selection bias per expert, the tokens per
  second of all processes together, and the main process's peak memory; :class:`MetricsFile` appends every log to
  ``metrics.jsonl`` (integrations such as wandb get the same dict through ``Trainer.log``).
- Evaluation: the same routing statistics per evaluation set, plus perplexity (``eval_<domain>_ppl``); the loss is
  the LM loss over all labelled tokens of the set. Under several processes each set is padded with blank rows, not
  repeated ones (:class:`~dylora_moe.train.sharding.PaddedForRanks`), and the sums are taken over all ranks, so an
  evaluation equals the one-process evaluation of the same model.
- Several processes: :meth:`MoETrainer.train` makes sure DDP wraps the model even after an evaluation before training.
- Saving: ``DyLoRA_MoE`` is not a PreTrainedModel, so the stock Trainer would write its whole state dict (the frozen
  base included, which fails on tied embeddings); :meth:`MoETrainer._save` (the Trainer's extension point for the
  model files) writes experts + router through ``save_pretrained`` instead. The rest of a checkpoint is the stock
  ``Trainer._save_checkpoint``, pointed at a staging folder and published by one rename when complete, so a save
  cut short never leaves a ``checkpoint-N`` that resume would load (a failed save removes its staging folder; a full
  disk is reported as ENOSPC). Every checkpoint records the run id (:class:`RunIdentity`, a stateful callback) and
  the files it holds (:func:`~dylora_moe.train.runs.write_manifest`), and every ``metrics.jsonl`` row the run id
  too (:class:`MetricsFile`).
- Rotation (``save_total_limit``) removes only this run's checkpoints, never another run's or one holding a file
  train.py did not write (the stock rotation prunes every ``checkpoint-*`` of the folder).
- Resume and best-model reload read those files back into the live model.
- Balancing: the model's ``balance_step`` after every optimizer step (:class:`BalanceStep`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.training_args import ParallelMode

from ..io.atomic_folder import is_staging_name, publish, staging_root
from ..io.checkpoint import save_checkpoint
from ..io.disk_full import as_disk_full
from ..io.full_state import is_sharded
from .collapse import CollapseWatch
from .runs import (
    TRAINER_STATE,
    CheckpointNotFound,
    RunConflict,
    checkpoint_identity,
    checkpoints,
    foreign_files,
    own_checkpoints,
    read_metrics,
    rotation_victims,
    write_manifest,
)
from .sharding import PaddedForRanks

logger = logging.getLogger(__name__)

__all__ = ["CheckpointNotFound", "DomainEarlyStopping", "MetricsFile", "MoETrainer", "RunIdentity", "RoutingStats"]

TRAINING_ARGS_FILE = "training_args.json"


def _args_file(folder: str) -> str:
    return os.path.join(folder, TRAINING_ARGS_FILE)


def _publish(staging: str, target: str, last: str) -> None:
    """Make ``staging`` visible as ``target``, replacing an earlier ``target`` whole in one step."""
    publish(Path(staging), Path(target), replace=os.path.exists(target), last=last)


def _give_up(staging: str, err: BaseException):
    """A save failed: remove its staging folder (a full disk must not stay full) and raise ``err``, as ENOSPC
    where it was a full disk in other words (torch's ``unexpected pos``, safetensors' ``os error 28``)."""
    disk_full = as_disk_full(err, staging)  # judged before the clean-up frees the space
    shutil.rmtree(staging, ignore_errors=True)
    if disk_full is not None:
        raise disk_full from err
    raise err


class RoutingStats:
    """Token-weighted sums of a model output's routing statistics between two reads.

    One float64 vector ``[routed tokens, labelled tokens, lm_loss, balance_loss, router_entropy, share of expert
    0..E-1]`` (fixed layout, so processes can sum it): the LM loss (a mean over the batch's labelled tokens) weighted
    by the labelled tokens, the rest by the routed (attention-mask) tokens. So a mean read back is the mean over all
    tokens added, however they were batched or spread over processes. Kept on the model's device so accumulating
    costs no host sync; :meth:`read` syncs once and sums over processes (every process must call it, as the Trainer's
    logging and evaluation do).
    """

    KEYS = ("lm_loss", "balance_loss", "router_entropy")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.sums: torch.Tensor | None = None
        self.seconds, self.running_since = 0.0, None

    def start_clock(self) -> None:
        self.running_since = time.perf_counter()

    def stop_clock(self) -> None:
        if self.running_since is not None:
            self.seconds += time.perf_counter() - self.running_since
            self.running_since = None

    def add(self, output, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Add one forward's statistics; ``labels`` (-100 where nothing is scored) count the LM loss's tokens
        (shifted by one, as the loss is), else every routed token does. A batch with no token adds zeros."""
        tokens = attention_mask.sum().to(torch.float64)
        scored = tokens if labels is None else (labels[:, 1:] != -100).sum().to(torch.float64)
        zero = tokens.new_zeros(())
        values = [getattr(output, key, None) for key in self.KEYS]
        values = [zero if v is None else v.detach().to(torch.float64).reshape(()) for v in values]
        shares = output.expert_token_fraction.detach().to(torch.float64).reshape(-1)
        lm_loss, balance_loss, router_entropy = values
        head = torch.stack([tokens, scored, lm_loss * scored, balance_loss * tokens, router_entropy * tokens])
        row = torch.cat([head, shares * tokens])
        row = torch.where(tokens > 0, row, torch.zeros_like(row))  # no token: nothing (an empty mean may be NaN)
        self.sums = row if self.sums is None else self.sums + row

    def read(self) -> dict[str, float]:
        """Token-weighted means since the last read (``util_expert_i`` per expert), the ``tokens`` routed, the
        ``scored_tokens`` of the LM loss and the ``seconds`` the clock ran; resets. Empty when no process added
        anything."""
        sums = self.sums if self.sums is not None else torch.zeros(5 + self.num_experts, dtype=torch.float64)
        running = self.running_since is not None
        self.stop_clock()
        elapsed = self.seconds
        if dist.is_available() and dist.is_initialized():
            sums = sums.to(_collective_device())
            dist.all_reduce(sums)
        sums = sums.cpu()  # the one host sync per log
        self.sums, self.seconds = None, 0.0
        if running:
            self.start_clock()
        tokens, scored = float(sums[0]), float(sums[1])
        if tokens == 0:
            return {}
        out = {"lm_loss": float(sums[2]) / max(scored, 1.0)}
        out.update({key: float(value) / tokens for key, value in zip(self.KEYS[1:], sums[3:5])})
        out.update({f"util_expert_{e}": float(share) / tokens for e, share in enumerate(sums[5:])})
        out["tokens"], out["scored_tokens"], out["seconds"] = tokens, scored, elapsed
        return out


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def peak_memory_mb() -> float:
    """Peak CUDA memory allocated by this process (GPU), else its peak resident set size (CPU), in MiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsFile(TrainerCallback):
    """Appends every log (training and evaluation) to ``<output_dir>/metrics.jsonl``, from the main process only,
    one JSON object a line tagged with the run id. A log the file already holds from before this process started
    (same step, same keys: the baseline evaluation of a resumed run) is not written twice."""

    def __init__(self, path: str | Path, run_id: str | None = None):
        self.path, self.run_id = Path(path), run_id
        self.logged_before = {_log_key(row) for row in read_metrics(self.path)[0]}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs):
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), "run_id": self.run_id, **logs}
        if _log_key(record) in self.logged_before:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _log_key(row: dict) -> tuple:
    return row.get("step"), frozenset(k for k in row if k not in ("step", "epoch", "time", "run_id"))


class RunIdentity(TrainerCallback, ExportableState):  # runs.IDENTITY_CALLBACK is this class's name
    """Records the run id and model flags in every checkpoint's ``trainer_state.json`` (the Trainer saves the state
    of stateful callbacks), so a resume can tell this run's checkpoints from another run's."""

    def __init__(self, run_id: str, fingerprint: dict):
        self.run_id, self.fingerprint = run_id, dict(fingerprint)

    def state(self) -> dict:
        return {"args": {"run_id": self.run_id, "fingerprint": self.fingerprint}, "attributes": {}}


class StepClock(TrainerCallback):
    """Runs the training clock of ``stats`` from the start to the end of each optimizer step, so tokens/s leaves out
    evaluation and checkpointing. (The Trainer checks each micro-batch's loss for NaN, a host sync, so on a GPU the
    host-side clock follows the device closely.)"""

    def __init__(self, stats: RoutingStats):
        self.stats = stats

    def on_step_begin(self, args, state, control, **kwargs):
        self.stats.start_clock()

    def on_step_end(self, args, state, control, **kwargs):
        self.stats.stop_clock()


class BalanceStep(TrainerCallback):
    """Calls the model's ``balance_step`` after every optimizer step (once per gradient-accumulation window): the
    loss-free selection bias moves toward equal load, and the next step's load window starts."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.balance_step()


class DomainEarlyStopping(EarlyStoppingCallback):
    """Early stopping on ``metric_for_best_model`` when the evaluation set is a dict: each domain's evaluation
    reports its own metrics, and only the one carrying the watched metric counts (the others are skipped quietly
    instead of warning)."""

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        key = args.metric_for_best_model
        if (key if key.startswith("eval_") else f"eval_{key}") in metrics:
            super().on_evaluate(args, state, control, metrics, **kwargs)


class MoETrainer(Trainer):
    """Trainer for :class:`~dylora_moe.model.DyLoRA_MoE`: routing metrics, per-domain evaluation, expert-only
    checkpoints written atomically. ``load_weights(model, folder)`` reads a checkpoint written by ``_save`` back into
    the live model (resume, best-model reload)."""

    def __init__(self, *args, load_weights, collapse: CollapseWatch | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_weights = load_weights
        model = self.accelerator.unwrap_model(self.model)
        num_experts = model.num_experts
        self.train_stats, self.eval_stats = RoutingStats(num_experts), RoutingStats(num_experts)
        self.collapse = collapse if collapse is not None else CollapseWatch(num_experts)
        self.add_callback(StepClock(self.train_stats))
        self.add_callback(BalanceStep(model))
        if self.eval_dataset is not None:
            self.eval_dataset = self._padded_for_ranks(self.eval_dataset)
        if getattr(model, "_no_split_modules", None) is None:  # FSDP's auto-wrap: one unit per decoder block
            model._no_split_modules = getattr(model.foundation_model, "_no_split_modules", None)
        if self.args.fsdp and not self.is_fsdp_enabled:
            logger.warning(
                "--fsdp is not applied: accelerate shards only on accelerators (GPU, NPU, XPU, ...), so this run is "
                "%s (run.json records it); see docs/distributed.md",
                "DDP" if self.args.world_size > 1 else "one process",
            )
        self._published: set[str] = set()  # checkpoint folders this trainer wrote (rotation without a run id)
        self.checkpoint_limit = self.args.save_total_limit  # what _rotate keeps (train() hides it from the stock loop)

    # ----- loss and metrics --------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        training = self.accelerator.unwrap_model(model).training  # the model's own mode (a DeepSpeed engine's may
        # say training during an evaluation before train())
        (self.train_stats if training else self.eval_stats).add(outputs, inputs["attention_mask"], inputs["labels"])
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log; evaluation logs get their routing stats in evaluation_loop
            stats = self.train_stats.read()
            if stats:
                logs["lm_loss"] = stats["lm_loss"]
                logs["balance_loss"] = stats["balance_loss"]
                logs["router_entropy"] = stats["router_entropy"]
                logs.update({k: v for k, v in stats.items() if k.startswith("util_expert_")})
                logs["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
                warning = self.collapse.update(logs, self.state.global_step)
                if warning and self.is_world_process_zero():
                    logger.warning(warning)
            router = self.accelerator.unwrap_model(self.model).router
            if router.use_selection_bias:  # the loss-free bias per expert (one host read per log)
                logs.update({f"balance_bias_expert_{e}": b for e, b in enumerate(router.selection_bias.tolist())})
            logs["peak_mem_mb"] = peak_memory_mb()
        super().log(logs, start_time)

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """The stock loop, then the routing statistics of its forwards; the loss is the LM loss over all labelled
        tokens of the set (the stock loop's mean of batch means would depend on the batching and the processes)."""
        self.eval_stats.read()  # drop anything left from an interrupted loop
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        stats = self.eval_stats.read()
        if "lm_loss" in stats:
            output.metrics[f"{metric_key_prefix}_loss"] = stats["lm_loss"]
        for key, value in stats.items():
            if key not in ("lm_loss", "tokens", "scored_tokens", "seconds"):
                output.metrics[f"{metric_key_prefix}_{key}"] = value
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_ppl"] = math.exp(min(loss, 700.0))
        return output

    def get_eval_dataloader(self, eval_dataset=None):
        """The stock loader; under several processes over the set padded with blank rows for the ranks
        (:class:`PaddedForRanks`), so that no row is evaluated twice when the set does not split evenly. The sets
        given to the constructor are padded there (so the stock loader's per-name cache stays per name), a set
        passed here is padded here."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._padded_for_ranks(eval_dataset)
        return super().get_eval_dataloader(eval_dataset)

    def _padded_for_ranks(self, dataset):
        """``dataset`` (or each of a dict) padded to a multiple of world size x evaluation batch; as it is in one
        process."""
        if isinstance(dataset, dict):
            return {name: self._padded_for_ranks(part) for name, part in dataset.items()}
        if self.args.world_size == 1 or isinstance(dataset, PaddedForRanks):
            return dataset
        return PaddedForRanks(dataset, self.args.world_size * self.args.eval_batch_size)

    def _undo_evaluation_prepare(self) -> None:
        """Undo what an evaluation before training did to the model (called by :meth:`train`).

        ``Trainer.evaluate`` before ``train`` prepares the model for evaluation only. Under DDP accelerate marks the
        bare model prepared, and ``train`` would then not wrap it in DistributedDataParallel: every process would
        train its own copy on its own batches (gradients never averaged: the ranks' experts drift apart, an
        evaluation mixes them, and the checkpoint holds rank 0's alone). Under DeepSpeed the evaluation's engine has
        no optimizer, and ``train`` would keep it (its backward fails). FSDP shards the model for good at that
        evaluation, which training keeps."""
        model = self.model
        distributed = self.args.parallel_mode == ParallelMode.DISTRIBUTED
        if distributed and not (self.is_fsdp_enabled or self.is_deepspeed_enabled) and self.model_wrapped is model:
            if vars(model).pop("_is_accelerate_prepared", False):
                self.accelerator._models[:] = [m for m in self.accelerator._models if m is not model]
                if "_original_forward" in vars(model):  # accelerate's autocast wrapper: prepare puts it back
                    vars(model).pop("forward", None)
                    vars(model).pop("_original_forward")
        if self.is_deepspeed_enabled and self.model_wrapped is not model and self.optimizer is None:
            self.model_wrapped, self.deepspeed = model, None  # train() builds the training engine
            self.accelerator._models.clear()

    # ----- saving and loading ------------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Experts (peft format) + router + config through the model's ``save_pretrained``; tokenizer; arguments.

        A checkpoint's files go straight into its folder inside the staging folder (:meth:`_save_checkpoint`
        publishes it). Any other folder (``final/`` by default, never the run folder itself) is written under a
        staging name beside it and swapped in whole, so a kill leaves the previous version or the new one, never
        half of one."""
        if not self.args.should_save:
            return
        output_dir = os.path.abspath(output_dir or os.path.join(self.args.output_dir, "final"))
        parent, name = os.path.split(output_dir)
        if is_staging_name(name) or is_staging_name(os.path.basename(parent)):
            self._write_model(output_dir, state_dict)
            return
        if os.path.isdir(output_dir) and os.listdir(output_dir) and not os.path.isfile(_args_file(output_dir)):
            raise FileExistsError(
                f"{output_dir} exists and was not written by save_model (no {TRAINING_ARGS_FILE}): not replacing it"
            )
        staging = str(staging_root(Path(output_dir)))
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self._write_model(staging, state_dict)
            _publish(staging, output_dir, last=TRAINING_ARGS_FILE)
        except BaseException as err:
            _give_up(staging, err)

    def _write_model(self, folder: str, state_dict=None) -> None:
        """The model's checkpoint; a model sharded by FSDP or DeepSpeed ZeRO is written from the full
        ``state_dict`` the Trainer gathered on every rank before calling :meth:`_save` (the same files one process
        writes)."""
        model = self.accelerator.unwrap_model(self.model)
        if state_dict and (is_sharded(model) or self.is_deepspeed_enabled):
            save_checkpoint(model, folder, state_dict=state_dict)
        else:
            model.save_pretrained(folder)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)
        Path(_args_file(folder)).write_text(self.args.to_json_string())  # JSON: nothing to unpickle at load

    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint (model through :meth:`_save`, optimizer, scheduler, scaler, RNG per process, trainer
        state with the stateful callbacks), written by ``Trainer._save_checkpoint`` into a staging folder, then
        published by one rename and rotated: a save cut short never leaves a ``checkpoint-N`` a resume would take."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        root = str(staging_root(Path(final)))
        staged = os.path.join(root, name)
        if self.args.should_save:
            shutil.rmtree(root, ignore_errors=True)
            if os.path.exists(final):
                self._check_replaceable(final)
        self._barrier()
        self._staging_root = root
        try:
            super()._save_checkpoint(model, trial)  # writes <staging_root>/checkpoint-N
        except BaseException as err:
            _give_up(root, err)
        finally:
            self._staging_root = None
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(best) == root:  # this step is the best: point at where it will be
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        self._barrier()  # every process has written its part
        if self.args.should_save:
            try:
                write_manifest(Path(staged))
                # A checkpoint of the same step (an abandoned segment of this run) is replaced.
                _publish(staged, final, last=TRAINER_STATE)
            except BaseException as err:
                _give_up(root, err)
            shutil.rmtree(root)
            self._rotate(run_dir, keep=(final, self.state.best_model_checkpoint), limit=self.checkpoint_limit)
        self._barrier()

    # ----- rotation: this run's checkpoints only -----------------------------------------------------------------

    def _run_id(self) -> str | None:
        identity = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, RunIdentity)), None)
        return identity.run_id if identity is not None else None

    def _is_own(self, checkpoint: str) -> bool:
        """Whether ``checkpoint`` is one of this run's (its recorded run id, or published by this trainer where no
        :class:`RunIdentity` names the run) and holds only files train.py wrote."""
        run_id = self._run_id()
        if run_id is None:
            mine = os.path.abspath(checkpoint) in self._published
        else:
            mine = (checkpoint_identity(Path(checkpoint)) or {}).get("run_id") == run_id
        return mine and not foreign_files(Path(checkpoint))

    def _check_replaceable(self, checkpoint: str) -> None:
        if not self._is_own(checkpoint):
            raise RunConflict(
                f"{checkpoint} is not a checkpoint of this run, or holds files train.py did not write: not replacing "
                "it (move it elsewhere; the checkpoints before it are complete)"
            )

    def _rotate(self, run_dir: str, keep: tuple, limit: int | None) -> None:
        """``save_total_limit`` over this run's checkpoints only (the newest and the best always stay)."""
        self._published.add(os.path.abspath(keep[0]))
        run_id = self._run_id()
        if run_id is not None:
            candidates = [p for _, p in own_checkpoints(Path(run_dir), run_id)]
        else:  # no run id to tell the run's checkpoints by: only those this trainer published
            candidates = [p for _, p in checkpoints(Path(run_dir)) if str(p.absolute()) in self._published]
        for path in rotation_victims(candidates, limit, keep):
            logger.info("deleting %s (save_total_limit %s)", path, limit)
            shutil.rmtree(path, ignore_errors=True)

    def train(self, *args, **kwargs):
        """The stock training loop. With ``save_total_limit`` 1 it would end by deleting every ``checkpoint-*`` of
        the folder but the best, other runs' too: the limit is hidden from it meanwhile, and the same prune is done
        here over this run's checkpoints (rotation after each save is :meth:`_rotate`)."""
        self._undo_evaluation_prepare()
        limit = self.checkpoint_limit = self.args.save_total_limit
        if limit != 1:
            return super().train(*args, **kwargs)
        self.args.save_total_limit = None
        try:
            result = super().train(*args, **kwargs)
        finally:
            self.args.save_total_limit = limit
        best = self.state.best_model_checkpoint
        if best and self.args.should_save:
            self._rotate(self.args.output_dir, keep=(best,), limit=1)
        return result

    def _get_output_dir(self, trial) -> str:
        """The staging folder while :meth:`_save_checkpoint` runs the stock save, else the stock run folder."""
        return getattr(self, "_staging_root", None) or super()._get_output_dir(trial=trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self.load_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self.load_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)
