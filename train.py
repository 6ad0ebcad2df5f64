"""Joint training of DyLoRA-MoE on Code Alpaca + MBPP, with per-domain evaluation and routing metrics.

Reads top to bottom: arguments -> base model and tokenizer -> DyLoRA_MoE -> data -> Trainer -> report.

    python train.py                                     # offline: the tiny model, ../shared/data, CPU, minutes
    python train.py --kernel triton --bf16 --model_name google/codegemma-2b          # the real job on a GPU
    python train.py --resume_from_checkpoint            # continue from the last complete checkpoint of --output_dir
    python train.py --sweep "num_experts=2,4 top_k=1,2" # one run per configuration, compared in sweep.md
    torchrun --standalone --nproc_per_node 2 train.py   # DDP through the Trainer (gloo on CPU, nccl on GPU)

Outputs in --output_dir: checkpoint-N/ (experts as peft adapters + router + optimizer state), final/ (the model
kept at the end), metrics.jsonl (every log), summary.md (per-domain table, expert utilisation per domain, the
specialisation section) and loss.png / utilization.png / specialisation.png / routing_examples.png (+ .html); with
--model_name tiny also the tiny base model and its tokenizer (tiny-<hash>/). With --sweep: one sub-folder per
configuration, sweep.md, sweep.png and sweep_wandb.yaml.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent
logger = logging.getLogger("train")

# The original script's values (DESIGN 2), and what `--model_name tiny` uses instead when the flag is not given:
# the random frozen tiny base needs larger LoRA steps (its loss plateaus after ~20 of them), and one epoch over half
# the training text keeps the default run within a few minutes on a 2-core CPU.
ORIGINAL_DEFAULTS = {
    "num_epochs": 10,
    "learning_rate": 2e-5,
    "batch_size": 4,
    "gradient_accumulation_steps": 8,
    "max_length": 512,
    "logging_steps": 10,
    "training_subset": 100.0,
}
TINY_DEFAULTS = {
    "num_epochs": 1,
    "learning_rate": 2e-3,
    "batch_size": 8,
    "gradient_accumulation_steps": 1,
    "max_length": 256,
    "logging_steps": 5,
    "training_subset": 50.0,
}


def default_data_dir() -> str:
    return os.environ.get("DYLORA_DATA_DIR") or str(REPO.parent / "shared" / "data")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends the default to each help text, unless the text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "default:" in text else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    def tiny_or_original(name: str, what: str) -> str:
        return (
            f"{what} (default: {ORIGINAL_DEFAULTS[name]}, the original's; {TINY_DEFAULTS[name]} with --model_name tiny)"
        )

    p = argparse.ArgumentParser(
        description="Train a mixture of LoRA experts (DyLoRA-MoE) on Code Alpaca + MBPP.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model_name",
        default="tiny",
        help="base model: a hub id (google/codegemma-2b was the original's, needs a hub and a GPU), a local folder, "
        "or 'tiny': a small Llama built from a config with a BPE tokenizer trained on the data (offline)",
    )
    g.add_argument(
        "--token", default=None, help="Hugging Face token for gated models (default: HF_TOKEN or the cached login)"
    )
    g.add_argument("--tiny_hidden_size", type=int, default=256, help="tiny model: hidden size")
    g.add_argument("--tiny_num_layers", type=int, default=2, help="tiny model: decoder layers")
    g.add_argument("--tiny_vocab_size", type=int, default=2048, help="tiny model: BPE vocabulary size")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")

    g = p.add_argument_group("experts and routing")
    g.add_argument("--num_experts", type=int, default=4, help="LoRA experts, all created up front and mature")
    g.add_argument("--lora_r", type=int, default=16, help="LoRA rank of every expert")
    g.add_argument("--lora_alpha", type=float, default=32, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA input")
    g.add_argument(
        "--kernel",
        choices=("auto", "triton", "eager", "reference"),
        default="auto",
        help="backend: triton kernels (GPU), eager PyTorch, the original per-expert algorithm (slow), "
        "or auto (triton with CUDA, else eager)",
    )
    g.add_argument(
        "--routing",
        choices=("token", "sequence"),
        default="token",
        help="token: each token's top-k experts mixed in every LoRA layer (one pass; the fast path); "
        "sequence: the seed's per-sequence expert mixture (routing pass + one batched pass)",
    )
    g.add_argument("--top_k", type=int, default=1, help="experts per token")
    g.add_argument("--temperature", type=float, default=2.0, help="router softmax temperature (the original's 2.0)")
    g.add_argument(
        "--sequence_top_k",
        type=int,
        default=None,
        help="sequence routing: keep each sequence's best k experts, renormalised (default: all)",
    )
    g.add_argument(
        "--router_weighting",
        choices=("softmax", "original"),
        default="softmax",
        help="softmax: top-k probabilities of the tempered softmax (k=1 trains the gate); original: softmax over "
        "the k selected logits (k=1 gives the gate no gradient)",
    )
    g.add_argument("--balance_loss", choices=("mse", "switch"), default="mse", help="load-balancing loss form")
    g.add_argument("--balance_coefficient", type=float, default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--z_loss_coefficient", type=float, default=0.0, help="weight of the router z-loss")
    # spec: the three flags of issue 12 (INTERFACES 6: plain fields of the experts/routing dataclass)
    g.add_argument("--freeze_router", action="store_true", help="keep the gate at its initial weights; experts train")
    g.add_argument(
        "--strict_gradients",
        action="store_true",
        help="stop with an error (not a warning) when, after the first optimizer step, an expert that received "
        "tokens has a zero gradient in some adapted layer, or a trainable gate has none",
    )
    g.add_argument(
        "--sweep",
        default=None,
        help='grid of train.py flags, e.g. "num_experts=2,4,8 top_k=1,2 temperature=1,2": one run per '
        "configuration in its own sub-folder of --output_dir, then sweep.md, sweep.png and a wandb sweep YAML",
    )

    g = p.add_argument_group("data")
    g.add_argument(
        "--data_dir",
        default=default_data_dir(),
        help="folder with code_alpaca_2k.json and mbpp.jsonl (env DYLORA_DATA_DIR, else ../shared/data next to "
        "the repo), or 'hub' to download sahil2801/CodeAlpaca-20k and google-research-datasets/mbpp",
    )
    g.add_argument("--max_length", type=int, default=None, help=tiny_or_original("max_length", "tokens per packed row"))
    g.add_argument(
        "--training_subset",
        type=float,
        default=None,
        help=tiny_or_original("training_subset", "percent of each training split to use"),
    )
    g.add_argument("--eval_subset", type=float, default=100.0, help="percent of each validation split to use")

    g = p.add_argument_group("training")
    g.add_argument("--num_epochs", type=int, default=None, help=tiny_or_original("num_epochs", "epochs"))
    g.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    g.add_argument("--batch_size", type=int, default=None, help=tiny_or_original("batch_size", "rows per device"))
    g.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=None,
        help=tiny_or_original("gradient_accumulation_steps", "batches per optimizer step"),
    )
    g.add_argument("--learning_rate", type=float, default=None, help=tiny_or_original("learning_rate", "peak LR"))
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--warmup_ratio", type=float, default=0.1, help="linear warm-up share of the steps (cosine after)")
    g.add_argument("--early_stopping_patience", type=int, default=3, help="evaluations without improvement")
    g.add_argument("--eval_steps", type=int, default=0, help="evaluate and save every N steps (0: each epoch)")
    g.add_argument("--logging_steps", type=int, default=None, help=tiny_or_original("logging_steps", "log interval"))
    g.add_argument("--seed", type=int, default=42, help="seed of the model init, dropout and data order")
    g.add_argument("--fp16", action="store_true", help="fp16 mixed precision (CUDA only)")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    g.add_argument(
        "--resume_from_checkpoint",
        nargs="?",
        const="last",
        default=None,
        help="continue from a checkpoint folder, or (flag alone) the last complete checkpoint-N of --output_dir",
    )

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default=str(REPO / "outputs" / "dylora-moe"), help="checkpoints, metrics, report")
    g.add_argument(
        "--report_to",
        default="auto",
        help="'none', 'wandb', or any Trainer integration list; 'auto': wandb online with WANDB_API_KEY or a wandb "
        "login, as WANDB_MODE says when set, else wandb offline (a local run folder); none without wandb installed",
    )
    g.add_argument("--run_name", default=None, help="run name for wandb")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.model_name == "tiny" else ORIGINAL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.fp16 and args.bf16:
        parser.error("--fp16 and --bf16 exclude each other")
    if args.fp16 and not torch.cuda.is_available():
        parser.error("--fp16 needs a CUDA GPU; on the CPU train in fp32 (no flag) or with --bf16")
    if args.kernel == "triton":
        # Fail now, not after loading the data and the model: the op layer's check names the fix.
        from dylora_moe.kernels import resolve_backend

        try:
            resolve_backend("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as err:
            parser.error(f"--kernel triton: {err}")
    if not 1 <= args.top_k <= args.num_experts:
        parser.error(f"--top_k must be in [1, --num_experts={args.num_experts}], got {args.top_k}")
    return args


def resolve_report_to(choice: str, output_dir: str) -> list[str]:
    """The Trainer's report_to list; with 'auto' decide about wandb and say so once."""
    if choice != "auto":
        return [] if choice == "none" else choice.split(",")
    if importlib.util.find_spec("wandb") is None:
        logger.info("wandb is not installed: metrics go to metrics.jsonl only")
        return []
    os.environ.setdefault("WANDB_PROJECT", "dylora-moe")
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
    from dylora_moe.data import training_texts
    from dylora_moe.tiny import TinyConfig, load_or_build_tiny, load_pretrained

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
        f"frozen: {frozen:>12,} (base model"
        + (" + router)" if router_frozen else ")"),  # spec: says the gate is frozen
        f"total:  {total:>12,} ({100 * (trainable_lora + router) / total:.2f}% trainable)",
    ]
    return "\n".join(lines)


def machine() -> str:
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
    if args.sweep:  # spec: one train.py process per configuration of the grid, then sweep.md (dylora_moe/sweep.py)
        from dylora_moe.sweep import run_sweep

        argv = sys.argv[1:] if argv is None else list(argv)
        flags = build_parser()._option_string_actions  # the option strings (argparse keeps no public list)
        return {"sweep": run_sweep(args.sweep, argv, args.output_dir, known_flags=flags)}
    started = time.time()
    from dylora_moe.data import DOMAINS, build_corpus, load_domain

    logger.info("arguments: %s", vars(args) | {"token": "***" if args.token else None})
    # ----- data, base model, experts --------------------------------------------------------------------------
    splits = [load_domain(args.data_dir, domain) for domain in DOMAINS]  # data errors show before heavy imports

    from transformers import TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from dylora_moe.checkpoint import load_checkpoint
    from dylora_moe.coverage import GradientCoverage  # spec:
    from dylora_moe.layer import check_kernel
    from dylora_moe.model import DyLoRA_MoE
    from dylora_moe.specialisation import SpecialisationCallback  # spec:
    from dylora_moe.train_report import format_duration, write_report  # spec: + format_duration
    from dylora_moe.training import CheckpointNotFound, DomainEarlyStopping, MetricsFile, MoETrainer

    os.makedirs(args.output_dir, exist_ok=True)
    report_to = resolve_report_to(args.report_to, args.output_dir)
    dtype = torch.bfloat16 if args.bf16 and torch.cuda.is_available() else None
    base, tokenizer = load_model_and_tokenizer(args, splits, dtype)
    set_seed(args.seed)  # the expert init; the tiny base is seeded on its own, the Trainer seeds dropout and data order
    model = DyLoRA_MoE(
        base,
        args.num_experts,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        token=args.token,
        allow_expert_growth=False,  # the original's training script: all experts up front, no growth
        kernel=args.kernel,
        routing=args.routing,
        top_k=args.top_k,
        temperature=args.temperature,
        router_weighting=args.router_weighting,
        sequence_top_k=args.sequence_top_k,
        balance_loss=args.balance_loss,
        balance_coefficient=args.balance_coefficient,
        z_loss_coefficient=args.z_loss_coefficient,
        mature_experts=True,
        freeze_router=args.freeze_router,  # spec:
    )
    for param in model.trainable_parameters():
        # Experts and gate train in fp32 over a bf16 base, as peft keeps adapters: AdamW steps of lr 2e-5 would
        # round away in bf16 weights. The layers cast them to the activations' dtype in forward.
        param.data = param.data.float()
    backend = check_kernel(args.kernel)
    logger.info("kernel %s runs on %s; parameters:\n%s", args.kernel, backend, parameter_breakdown(model))
    corpus = build_corpus(splits, tokenizer, args.max_length, args.training_subset, args.eval_subset)
    logger.info(
        "data: %d training rows of %d tokens (%d tokens); eval rows %s",
        len(corpus.train),
        args.max_length,
        corpus.train.num_tokens,
        {domain: len(ds) for domain, ds in corpus.eval.items()},
    )

    # ----- Trainer ---------------------------------------------------------------------------------------------
    per_epoch = "epoch" if args.eval_steps == 0 else "steps"
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        run_name=args.run_name,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        lr_scheduler_type="cosine",
        eval_strategy=per_epoch,
        save_strategy=per_epoch,
        eval_steps=args.eval_steps or None,
        save_steps=args.eval_steps or None,
        save_total_limit=3,  # the best checkpoint is kept on top of the 3 newest
        load_best_model_at_end=True,
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
        metric_for_best_model="eval_code_alpaca_loss",  # the original picked the best model by Code Alpaca loss
        greater_is_better=False,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        prediction_loss_only=True,  # never gather vocab-sized logits across evaluation batches
        report_to=report_to,
        seed=args.seed,
        fp16=args.fp16,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None,
        ddp_find_unused_parameters=False,
        activation_checkpointing=args.gradient_checkpointing,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    metrics_path = Path(args.output_dir) / "metrics.jsonl"
    trainer = MoETrainer(
        model=model,
        args=training_args,
        train_dataset=corpus.train,
        eval_dataset=corpus.eval,
        processing_class=tokenizer,
        callbacks=[
            MetricsFile(metrics_path),
            DomainEarlyStopping(early_stopping_patience=args.early_stopping_patience),
            GradientCoverage(strict=args.strict_gradients),  # spec: checks the first optimizer step's gradients
        ],
        load_weights=load_checkpoint,
    )
    specialisation = SpecialisationCallback.attach(trainer)  # spec: eval_spec_* metrics at every evaluation

    resume = args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(args.output_dir)
        if resume is None:
            raise CheckpointNotFound(f"--resume_from_checkpoint: no complete checkpoint-N folder in {args.output_dir}")
        logger.info("resuming from %s", resume)
    if resume is None and trainer.is_world_process_zero():
        metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log; a resumed one appends

    # Before training: the fresh experts (B = 0) are the base model, so this is the baseline even when resuming.
    initial = trainer.evaluate()
    trainer.train(resume_from_checkpoint=resume)
    final = trainer.evaluate()  # the best checkpoint by Code Alpaca eval loss, reloaded at the end of train()
    trainer.save_model(os.path.join(args.output_dir, "final"))

    # ----- report ------------------------------------------------------------------------------------------------
    summary = None
    if trainer.is_world_process_zero():
        run_info = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "processes": str(training_args.world_size),
            "commit": commit(),
            "command": "python train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": f"{args.model_name}, {args.num_experts} experts, r={args.lora_r}, routing={args.routing}, "
            f"top_k={args.top_k}, kernel={args.kernel} ({backend})"
            + (", router frozen (--freeze_router)" if args.freeze_router else ""),  # spec:
            "training": f"{trainer.state.global_step} optimizer steps, {trainer.state.epoch:.2f} epochs, "
            f"{corpus.train.num_tokens:,} training tokens per epoch, best checkpoint "
            f"{trainer.state.best_model_checkpoint or 'none (no evaluation during training)'}",
            "wall time": format_duration(time.time() - started),  # spec: seconds for a short run
        }
        summary = write_report(
            args.output_dir,
            initial=initial,
            final=final,
            domains=list(DOMAINS),
            num_experts=args.num_experts,
            run_info=run_info,
            specialisation=specialisation.latest,  # spec: the final evaluation's routing
            tokenizer=tokenizer,  # spec:
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
    return {"initial": initial, "final": final, "summary": summary, "trainer": trainer}


def setup_logging() -> None:
    """INFO from the main process, warnings only from the others; transformers' own chatter at warning level."""
    from transformers.utils import logging as hf_logging

    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    hf_logging.set_verbosity_warning()


if __name__ == "__main__":
    from dylora_moe.coverage import GradientCoverageError  # spec:
    from dylora_moe.data import DataError
    from dylora_moe.sweep import SweepError  # spec:
    from dylora_moe.tiny import ModelLoadError
    from dylora_moe.training import CheckpointNotFound

    setup_logging()
    try:
        main()
    except (DataError, ModelLoadError, CheckpointNotFound, GradientCoverageError, SweepError) as err:  # spec: + 2
        sys.exit(f"error: {err}")
