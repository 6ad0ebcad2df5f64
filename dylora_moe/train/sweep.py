"""Offline sweeps: one train.py run per configuration of a grid, then a comparison.

    python train.py --sweep "num_experts=2,4,8 top_k=1,2 temperature=1,2"

The grid is a space-separated list of ``flag=value,value,...`` over any train.py flag (``true``/``false`` for a
switch: the flag given alone, or left out); grids joined by ``;`` run the union of their configurations (e.g.
``"balance_loss=mse,switch ; balance_loss=loss_free balance_update_rate=0.01,0.05"``). ``--sweep_jobs N`` runs N
configurations at a time (each with 1/N of the CPU threads; the first runs alone, so later ones share its tiny base).
Every configuration runs as its own ``train.py`` process (the other
flags of the command line are kept) in a sub-folder of the output dir named after it, e.g.
``num_experts-2_top_k-1_temperature-1/``, with its log in ``train.log``. A configuration that fails (a bad
combination such as top_k > num_experts, a crash) is reported with its exit status and last log line, its folder
removed (its log kept as ``<folder>.failed.log``; a folder holding a checkpoint stays), and the sweep goes on; a
progress bar counts the runs on a terminal. Afterwards, from each run's ``metrics.jsonl``:

- ``sweep.md``: per configuration, the final eval loss per domain, the domain-expert mutual information
  (normalised, and above chance), router entropy, load (largest share x E, entropy of the shares, effective
  experts), training tokens/s and wall time, plus the failures; configurations that differ only in ``seed`` are
  also averaged;
- ``sweep.png``: the same numbers as points, one row per configuration, each axis spanning the data;
- ``sweep_wandb.yaml``: a wandb sweep over the same grid for the real model on a GPU (``wandb sweep``, then
  ``wandb agent``).

The tiny base model is built once: its cached ``tiny-*`` folder is copied into later runs' folders (their hash check
still decides whether it is used).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .. import progress
from .runs import SUMMARY_FILE, read_metrics

logger = logging.getLogger(__name__)

# Each configuration runs the installed package's training command (what train.py and dylora-moe-train call), so a
# sweep works from a wheel install too, with no checkout.
TRAIN_COMMAND = (sys.executable, "-m", "dylora_moe.train.cli")
SWEEP_MD, SWEEP_PLOT, WANDB_YAML, RUN_LOG = "sweep.md", "sweep.png", "sweep_wandb.yaml", "train.log"
SWEEP_RUN_FOLDER = "outputs/wandb-sweep/$WANDB_RUN_ID"  # one folder per wandb run: a folder holds one run
RESERVED = ("sweep", "sweep_jobs", "output_dir")  # set by the sweep itself for each run
BOOLEANS = {"true": True, "false": False}
# What the wandb sweep fixes for the real job (the original's model on a GPU); everything else is train.py's default.
REAL_MODEL = {"model_name": "google/codegemma-2b", "backend": "triton", "bf16": True}


class SweepError(ValueError):
    """The grid text cannot be read; the message names the part and what was expected."""


def parse_grid(grid: str, known_flags: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``"num_experts=2,4 top_k=1,2"`` -> ``{"num_experts": ["2", "4"], "top_k": ["1", "2"]}`` (order kept).
    With ``known_flags`` (option strings such as ``--top_k``), an unknown flag is an error naming it."""
    known = None if known_flags is None else {flag.lstrip("-") for flag in known_flags}
    axes: dict[str, list[str]] = {}
    for part in grid.split():
        name, sep, values = part.partition("=")
        name = name.lstrip("-")
        items = [v for v in values.split(",") if v]
        if not sep or not name or not items:
            raise SweepError(f"sweep part {part!r}: expected flag=value[,value...], e.g. num_experts=2,4,8")
        if name in RESERVED:
            raise SweepError(f"sweep part {part!r}: --{name} is set by the sweep itself and cannot be swept")
        if name in axes:
            raise SweepError(f"sweep flag {name!r} is given twice; list all its values once: {name}=a,b")
        if known is not None and name not in known:
            raise SweepError(f"sweep flag {name!r} is not a train.py flag (see python train.py --help)")
        axes[name] = items
    if not axes:
        raise SweepError(f'empty sweep grid {grid!r}; expected e.g. "num_experts=2,4,8 top_k=1,2"')
    return axes


def configurations(axes: dict[str, list[str]]) -> list[dict[str, str]]:
    """Every combination of the grid's values (the last flag varies fastest)."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def parse_grids(grid: str, known_flags: Iterable[str] | None = None) -> list[dict[str, list[str]]]:
    """The ``;``-separated grids of ``grid``, each read by :func:`parse_grid`."""
    known = None if known_flags is None else list(known_flags)
    parts = [part for part in grid.split(";") if part.strip()]
    if not parts:
        raise SweepError(f'empty sweep grid {grid!r}; expected e.g. "num_experts=2,4,8 top_k=1,2"')
    return [parse_grid(part, known) for part in parts]


def union_configurations(grids: list[dict[str, list[str]]]) -> list[dict[str, str]]:
    """The configurations of every grid in order, each once."""
    out, seen = [], set()
    for axes in grids:
        for config in configurations(axes):
            key = tuple(sorted(config.items()))
            if key not in seen:
                seen.add(key)
                out.append(config)
    return out


def merged_axes(grids: list[dict[str, list[str]]]) -> dict[str, list[str]]:
    """Every flag of the grids with the union of its values (for the wandb sweep, which takes one grid)."""
    axes: dict[str, list[str]] = {}
    for grid in grids:
        for name, values in grid.items():
            axes.setdefault(name, [])
            axes[name] += [v for v in values if v not in axes[name]]
    return axes


def config_name(config: dict[str, str]) -> str:
    """A folder name for a configuration: ``num_experts-2_top_k-1`` (characters unsafe in paths replaced)."""
    return "_".join(f"{k}-{re.sub(r'[^A-Za-z0-9.+-]', '-', v)}" for k, v in config.items())


def config_argv(config: dict[str, str]) -> list[str]:
    """Command-line flags of a configuration; ``true``/``false`` give a switch alone or nothing."""
    argv = []
    for name, value in config.items():
        switch = BOOLEANS.get(value.lower())
        if switch is None:
            argv += [f"--{name}", value]
        elif switch:
            argv.append(f"--{name}")
    return argv


def strip_flags(argv: list[str], names: Iterable[str]) -> list[str]:
    """``argv`` without the flags ``names`` and their values (``--name value`` and ``--name=value``)."""
    drop = {f"--{n}" for n in names}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in drop:
            skip = True
        elif arg.split("=", 1)[0] not in drop:
            out.append(arg)
    return out


@dataclass
class RunResult:
    """One configuration's outcome: ``returncode`` (0: finished), ``seconds`` of wall time, ``error`` (the last log
    line of a failed run) and the final numbers read from its ``metrics.jsonl``."""

    config: dict[str, str]
    folder: Path
    returncode: int
    seconds: float
    error: str = ""
    losses: dict[str, float] = field(default_factory=dict)
    nmi: float = math.nan
    nmi_above_chance: float = math.nan
    router_entropy: float = math.nan
    load_max_over_mean: float = math.nan
    expert_entropy: float = math.nan
    tokens_per_s: float = math.nan
    log: Path | None = None  # the run's log; default folder/train.log (a failed run's is kept beside its folder)

    @property
    def effective_experts(self) -> float:
        """exp(entropy of the expert shares) = E ** (entropy / log E): E when balanced, 1 when one expert takes all."""
        num_experts = int(self.config.get("num_experts", 0)) or None
        if num_experts is None or math.isnan(self.expert_entropy):
            return math.nan
        return num_experts**self.expert_entropy

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.config.items())


def read_run(result: RunResult) -> RunResult:
    """Fill ``result``'s numbers from the last evaluation records and the training logs of its metrics.jsonl."""
    records = read_metrics(result.folder / "metrics.jsonl")[0]  # none for a run that never logged; no torn line
    entropies = {}
    for r in records:
        for key, value in r.items():
            match = re.fullmatch(r"eval_(.+)_loss", key)
            # A domain's evaluation record has eval_<domain>_runtime (the Trainer's); eval_<domain>_balance_loss does
            # not make "<domain>_balance" a domain.
            if match and f"eval_{match.group(1)}_runtime" in r:
                result.losses[match.group(1)] = value
                entropies[match.group(1)] = r.get(f"eval_{match.group(1)}_router_entropy", math.nan)
        if "eval_spec_nmi" in r:
            result.nmi, result.load_max_over_mean = r["eval_spec_nmi"], r.get("eval_spec_load_max_over_mean", math.nan)
            result.expert_entropy = r.get("eval_spec_expert_entropy", math.nan)
            result.nmi_above_chance = r.get("eval_spec_nmi_above_chance", math.nan)
    if entropies:
        result.router_entropy = sum(entropies.values()) / len(entropies)
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    if speeds:
        result.tokens_per_s = sum(speeds) / len(speeds)
    return result


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _child_env() -> dict[str, str]:
    """The environment of a run: this one, with the folder this package was imported from first on the path, so a
    run uses the same dylora_moe as the sweep (a checkout's, even where another copy is installed). An installed
    package's folder (site-packages) is left where it is: ahead of the standard library it could shadow it."""
    root = str(Path(__file__).resolve().parents[2])
    if root in {str(Path(p).resolve()) for p in site.getsitepackages() + [site.getusersitepackages()]}:
        return dict(os.environ)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


def run_config(
    config, base_argv, folder: Path, command: Sequence[str], timeout: float | None, threads: int | None = None
) -> RunResult:
    """Run ``command`` (the training command) for one configuration in ``folder``; its stdout and stderr go to
    ``folder/train.log``. ``threads``: the CPU threads the run may use (OMP_NUM_THREADS; default: torch's own)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = _child_env() if threads is None else {**_child_env(), "OMP_NUM_THREADS": str(threads)}
    cmd = [*command, *base_argv, *config_argv(config), "--output_dir", str(folder)]
    started = time.time()
    with (folder / RUN_LOG).open("w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            code = -1
            log.write(f"timed out after {timeout} s\n")
    result = RunResult(config, folder, code, time.time() - started)
    if code != 0:
        result.error = _last_line(folder / RUN_LOG)
    return read_run(result)


def clean_up_failed(result: RunResult, output_dir: Path) -> None:
    """A failed configuration's folder goes (the copied tiny base, a partial metrics.jsonl: nothing to resume from);
    its log is kept as ``<folder>.failed.log`` beside it. A folder with a checkpoint or a final model stays."""
    folder = result.folder
    if result.ok or not folder.is_dir() or any(folder.glob("checkpoint-*")) or (folder / "final").exists():
        return
    log = output_dir / f"{folder.name}.failed.log"
    if (folder / RUN_LOG).is_file():
        os.replace(folder / RUN_LOG, log)
        result.log = log
    shutil.rmtree(folder, ignore_errors=True)


def _share_tiny_base(done: list[RunResult], folder: Path) -> None:
    """Copy the cached tiny base model of an earlier run into ``folder`` (train.py reuses it when its hash fits)."""
    for earlier in done:
        for tiny in earlier.folder.glob("tiny-*"):
            if tiny.is_dir() and not (folder / tiny.name).exists():
                shutil.copytree(tiny, folder / tiny.name)


def _fmt(value: float, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _row_numbers(r: RunResult, domains: list[str]) -> list[float]:
    return [*(r.losses.get(d, math.nan) for d in domains), r.load_max_over_mean, r.expert_entropy,
            r.effective_experts, r.nmi, r.nmi_above_chance, r.router_entropy]  # fmt: skip


NUMBER_HEADER = ["load max×E", "load entropy", "effective experts", "MI (norm.)", "MI above chance", "router entropy"]
NUMBER_FORMATS = [".2f", ".3f", ".2f", ".3f", ".3f", ".3f"]


def sweep_table(results: list[RunResult]) -> str:
    domains = sorted({d for r in results for d in r.losses})
    header = ["configuration", "status", *(f"{d} loss" for d in domains), *NUMBER_HEADER, "tokens/s", "wall s"]
    header.append("summary")
    formats = [".4f"] * len(domains) + NUMBER_FORMATS
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for r in results:
        status = "ok" if r.ok else f"failed ({r.returncode})"
        row = [r.label, status, *(_fmt(v, f) for v, f in zip(_row_numbers(r, domains), formats))]
        row += [_fmt(r.tokens_per_s, ".0f"), f"{r.seconds:.0f}"]
        summary = r.folder / SUMMARY_FILE
        row.append(f"[{r.folder.name}]({r.folder.name}/{SUMMARY_FILE})" if summary.is_file() else f"{r.folder.name}/")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seed_mean_table(results: list[RunResult]) -> str:
    """Finished runs that differ only in ``seed``, averaged (mean, and the spread max - min of each number);
    empty when no configuration sets a seed."""
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        if r.ok and "seed" in r.config:
            groups.setdefault(" ".join(f"{k}={v}" for k, v in r.config.items() if k != "seed"), []).append(r)
    if not groups:
        return ""
    domains = sorted({d for r in results for d in r.losses})
    header = ["configuration", "seeds", *(f"{d} loss" for d in domains), *NUMBER_HEADER]
    formats = [".4f"] * len(domains) + NUMBER_FORMATS
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for label, runs in groups.items():
        columns = list(zip(*(_row_numbers(r, domains) for r in runs)))
        cells = []
        for values, spec in zip(columns, formats):
            values = [v for v in values if not math.isnan(v)]
            mean = sum(values) / len(values) if values else math.nan
            spread = f" ± {(max(values) - min(values)) / 2:{spec}}" if len(values) > 1 else ""
            cells.append(_fmt(mean, spec) + spread)
        lines.append("| " + " | ".join([label or "(all)", str(len(runs)), *cells]) + " |")
    return "\n".join(lines)


def plot_sweep(path: Path, results: list[RunResult]):
    """Four panels of points, one row per configuration (its flags as the row's label): final eval loss per domain
    (one marker per domain), normalised MI, router entropy, training tokens/s. Each x axis spans the data (a loss
    difference of 0.02 shows), not zero to the top. Failed configurations keep their row, marked, with no point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [r.label + (" (failed)" if not r.ok else "") for r in results]
    y = list(range(len(results)))
    fig = Figure(figsize=(12, max(3.5, 0.32 * len(results) + 2.2)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4, sharey=True, gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
    loss = axes[0]
    domains = sorted({d for r in results for d in r.losses})
    for domain, marker in zip(domains, "os^Dv<>p*h"):
        loss.plot([r.losses.get(domain, math.nan) for r in results], y, marker, label=domain, alpha=0.85)
    loss.set(title="final eval loss (nats/token)")
    if domains:
        loss.legend(fontsize=7, loc="best")
    for ax, values, title in (
        (axes[1], [r.nmi for r in results], "domain-expert MI (normalised)"),
        (axes[2], [r.router_entropy for r in results], "router entropy (nats/token)"),
        (axes[3], [r.tokens_per_s for r in results], "training tokens/s"),
    ):
        ax.plot(values, y, "o", color="C2")
        ax.set_title(title, fontsize=9)
    loss.set_yticks(y, labels, fontsize=8)
    loss.set_ylim(len(results) - 0.5, -0.5)  # the first configuration on top, as in sweep.md
    loss.title.set_fontsize(9)
    for ax in axes:
        ax.margins(x=0.15)
        ax.grid(alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def _yaml_value(value: str):
    if value.lower() in BOOLEANS:
        return value.lower()
    try:
        float(value)
        return value
    except ValueError:
        return json.dumps(value)  # a JSON string is a YAML string


def wandb_sweep_yaml(axes: dict[str, list[str]], base_argv: list[str], metric: str) -> str:
    """A wandb grid sweep over ``axes`` on the real model (``REAL_MODEL``); the offline flags are listed only as a
    comment, since tiny-model settings (steps, subsets) would not fit the real job."""
    lines = [
        "# wandb sweep over the grid of the offline sweep beside it, on the real model (needs a GPU and the hub):",
        "#   wandb sweep sweep_wandb.yaml   then   wandb agent <entity/project/sweep id>   (from the repository root)",
        "# Flags not listed take train.py's defaults (the original's values). Each run writes its own --output_dir,",
        "# outputs/wandb-sweep/<wandb run id> (train.py expands $WANDB_RUN_ID, which the wandb agent sets per run).",
        f"# The offline sweep also had: {' '.join(base_argv) or '(no other flags)'}",
        "program: train.py",
        "method: grid",
        "metric:",
        f"  name: {metric}",
        "  goal: minimize",
        "parameters:",
    ]
    for name, values in axes.items():
        lines += [f"  {name}:", f"    values: [{', '.join(str(_yaml_value(v)) for v in values)}]"]
    for name, value in REAL_MODEL.items():
        if name not in axes:
            lines += [f"  {name}:", f"    value: {_yaml_value(str(value))}"]
    lines += [
        "command:",
        "  - ${env}",
        "  - ${interpreter}",
        "  - ${program}",
        "  - --output_dir",
        f"  - {SWEEP_RUN_FOLDER}",
        "  - ${args_no_boolean_flags}",
    ]
    return "\n".join(lines) + "\n"


def run_sweep(
    grid: str,
    base_argv: list[str],
    output_dir: str | Path,
    *,
    known_flags: Iterable[str] | None = None,
    script: str | Path | None = None,
    timeout: float | None = None,
    jobs: int = 1,
) -> Path:
    """Run every configuration of ``grid`` (``;`` joins grids) with the training command (:data:`TRAIN_COMMAND`;
    ``script``: a Python script to run instead, e.g. a stand-in in tests) with ``base_argv`` (``--sweep``,
    ``--sweep_jobs`` and ``--output_dir`` are dropped from it) in its own sub-folder of ``output_dir``, ``jobs`` at a
    time; write sweep.md, sweep.png and sweep_wandb.yaml there. Returns the path of sweep.md. A failed configuration
    is reported, never raised."""
    if jobs < 1:
        raise SweepError(f"--sweep_jobs must be >= 1, got {jobs}")
    grids = parse_grids(grid, known_flags)
    command = TRAIN_COMMAND if script is None else (sys.executable, str(script))
    base = strip_flags(list(base_argv), RESERVED)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    configs = union_configurations(grids)
    threads = None if jobs == 1 else max(1, (os.cpu_count() or 1) // jobs)
    results: dict[int, RunResult] = {}
    bar = progress.bar(len(configs), "sweep", unit="run")

    def run(i: int) -> RunResult:
        config = configs[i]
        folder = output_dir / config_name(config)
        _share_tiny_base([r for r in results.values() if r.ok], folder)
        logger.info("sweep %d/%d: %s -> %s", i + 1, len(configs), " ".join(config_argv(config)), folder)
        result = run_config(config, base, folder, command, timeout, threads)
        if result.ok:
            logger.info("sweep %d/%d finished in %.0f s", i + 1, len(configs), result.seconds)
        else:
            logger.warning("sweep %d/%d failed (exit %d): %s", i + 1, len(configs), result.returncode, result.error)
            clean_up_failed(result, output_dir)
        results[i] = result
        bar.update(1)
        return result

    if configs:
        run(0)  # alone: the later runs copy its tiny base model instead of each building one
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, range(1, len(configs))))
    bar.close()
    ordered = [results[i] for i in range(len(configs))]
    path = write_sweep(output_dir, grid, merged_axes(grids), base, ordered)
    failed = sum(not r.ok for r in ordered)
    logger.info(
        "sweep done: %d configurations, %d finished, %d failed; table: %s, plot: %s",
        len(ordered), len(ordered) - failed, failed, path, output_dir / SWEEP_PLOT,
    )  # fmt: skip
    return path


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def write_sweep(output_dir: Path, grid: str, axes: dict[str, list[str]], base: list[str], results: list[RunResult]):
    """sweep.png, sweep_wandb.yaml and sweep.md (returned) from the runs' results."""
    plot_sweep(output_dir / SWEEP_PLOT, results)
    domains = [d for r in results for d in r.losses]
    metric = f"eval/{'code_alpaca' if 'code_alpaca' in domains else (domains or ['code_alpaca'])[0]}_loss"
    (output_dir / WANDB_YAML).write_text(wandb_sweep_yaml(axes, base, metric))
    failed = [r for r in results if not r.ok]
    means = seed_mean_table(results)
    failures = "\n".join(
        f"- `{r.label}`: exit {r.returncode}: {r.error} (log: {_relative(r.log or r.folder / RUN_LOG, output_dir)})"
        for r in failed
    )
    text = f"""# DyLoRA-MoE sweep

- grid: `{grid}`
- other flags: `{" ".join(base) or "(none)"}`
- configurations: {len(results)} ({len(results) - len(failed)} finished, {len(failed)} failed)

Final evaluation of each run (the model kept at the end): eval loss per domain; the load over the evaluation tokens of
all domains (largest expert share x E: 1 = balanced, E = one expert takes all; entropy of the shares / log E; effective
experts = exp(entropy)); the domain-expert mutual information (normalised: 0 = no specialisation, 1 = each expert
serves one domain) and how much of it is above chance (minus the mean over shuffled domain labels); router entropy
(mean of the domains); the mean training tokens/s.

{sweep_table(results)}
{(chr(10) + "Mean over seeds (± half the range):" + chr(10) + chr(10) + means + chr(10)) if means else ""}
![sweep comparison]({SWEEP_PLOT})

{"## Failed configurations" + chr(10) + chr(10) + failures + chr(10) if failed else ""}
A wandb sweep of the same grid on the real model (GPU): [{WANDB_YAML}]({WANDB_YAML}).
"""
    path = output_dir / SWEEP_MD
    path.write_text(text)
    return path
