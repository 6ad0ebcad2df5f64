"""What an evaluation leaves behind: every sample as JSON lines, the metrics as JSON, a markdown section (tables of
pass@k per routing, the oracle, and which expert solves which problems) and a figure.

Files (in the output folder, each written to a temporary name and renamed, so none is ever half written):
``code_eval_samples.jsonl``, ``code_eval.json``, ``code_eval.md``, ``code_eval.png`` (with matplotlib).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..io.atomic_folder import write_text_atomic

# The evaluation's files (train.py --code_eval writes them into its run folder, whose list of outputs names them).
SAMPLES_FILE, METRICS_FILE = "code_eval_samples.jsonl", "code_eval.json"
MARKDOWN_FILE, FIGURE_FILE = "code_eval.md", "code_eval.png"

SECTION_TITLE = "## Functional evaluation (pass@k in a sandbox)"


def write_jsonl(path: Path, rows) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown(summary: dict) -> str:
    """The section for summary.md: pass@k per benchmark and routing; per expert, what it solves alone and how often
    the router picks it; the learned-vs-oracle gap. ``summary``: from :func:`~dylora_moe.evaluate.summarise`."""
    lines = [SECTION_TITLE, "", summary["standard"], ""]
    for bench, info in summary["benchmarks"].items():
        ks = sorted({k for r in info["routings"].values() for k in r["pass_at_k"]}, key=int)
        lines += [f"### {bench} ({info['problems']} problems)", ""]
        lines += ["| routing | " + " | ".join(f"pass@{k} (%)" for k in ks) + " |"]
        lines += ["| --- | " + " | ".join("---:" for _ in ks) + " |"]
        for routing, r in info["routings"].items():
            lines.append(f"| {routing} | " + " | ".join(_pct(r["pass_at_k"].get(k)) for k in ks) + " |")
        if info.get("oracle") is not None:
            lines.append(f"| oracle (any single expert) | {_pct(info['oracle'])} |" + " |" * (len(ks) - 1))
        lines.append("")
        experts = info.get("experts")
        if experts:
            gap = info["oracle"] - info["routings"]["learned"]["pass_at_k"]["1"]
            lines += [
                f"Oracle minus learned routing (greedy pass@1): {_pct(gap)} points. Per expert (greedy):",
                "",
                "| expert | solves | solves alone | router's top pick for | of those it solves |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            for e, row in experts.items():
                lines.append(
                    f"| {e} | {row['solved']} | {row['solved_alone']} | {row['top_pick']} | {row['top_pick_solved']} |"
                )
            lines.append("")
    lines.append(
        f"Every sample (prompt, completion, verdict, expert weights): `{SAMPLES_FILE}`; metrics: "
        f"`{METRICS_FILE}`" + (f"; figure: `{FIGURE_FILE}`." if summary.get("figure") else ".")
    )
    return "\n".join(lines) + "\n"


def plot(path: Path, summary: dict) -> bool:
    """Write :func:`figure` to ``path`` (a temporary name, then renamed). Returns False when matplotlib is not
    installed."""
    try:
        fig = figure(summary)
    except ModuleNotFoundError:
        return False
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return True


def figure(summary: dict):
    """Left: greedy pass@1 per routing and benchmark (bars; "no problem solved" in words when all are zero). Right:
    which expert solves which problem (a matrix of problems x experts, learned routing as the last row)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches = list(summary["benchmarks"])
    fig = Figure(figsize=(12, 4), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    routings = list(dict.fromkeys(r for b in benches for r in summary["benchmarks"][b]["routings"]))
    has_oracle = any(summary["benchmarks"][b].get("oracle") is not None for b in benches)
    bars = routings + (["oracle"] if has_oracle else [])
    width = 0.8 / max(len(bars), 1)
    solved_any = False
    for i, routing in enumerate(bars):
        values = []
        for b in benches:
            info = summary["benchmarks"][b]
            values.append(
                info.get("oracle")
                if routing == "oracle"
                else info["routings"].get(routing, {}).get("pass_at_k", {}).get("1")
            )
        left.bar(np.arange(len(benches)) + i * width, [100 * (v or 0) for v in values], width, label=routing)
        solved_any = solved_any or any(v for v in values)
    left.set_xticks(np.arange(len(benches)) + width * (len(bars) - 1) / 2, benches)
    left.set(ylabel="pass@1 (%)", title="pass@1 per routing")
    if solved_any:
        left.legend(fontsize=7)
    else:  # an empty chart on a -0.04..0.04 axis would say nothing: say it in words
        left.set_ylim(0, 100)
        problems = ", ".join(f"{summary['benchmarks'][b]['problems']} {b}" for b in benches)
        left.text(
            0.5, 0.5, f"no problem solved\n(pass@1 = 0 under every routing;\n{problems} problems)",
            transform=left.transAxes, ha="center", va="center", fontsize=11,
        )  # fmt: skip
    matrix_rows = [r for r in routings if r.startswith("expert_")] + (["learned"] if "learned" in routings else [])
    columns, boundaries = [], []
    for b in benches:
        solved = summary["benchmarks"][b]["solved"]
        tasks = list(next(iter(solved.values())).keys()) if solved else []
        columns += [(b, t) for t in tasks]
        boundaries.append(len(columns))
    if matrix_rows and columns:
        grid = np.array(
            [[summary["benchmarks"][b]["solved"].get(r, {}).get(t, 0) for b, t in columns] for r in matrix_rows],
            dtype=float,
        )
        right.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
        right.set_yticks(range(len(matrix_rows)), matrix_rows)
        for x in boundaries[:-1]:
            right.axvline(x - 0.5, color="k", lw=1)
        right.set(xlabel=" | ".join(benches) + " problems (task order)", title="solved (green) per expert")
        if not grid.any():
            right.text(0.5, 0.5, "no problem solved", transform=right.transAxes, ha="center", va="center", fontsize=11)
    else:
        right.set_axis_off()
    fig.tight_layout()
    return fig


def write_outputs(output_dir: str | Path, rows: list[dict], summary: dict, metrics: dict) -> Path:
    """Write the samples, metrics, figure and markdown section into ``output_dir``; returns the markdown's path."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / SAMPLES_FILE, rows)
    summary["figure"] = plot(folder / FIGURE_FILE, summary)
    write_text_atomic(folder / METRICS_FILE, json.dumps({"metrics": metrics, "summary": summary}, indent=1) + "\n")
    text = markdown(summary)
    write_text_atomic(folder / MARKDOWN_FILE, text)
    return folder / MARKDOWN_FILE


def append_section(summary_md: Path, section: str) -> None:
    """Put ``section`` at the end of an existing summary.md, replacing an earlier copy of it (a rerun)."""
    text = summary_md.read_text(encoding="utf-8")
    at = text.find(SECTION_TITLE)
    text = (text[:at] if at != -1 else text).rstrip("\n") + "\n\n" + section
    write_text_atomic(summary_md, text)
