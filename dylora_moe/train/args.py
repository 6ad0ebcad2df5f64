"""The training command's arguments: the project's flags as dataclasses, the standard-library parser that answers
``--help`` and a bad value at once, the checks, and the Trainer's full arguments (transformers imported only there).

Arguments are four dataclasses parsed by transformers' ``HfArgumentParser``: :class:`ModelArguments`,
:class:`ExpertArguments`, :class:`DataArguments` and ``TrainingArguments`` (every Trainer option is a flag), with
this project's defaults and the original script's flag names (:class:`TrainingFlags`). The project's own flags are
parsed and validated first with the standard library alone, so ``--help`` and a bad value answer at once; only then
are torch and transformers imported.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import io
import logging
import math
import netrc
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dylora_moe.config import CHOICES, RENAMED, RULES, DyLoRAMoEConfig, SettingError
from dylora_moe.corpora import DOMAINS, default_data_dir
from dylora_moe.flags import dataclass_flags, program, unrecognized, with_suggestion
from dylora_moe.train.parsing import HelpFormatter, add_fields, bare_booleans

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
    load_in_4bit: bool = _arg(
        False,
        "load the base model's linear layers in 4 bits (bitsandbytes, QLoRA); experts and router train in float32 "
        "over it (needs pip install 'dylora-moe[quant]')",
    )
    load_in_8bit: bool = _arg(False, "load the base model's linear layers in 8 bits (bitsandbytes LLM.int8)")
    bnb_4bit_quant_type: str | None = _arg(None, "4-bit data type of --load_in_4bit: nf4 (default) or fp4")
    use_bnb_nested_quant: bool = _arg(
        False, "with --load_in_4bit: quantize the quantization constants too (double quantization, ~0.4 bit/weight)"
    )


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
        "folder with code_alpaca_2k.json and mbpp.jsonl, or 'hub' to download sahil2801/CodeAlpaca-20k and "
        "google-research-datasets/mbpp (cached); default: env DYLORA_DATA_DIR, else ../shared/data next to the "
        "repo when present, else 'hub'",
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
    allow_setting_changes: bool = _arg(
        False,
        "resume even where a setting that changes what the model computes (--temperature, --router_weighting, the "
        "balancing flags, --z_loss_coefficient, --lora_dropout, --freeze_router) differs from the run's",
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
SCRIPT_ONLY_TRAINING_FLAGS = ("overwrite_output_dir", "allow_setting_changes", "early_stopping_patience")


# ----- parsing and validation (standard library only) --------------------------------------------------------------


INSTALLED_COMMAND = "dylora-moe-train"  # pyproject.toml's [project.scripts]


def prog() -> str:
    """``dylora-moe-train`` when run as the installed command, else ``train.py``."""
    return program("train.py", INSTALLED_COMMAND)


class ArgumentParser(argparse.ArgumentParser):
    """Errors as one line, ``train.py: error: argument --x: ...`` with exit code 2 (no usage block, no traceback);
    an unrecognized flag gets the closest known one (``known_flags``: beyond this parser's own)."""

    known_flags: set[str] = set()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})  # --num_expert is not --num_experts

    def error(self, message):
        message = with_suggestion(message, set(self._option_string_actions) | self.known_flags)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    """The project's flags (standard library only: answers --help at once). Every other TrainingArguments option is
    accepted too and checked by the full parser (:func:`trainer_arguments`)."""
    p = ArgumentParser(
        prog=prog(),
        description="Train a mixture of LoRA experts (DyLoRA-MoE) on Code Alpaca + MBPP.",
        formatter_class=HelpFormatter,
        epilog="Every other transformers TrainingArguments option is a flag too (--optim, --max_grad_norm, "
        "--disable_tqdm, --torch_compile_backend, --activation_checkpointing, ...); --help_trainer lists them all "
        "(it imports transformers: a few seconds).",
    )
    p.add_argument("--help_trainer", action="store_true", help="list every TrainingArguments flag, then exit")
    for title, dtype in ARGUMENT_GROUPS.items():
        add_fields(p.add_argument_group(title), dtype)
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
    ("bnb_4bit_quant_type", lambda v, a: v in (None, *BNB_4BIT_QUANT_TYPES), "nf4 or fp4"),
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


BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")  # transformers' BitsAndBytesConfig(bnb_4bit_quant_type=...)
TINY_MAX_LENGTH = 8192  # the tiny model's positions; a longer row is one padded giant (attention of length^2)


def check_combinations(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that are each valid but do not go together, refused before anything is written (a run that would
    fail after training, or silently ignore a flag)."""
    if "$" in args.output_dir:
        parser.error(f"argument --output_dir: {args.output_dir}: an environment variable in it is not set")
    if args.routing == "token" and args.sequence_top_k is not None:
        parser.error("argument --sequence_top_k: applies to --routing sequence only; token routing keeps --top_k "
                     "experts per token")  # fmt: skip
    if args.model_name == "tiny" and args.max_length > TINY_MAX_LENGTH:
        parser.error(f"argument --max_length: at most {TINY_MAX_LENGTH} with --model_name tiny (its positions), got "
                     f"{args.max_length}")  # fmt: skip
    check_quantization(parser, args)
    metrics = [f"eval_{d}_{m}" for d in DOMAINS for m in ("loss", "ppl")]
    metric = args.metric_for_best_model
    if metric is not None and (metric if metric.startswith("eval_") else f"eval_{metric}") not in metrics:
        parser.error(f"argument --metric_for_best_model: expected one of {', '.join(metrics)}, got {metric!r}")
    if args.eval_strategy == "no" and (args.early_stopping_patience or args.load_best_model_at_end):
        parser.error("argument --eval_strategy: 'no' leaves early stopping and the best-model reload nothing to "
                     "compare; add --early_stopping_patience 0 --load_best_model_at_end false")  # fmt: skip


def check_quantization(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """The bitsandbytes flags: one precision, the 4-bit options only with 4 bits, and the package installed
    (imported now, before the data and the model are loaded)."""
    if args.load_in_4bit and args.load_in_8bit:
        parser.error("argument --load_in_8bit: --load_in_4bit and --load_in_8bit exclude each other; pick one")
    for name in ("bnb_4bit_quant_type", "use_bnb_nested_quant"):
        if getattr(args, name) not in (None, False) and not args.load_in_4bit:
            parser.error(f"argument --{name}: applies to --load_in_4bit only")
    if args.load_in_4bit or args.load_in_8bit:
        from dylora_moe.quantized import require_bitsandbytes

        try:
            require_bitsandbytes()
        except ImportError as err:
            parser.error(f"argument --load_in_{4 if args.load_in_4bit else 8}bit: {err}")


def quantization_flags(args: argparse.Namespace) -> dict:
    """The quantization flags given (none for a float base), as run.json records them."""
    if args.load_in_4bit:
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": args.bnb_4bit_quant_type or "nf4",
            "use_bnb_nested_quant": args.use_bnb_nested_quant,
        }
    return {"load_in_8bit": True} if args.load_in_8bit else {}


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
    trainer_flags = dataclass_flags("transformers.training_args", "TrainingArguments")  # read, not imported
    parser.known_flags = trainer_flags or set()
    args, unknown = parser.parse_known_args(argv)
    if trainer_flags and (wrong := unrecognized(unknown, set(parser._option_string_actions) | trainer_flags)):
        parser.error(f"unrecognized arguments: {' '.join(wrong)}")  # a typo, answered before anything is set up
    args.trainer_only = unknown  # TrainingArguments flags (or typos): the full parser checks them
    if args.help_trainer:
        full_parser().print_help()
        parser.exit(0)
    validate(parser, resolve_defaults(args), sys.argv[1:] if argv is None else argv)
    return args


def full_parser():
    """HfArgumentParser over the three dataclasses and TrainingArguments with this script's defaults and names."""
    from transformers import HfArgumentParser, TrainingArguments

    class TrainArguments(TrainingFlags, TrainingArguments):
        pass

    TrainArguments = dataclass(TrainArguments)

    class Parser(HfArgumentParser):
        known_flags: set[str] = set()
        error = ArgumentParser.error

    parser = Parser(
        (ModelArguments, ExpertArguments, DataArguments, CodeEvalArguments, TrainArguments),
        prog=prog(),
        allow_abbrev=False,
    )
    parser.train_arguments_class = TrainArguments
    bare_booleans(parser, TrainArguments)
    return parser


def trainer_arguments(argv, report_to: list[str]):
    """The Trainer's arguments from the full command line (exit 2 on an unknown flag or a value the Trainer
    refuses), with this script's defaults resolved as :func:`parse_args` resolves them."""
    import torch

    _import_integrations_into_the_log()
    parser = full_parser()
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


# The flags that fix the trained weights' shapes and meaning: a resume must agree with the run on each.
SHAPE_SETTINGS = ("model_name", "num_experts", "lora_r", "lora_alpha", "routing", "top_k", "sequence_top_k")
# The flags that change what the model computes or how it trains (routing semantics, balancing, regularisation): a
# resume refuses a change unless --allow_setting_changes. The backend and the fused loss compute the same values.
CHANGEABLE_SETTINGS = (
    "temperature", "router_weighting", "balance_loss", "balance_coefficient", "balance_update_rate",
    "global_balance", "z_loss_coefficient", "lora_dropout", "freeze_router",
)  # fmt: skip


def model_fingerprint(args: argparse.Namespace) -> dict:
    """The flags that shape the trained model (:data:`SHAPE_SETTINGS`, the tiny base's size, and
    :data:`CHANGEABLE_SETTINGS`): recorded with the run and in each checkpoint, compared on resume."""
    keys = list(SHAPE_SETTINGS)
    if args.model_name == "tiny":
        keys += ["tiny_hidden_size", "tiny_num_layers", "tiny_vocab_size"]
    # The base's quantization only when there is one: a float run's fingerprint is the same as before these flags.
    return {key: getattr(args, key) for key in [*keys, *CHANGEABLE_SETTINGS]} | quantization_flags(args)


def _import_integrations_into_the_log() -> None:
    """Import transformers' integrations with stdout captured: with WANDB_MODE=offline they print ``[INFO] Running
    in WANDB offline mode`` at import, which :func:`resolve_report_to` has said already in the log's format; the
    captured lines go to the log at debug level instead of the console."""
    if "transformers.integrations.integration_utils" in sys.modules:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        import transformers.integrations.integration_utils  # noqa: F401
    for line in printed.getvalue().splitlines():
        if line.strip():
            logging.getLogger("transformers").debug(line.removeprefix("[INFO] "))


def resolve_report_to(choice: str, output_dir: str) -> list[str]:
    """The Trainer's report_to list; with 'auto' decide about wandb and say so once. Nothing of wandb is touched
    (environment, import) unless the list holds it: its setup costs seconds."""
    if choice != "auto":
        chosen = [] if choice == "none" else choice.split(",")
        if "wandb" in chosen and os.environ.get("WANDB_MODE"):
            logger.info("wandb: WANDB_MODE=%s", os.environ["WANDB_MODE"])
        return chosen
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
