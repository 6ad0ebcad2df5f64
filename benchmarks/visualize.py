"""Plots from the benchmark CSV: one metric of one op and mode, one series (line or bar group) per provider.

    python benchmarks/visualize.py --op moe_lora --metric kernel_time --mode full [--device H100] [--run ID]
        [--where routing=token ...] [--data CSV ...] [--out PNG]

Numeric x axes (``E``) give lines with a min-max band; categorical ones (``case``: a shape label) give grouped bars.
Data: the run just measured (benchmarks/out/all_benchmark_data.csv, where ``pytest benchmarks/`` writes) when it
exists, else the committed history; ``--data`` picks other files. Default: the newest run of the first matching
device; the PNG goes to benchmarks/out/ unless ``--out`` says where.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.records import BENCH_DIR, COMMITTED_CSV, LOCAL_CSV, METRICS, read_rows, runs  # noqa: E402

# (op, metric fallbacks, mode, shape filter): what report.py --plots draws for a run
STANDARD = [
    ("moe_lora", ("kernel_time", "time"), "full", {}),
    ("router", ("cudagraph_time", "kernel_time", "time"), "fwd", {}),
    ("step", ("time",), "full", {"routing": ("token", "-")}),  # "-": peft, one adapter
    ("step", ("memory", "memory_extra"), "full", {}),
]


def select(rows: list[dict], op: str, metric: str, mode: str, where: dict | None = None) -> list[dict]:
    """Rows of one op, metric and mode whose shape matches ``where`` (a value, or a tuple of accepted values)."""
    where = where or {}
    return [
        r
        for r in rows
        if (r["op"], r["metric"], r["mode"]) == (op, metric, mode)
        and all(str(r["shape"].get(k)) in (map(str, v) if isinstance(v, tuple) else [str(v)]) for k, v in where.items())
    ]


def series_of(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by series: the provider, plus the shape keys that still tell two of its rows at one x value apart (the
    routing when both routings are plotted; not E or k where the x value, a case label, names them already)."""
    x_name = rows[0]["x_name"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["provider"], str(r["x_value"])), []).append(r)
    keys = {k for r in rows for k in r["shape"]} - {x_name}
    varying = sorted(k for k in keys if any(len({str(r["shape"].get(k)) for r in g}) > 1 for g in groups.values()))
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = " ".join([r["provider"], *(f"{k}={r['shape'].get(k)}" for k in varying)])
        series.setdefault(label, []).append(r)
    return series


def _readable_log_axis(axis) -> None:
    """Ticks of a log axis as plain numbers (0.5, 1, 2, 5, 10), not 4x10^0."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def plot(rows: list[dict], path: Path, title: str = "") -> Path:
    """Draw ``rows`` (one op, metric and mode) into the PNG at ``path``; returns ``path``. One colour per provider;
    a provider's variants (e.g. the routing) differ by line style or hatch."""
    import matplotlib

    matplotlib.use("Agg")  # files only; GPU machines have no display
    import matplotlib.pyplot as plt

    if not rows:
        raise ValueError("no benchmark rows to plot (check the op, metric, mode and filters)")
    first = rows[0]
    series = series_of(rows)
    providers = sorted({r["provider"] for r in rows})
    colour = {p: f"C{i % 10}" for i, p in enumerate(providers)}
    styles, hatches = ["-", "--", ":", "-."], ["", "//", "..", "xx"]
    xs = sorted({r["x_value"] for r in rows}, key=lambda v: (isinstance(v, str), v))
    numeric = all(isinstance(x, float) for x in xs)
    width_in = 8 if numeric else min(16, max(8, 0.35 * len(xs) * len(series) + 2))
    fig, ax = plt.subplots(figsize=(width_in, 5))
    width = 0.8 / len(series)
    variant_of: dict[str, int] = {}
    for i, (label, members) in enumerate(sorted(series.items())):
        provider = members[0]["provider"]
        variant = variant_of.setdefault(provider, 0)
        variant_of[provider] += 1
        points = {r["x_value"]: r for r in members}  # the last written wins
        if numeric:
            px = sorted(points)
            ax.plot(px, [points[x]["value"] for x in px], marker="o", color=colour[provider],
                    ls=styles[variant % len(styles)], label=label)  # fmt: skip
            ax.fill_between(px, [points[x]["value_min"] for x in px], [points[x]["value_max"] for x in px],
                            color=colour[provider], alpha=0.15)  # fmt: skip
        else:
            heights = [points[x]["value"] if x in points else 0.0 for x in xs]
            ax.bar([j + i * width for j in range(len(xs))], heights, width, label=label, color=colour[provider],
                   hatch=hatches[variant % len(hatches)], edgecolor="white")  # fmt: skip
    if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
    else:
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(xs))])
        ax.set_xticklabels(xs, fontsize=8)
        ax.set_yscale("log")
        _readable_log_axis(ax.yaxis)
    better = "lower" if METRICS[first["metric"]][1] else "higher"
    ax.set_xlabel(first["x_name"])
    ax.set_ylabel(f"{first['metric']} ({first['unit']}; {better} is better)")
    ax.set_title(title or f"{first['op']} {first['mode']}, {first['device_name']}, {first['dtype']}, {first['commit']}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot, never over a bar
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def slug(*parts: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")


def standard_plots(rows: list[dict], folder: Path) -> list[Path]:
    """The ``STANDARD`` plots of one run that has rows for them, into ``folder``."""
    written = []
    for op, metrics, mode, where in STANDARD:
        for metric in metrics:
            chosen = select(rows, op, metric, mode, where)
            if chosen:
                name = slug(rows[0]["device_name"].split(",")[0], op, mode, metric, *map(str, where))
                written.append(plot(chosen, folder / f"{name}.png"))
                break
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, help="moe_lora | router | step")
    parser.add_argument("--metric", default="time", choices=list(METRICS))
    parser.add_argument("--mode", default="full", help="fwd | bwd | full")
    parser.add_argument("--device", help="device name contains this (case-insensitive)")
    parser.add_argument("--run", help="run_id (default: the newest run of the device)")
    parser.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUE", help="shape filters, e.g. routing=token")
    parser.add_argument("--data", type=Path, nargs="+", default=[LOCAL_CSV if LOCAL_CSV.is_file() else COMMITTED_CSV])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bad = [w for w in args.where if "=" not in w]
    if bad:
        parser.error(f"--where takes KEY=VALUE pairs; got {bad}")
    where = dict(w.split("=", 1) for w in args.where)
    for run_rows in runs(read_rows(*args.data), args.device, args.run).values():
        chosen = select(run_rows, args.op, args.metric, args.mode, where)
        if chosen:
            out = (
                args.out or BENCH_DIR / "out" / f"{slug(chosen[0]['device_name'], args.op, args.mode, args.metric)}.png"
            )
            print(f"wrote {plot(chosen, out)}")
            return out
    raise SystemExit(f"no rows for op={args.op} metric={args.metric} mode={args.mode} where={where}")


if __name__ == "__main__":
    main()
