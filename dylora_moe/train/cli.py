"""Joint training of DyLoRA-MoE on Code Alpaca + MBPP, with per-domain evaluation and routing metrics.

Reads top to bottom: arguments -> output folder (one run per folder) -> data -> base model -> DyLoRA_MoE ->
Trainer -> report.

    python train.py                                     # offline: the tiny model, ../shared/data, CPU, minutes
    python train.py --backend triton --bf16 --model_name google/codegemma-2b         # the real job on a GPU
    python train.py --resume_from_checkpoint            # continue the run of --output_dir from its last checkpoint
    python train.py --sweep "num_experts=2,4 top_k=1,2" # one run per configuration, compared in sweep.md
    torchrun --standalone --nproc_per_node 2 train.py   # DDP through the Trainer (gloo on CPU, nccl on GPU)

Arguments are four dataclasses parsed by transformers' ``HfArgumentParser``: :class:`ModelArguments`,
:class:`ExpertArguments`, :class:`DataArguments` and ``TrainingArguments`` (every Trainer option is a flag), with
this project's defaults and the original script's flag names (:class:`TrainingFlags`). The project's own flags are
parsed and validated first with the standard library alone, so ``--help`` and a bad value answer at once; only then
are torch and transformers imported.

Outputs in --output_dir: run.json (the run id and model flags), checkpoint-N/ (experts as peft adapters + router +
optimizer state), final/ (the model kept at the end), metrics.jsonl (every log), summary.md (per-domain table,
expert utilisation per domain, the specialisation section) and loss.png / utilization.png / specialisation.png /
routing_examples.png (+ .html); with --model_name tiny also the tiny base model and its tokenizer (tiny-<hash>/).
With --sweep: one sub-folder per configuration, sweep.md, sweep.png and sweep_wandb.yaml.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import logging
import math
import netrc
import os
import platform
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dylora_moe.config import CHOICES, RENAMED, RULES, DyLoRAMoEConfig, SettingError

REPO = Path(__file__).resolve().parents[2]
logger = logging.getLogger("train")

# The original script's values (docs/design.md §2), and what `--model_name tiny` uses instead when the flag is not
# given: the random frozen tiny base needs larger LoRA steps (its loss plateaus after ~20 of them), and one epoch over
# half the training text keeps the default run within a few minutes on a 2-core CPU.
ORIGINAL_DEFAULTS = {
    "num_train_epochs": 10,
    "learning_rate": 2e-5,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 8,
    "max_length": 512,
    "logging_steps": 10,
    "training_subset": 100.0,
}
TINY_DEFAULTS = {
    "num_train_epochs": 1,
    "learning_rate": 2e-3,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 256,
    "logging_steps": 5,
    "training_subset": 50.0,
}


def default_data_dir() -> str:
    return os.environ.get("DYLORA_DATA_DIR") or str(REPO.parent / "shared" / "data")


def _arg(default, help: str, **metadata):
    """A dataclass field with its flag's help text (``aliases``, ``nargs``, ... pass through to argparse)."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help, **metadata})
    return field(default=default, metadata={"help": help, **metadata})


def _tiny_or_original(name: str, what: str) -> str:
    return f"{what} (default: {ORIGINAL_DEFAULTS[name]}, the original's; {TINY_DEFAULTS[name]} with --model_name tiny)"


@dataclass
class ModelArguments:
    """The frozen base model."""

    model_name: str = _arg(
        "tiny",
        "base model: a hub id (google/codegemma-2b was the original's, needs a hub and a GPU), a local folder, "
        "or 'tiny': a small Llama built from a config with a BPE tokenizer trained on the data (offline)",
    )
    token: str | None = _arg(None, "Hugging Face token for gated models (default: HF_TOKEN or the cached login)")
    tiny_hidden_size: int = _arg(256, "tiny model: hidden size")
    tiny_num_layers: int = _arg(2, "tiny model: decoder layers")
    tiny_vocab_size: int = _arg(2048, "tiny model: BPE vocabulary size (>= 300)")


# The model settings that are train.py flags: name, type, choices and help come from DyLoRAMoEConfig (the one place a
# setting is defined and checked); the defaults are the library's except these.
FLAG_SETTINGS = (
    "num_experts", "lora_r", "lora_alpha", "lora_dropout", "backend", "routing", "top_k", "temperature",
    "sequence_top_k", "router_weighting", "balance_loss", "balance_coefficient", "balance_update_rate",
    "global_balance", "z_loss_coefficient", "freeze_router",
)  # fmt: skip
TRAIN_SETTING_DEFAULTS = {"num_experts": 4, "lora_alpha": 32.0, "routing": "token"}
FLAG_HELP = {"num_experts": "LoRA experts, all created up front and mature"}
FUSED_LOSS_FLAG = {"off": False, "on": True, "auto": "auto"}  # --fused_loss value -> the fused_loss setting


def _setting_field(f: dataclasses.Field, kind) -> tuple:
    if f.name in CHOICES:
        kind = Literal[CHOICES[f.name]]
    default = TRAIN_SETTING_DEFAULTS.get(f.name, f.default)
    metadata = {"aliases": [f"--{old}" for old, new in RENAMED.items() if new == f.name]}
    return f.name, kind, _arg(default, FLAG_HELP.get(f.name, f.metadata["help"]), **metadata)


def _expert_arguments():
    """The dataclass of the "experts and routing" flags: :data:`FLAG_SETTINGS` and what train.py adds."""
    hints = typing.get_type_hints(DyLoRAMoEConfig)
    fields = {f.name: f for f in dataclasses.fields(DyLoRAMoEConfig)}
    own = [
        ("fused_loss", Literal[tuple(FUSED_LOSS_FLAG)], _arg("off", fields["fused_loss"].metadata["help"])),
        ("strict_gradients", bool, _arg(
            False,
            "stop with an error (not a warning) when, after the first optimizer step, an expert that received "
            "tokens has a zero gradient in some adapted layer, or a trainable gate has none",
        )),
        ("sweep", str | None, _arg(
            None,
            'grid of train.py flags, e.g. "num_experts=2,4,8 top_k=1,2 temperature=1,2": one run per '
            "configuration in its own sub-folder of --output_dir, then sweep.md, sweep.png and a wandb sweep YAML; "
            "grids joined by ';' run the union of their configurations",
        )),
        ("sweep_jobs", int, _arg(1, "configurations of --sweep run at a time")),
        ("collapse_threshold", float | None, _arg(
            None, "warn when one expert's share of the routed tokens stays above this (default: 2/E, at most "
            "halfway to 1)",
        )),
        ("collapse_patience", int, _arg(3, "... over this many logged steps in a row")),
    ]  # fmt: skip
    settings = [_setting_field(fields[name], hints[name]) for name in FLAG_SETTINGS]
    cls = dataclasses.make_dataclass("ExpertArguments", settings + own)
    cls.__doc__ = "The LoRA experts and the router."
    return cls


ExpertArguments = _expert_arguments()


def model_config(args: argparse.Namespace) -> DyLoRAMoEConfig:
    """The model's settings from the flags (the original's training script: all experts up front, mature, no
    growth)."""
    return DyLoRAMoEConfig(
        **{name: getattr(args, name) for name in FLAG_SETTINGS},
        fused_loss=FUSED_LOSS_FLAG[args.fused_loss],
        allow_expert_growth=False,
        mature_experts=True,
    )


@dataclass
class DataArguments:
    """The corpora and how they are cut."""

    data_dir: str = _arg(
        default_data_dir,
        "folder with code_alpaca_2k.json and mbpp.jsonl (env DYLORA_DATA_DIR, else ../shared/data next to "
        "the repo), or 'hub' to download sahil2801/CodeAlpaca-20k and google-research-datasets/mbpp",
    )
    max_length: int | None = _arg(None, _tiny_or_original("max_length", "tokens per packed row, >= 2"))
    training_subset: float | None = _arg(
        None, _tiny_or_original("training_subset", "percent of each training split to use, in (0, 100]")
    )
    eval_subset: float = _arg(100.0, "percent of each validation split to use, in (0, 100]")


CODE_EVAL_BENCHMARKS = ("mbpp", "humaneval")  # dylora_moe.evaluate.BENCHMARKS (a test keeps them in step)


@dataclass
class CodeEvalArguments:
    """Functional evaluation after training (python -m dylora_moe.evaluate does the same on any checkpoint)."""

    code_eval: str | None = _arg(
        None,
        "after training, greedy pass@1 on these benchmarks (comma-separated: mbpp, humaneval) under the base model, "
        "the learned routing, each expert forced and the oracle; results in summary.md, code_eval.* and the metrics",
    )
    code_eval_limit: int | None = _arg(None, "evaluate only the first N problems of each benchmark (default: all)")
    code_eval_max_new_tokens: int = _arg(512, "tokens generated per completion")


@dataclass
class TrainingFlags:
    """TrainingArguments fields whose default differs here, under the original script's names where it had them
    (``--num_epochs``, ``--batch_size``, ...); plus the run options this script adds. Every other TrainingArguments
    field is a flag with the Trainer's own default."""

    output_dir: str = _arg(str(REPO / "outputs" / "dylora-moe"), "checkpoints, metrics, report ($VARS expanded)")
    overwrite_output_dir: bool = _arg(
        False,
        "replace the run already in --output_dir (only the files train.py wrote for that run; other files stay, and "
        "a folder whose run it cannot identify is refused)",
    )
    resume_from_checkpoint: str | None = _arg(
        None,
        "continue from a checkpoint folder, or (flag alone) the last complete checkpoint of the run in --output_dir",
        nargs="?",
        const="last",
    )
    num_train_epochs: float | None = _arg(
        None, _tiny_or_original("num_train_epochs", "epochs"), aliases=["--num_epochs"]
    )
    max_steps: int = _arg(-1, "stop after this many optimizer steps (-1: epochs)")
    per_device_train_batch_size: int | None = _arg(
        None, _tiny_or_original("per_device_train_batch_size", "rows per device"), aliases=["--batch_size"]
    )
    per_device_eval_batch_size: int | None = _arg(None, "evaluation rows per device (default: the training batch)")
    gradient_accumulation_steps: int | None = _arg(
        None, _tiny_or_original("gradient_accumulation_steps", "batches per optimizer step")
    )
    learning_rate: float | None = _arg(None, _tiny_or_original("learning_rate", "peak LR, > 0"))
    weight_decay: float = _arg(0.01, "AdamW weight decay")
    warmup_steps: float = _arg(
        0.1, "linear warm-up: a share of the steps when < 1, else steps (cosine after)", aliases=["--warmup_ratio"]
    )
    lr_scheduler_type: str = _arg("cosine", "learning-rate schedule (any transformers SchedulerType)")
    early_stopping_patience: int = _arg(3, "evaluations without improvement before stopping (0: never stop early)")
    eval_steps: float | None = _arg(None, "evaluate and save every N steps (default, or 0: each epoch)")
    eval_strategy: str | None = _arg(None, "'steps' with --eval_steps, else 'epoch'")
    save_strategy: str | None = _arg(None, "as --eval_strategy (the best checkpoint is kept at the end)")
    save_steps: float | None = _arg(None, "default: --eval_steps")
    save_total_limit: int | None = _arg(3, "checkpoints kept (the best one on top)")
    load_best_model_at_end: bool = _arg(True, "reload the best checkpoint by Code Alpaca eval loss at the end")
    metric_for_best_model: str | None = _arg("eval_code_alpaca_loss", "the original picked by Code Alpaca loss")
    greater_is_better: bool | None = _arg(False, "whether a larger --metric_for_best_model is better")
    restore_callback_states_from_checkpoint: bool = _arg(True, "early-stopping patience survives a resume")
    logging_steps: float | None = _arg(None, _tiny_or_original("logging_steps", "log interval"))
    logging_first_step: bool = _arg(True, "log the first step too")
    prediction_loss_only: bool = _arg(True, "never gather vocab-sized logits across evaluation batches")
    remove_unused_columns: bool = _arg(False, "the packed rows have exactly the model's columns")
    ddp_find_unused_parameters: bool | None = _arg(False, "DDP: every LoRA parameter is used each step")
    seed: int = _arg(42, "seed of the model init, dropout and data order")
    fp16: bool = _arg(False, "fp16 mixed precision (CUDA only)")
    bf16: bool = _arg(False, "bf16 mixed precision")
    torch_compile: bool = _arg(False, "compile the model with torch.compile", aliases=["--compile"])
    report_to: str = _arg(
        "auto",
        "'none', 'wandb', or any Trainer integration list; 'auto': wandb online with WANDB_API_KEY or a wandb "
        "login, as WANDB_MODE says when set, else wandb offline (a local run folder); none without wandb installed",
    )
    run_name: str | None = _arg(None, "run name for wandb")


ARGUMENT_GROUPS = {
    "model": ModelArguments,
    "experts and routing": ExpertArguments,
    "data": DataArguments,
    "functional evaluation": CodeEvalArguments,
    "training": TrainingFlags,
}
# The flags of TrainingFlags that are not TrainingArguments fields (the parser's own, handled by this script).
SCRIPT_ONLY_TRAINING_FLAGS = ("overwrite_output_dir", "early_stopping_patience")


# ----- parsing and validation (standard library only) --------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """Errors as one line, ``train.py: error: argument --x: ...`` with exit code 2 (no usage block, no traceback)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default to each help text, unless the text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default" in text or action.default in (None, False) else super()._get_help_string(action)


def _str_to_bool(value) -> bool:
    text = str(value).lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _add_fields(group, dtype) -> None:
    """One flag per dataclass field, with the conventions of transformers' HfArgumentParser (``--a_b`` and
    ``--a-b``, ``--flag`` alone for a bool, ``--no_flag`` for a bool that defaults to True, Literal -> choices)."""
    hints = typing.get_type_hints(dtype)
    for f in dataclasses.fields(dtype):
        kind, meta = hints[f.name], dict(f.metadata)
        names = [f"--{f.name}", *([f"--{f.name.replace('_', '-')}"] if "_" in f.name else []), *meta.pop("aliases", [])]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"dest": f.name, "default": default, **meta}
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if kind is bool or options == [bool]:
            kwargs.update(type=_str_to_bool, nargs="?", const=True)
        elif typing.get_origin(kind) is Literal:
            kwargs.update(choices=typing.get_args(kind))
        else:
            kwargs.setdefault("type", options[0] if options else kind)
        group.add_argument(*names, **kwargs)
        if default is True:
            group.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)


def build_parser() -> ArgumentParser:
    """The project's flags (standard library only: answers --help at once). Every other TrainingArguments option is
    accepted too and checked by the full parser (:func:`trainer_arguments`)."""
    p = ArgumentParser(
        prog="train.py",
        description="Train a mixture of LoRA experts (DyLoRA-MoE) on Code Alpaca + MBPP.",
        formatter_class=_HelpFormatter,
        epilog="Every other transformers TrainingArguments option is a flag too (--optim, --max_grad_norm, "
        "--disable_tqdm, --torch_compile_backend, --activation_checkpointing, ...); --help_trainer lists them all "
        "(it imports transformers: a few seconds).",
    )
    p.add_argument("--help_trainer", action="store_true", help="list every TrainingArguments flag, then exit")
    for title, dtype in ARGUMENT_GROUPS.items():
        _add_fields(p.add_argument_group(title), dtype)
    return p


def resolve_defaults(ns: argparse.Namespace) -> argparse.Namespace:
    """Fill what depends on other flags: tiny or original defaults, evaluation batch, evaluation/save cadence."""
    ns.output_dir = os.path.expandvars(ns.output_dir)  # $WANDB_RUN_ID: one folder per run of a wandb sweep
    defaults = TINY_DEFAULTS if ns.model_name == "tiny" else ORIGINAL_DEFAULTS
    for name, value in defaults.items():
        if getattr(ns, name) is None:
            setattr(ns, name, value)
    if ns.per_device_eval_batch_size is None:
        ns.per_device_eval_batch_size = ns.per_device_train_batch_size
    if not ns.eval_steps:  # the original's 0: each epoch
        ns.eval_steps = None
    cadence = "steps" if ns.eval_steps else "epoch"
    ns.eval_strategy = ns.eval_strategy or cadence
    ns.save_strategy = ns.save_strategy or ns.eval_strategy
    if ns.save_steps is None:
        ns.save_steps = ns.eval_steps
    return ns


def _positive(v) -> bool:
    return math.isfinite(v) and v > 0


def _percent(v) -> bool:
    return math.isfinite(v) and 0 < v <= 100


# (flag, holds, what is expected): checked in this order, so --num_experts is checked before --top_k uses it. The
# model settings' rules are DyLoRAMoEConfig's (their errors worded as flag errors).
CHECKS = (
    ("model_name", lambda v, a: bool(v.strip()), "a hub id, a local folder or 'tiny'"),
    ("tiny_hidden_size", lambda v, a: v >= 1, "an integer >= 1"),
    ("tiny_num_layers", lambda v, a: v >= 1, "an integer >= 1"),
    ("tiny_vocab_size", lambda v, a: v >= 300, "an integer >= 300 (256 bytes + special tokens + merges)"),
    *((name, *RULES[name]) for name in FLAG_SETTINGS if name in RULES),  # DyLoRAMoEConfig's rules
    ("collapse_threshold", lambda v, a: v is None or 0 < v < 1, "a share in (0, 1)"),
    ("collapse_patience", lambda v, a: v >= 1, "an integer >= 1"),
    ("sweep_jobs", lambda v, a: v >= 1, "an integer >= 1"),
    ("max_length", lambda v, a: v >= 2, "an integer >= 2"),
    ("training_subset", lambda v, a: _percent(v), "a percent in (0, 100]"),
    ("eval_subset", lambda v, a: _percent(v), "a percent in (0, 100]"),
    ("num_train_epochs", lambda v, a: _positive(v), "a number > 0"),
    ("max_steps", lambda v, a: v == -1 or v >= 1, "-1 (train for --num_epochs) or an integer >= 1"),
    ("per_device_train_batch_size", lambda v, a: v >= 1, "an integer >= 1"),
    ("per_device_eval_batch_size", lambda v, a: v >= 1, "an integer >= 1"),
    ("gradient_accumulation_steps", lambda v, a: v >= 1, "an integer >= 1"),
    ("learning_rate", lambda v, a: _positive(v), "a number > 0"),
    ("weight_decay", lambda v, a: math.isfinite(v) and v >= 0, "a number >= 0"),
    ("warmup_steps", lambda v, a: math.isfinite(v) and v >= 0, "a number >= 0 (a share of the steps when < 1)"),
    ("early_stopping_patience", lambda v, a: v >= 0, "an integer >= 0 (0: no early stopping)"),
    ("eval_steps", lambda v, a: v is None or _positive(v), "a number >= 0 (0: each epoch)"),
    ("save_steps", lambda v, a: v is None or _positive(v), "a number > 0"),
    ("save_total_limit", lambda v, a: v is None or v >= 1, "an integer >= 1"),
    ("logging_steps", lambda v, a: _positive(v), "a number > 0"),
    ("seed", lambda v, a: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("code_eval", lambda v, a: v is None or _benchmarks(v), f"benchmarks among {', '.join(CODE_EVAL_BENCHMARKS)}"),
    ("code_eval_limit", lambda v, a: v is None or v >= 1, "an integer >= 1"),
    ("code_eval_max_new_tokens", lambda v, a: v >= 1, "an integer >= 1"),
)


def _benchmarks(value: str) -> bool:
    names = [name.strip() for name in value.split(",")]
    return bool(names) and all(name in CODE_EVAL_BENCHMARKS for name in names)


def _flag(name: str) -> str:
    return {"num_train_epochs": "num_epochs", "per_device_train_batch_size": "batch_size"}.get(name, name)


TINY_MAX_LENGTH = 8192  # the tiny model's positions; a longer row is one padded giant (attention of length^2)


def check_combinations(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that are each valid but do not go together, refused before anything is written (a run that would
    fail after training, or silently ignore a flag)."""
    from dylora_moe.train.data import DOMAINS  # standard library only

    if "$" in args.output_dir:
        parser.error(f"argument --output_dir: {args.output_dir}: an environment variable in it is not set")
    if args.routing == "token" and args.sequence_top_k is not None:
        parser.error("argument --sequence_top_k: applies to --routing sequence only; token routing keeps --top_k "
                     "experts per token")  # fmt: skip
    if args.model_name == "tiny" and args.max_length > TINY_MAX_LENGTH:
        parser.error(f"argument --max_length: at most {TINY_MAX_LENGTH} with --model_name tiny (its positions), got "
                     f"{args.max_length}")  # fmt: skip
    metrics = [f"eval_{d}_{m}" for d in DOMAINS for m in ("loss", "ppl")]
    metric = args.metric_for_best_model
    if metric is not None and (metric if metric.startswith("eval_") else f"eval_{metric}") not in metrics:
        parser.error(f"argument --metric_for_best_model: expected one of {', '.join(metrics)}, got {metric!r}")
    if args.eval_strategy == "no" and (args.early_stopping_patience or args.load_best_model_at_end):
        parser.error("argument --eval_strategy: 'no' leaves early stopping and the best-model reload nothing to "
                     "compare; add --early_stopping_patience 0 --load_best_model_at_end false")  # fmt: skip


def validate(parser: ArgumentParser, args: argparse.Namespace, argv=()) -> None:
    """Every value checked before anything is opened for writing; a bad one exits 2 naming the flag (as spelled in
    ``argv``, where a flag has two names)."""
    for name, holds, expected in CHECKS:
        value = getattr(args, name)
        if holds(value, args):
            continue
        if name in RULES:
            parser.error(f"argument --{name}: {SettingError(name, value, expected, vars(args)).as_flag()}")
        parser.error(f"argument --{_flag(name)}: expected {expected.format(a=args)}, got {value!r}")
    check_combinations(parser, args)
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        parser.error(f"argument --output_dir: {out} is a file; expected a folder (created when missing)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        parser.error(f"argument --output_dir: {blocking} is a file, so {out} cannot be created")
    if args.resume_from_checkpoint not in (None, "last") and not Path(args.resume_from_checkpoint).is_dir():
        parser.error(f"argument --resume_from_checkpoint: {args.resume_from_checkpoint} is not a checkpoint folder")
    if args.fp16 and args.bf16:
        parser.error("argument --fp16: --fp16 and --bf16 exclude each other")
    if args.fp16 or args.backend == "triton":
        import torch  # only these two checks need it

        if args.fp16 and not torch.cuda.is_available():
            parser.error("argument --fp16: needs a CUDA GPU; on the CPU train in fp32 (no flag) or with --bf16")
        if args.backend == "triton":
            # Fail now, not after loading the data and the model: the op layer's check names the fix.
            from dylora_moe.kernels import resolve_backend

            try:
                resolve_backend("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
            except RuntimeError as err:
                said = next(
                    (a.split("=")[0] for a in argv if a.split("=")[0] in ("--kernel", "--backend")), "--backend"
                )
                parser.error(f"argument {said}: {said} triton: {err}")


def parse_args(argv=None) -> argparse.Namespace:
    """The project's flags, resolved and validated (exit 2 on a bad value). Trainer-only flags are left for
    :func:`trainer_arguments`; ``--help_trainer`` prints the full parser's help."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.trainer_only = unknown  # TrainingArguments flags (or typos): the full parser checks them
    if args.help_trainer:
        _full_parser().print_help()
        parser.exit(0)
    validate(parser, resolve_defaults(args), sys.argv[1:] if argv is None else argv)
    return args


def _full_parser():
    """HfArgumentParser over the three dataclasses and TrainingArguments with this script's defaults and names."""
    from transformers import HfArgumentParser, TrainingArguments

    class TrainArguments(TrainingFlags, TrainingArguments):
        pass

    TrainArguments = dataclass(TrainArguments)

    class Parser(HfArgumentParser):
        error = ArgumentParser.error

    parser = Parser(
        (ModelArguments, ExpertArguments, DataArguments, CodeEvalArguments, TrainArguments), prog="train.py"
    )
    parser.train_arguments_class = TrainArguments
    _bare_booleans(parser, TrainArguments)
    return parser


def _bare_booleans(parser, dtype) -> None:
    """Every ``bool`` and ``bool | None`` field a switch that also takes a value (``--disable_tqdm`` alone or
    ``--disable_tqdm false``), as transformers' parser does for plain ``bool``: its ``bool | None`` fields
    (``--disable_tqdm``, ...) otherwise demand a value."""
    hints = typing.get_type_hints(dtype)
    booleans = {name for name, kind in hints.items() if kind is bool or bool in typing.get_args(kind)}
    for action in parser._actions:
        if action.dest in booleans and action.nargs is None and not action.option_strings[0].startswith("--no_"):
            action.nargs, action.const, action.type = "?", True, _str_to_bool


def trainer_arguments(argv, report_to: list[str]):
    """The Trainer's arguments from the full command line (exit 2 on an unknown flag or a value the Trainer
    refuses), with this script's defaults resolved as :func:`parse_args` resolves them."""
    import torch

    parser = _full_parser()
    ns = resolve_defaults(parser.parse_args(sys.argv[1:] if argv is None else argv))
    ns.report_to = report_to
    if not torch.cuda.is_available():
        ns.use_cpu = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() and ns.ddp_backend is None:
        ns.ddp_backend = "gloo"  # torchrun on the CPU
    cls = parser.train_arguments_class
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    try:
        return cls(**{k: v for k, v in vars(ns).items() if k in names})
    except ValueError as err:
        parser.error(str(err).strip().splitlines()[0])


def finished_at(checkpoint: str, max_steps: int) -> bool:
    """Whether ``checkpoint`` is the last step of the training asked for (``--max_steps``, else its own plan)."""
    from dylora_moe.train.runs import TRAINER_STATE, read_json

    state = read_json(Path(checkpoint) / TRAINER_STATE) or {}
    step, planned = state.get("global_step", 0), state.get("max_steps", 0)
    return step >= (max_steps if max_steps > 0 else planned) > 0


def model_fingerprint(args: argparse.Namespace) -> dict:
    """The flags that shape the trained weights: a resume must agree with the run on each."""
    keys = ["model_name", "num_experts", "lora_r", "lora_alpha", "routing", "top_k", "sequence_top_k"]
    if args.model_name == "tiny":
        keys += ["tiny_hidden_size", "tiny_num_layers", "tiny_vocab_size"]
    return {key: getattr(args, key) for key in keys}


def resolve_report_to(choice: str, output_dir: str) -> list[str]:
    """The Trainer's report_to list; with 'auto' decide about wandb and say so once."""
    if choice != "auto":
        return [] if choice == "none" else choice.split(",")
    if importlib.util.find_spec("wandb") is None:
        logger.info("wandb is not installed: metrics go to metrics.jsonl only")
        return []
    os.environ.setdefault("WANDB_PROJECT", "dylora-moe")
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and sync lines would interleave with the metric lines
    os.environ.setdefault("WANDB_DIR", output_dir)
    if os.environ.get("WANDB_MODE"):
        logger.info("wandb: WANDB_MODE=%s", os.environ["WANDB_MODE"])
    elif os.environ.get("WANDB_API_KEY") or _wandb_login_found():
        logger.info("wandb: online (API key found)")
    else:
        os.environ["WANDB_MODE"] = "offline"
        logger.info("wandb: no API key, logging offline to %s/wandb (upload later with `wandb sync`)", output_dir)
    return ["wandb"]


def _wandb_login_found() -> bool:
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def load_model_and_tokenizer(args, splits, dtype):
    """The frozen base model and its tokenizer: tiny (built once from the full training text, cached in
    --output_dir) or a hub id / local folder."""
    from dylora_moe.train.base_models import TinyConfig, load_or_build_tiny, load_pretrained
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
        model, tokenizer, folder = load_or_build_tiny(args.output_dir, training_texts(splits), config)
        logger.info("tiny base model and tokenizer (vocab %d) in %s", len(tokenizer), folder)
        return model, tokenizer
    return load_pretrained(args.model_name, token=args.token, dtype=dtype)


def check_max_length(base, max_length: int) -> None:
    """Refuse rows longer than the base model's positions (a ModelLoadError: one ``error:`` line, before the data is
    packed; the run has no checkpoint yet, so the corrected command reuses the folder)."""
    from dylora_moe.train.base_models import ModelLoadError

    positions = getattr(base.config.get_text_config(), "max_position_embeddings", None)
    if positions and max_length > positions:
        raise ModelLoadError(
            f"--max_length {max_length} is longer than the base model's {positions} positions "
            f"(max_position_embeddings): pass --max_length <= {positions}"
        )


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
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
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


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} visible)"
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.sweep:  # one train.py process per configuration of the grid, then sweep.md (dylora_moe/train/sweep.py)
        from dylora_moe.train.sweep import run_sweep

        argv = sys.argv[1:] if argv is None else list(argv)
        flags = set(build_parser()._option_string_actions) | set(_full_parser()._option_string_actions)
        return {"sweep": run_sweep(args.sweep, argv, args.output_dir, known_flags=flags, jobs=args.sweep_jobs)}
    started = time.time()
    from dylora_moe.train.runs import plan_run, start_run

    report_to = resolve_report_to(args.report_to, args.output_dir)
    # Flags only the Trainer knows (or typos) are checked first, so a typo gets its own error even where the folder
    # holds a run; without any, the data is read before the import.
    training_args = trainer_arguments(argv, report_to) if args.trainer_only else None
    # ----- output folder: one run per folder, decided before anything is written -------------------------------
    is_main = int(os.environ.get("RANK", "0")) == 0
    plan = plan_run(
        args.output_dir,
        model_fingerprint(args),
        resume=args.resume_from_checkpoint,
        overwrite=args.overwrite_output_dir,
        check_conflicts=is_main,
    )
    # ----- data (errors show before the heavy imports), then the Trainer's arguments ------------------------------
    from dylora_moe.train.data import DOMAINS, build_corpus, load_domain

    splits = [load_domain(args.data_dir, domain) for domain in DOMAINS]
    training_args = training_args or trainer_arguments(argv, report_to)
    shown = {k: v for k, v in vars(args).items() if k not in ("help_trainer", "trainer_only")}
    logger.info("arguments: %s", shown | {"token": "***" if args.token else None})
    if is_main:
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
    from dylora_moe.train.specialisation import SpecialisationCallback
    from dylora_moe.train.trainer import DomainEarlyStopping, MetricsFile, MoETrainer, RunIdentity

    hf_logging.disable_progress_bar()  # no "Loading weights" bar per load (base model, each checkpoint reload)
    dtype = torch.bfloat16 if args.bf16 and torch.cuda.is_available() else None
    base, tokenizer = load_model_and_tokenizer(args, splits, dtype)
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
    """The message for a write that failed for want of space ("no space left on device" and where; torch.save
    reports it as a bare ``basic_ios::clear: iostream error``); None for any other error."""
    import errno
    import shutil

    out = _output_dir(argv)
    try:
        free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    except (OSError, StopIteration):
        return None
    full = getattr(err, "errno", None) == errno.ENOSPC or (
        isinstance(err, RuntimeError) and "iostream error" in str(err) and free < 64 * 2**20
    )
    if not full:
        return None
    where = getattr(err, "filename", None) or out
    return (
        f"error: no space left on device while writing to {where} ({free / 2**20:.0f} MiB free there): free some "
        "space or pass another --output_dir; the checkpoints already written are complete, and "
        "--resume_from_checkpoint continues from the last one"
    )


def cli() -> None:
    """``python train.py``: known failures end as one ``error:`` line (exit 2 for a refused run, 1 otherwise);
    ctrl-C ends with one line and the command that resumes (exit 130)."""
    setup_logging()
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(print(interrupted_message(sys.argv[1:]), file=sys.stderr) or 130)
    except Exception as err:
        from dylora_moe.train.runs import CheckpointNotFound, RunConflict

        if (message := disk_full_message(err, sys.argv[1:])) is not None:
            sys.exit(message)

        if isinstance(err, RunConflict):
            sys.exit(print(f"train.py: error: {err}", file=sys.stderr) or 2)
        known = [CheckpointNotFound]
        for module, name in (
            ("dylora_moe.train.data", "DataError"),
            ("dylora_moe.train.base_models", "ModelLoadError"),
            ("dylora_moe.train.gradient_coverage", "GradientCoverageError"),
            ("dylora_moe.train.sweep", "SweepError"),
        ):
            if module in sys.modules:
                known.append(getattr(sys.modules[module], name))
        if isinstance(err, tuple(known)):
            sys.exit(f"error: {err}")
        raise


if __name__ == "__main__":
    cli()
