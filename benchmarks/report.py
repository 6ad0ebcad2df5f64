"""Markdown report of benchmark runs from the CSV: the goal table of docs/design.md §5, then one table per case.

    python benchmarks/report.py [--data CSV ...] [--device SUBSTR] [--run RUN_ID] [--out FILE] [--plots DIR]

Default data: benchmarks/data/all_benchmark_data.csv (the committed history); one section per device name, for its
newest run (``--run`` picks another). Every goal is one entry of ``GOALS``: a ratio of two measured terms (or of one
term and a device constant), a comparison and a threshold. Speed-ups are time(baseline) / time(row): > 1 is faster.
Times use the best clock a run has: the router's CUDA-graph time, then the CUDA-event kernel time, then host time.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.records import COMMITTED_CSV, METRICS, read_rows, runs  # noqa: E402

CLOCK = ("kernel_time", "time")  # op goals: kernel time on a GPU (host time adds a sync), host time elsewhere
ROUTER_CLOCK = ("cudagraph_time", "kernel_time", "time")  # the router's own kernels, without launch cost
MEMORY = ("memory", "memory_extra")
# Nominal peak memory bandwidth (GB/s) by GPU name fragment, for the 75%-of-bandwidth goal; first match wins.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("L4", 300.0),
]
BASELINE = {"moe_lora": "eager", "router": "torch_seq", "step": "reference"}  # "vs" column of the case tables
LABEL_KEYS = {"step": ("E", "routing")}  # shape keys that label rows inside one table instead of splitting it
BASE = "base"  # the frozen base layer / model, measured in the same run: what the other providers add to it
# Providers whose time includes the base (the rest time the LoRA delta alone, which a layer adds to its base).
WITH_BASE = {"moe_lora": {"base+moe_lora"}, "step": None}  # None: every provider of the op


def adds_to_base(op: str, provider: str, own: float | None, base: float | None) -> float | None:
    """Percent that ``provider`` adds to the frozen base's time, from the two measurements of one run: a delta-only
    provider's time / base, one that includes the base (``base+moe_lora``, every step) its time / base - 1."""
    if op not in WITH_BASE or provider == BASE or not own or not base:
        return None
    with_base = WITH_BASE[op]
    return (own / base - (1.0 if with_base is None or provider in with_base else 0.0)) * 100


def peak_gbps(row: dict) -> float | None:
    name = row["device_name"].lower()
    return next((gbps for fragment, gbps in PEAK_GBPS if fragment.lower() in name), None)


@dataclass(frozen=True)
class Term:
    """One measured number: the row of ``provider`` in ``mode`` with shape keys ``where``, read from the first
    metric of ``metrics`` the run has."""

    provider: str
    mode: str = "full"
    metrics: tuple[str, ...] = CLOCK
    where: dict = field(default_factory=dict)

    def find(self, rows: list[dict]) -> dict | None:
        for metric in self.metrics:
            found = [
                r
                for r in rows
                if (r["provider"], r["mode"], r["metric"]) == (self.provider, self.mode, metric)
                and all(r["shape"].get(k) == v for k, v in self.where.items())
            ]
            if found:
                return found[-1]  # the last written wins
        return None


def read(row: dict | None, best: bool) -> float | None:
    """The row's median, or its best value (the min of a lower-is-better metric, the max of the others)."""
    if row is None:
        return None
    if not best:
        return row["value"]
    return row["value_min"] if METRICS[row["metric"]][1] else row["value_max"]


@dataclass(frozen=True)
class Goal:
    """``num / den * scale`` compared with ``target`` by ``compare`` (">=" or "<="), once per distinct value of the
    ``per`` shape keys among this run's ``op`` rows that match ``case``. ``den`` is a Term, or a function of the
    numerator's row (a device constant, a bound from the shape), or None."""

    device: str  # "cuda" | "cpu": the runs it applies to
    op: str
    text: str  # formatted with the ``per`` values
    num: Term
    den: Term | Callable[[dict], float | None] | None
    compare: str
    target: float
    case: dict = field(default_factory=dict)
    per: tuple[str, ...] = ()
    scale: float = 1.0
    note: str = ""

    def evaluate(self, rows: list[dict], best: bool = False) -> list[dict]:
        scoped = [r for r in rows if r["op"] == self.op and all(r["shape"].get(k) == v for k, v in self.case.items())]
        keys = sorted({tuple(r["shape"].get(k) for k in self.per) for r in scoped}, key=str) or [("?",) * len(self.per)]
        verdicts = []
        for key in keys:
            members = [r for r in scoped if tuple(r["shape"].get(k) for k in self.per) == key]
            num_row = self.num.find(members)
            num = read(num_row, best)
            if isinstance(self.den, Term):
                den = read(self.den.find(members), best)
            else:
                den = 1.0 if self.den is None else (num_row and self.den(num_row))
            value = None if num is None or not den else num / den * self.scale
            met = value is not None and {">=": operator.ge, "<=": operator.le}[self.compare](value, self.target)
            verdicts.append(
                {
                    "goal": self.text.format(**dict(zip(self.per, key))),
                    "value": value,
                    "target": f"{self.compare} {self.target:g}{self.note}",
                    "status": "NOT MEASURED" if value is None else ("MET" if met else "NOT MET"),
                }
            )
        return verdicts


def saved_bound(row: dict) -> float:
    s = row["shape"]
    return s["T"] * (s["E"] * s["r"] + 2 * s["k"])


# The goals' reference case (docs/design.md §5): T = 8192, d_in = d_out = 4096, E = 8, r = 16, k = 2 and k = E.
REF = {"T": 8192, "d_in": 4096, "d_out": 4096, "E": 8, "r": 16}
E4_TOKEN = {"E": 4, "routing": "token"}
E4_SEQ = {"E": 4, "routing": "sequence"}
GOALS = [
    Goal("cuda", "moe_lora", "op fwd+bwd k={k}: triton vs eager loop over experts", Term("loop"), Term("triton"),
         ">=", 5, REF, ("k",)),
    Goal("cuda", "moe_lora", "op fwd+bwd k={k}: triton vs ONE plain eager LoRA of rank r", Term("lora_dense"),
         Term("triton"), ">=", 1.0, REF, ("k",)),
    Goal("cuda", "moe_lora", "op fwd+bwd k={k}: triton vs the grouped_mm baseline (docs/gpu-check.md)",
         Term("grouped_mm"), Term("triton"), ">=", 1.5, REF, ("k",)),
    Goal("cuda", "moe_lora", "op fwd+bwd k={k}: triton vs eager (docs/gpu-check.md)", Term("eager"), Term("triton"),
         ">=", 1.3, REF, ("k",)),
    Goal("cuda", "moe_lora", "op fwd k={k}: LoRA bytes, fraction of peak bandwidth",
         Term("triton", "fwd", ("bandwidth",)), peak_gbps, ">=", 0.75, REF, ("k",)),
    Goal("cuda", "moe_lora", "op fwd+bwd k={k}: LoRA bytes, fraction of peak bandwidth",
         Term("triton", metrics=("bandwidth",)), peak_gbps, ">=", 0.75, REF, ("k",)),
    Goal("cuda", "moe_lora", "layer fwd+bwd k={k}: (base + triton MoE-LoRA) / frozen base linear, time",
         Term("base+moe_lora"), Term("base"), "<=", 1.15, REF, ("k",)),
    Goal("cuda", "moe_lora", "op k={k}: saved-for-backward elements / T*(E*r+2k)",
         Term("triton", metrics=("saved_elems",)), saved_bound, "<=", 1.0, REF, ("k",)),
    Goal("cuda", "router", "router T=32k E={E}: triton time (us)", Term("triton", "fwd", ROUTER_CLOCK), None,
         "<=", 10, {"T": 32768}, ("E",), scale=1e3),
    Goal("cuda", "router", "router T=32k E={E}: triton vs torch softmax/topk/scatter/bincount",
         Term("torch_seq", "fwd"), Term("triton", "fwd"), ">=", 3, {"T": 32768}, ("E",)),
    Goal("cuda", "step", "train step E=4 token k=1: triton vs original algorithm (reference, sequence), tokens/s",
         Term("reference", where=E4_SEQ, metrics=("time",)), Term("triton", where=E4_TOKEN, metrics=("time",)),
         ">=", 3),
    Goal("cuda", "step", "train step E=4 token k=1: triton vs single-adapter peft LoRA, tokens/s",
         Term("peft", metrics=("time",)), Term("triton", where=E4_TOKEN, metrics=("time",)), ">=", 0.7),
    Goal("cuda", "step", "train step E=4 token k=1: triton vs single-adapter peft LoRA (docs/gpu-check.md)",
         Term("peft", metrics=("time",)), Term("triton", where=E4_TOKEN, metrics=("time",)), ">=", 1.0),
    Goal("cuda", "step", "train step E=4 token k=1: triton vs eager backend, tokens/s",
         Term("eager", where=E4_TOKEN, metrics=("time",)), Term("triton", where=E4_TOKEN, metrics=("time",)),
         ">=", 1.3),
    Goal("cuda", "step", "train step E=4 token k=1: triton peak memory / single-adapter peft LoRA",
         Term("triton", where=E4_TOKEN, metrics=MEMORY), Term("peft", metrics=MEMORY), "<=", 1.3),
    Goal("cuda", "step", "train step E=4 sequence: triton vs reference sequence routing, speed-up",
         Term("reference", where=E4_SEQ, metrics=("time",)), Term("triton", where=E4_SEQ, metrics=("time",)),
         ">=", 1.0),
    Goal("cuda", "step", "train step E=4 sequence: triton peak memory / reference", Term("triton", where=E4_SEQ,
         metrics=MEMORY), Term("reference", where=E4_SEQ, metrics=MEMORY), "<=", 0.8, note=" ('well under')"),
    Goal("cpu", "step", "CPU train step E=4: eager token routing vs reference sequence routing, speed-up",
         Term("reference", where=E4_SEQ, metrics=("time",)), Term("eager", where=E4_TOKEN, metrics=("time",)),
         ">=", 2.5),
    Goal("cpu", "step", "CPU train step E=4: eager sequence routing vs reference sequence routing, speed-up",
         Term("reference", where=E4_SEQ, metrics=("time",)), Term("eager", where=E4_SEQ, metrics=("time",)),
         ">=", 1.0),
]  # fmt: skip


def goal_table(rows: list[dict], goals: list[Goal] = GOALS) -> list[str]:
    """Goals of this run's device: measured (medians), at best (mins of times: a loaded machine only adds time, so
    this shows whether a miss is noise), target, status (judged on the medians)."""
    device = rows[0]["device"]
    lines = ["| goal | measured | at best | target | status |", "|---|---:|---:|---|---|"]
    for goal in (g for g in goals if g.device == device):
        for median, best in zip(goal.evaluate(rows), goal.evaluate(rows, best=True)):
            lines.append(
                f"| {median['goal']} | {fmt(median['value'])} | {fmt(best['value'])} | {median['target']} "
                f"| **{median['status']}** |"
            )
    return lines


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def experts_line(op: str, lines_by_key: dict, clock: str, base: float) -> str:
    """One sentence under a table: what the fastest MoE-LoRA backend measured (triton, else eager; for the op the
    layer as a whole, base + MoE-LoRA, where measured) adds to the frozen base."""
    what = "base layer" if op == "moe_lora" else "base model's step"
    for provider in ("base+moe_lora", "triton", "eager") if op == "moe_lora" else ("triton", "eager"):
        found = [v[clock] for k, v in lines_by_key.items() if k[-1] == provider and clock in v]
        if found:
            share = adds_to_base(op, provider, found[0]["value"], base)
            return f"Experts ({provider}) add {fmt(share)}% to the frozen {what} (same run, {clock})."
    return f"Experts: no MoE-LoRA row beside the frozen {what} in this table."


def case_tables(rows: list[dict]) -> list[str]:
    """One table per (op, mode, shape): one line per provider (and label keys), one column per metric (median)."""
    tables: dict[tuple, list[dict]] = {}
    for row in rows:
        labels = LABEL_KEYS.get(row["op"], ())
        shape = {k: v for k, v in row["shape"].items() if k not in labels}
        tables.setdefault((row["op"], row["mode"], json.dumps(shape, sort_keys=True)), []).append(row)
    lines = []
    for (op, mode, shape), members in sorted(tables.items()):
        labels = LABEL_KEYS.get(op, ())
        metrics = [m for m in METRICS if any(r["metric"] == m for r in members)]
        lines_by_key: dict[tuple, dict] = {}
        for r in members:
            key = (*(r["shape"].get(k) for k in labels), r["provider"])
            lines_by_key.setdefault(key, {})[r["metric"]] = r
        clock = next(m for m in (*ROUTER_CLOCK, *MEMORY) if m in metrics)
        baseline = BASELINE.get(op)
        cells = ", ".join(f"{k}={v}" for k, v in json.loads(shape).items())
        base_row = next((v.get(clock) for k, v in lines_by_key.items() if k[-1] == BASE), None)
        base_column = op in WITH_BASE and base_row is not None
        head = [*labels, "provider", *(f"{m} ({METRICS[m][0]})" for m in metrics), f"vs {baseline} ({clock})"]
        head += ["adds to base (%)"] if base_column else []
        rule = "|" + "---|" * (len(labels) + 1) + "---:|" * (len(metrics) + 1 + base_column)
        lines += [f"### {op} {mode}: {cells}", "", "| " + " | ".join(head) + " |", rule]
        for key in sorted(lines_by_key, key=lambda k: [(isinstance(v, str), v) for v in k]):
            by_metric = lines_by_key[key]
            base = lines_by_key.get((*key[:-1], baseline), {}).get(clock)
            own = by_metric.get(clock)
            speedup = base["value"] / own["value"] if base and own and own["value"] else None
            values = [fmt(by_metric[m]["value"]) if m in by_metric else "-" for m in metrics]
            cells = [*map(str, key), *values, fmt(speedup)]
            if base_column:
                cells.append(fmt(adds_to_base(op, key[-1], own and own["value"], base_row["value"])))
            lines.append("| " + " | ".join(cells) + " |")
        if base_column:
            lines += ["", experts_line(op, lines_by_key, clock, base_row["value"])]
        lines.append("")
    return lines


def run_section(rows: list[dict]) -> list[str]:
    first = rows[0]
    versions = sorted({(r["torch"], r["triton"] or "not recorded") for r in rows})
    return [
        f"## {first['device_name']}: run {first['run_id']}",
        "",
        f"- device: {first['device']}; dtype: {', '.join(sorted({r['dtype'] for r in rows}))}; "
        f"commit: {', '.join(sorted({r['commit'] for r in rows}))}; "
        + "; ".join(f"torch {t}, triton {tr}" for t, tr in versions),
        f"- measured {min(r['timestamp'] for r in rows)} to {max(r['timestamp'] for r in rows)} (UTC); "
        f"sources: {', '.join(sorted({r['info'].get('source', 'benchmark run') for r in rows}))}",
        "",
        "### Goals (docs/design.md §5)",
        "",
        *goal_table(rows),
        "",
        'Bitwise determinism is checked by the test suite (tests/), not timed here. "adds to base": what each '
        "provider adds to the frozen base (`base`) measured in this run, in percent of the base's time (the LoRA "
        "delta alone: its time / base; `base+moe_lora` and every step: time / base - 1).",
        "",
        *case_tables(rows),
    ]


def build_report(rows: list[dict], device: str | None = None, run_id: str | None = None) -> str:
    selected = runs(rows, device, run_id)
    if not selected:
        raise SystemExit(f"no benchmark rows for device {device!r} run {run_id!r}")
    lines = ["# Benchmark report", ""]
    for members in selected.values():
        lines += run_section(members)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, nargs="+", default=[COMMITTED_CSV], help="benchmark CSV files")
    parser.add_argument("--device", help="only device names containing this (case-insensitive)")
    parser.add_argument("--run", help="this run_id (default: the newest run of each device)")
    parser.add_argument("--out", type=Path, help="also write the report here")
    parser.add_argument("--plots", type=Path, help="write the standard plots (visualize.py) into this folder")
    args = parser.parse_args(argv)
    rows = read_rows(*args.data)
    report = build_report(rows, args.device, args.run)
    if args.plots:
        from benchmarks.visualize import standard_plots

        for run_rows in runs(rows, args.device, args.run).values():
            names = standard_plots(run_rows, args.plots)
            where = args.out.parent if args.out else Path.cwd()
            report += "\n" + "\n".join(f"![{p.name}]({os.path.relpath(p, where)})" for p in names) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
