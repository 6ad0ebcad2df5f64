"""Joint training of DyLoRA-MoE on Code Alpaca + MBPP, with per-domain evaluation and routing metrics.

Reads top to bottom: arguments -> output folder (one run per folder) -> data -> base model -> DyLoRA_MoE ->
Trainer -> report.

    python train.py                                     # offline: the tiny model, ../shared/data, CPU, minutes
    python train.py --backend triton --bf16 --model_name google/codegemma-2b         # the real job on a GPU
    python train.py --resume_from_checkpoint            # continue the run of --output_dir from its last checkpoint
    python train.py --sweep "num_experts=2,4 top_k=1,2" # one run per configuration, compared in sweep.md
    torchrun --standalone --nproc_per_node 2 train.py   # DDP through the Trainer (gloo on CPU, nccl on GPU)

Arguments, parser and checks: :mod:`dylora_moe.train.args`.

Outputs in --output_dir: run.json (the run id and model flags), checkpoint-N/ (experts as peft adapters + router +
optimizer state), final/ (the model kept at the end), metrics.jsonl (every log), summary.md (per-domain table,
expert utilisation per domain, the specialisation section) and loss.png / utilization.png / specialisation.png /
routing_examples.png (+ .html); with --model_name tiny also the tiny base model and its tokenizer (tiny-<hash>/).
With --sweep: one sub-folder per configuration, sweep.md, sweep.png and sweep_wandb.yaml.
"""

import argparse
import contextlib
import datetime
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

from dylora_moe.provenance import commit, machine
from dylora_moe.train.args import (
    CHANGEABLE_SETTINGS,
    build_parser,
    full_parser,
    model_config,
    model_fingerprint,
    parse_args,
    resolve_defaults,
    resolve_report_to,
    trainer_arguments,
)

logger = logging.getLogger("train")


def finished_at(checkpoint: str, max_steps: int) -> bool:
    """Whether ``checkpoint`` is the last step of the training asked for (``--max_steps``, else its own plan)."""
    from dylora_moe.train.runs import TRAINER_STATE, read_json

    state = read_json(Path(checkpoint) / TRAINER_STATE) or {}
    step, planned = state.get("global_step", 0), state.get("max_steps", 0)
    return step >= (max_steps if max_steps > 0 else planned) > 0


def already_finished(plan, max_steps: int) -> str | None:
    """The one line for resuming a run that is complete (its last checkpoint is the last step asked for, final/ and
    summary.md are written): nothing is done. None when there is work left (more --max_steps, or a run killed while
    writing final/ or its report, which the resume completes)."""
    from dylora_moe.train.runs import FINAL_DIR, SUMMARY_FILE, TRAINER_STATE, read_json

    if not plan.resume_from or not finished_at(plan.resume_from, max_steps):
        return None
    folder = plan.output_dir
    if not ((folder / FINAL_DIR).is_dir() and (folder / SUMMARY_FILE).is_file()):
        return None
    step = (read_json(Path(plan.resume_from) / TRAINER_STATE) or {}).get("global_step", 0)
    return (
        f"run {plan.run_id} in {folder} finished already at step {step} (final/ and {SUMMARY_FILE} are there); "
        f"nothing to do: pass --max_steps above {step} to train further"
    )


def load_model_and_tokenizer(args, splits, dtype, quantization=None):
    """The frozen base model and its tokenizer: tiny (built once from the full training text, cached in
    --output_dir) or a hub id / local folder; either quantized by ``quantization`` (--load_in_4bit / 8bit)."""
    from dylora_moe.base_models import TinyConfig, load_or_build_tiny, load_pretrained
    from dylora_moe.train.data import training_texts

    if args.model_name == "tiny":
        config = TinyConfig(
            hidden_size=args.tiny_hidden_size,
            num_layers=args.tiny_num_layers,
            num_heads=max(1, args.tiny_hidden_size // 64),
            vocab_size=args.tiny_vocab_size,
            max_position_embeddings=max(2048, args.max_length),
            seed=args.seed,
        )
        model, tokenizer, folder = load_or_build_tiny(args.output_dir, training_texts(splits), config, quantization)
        logger.info("tiny base model and tokenizer (vocab %d) in %s", len(tokenizer), folder)
        return model, tokenizer
    return load_pretrained(args.model_name, token=args.token, dtype=dtype, quantization=quantization)


def check_max_length(base, max_length: int) -> None:
    """Refuse rows longer than the base model's positions (a ModelLoadError: one ``error:`` line, before the data is
    packed; the run has no checkpoint yet, so the corrected command reuses the folder)."""
    from dylora_moe.base_models import ModelLoadError

    positions = getattr(base.config.get_text_config(), "max_position_embeddings", None)
    if positions and max_length > positions:
        raise ModelLoadError(
            f"--max_length {max_length} is longer than the base model's {positions} positions "
            f"(max_position_embeddings): pass --max_length <= {positions}"
        )


def weights_in(param) -> int:
    """The weights a parameter holds: a bitsandbytes 4-bit one packs two per byte (its quant_state has the shape)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def parameter_breakdown(model) -> str:
    """LoRA (per expert) / router / frozen parameter counts; raises when no LoRA parameter is trainable."""
    lora = [(n, p) for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
    trainable_lora = sum(p.numel() for _, p in lora if p.requires_grad)
    if trainable_lora == 0:
        raise RuntimeError("no trainable LoRA parameter: the experts would not learn (were the adapters frozen?)")
    router = sum(p.numel() for n, p in model.named_parameters() if n.startswith("router.") and p.requires_grad)
    router_frozen = sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("router.") and not p.requires_grad
    )
    frozen = sum(weights_in(p) for p in model.parameters() if not p.requires_grad)
    per_expert = trainable_lora // model.num_experts
    total = trainable_lora + router + frozen
    lines = [
        f"LoRA:   {trainable_lora:>12,} trainable ({model.num_experts} experts x {per_expert:,}, "
        f"{len(lora) // 2} adapted linears, r={model.lora_r})",
        f"router: {router:>12,} trainable" + (f" ({router_frozen:,} frozen: --freeze_router)" if router_frozen else ""),
        f"frozen: {frozen:>12,} (base model" + (" + router)" if router_frozen else ")"),
        f"total:  {total:>12,} ({100 * (trainable_lora + router) / total:.2f}% trainable)",
    ]
    return "\n".join(lines)


def asks_no_bars(argv: list[str]) -> bool:
    """Whether the command line holds ``--disable_tqdm`` (bare, ``=true`` or ``true``): no progress bar anywhere, the
    sweep's and the code evaluation's included (the Trainer reads the flag for its own)."""
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name == "--disable_tqdm":
            if not value:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "true"
            return value.lower() in ("1", "true", "yes")
    return False


def main(argv=None) -> dict:
    args = parse_args(argv)
    if asks_no_bars(sys.argv[1:] if argv is None else list(argv)):
        from dylora_moe import progress

        progress.disable()
    if args.sweep:  # one train.py process per configuration of the grid, then sweep.md (dylora_moe/train/sweep.py)
        from dylora_moe.train.sweep import run_sweep

        argv = sys.argv[1:] if argv is None else list(argv)
        flags = set(build_parser()._option_string_actions) | set(full_parser()._option_string_actions)
        return {"sweep": run_sweep(args.sweep, argv, args.output_dir, known_flags=flags, jobs=args.sweep_jobs)}
    with contextlib.ExitStack() as held:  # the output folder's lock, from the run's first write to its end
        return run_training(args, argv, held)


def run_training(args: argparse.Namespace, argv, held: contextlib.ExitStack) -> dict:
    """One training run into ``args.output_dir``; ``held`` keeps the folder's lock until :func:`main` returns."""
    started = time.time()
    from dylora_moe.train.runs import RunFolderLock, plan_run, start_run

    # Flags only the Trainer knows (or typos) are checked first, so a typo gets its own error even where the folder
    # holds a run; without any, the data is read before the import. wandb is decided (and said) once, when needed.
    training_args = (
        trainer_arguments(argv, resolve_report_to(args.report_to, args.output_dir)) if args.trainer_only else None
    )
    # ----- output folder: one run per folder, decided before anything is written -------------------------------
    is_main = int(os.environ.get("RANK", "0")) == 0
    # One run per folder: the main process holds the folder's lock until the run ends (under torchrun the others
    # stop when a refused main process exits). A folder that does not exist yet is created, and locked, only at the
    # first write below.
    locked = is_main and Path(args.output_dir).is_dir()
    if locked:
        held.enter_context(RunFolderLock(args.output_dir))
    plan_for_folder = functools.partial(
        plan_run,
        args.output_dir,
        model_fingerprint(args),
        resume=args.resume_from_checkpoint,
        overwrite=args.overwrite_output_dir,
        check_conflicts=is_main,
        allow_changes=frozenset(CHANGEABLE_SETTINGS if args.allow_setting_changes else ()),
        changeable=frozenset(CHANGEABLE_SETTINGS),
    )
    plan = plan_for_folder()
    if (done := already_finished(plan, args.max_steps)) is not None:
        logger.info("%s", done)
        return {"already_finished": True, "run_id": plan.run_id, "summary": plan.output_dir / "summary.md"}
    if args.code_eval:  # refused now, not after hours of training, where this machine cannot isolate the programs
        from dylora_moe.evaluate.execution import isolation_level

        isolation_level()
    # ----- data (errors show before the heavy imports), then the Trainer's arguments ------------------------------
    from dylora_moe.corpora import DOMAINS, load_domain
    from dylora_moe.train.data import build_corpus

    splits = [load_domain(args.data_dir, domain) for domain in DOMAINS]
    training_args = training_args or trainer_arguments(argv, resolve_report_to(args.report_to, args.output_dir))
    shown = {k: v for k, v in vars(args).items() if k not in ("help_trainer", "trainer_only")}
    logger.info("arguments: %s", shown | {"token": "***" if args.token else None})
    if is_main:
        if not locked:  # planned for a folder that did not exist: planned again under the lock, in case it does now
            held.enter_context(RunFolderLock(args.output_dir))
            plan = plan_for_folder()
        start_run(plan)  # the first write: staging leftovers go, run.json, metrics.jsonl cut to the checkpoint

    import torch
    from transformers import PrinterCallback, ProgressCallback, TrainerState, set_seed
    from transformers.utils import logging as hf_logging

    from dylora_moe.io.checkpoint import load_checkpoint
    from dylora_moe.model import DyLoRA_MoE
    from dylora_moe.train.collapse import CollapseWatch
    from dylora_moe.train.console import Console
    from dylora_moe.train.gradient_coverage import GradientCoverage
    from dylora_moe.train.report import format_duration, write_report
    from dylora_moe.train.runs import record_sharding
    from dylora_moe.train.sharding import sharding_record
    from dylora_moe.train.specialisation import SpecialisationCallback
    from dylora_moe.train.trainer import DomainEarlyStopping, MetricsFile, MoETrainer, RunIdentity

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per load (base model, each checkpoint reload)
    from dylora_moe.base_models import Quantization

    dtype = torch.bfloat16 if args.bf16 and torch.cuda.is_available() else None
    quantization = Quantization.from_flags(args, dtype)
    base, tokenizer = load_model_and_tokenizer(args, splits, dtype, quantization)
    if quantization is not None:
        logger.info("base model quantized on loading: %s", quantization.describe())
    check_max_length(base, args.max_length)  # before the rows are packed and a giant one allocated
    set_seed(args.seed)  # the expert init; the tiny base is seeded on its own, the Trainer seeds dropout and data order
    model = DyLoRA_MoE(base, token=args.token, config=model_config(args))
    for param in model.trainable_parameters():
        # Experts and gate train in fp32 over a bf16 base, as peft keeps adapters: AdamW steps of lr 2e-5 would
        # round away in bf16 weights. The layers cast them to the activations' dtype in forward.
        param.data = param.data.float()
    logger.info("backend %s; parameters:\n%s", model.backend, parameter_breakdown(model))
    corpus = build_corpus(splits, tokenizer, args.max_length, args.training_subset, args.eval_subset)
    logger.info(
        "data: %d training rows of %d tokens (%d tokens); eval rows %s",
        len(corpus.train),
        args.max_length,
        corpus.train.num_tokens,
        {domain: len(ds) for domain, ds in corpus.eval.items()},
    )

    # ----- Trainer ---------------------------------------------------------------------------------------------
    trainer = MoETrainer(
        model=model,
        args=training_args,
        train_dataset=corpus.train,
        eval_dataset=corpus.eval,
        processing_class=tokenizer,
        callbacks=[
            RunIdentity(plan.run_id, plan.fingerprint),
            MetricsFile(Path(args.output_dir) / "metrics.jsonl", plan.run_id),
            *([DomainEarlyStopping(args.early_stopping_patience)] if args.early_stopping_patience else []),
            GradientCoverage(strict=args.strict_gradients),  # checks the first optimizer step's gradients
        ],
        load_weights=load_checkpoint,
        collapse=CollapseWatch(args.num_experts, args.collapse_threshold, args.collapse_patience),
    )
    if trainer.is_world_process_zero():
        record_sharding(args.output_dir, sharding_record(trainer))  # run.json: processes, DDP / FSDP / DeepSpeed
    specialisation = SpecialisationCallback.attach(trainer)  # eval_spec_* metrics at every evaluation
    trainer.remove_callback(ProgressCallback)  # nested dict-printing bars; Console prints one line per log
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Console())
    if plan.resume_from:
        logger.info("resuming run %s from %s", plan.run_id, plan.resume_from)

    # Before training: the fresh experts (B = 0) are the base model, so this is the baseline even when resuming.
    initial = trainer.evaluate()
    if plan.resume_from and finished_at(plan.resume_from, args.max_steps):
        # The checkpoint is the run's last step (killed while writing final/ or the report): the Trainer would train
        # one step past it, so take its state and its best model as they are and go on to final/.
        trainer.state = TrainerState.load_from_json(os.path.join(plan.resume_from, "trainer_state.json"))
        best = trainer.state.best_model_checkpoint
        if training_args.load_best_model_at_end and best and os.path.isdir(best):
            trainer._load_best_model()
        else:
            trainer._load_from_checkpoint(plan.resume_from)
    else:
        trainer.train(resume_from_checkpoint=plan.resume_from)
    final = trainer.evaluate()  # the best checkpoint by Code Alpaca eval loss, reloaded at the end of train()
    trainer.save_model(os.path.join(args.output_dir, "final"))

    # ----- report ------------------------------------------------------------------------------------------------
    summary = code_eval = None
    if trainer.is_world_process_zero():
        run_info = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "processes": str(training_args.world_size),
            "commit": commit(),
            "run id": plan.run_id,
            "command": "python train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": f"{args.model_name}, {args.num_experts} experts, r={args.lora_r}, routing={args.routing}, "
            f"top_k={args.top_k}, backend={args.backend}"
            + (", router frozen (--freeze_router)" if args.freeze_router else ""),
            "base weights": quantization.describe() if quantization else str(base.dtype).removeprefix("torch."),
            "training": f"{trainer.state.global_step} optimizer steps, {trainer.state.epoch:.2f} epochs, "
            f"{corpus.train.num_tokens:,} training tokens per epoch, best checkpoint "
            f"{trainer.state.best_model_checkpoint or 'none (no evaluation during training)'}",
            "wall time": format_duration(time.time() - started),
        }
        summary = write_report(
            args.output_dir,
            initial=initial,
            final=final,
            domains=list(DOMAINS),
            num_experts=args.num_experts,
            run_info=run_info,
            specialisation=specialisation.latest,  # the final evaluation's routing
            tokenizer=tokenizer,
        )
        for domain in DOMAINS:
            a, b = initial[f"eval_{domain}_loss"], final[f"eval_{domain}_loss"]
            logger.info(
                "%-12s eval loss %.4f -> %.4f   ppl %.2f -> %.2f",
                domain,
                a,
                b,
                math.exp(min(a, 700)),
                math.exp(min(b, 700)),
            )
        logger.info("summary: %s", summary)
        if args.code_eval:
            code_eval = run_code_eval(args, model, tokenizer, trainer.log)
    return {
        "initial": initial, "final": final, "summary": summary, "trainer": trainer, "run_id": plan.run_id,
        "code_eval": code_eval,
    }  # fmt: skip


def run_code_eval(args: argparse.Namespace, model, tokenizer, log) -> dict:
    """pass@1 of the trained model (``--code_eval``): appended to summary.md, logged to metrics.jsonl and wandb."""
    from dylora_moe.evaluate import evaluate_after_training
    from dylora_moe.evaluate.generation import Sampling

    benchmarks = [name.strip() for name in args.code_eval.split(",")]
    logger.info("functional evaluation: %s (%s problems each)", ", ".join(benchmarks), args.code_eval_limit or "all")
    metrics = evaluate_after_training(
        model, tokenizer, benchmarks, args.code_eval_limit, args.output_dir, log=log, data_dir=args.data_dir,
        sampling=Sampling(max_new_tokens=args.code_eval_max_new_tokens),
    )  # fmt: skip
    for name, value in sorted(metrics.items()):
        logger.info("%s %.4f", name, value)
    return metrics


def setup_logging() -> None:
    """INFO from the main process, warnings only from the others; transformers' own chatter at warning level."""
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")  # read when transformers is first imported
    from dylora_moe.logs import one_line_per_record

    one_line_per_record()  # the hub's retry warnings once, not twice


def _output_dir(argv: list[str]) -> Path:
    """The --output_dir of a command line that was accepted already (for the messages below)."""
    return Path(resolve_defaults(build_parser().parse_known_args(argv)[0]).output_dir)


def interrupted_message(argv: list[str]) -> str:
    """One line for ctrl-C: where the run stands and the command that continues it."""
    from dylora_moe.train.runs import checkpoints

    out = _output_dir(argv)
    if not checkpoints(out):
        return f"train.py: interrupted before the first checkpoint in {out}; the same command starts it again"
    kept, skip = [], False
    for arg in argv:  # drop --overwrite_output_dir / --resume_from_checkpoint and a value given to either
        if skip and not arg.startswith("-"):
            skip = False
            continue
        skip = arg.split("=")[0] in ("--overwrite_output_dir", "--resume_from_checkpoint")
        if not skip:
            kept.append(arg)
    return f"train.py: interrupted; continue with: python train.py {' '.join([*kept, '--resume_from_checkpoint'])}"


def disk_full_message(err: BaseException, argv: list[str]) -> str | None:
    """The message for a write that failed for want of space ("no space left on device" and where), however the
    library words it (:mod:`dylora_moe.io.disk_full`); None for any other error."""
    from dylora_moe.io.disk_full import failed_path, free_bytes, is_disk_full

    out = _output_dir(argv)
    if not is_disk_full(err, out):
        return None
    where, free = failed_path(err) or out, free_bytes(out)
    space = f" ({free / 2**20:.0f} MiB free there now)" if free is not None else ""
    return (
        f"error: no space left on device while writing to {where}{space}: free some space or pass another "
        "--output_dir; the unfinished save was removed, the checkpoints already written are complete, and "
        "--resume_from_checkpoint continues from the last one"
    )


def _end(message: str, code: int) -> None:
    """Exit with ``code`` after ``message`` as the last line on stderr, said once: by the main process only (under
    torchrun every process meets the same refusal; the others end silently with the same code)."""
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit(code)
    if code == 1:
        sys.exit(message)  # Python prints it and exits 1 (SystemExit carries the message, as callers expect)
    print(message, file=sys.stderr)
    sys.exit(code)


def _leave_process_group() -> None:
    """Under torchrun: close the process group the Trainer opened, while the interpreter is whole (gloo's worker
    threads can otherwise abort the process during its finalisation, pytorch/pytorch#179291)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears its end down while another still talks to it (rank 0 writes the reports last)
        dist.destroy_process_group()


def cli() -> None:
    """``python train.py``: known failures end as one ``error:`` line (exit 2 for a refused run, 1 otherwise);
    ctrl-C ends with one line and the command that resumes (exit 130). Under torchrun the line comes from rank 0
    alone."""
    setup_logging()
    try:
        main()
        _leave_process_group()
    except KeyboardInterrupt:
        _end(interrupted_message(sys.argv[1:]), 130)
    except Exception as err:
        from dylora_moe.train.runs import CheckpointNotFound, RunConflict

        if (message := disk_full_message(err, sys.argv[1:])) is not None:
            _end(message, 1)

        if isinstance(err, RunConflict):
            _end(f"train.py: error: {err}", 2)
        known = [CheckpointNotFound]
        for module, name in (
            ("dylora_moe.io.checkpoint", "CheckpointError"),
            ("dylora_moe.corpora", "DataError"),
            ("dylora_moe.base_models", "ModelLoadError"),
            ("dylora_moe.train.gradient_coverage", "GradientCoverageError"),
            ("dylora_moe.train.sweep", "SweepError"),
            ("dylora_moe.evaluate.execution", "SandboxUnavailableError"),
        ):
            if module in sys.modules:
                known.append(getattr(sys.modules[module], name))
        if isinstance(err, tuple(known)):
            _end(f"error: {err}", 1)
        raise


if __name__ == "__main__":
    cli()
