"""Turn pytest-benchmark JSON files into a Markdown report with tables, DESIGN 4 goals, and PNG plots.

    python3 benchmarks/report.py RESULTS.json [MORE.json ...] [--out-dir benchmarks/results] [--peak-gbps 3350]

Writes ``<out-dir>/<device>-<date>.md`` (device: ``cpu`` or the GPU's name, slugified; date of the run) and
``<device>-<date>-{ops,step,memory}.png``, and prints the report. Rows come from the ``extra_info`` that
``benchmarks/conftest.py`` records (``kind`` = moe_lora | router | step).

Times are medians. On a GPU, op rows also carry the CUDA-event median of ``triton.testing.do_bench``; op speed-ups
and goals use it there (host timing adds a sync of ~10 us that is no part of a kernel), model steps use the host
median. Speed-up "vs X" is time(X) / time(row), so > 1 means the row is faster.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

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
MIB = 2**20
REF_CASE = (8192, 4096, 8, 16)  # DESIGN 4's op goals are stated for T, d_in, E, r = these (k = 2 and k = E)
BACKEND_COLORS = {"peft": "grey", "reference": "tab:red", "eager": "tab:blue", "triton": "tab:green"}


def load_rows(paths: list[Path]) -> tuple[list[dict], dict]:
    """One flat dict per benchmark: its extra_info plus ``time_s`` (the clock goals use), ``median_s``, ``min_s``."""
    rows, meta = [], {}
    for path in paths:
        data = json.loads(path.read_text())
        meta.setdefault("datetime", data.get("datetime", ""))
        meta.setdefault("machine", data.get("machine_info", {}))
        for bench in data["benchmarks"]:
            info = dict(bench.get("extra_info", {}))
            if "kind" not in info:
                continue
            info["group"] = bench.get("group") or ""
            info["median_s"] = bench["stats"]["median"]
            info["min_s"] = bench["stats"]["min"]
            info["time_s"] = info.get("cuda_event_median_s", info["median_s"])
            rows.append(info)
    if not rows:
        raise SystemExit(f"no benchmark with extra_info['kind'] in {', '.join(map(str, paths))}")
    return rows, meta


def device_slug(rows: list[dict]) -> str:
    device = rows[0]["device"]
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", rows[0]["device_name"].lower()).strip("-")


def peak_gbps(device_name: str) -> float | None:
    for fragment, gbps in PEAK_GBPS:
        if fragment.lower() in device_name.lower():
            return gbps
    return None


def fmt(value, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def mem_mib(row: dict | None):
    if row is None:
        return None
    value = row.get("peak_mem_bytes", row.get("peak_extra_bytes"))
    return None if value is None else value / MIB


def peak_label(rows: list[dict]) -> str:
    """GPU rows carry the whole peak; CPU rows only the extra allocated during the call (see conftest)."""
    return "peak (MiB)" if any("peak_mem_bytes" in r for r in rows) else "peak extra (MiB)"


def find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(key) == value for key, value in match.items()):
            return row
    return None


def time_of(rows: list[dict], **match):
    row = find(rows, **match)
    return None if row is None else row["time_s"]


# ---------------------------------------------------------------------------------------------- tables


def op_tables(rows: list[dict]) -> list[str]:
    lines = []
    groups = defaultdict(list)
    for row in rows:
        if row["kind"] in ("moe_lora", "router"):
            groups[row["group"]].append(row)
    for group in sorted(groups):
        members = sorted(groups[group], key=lambda r: r["time_s"])
        baseline = "loop" if members[0]["kind"] == "moe_lora" else "torch_seq"
        t_eager = time_of(members, provider="eager")
        t_base = time_of(members, provider=baseline)
        lora = members[0]["kind"] == "moe_lora"  # LoRA bytes and saved activations exist for the LoRA op only
        extra_head, extra_rule = (" LoRA GB/s | saved extra elems |", "---:|---:|") if lora else ("", "")
        lines += [
            f"### {group}",
            "",
            f"| provider | time (ms) | host min (ms) | vs eager | vs {baseline} | peak extra (MiB) |{extra_head}",
            f"|---|---:|---:|---:|---:|---:|{extra_rule}",
        ]
        for row in members:
            cells = [
                row["provider"],
                f"{row['time_s'] * 1e3:.3f}",
                f"{row['min_s'] * 1e3:.3f}",
                fmt(ratio(t_eager, row["time_s"]), ".2f", "x"),
                fmt(ratio(t_base, row["time_s"]), ".2f", "x"),
                fmt(ratio(row.get("peak_extra_bytes"), MIB), ".2f"),
            ]
            if lora:
                cells += [fmt(row.get("gbps"), ".1f"), fmt(row.get("saved_extra_elems"), "d")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def step_tables(rows: list[dict]) -> list[str]:
    lines = []
    steps = [r for r in rows if r["kind"] == "step"]
    for mode in ("train", "fwd"):
        members = [r for r in steps if r["mode"] == mode]
        if not members:
            continue
        peft = find(members, backend="peft")
        first = members[0]
        lines += [
            f"### step {mode} ({first['shape']}, k={first.get('top_k', '-')})",
            "",
            "| E | routing | backend | time (ms) | host min (ms) | tokens/s | vs eager | vs reference "
            f"| tokens/s vs peft | {peak_label(members)} | memory vs peft |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        order = {"peft": 0, "reference": 1, "eager": 2, "triton": 3}
        for row in sorted(members, key=lambda r: (r.get("E", 0), r.get("routing", ""), order[r["backend"]])):
            same = {"mode": mode, "E": row.get("E"), "routing": row.get("routing")}
            t = row["time_s"]
            lines.append(
                f"| {row.get('E', '-')} | {row.get('routing', '-')} | {row['backend']} | {t * 1e3:.1f} "
                f"| {row['min_s'] * 1e3:.1f} | {fmt(row.get('tokens_per_s'), ',.0f')} "
                f"| {fmt(ratio(time_of(steps, backend='eager', **same), t), '.2f', 'x')} "
                f"| {fmt(ratio(time_of(steps, backend='reference', **same), t), '.2f', 'x')} "
                f"| {fmt(ratio(peft and peft['time_s'], t), '.2f', 'x')} | {fmt(mem_mib(row), '.1f')} "
                f"| {fmt(ratio(mem_mib(row), mem_mib(peft)), '.2f', 'x')} |"
            )
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------- goals


def goal(name: str, value, target: str, met) -> dict:
    status = "NOT MEASURED" if value is None else ("MET" if met(value) else "NOT MET")
    return {"name": name, "value": value, "target": target, "status": status}


def cpu_goals(rows: list[dict]) -> list[dict]:
    steps = [r for r in rows if r["kind"] == "step" and r["mode"] == "train" and r.get("E") == 4]
    t_ref_seq = time_of(steps, backend="reference", routing="sequence")
    return [
        goal(
            "CPU train step: eager token routing (E=4, k=1) vs reference sequence routing (E=4), speed-up",
            ratio(t_ref_seq, time_of(steps, backend="eager", routing="token")),
            ">= 2.5x",
            lambda v: v >= 2.5,
        ),
        goal(
            "CPU train step: eager sequence routing vs reference sequence routing (E=4), speed-up",
            ratio(t_ref_seq, time_of(steps, backend="eager", routing="sequence")),
            ">= 1.0x (not slower)",
            lambda v: v >= 1.0,
        ),
    ]


def gpu_goals(rows: list[dict], bandwidth: float | None) -> list[dict]:
    goals = []
    reference_case = {
        r["shape"] for r in rows if r["kind"] == "moe_lora" and (r["T"], r["d_in"], r["E"], r["r"]) == REF_CASE
    }
    for shape in sorted(reference_case):
        ops = [r for r in rows if r["kind"] == "moe_lora" and r["shape"] == shape]
        full = [r for r in ops if r["mode"] == "fwd+bwd"]
        t_triton = time_of(full, provider="triton")
        goals.append(
            goal(
                f"MoE-LoRA fwd+bwd {shape}: triton vs eager loop over experts, speed-up",
                ratio(time_of(full, provider="loop"), t_triton),
                ">= 5x",
                lambda v: v >= 5,
            )
        )
        goals.append(
            goal(
                f"MoE-LoRA fwd+bwd {shape}: triton vs one plain eager LoRA of rank r, speed-up",
                ratio(time_of(full, provider="lora_dense"), t_triton),
                ">= 1.0x (no slower)",
                lambda v: v >= 1.0,
            )
        )
        for mode in ("fwd", "fwd+bwd"):
            row = find(ops, provider="triton", mode=mode)
            goals.append(
                goal(
                    f"MoE-LoRA {mode} {shape}: LoRA bytes at fraction of peak bandwidth ({fmt(bandwidth, '.0f')} GB/s)",
                    ratio(row and row.get("gbps"), bandwidth),
                    ">= 0.75",
                    lambda v: v >= 0.75,
                )
            )
        goals.append(
            goal(
                f"MoE-LoRA linear fwd+bwd {shape}: (base + triton MoE-LoRA) / base linear alone, time",
                ratio(time_of(full, provider="base+moe_lora"), time_of(full, provider="base")),
                "<= 1.15x",
                lambda v: v <= 1.15,
            )
        )
        row = find(full, provider="triton")
        goals.append(
            goal(
                f"MoE-LoRA {shape}: saved extra elements / T*(E*r+2k)",
                ratio(row and row.get("saved_extra_elems"), row and row.get("saved_bound_elems")),
                "<= 1.0",
                lambda v: v <= 1.0,
            )
        )
    for shape in sorted({r["shape"] for r in rows if r["kind"] == "router"}):
        routes = [r for r in rows if r["kind"] == "router" and r["shape"] == shape]
        t_triton = time_of(routes, provider="triton")
        goals.append(
            goal(f"router {shape}: triton time (us)", t_triton and t_triton * 1e6, "<= 10 us", lambda v: v <= 10)
        )
        goals.append(
            goal(
                f"router {shape}: triton vs torch softmax/topk/scatter/bincount, speed-up",
                ratio(time_of(routes, provider="torch_seq"), t_triton),
                ">= 3x",
                lambda v: v >= 3,
            )
        )
    steps = [r for r in rows if r["kind"] == "step" and r["mode"] == "train"]
    fast = find(steps, backend="triton", routing="token", E=4)
    peft = find(steps, backend="peft")
    ref_seq = find(steps, backend="reference", routing="sequence", E=4)
    fast_seq = find(steps, backend="triton", routing="sequence", E=4)

    def t(row):
        return row and row["time_s"]

    goals += [
        goal(
            "train step E=4 token k=1: triton vs reference sequence routing (original algorithm), tokens/s",
            ratio(t(ref_seq), t(fast)),
            ">= 3x",
            lambda v: v >= 3,
        ),
        goal(
            "train step E=4 token k=1: triton vs single-adapter peft LoRA, tokens/s",
            ratio(t(peft), t(fast)),
            ">= 0.7x",
            lambda v: v >= 0.7,
        ),
        goal(
            "train step E=4 token k=1: triton peak memory / single-adapter peft LoRA",
            ratio(mem_mib(fast), mem_mib(peft)),
            "<= 1.3x",
            lambda v: v <= 1.3,
        ),
        goal(
            "train step E=4 sequence: triton fast path vs reference sequence routing, speed-up",
            ratio(t(ref_seq), t(fast_seq)),
            ">= 1.0x (not slower)",
            lambda v: v >= 1.0,
        ),
        goal(
            "train step E=4 sequence: triton fast path peak memory / reference",
            ratio(mem_mib(fast_seq), mem_mib(ref_seq)),
            "<= 0.8x ('well under'; our threshold)",
            lambda v: v <= 0.8,
        ),
    ]
    return goals


def goal_lines(goals: list[dict], at_min: list[dict]) -> list[str]:
    """The goals table; ``at_min`` are the same goals from host-min times (a loaded machine only adds time, so the
    min shows whether a miss is noise). Status is judged on the medians."""
    lines = ["| goal | measured | at host min | target | status |", "|---|---:|---:|---|---|"]
    for g, m in zip(goals, at_min):
        lines.append(
            f"| {g['name']} | {fmt(g['value'], '.3g')} | {fmt(m['value'], '.3g')} | {g['target']} | **{g['status']}** |"
        )
    return lines + [""]


# ---------------------------------------------------------------------------------------------- plots


def plot_ops(rows: list[dict], path: Path) -> bool:
    """Speed-up vs eager of every provider, one cluster of bars per op group."""
    import matplotlib.pyplot as plt

    groups = sorted({r["group"] for r in rows if r["kind"] in ("moe_lora", "router")})
    if not groups:
        return False
    providers = sorted({r["provider"] for r in rows if r["group"] in groups})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(groups)), 5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        values = []
        for group in groups:
            members = [r for r in rows if r["group"] == group]
            values.append(ratio(time_of(members, provider="eager"), time_of(members, provider=provider)) or 0.0)
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=provider)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([g.replace(" ", "\n", 1) for g in groups], fontsize=7, rotation=20)
    ax.set_ylabel("speed-up vs eager (log; > 1 is faster)")
    ax.set_title(f"op level, {rows[0]['device_name']}, {rows[0]['dtype']}, {rows[0]['commit']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def step_label(row: dict) -> str:
    return "peft LoRA" if row["backend"] == "peft" else f"{row['backend']} {row['routing']} E={row['E']}"


def plot_steps(rows: list[dict], path: Path) -> bool:
    """Tokens/s of every model-level configuration, one panel per mode."""
    import matplotlib.pyplot as plt

    steps = [r for r in rows if r["kind"] == "step" and r.get("tokens_per_s")]
    modes = [m for m in ("train", "fwd") if any(r["mode"] == m for r in steps)]
    if not modes:
        return False
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        members = sorted((r for r in steps if r["mode"] == mode), key=lambda r: r["tokens_per_s"])
        ax.barh(
            [step_label(r) for r in members],
            [r["tokens_per_s"] for r in members],
            color=[BACKEND_COLORS[r["backend"]] for r in members],
        )
        ax.set_xlabel("tokens/s (higher is better)")
        ax.set_title(f"{mode} step, {members[0]['shape']}")
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"model level, {rows[0]['device_name']}, {rows[0]['dtype']}, {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(rows: list[dict], path: Path) -> bool:
    """Peak memory of the fwd+bwd op rows and of the training steps."""
    import matplotlib.pyplot as plt

    ops = [r for r in rows if r["kind"] == "moe_lora" and r["mode"] == "fwd+bwd" and r.get("peak_extra_bytes")]
    steps = [r for r in rows if r["kind"] == "step" and r["mode"] == "train" and mem_mib(r)]
    titles = ((ops, "op fwd+bwd: peak extra (MiB)"), (steps, f"train step: {peak_label(steps)}"))
    panels = [(p, t) for p, t in titles if p]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), squeeze=False)
    for ax, (members, title) in zip(axes[0], panels):
        if members[0]["kind"] == "step":
            members = sorted(members, key=mem_mib)
            labels = [step_label(r) for r in members]
            values = [mem_mib(r) for r in members]
            colors = [BACKEND_COLORS[r["backend"]] for r in members]
        else:
            labels = [f"{r['provider']} k={r['k']}" for r in members]
            values = [r["peak_extra_bytes"] / MIB for r in members]
            colors = ["tab:green" if r["provider"] == "triton" else "tab:blue" for r in members]
        ax.barh(labels, values, color=colors)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"memory, {rows[0]['device_name']}, {rows[0]['dtype']}, {rows[0]['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- report


def build_report(rows: list[dict], meta: dict, plots: list[str], bandwidth: float | None) -> str:
    first = rows[0]
    commits = sorted({r["commit"] for r in rows})
    on_gpu = first["device"] == "cuda"
    clock = (
        "op rows: CUDA-event median of triton.testing.do_bench; model steps: host median with a CUDA sync"
        if on_gpu
        else "host median (perf_counter)"
    )
    memory = (
        "torch.cuda.max_memory_allocated during one call (model steps: everything live; op rows: the extra)"
        if on_gpu
        else "peak extra bytes allocated by CPU tensors during one call (torch profiler allocator events)"
    )
    names = ", ".join(sorted({r["device_name"] for r in rows}))
    dtypes = ", ".join(sorted({r["dtype"] for r in rows}))
    lines = [
        f"# Benchmarks: {names}, {meta.get('datetime', '')[:10]}",
        "",
        f"- device: {first['device']} ({names}); dtype: {dtypes}; torch {first['torch']}",
        f"- commit: {', '.join(commits)}; run at {meta.get('datetime', '')}",
        f"- time: {clock}; speed-up vs X = time(X) / time(row)",
        f"- memory: {memory}",
        "- command: `python3 -m pytest benchmarks/ --benchmark-only --benchmark-json=...`, then "
        "`python3 benchmarks/report.py`",
        "",
        "## DESIGN section 4 goals",
        "",
    ]
    at_min = [dict(r, time_s=r["min_s"]) for r in rows]
    for r in at_min:
        if "lora_bytes" in r:
            r["gbps"] = r["lora_bytes"] / r["min_s"] / 1e9
    if on_gpu:
        lines += goal_lines(gpu_goals(rows, bandwidth), gpu_goals(at_min, bandwidth))
    else:
        lines += goal_lines(cpu_goals(rows), cpu_goals(at_min))
    if not on_gpu:
        lines += ["GPU goals: not measured in this run (no GPU); see a GPU report for them.", ""]
    lines += ["Bitwise determinism (DESIGN 4) is checked by the test suite (tests/), not timed here.", ""]
    step_lines = step_tables(rows)
    if step_lines:
        lines += ["## Model level: one step of DyLoRA_MoE vs single-adapter peft LoRA", ""] + step_lines
    op_lines = op_tables(rows)
    if op_lines:
        lines += ["## Op level", ""] + op_lines
    if plots:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    return "\n".join(lines)


def matplotlib_ready() -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only; headless GPU machines have no display
    return True


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON files (--benchmark-json output)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--peak-gbps", type=float, default=None, help="GPU peak memory bandwidth; default by name")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    args = parser.parse_args(argv)

    rows, meta = load_rows(args.json)
    stem = f"{device_slug(rows)}-{meta.get('datetime', '')[:10] or 'undated'}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    if not args.no_plots and not matplotlib_ready():
        print("report.py: matplotlib is not installed; writing the report without plots")
        args.no_plots = True
    if not args.no_plots:
        for suffix, plot in (("ops", plot_ops), ("step", plot_steps), ("memory", plot_memory)):
            name = f"{stem}-{suffix}.png"
            if plot(rows, args.out_dir / name):
                plots.append(name)
    bandwidth = args.peak_gbps or (peak_gbps(rows[0]["device_name"]) if rows[0]["device"] == "cuda" else None)
    report = build_report(rows, meta, plots, bandwidth)
    path = args.out_dir / f"{stem}.md"
    path.write_text(report)
    print(report)
    print(f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
