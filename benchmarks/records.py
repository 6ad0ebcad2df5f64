"""The benchmark data file: one CSV row per (op, provider, mode, metric, case), appended by every benchmark run.

Columns (``COLUMNS``, in file order):
  op            what is measured: ``moe_lora`` | ``router`` | ``step`` (one training or evaluation step of a model)
  provider      who computes it: a backend (``triton``, ``eager``, ``loop``, ``reference``), a baseline
                (``lora_dense``, ``base``, ``torch_seq``, ``peft``) or a variant (``triton+compile``)
  mode          ``fwd`` | ``bwd`` | ``full`` (forward + backward; for ``step``: forward, backward, optimizer step)
  metric, unit  see ``METRICS``
  x_name        the plot's x axis (``case``: a shape label; ``E``: number of experts) and its ``x_value``
  value         the median; ``value_min`` / ``value_max`` the spread over rounds (equal to ``value`` where one
                number was measured)
  shape         JSON: the whole configuration (tokens, sizes, experts, rank, top-k, routing); identical for every
                provider of one case, so goals compare rows with equal shapes
  info          JSON: notes on this row (memory method, bytes moved, source of a converted row)
  dtype, device, device_name, commit, torch, triton   where and what ran
  run_id        one benchmark session (rows of one run are compared with each other); ``timestamp`` UTC

Usage: ``append_rows`` (benchmarks/conftest.py), ``read_rows`` (report.py, visualize.py); from the shell,
``python benchmarks/records.py merge SRC.csv [...] --into benchmarks/data/all_benchmark_data.csv`` appends the rows
of a run (a GPU machine's output folder) to the committed data.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
COMMITTED_CSV = BENCH_DIR / "data" / "all_benchmark_data.csv"  # the measured history, in git
LOCAL_CSV = BENCH_DIR / "out" / "all_benchmark_data.csv"  # a local run's default (gitignored)

COLUMNS = (
    "op",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "value",
    "value_min",
    "value_max",
    "shape",
    "info",
    "dtype",
    "device",
    "device_name",
    "commit",
    "torch",
    "triton",
    "run_id",
    "timestamp",
)
# metric -> (unit, True when lower is better)
METRICS = {
    "time": ("ms", True),  # host wall clock per call (pytest-benchmark; a CUDA sync ends each call)
    "kernel_time": ("ms", True),  # GPU: triton.testing.do_bench (CUDA events, L2 flushed between calls)
    "cudagraph_time": ("ms", True),  # GPU: triton.testing.do_bench_cudagraph (replayed graph: no launch cost)
    "memory": ("MiB", True),  # GPU: torch.cuda.max_memory_allocated during one call (everything live)
    "memory_extra": ("MiB", True),  # peak allocated during one call above what was live before it
    "bandwidth": ("GB/s", False),  # bytes the op must move / time (info: bytes, clock)
    "throughput": ("tokens/s", False),  # tokens per call / host time
    "saved_elems": ("elements", True),  # elements saved for backward beyond the inputs
}
NUMERIC = ("value", "value_min", "value_max")


def make_row(**fields) -> dict:
    """A row with every column: ``unit`` from ``METRICS``, min/max default to ``value``, dicts as JSON."""
    metric = fields["metric"]
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    row = {"unit": METRICS[metric][0], "value_min": fields["value"], "value_max": fields["value"], **fields}
    for key in ("shape", "info"):
        row[key] = json.dumps(row.get(key) or {}, sort_keys=True)
    missing = [c for c in COLUMNS if c not in row]
    extra = [c for c in row if c not in COLUMNS]
    if missing or extra:
        raise ValueError(f"benchmark row: missing columns {missing}, unknown columns {extra}")
    return row


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append ``rows`` (from ``make_row``) to the CSV at ``path``, writing the header when the file is new.

    A file whose header is not ``COLUMNS`` is refused (appending would misalign every column).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), ()))
        if header != COLUMNS:
            raise ValueError(f"{path}: header {list(header)} is not the benchmark schema {list(COLUMNS)}")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(*paths: Path) -> list[dict]:
    """Rows of the CSV files, in file order: numbers as floats, ``shape``/``info`` as dicts, ``x_value`` a number
    where it is one."""
    rows = []
    for path in paths:
        with Path(path).open(newline="") as f:
            for row in csv.DictReader(f):
                for key in NUMERIC:
                    row[key] = float(row[key]) if row[key] not in ("", None) else None
                row["shape"] = json.loads(row["shape"] or "{}")
                row["info"] = json.loads(row["info"] or "{}")
                try:
                    row["x_value"] = float(row["x_value"])
                except ValueError:
                    pass
                rows.append(row)
    return rows


def runs(rows: list[dict], device: str | None = None, run_id: str | None = None) -> dict[str, list[dict]]:
    """Rows grouped by run, newest run first; ``device`` keeps runs whose device name contains it (case-insensitive),
    ``run_id`` one run. Without ``run_id`` only the newest run of each device name is kept."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        if device and device.lower() not in row["device_name"].lower():
            continue
        if run_id and row["run_id"] != run_id:
            continue
        grouped.setdefault(row["run_id"], []).append(row)
    ordered = sorted(grouped.items(), key=lambda item: max(r["timestamp"] for r in item[1]), reverse=True)
    if run_id is None:
        newest: dict[str, tuple] = {}
        for rid, members in ordered:
            newest.setdefault(members[0]["device_name"], (rid, members))
        ordered = list(newest.values())
    return dict(ordered)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Append benchmark CSV rows to another CSV (same schema).")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="append the rows of SRC files to --into")
    merge.add_argument("sources", nargs="+", type=Path)
    merge.add_argument("--into", type=Path, default=COMMITTED_CSV)
    args = parser.parse_args(argv)
    for source in args.sources:
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise SystemExit(f"{source}: header {reader.fieldnames} is not the benchmark schema {list(COLUMNS)}")
            rows = list(reader)
        append_rows(args.into, rows)
        print(f"appended {len(rows)} rows of {source} to {args.into}")


if __name__ == "__main__":
    main()
