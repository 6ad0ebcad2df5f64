"""End-of-run report of train.py: ``summary.md`` (per-domain table, the load balance up front, expert utilisation
per domain, training metrics) and two PNG plots (loss curves; expert utilisation per domain and over training).

Reads only plain dicts (the evaluation metrics and the records of ``metrics.jsonl``), so a report can be rebuilt
from a finished run's files. Plots use matplotlib's object API (no pyplot global state, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .collapse import default_threshold
from .runs import LOSS_PLOT, SUMMARY_FILE, UTIL_PLOT, read_metrics
from .specialisation import SpecialisationStats, entropy
from .specialisation_report import specialisation_section

WITHIN_DOMAIN = "Within a domain one expert may take most tokens (specialisation); balance counts over all."


def domain_metrics(metrics: dict[str, float], domains: list[str], num_experts: int) -> dict[str, dict]:
    """``{domain: {loss, ppl, util: [E], entropy}}`` from the flat ``eval_<domain>_*`` keys of ``Trainer.evaluate``."""
    out = {}
    for d in domains:
        p = f"eval_{d}_"
        loss = metrics[p + "loss"]
        out[d] = {
            "loss": loss,
            "ppl": metrics.get(p + "ppl", math.exp(min(loss, 700.0))),
            "util": [metrics.get(f"{p}util_expert_{e}", float("nan")) for e in range(num_experts)],
            "entropy": metrics.get(p + "router_entropy", float("nan")),
        }
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def domain_table(initial: dict[str, dict], final: dict[str, dict]) -> str:
    """Markdown table: per domain, eval loss and perplexity before and after training."""
    rows = []
    for d in final:
        a, b = initial[d], final[d]
        rows.append(
            [
                d,
                f"{a['loss']:.4f}",
                f"{b['loss']:.4f}",
                f"{b['loss'] - a['loss']:+.4f}",
                f"{a['ppl']:.2f}",
                f"{b['ppl']:.2f}",
            ]
        )
    return _table(["domain", "initial loss", "final loss", "change", "initial ppl", "final ppl"], rows)


def utilization_table(final: dict[str, dict]) -> str:
    """Markdown table: per domain, each expert's share of the routed tokens and the router entropy (final model)."""
    num_experts = len(next(iter(final.values()))["util"])
    rows = [[d, *(f"{u:.3f}" for u in m["util"]), f"{m['entropy']:.3f}"] for d, m in final.items()]
    return _table(["domain", *(f"expert {e}" for e in range(num_experts)), "router entropy (nats)"], rows)


def load_section(final: dict[str, dict], num_experts: int, specialisation: SpecialisationStats | None) -> str:
    """Markdown: the load over all evaluation tokens (largest share x E, entropy, effective experts) in bold, per
    domain the same, and a collapse notice naming the expert and the fix when one expert holds more than
    :func:`~dylora_moe.train.collapse.default_threshold` of the tokens."""
    if num_experts < 2:
        return "One expert: nothing to balance."
    rows, shares_all = [], None
    if specialisation is not None:
        per_domain = dict(zip(specialisation.domains, specialisation.shares()))
        total = specialisation.domain_mass.sum(0)
        shares_all = total / max(total.sum(), 1e-300)
    else:
        per_domain = {d: np.nan_to_num(np.asarray(m["util"], dtype=float)) for d, m in final.items()}
    for domain, shares in per_domain.items():
        top = int(np.argmax(shares))
        rows.append([domain, f"{shares[top] * num_experts:.2f}", str(top), f"{np.exp(entropy(shares)):.2f}"])
    if shares_all is None:  # no specialisation section: the per-domain load is said here
        table = _table(["domain", "largest share x E", "largest expert", "effective experts"], rows)
        return f"{table}\n\n{WITHIN_DOMAIN}"
    top = int(np.argmax(shares_all))
    h = entropy(shares_all)
    text = (
        f"**Largest expert share x E over all evaluation tokens: {shares_all[top] * num_experts:.2f}** (expert {top}; "
        f"1 = balanced, {num_experts} = one expert takes all); entropy of the shares {h / math.log(num_experts):.3f} "
        f"of log E; **{math.exp(h):.2f} effective experts of {num_experts}**."
    )
    if shares_all[top] > default_threshold(num_experts):
        text += (
            f"\n\n> **Router collapse:** expert {top} takes {shares_all[top]:.0%} of the evaluation tokens; the "
            "mixture is close to a single LoRA. Fix: `--balance_loss loss_free` (raise `--balance_update_rate` for "
            "short runs), or a larger `--balance_coefficient` with `--balance_loss switch`."
        )
    return f"{text}\n\n{WITHIN_DOMAIN} Per domain: the table of the specialisation section below."


def training_logs(records: list[dict]) -> list[dict]:
    """The training-step records (those with a ``loss``), one per step (a resumed run's re-logged steps: the last)."""
    by_step = {r["step"]: r for r in records if "loss" in r and "eval_loss" not in r}
    return [by_step[s] for s in sorted(by_step)]


def _biases(record: dict) -> list[float]:
    return [v for k, v in record.items() if k.startswith("balance_bias_expert_")]


def _balance_column(logs: list[dict]):
    """The balancing's column: the balance loss, or under loss-free balancing (a selection bias logged and no loss,
    which is zero by construction there) the bias spread (max - min), as the console's step line shows."""
    if any(r.get("balance_loss") for r in logs) or not all(_biases(r) for r in logs):
        return "balance loss", lambda r: f"{r.get('balance_loss', float('nan')):.5f}"
    return "bias spread", lambda r: f"{max(_biases(r)) - min(_biases(r)):.3f}"


def training_table(logs: list[dict], num_experts: int, max_rows: int = 12) -> str:
    """Markdown table of logged training steps (evenly thinned to ``max_rows``, first and last kept)."""
    if len(logs) > max_rows:
        keep = sorted({round(i * (len(logs) - 1) / (max_rows - 1)) for i in range(max_rows)})
        logs = [logs[i] for i in keep]
    balance_header, balance = _balance_column(logs)
    header = ["step", "loss", "lm loss", balance_header, "router entropy", "tokens/s", "peak MiB"]
    header += [f"util e{e}" for e in range(num_experts)]
    rows = []
    for r in logs:
        row = [str(r["step"]), f"{r['loss']:.4f}", f"{r.get('lm_loss', float('nan')):.4f}"]
        row += [balance(r), f"{r.get('router_entropy', float('nan')):.3f}"]
        row += [f"{r.get('tokens_per_s', float('nan')):.0f}", f"{r.get('peak_mem_mb', float('nan')):.0f}"]
        row += [f"{r.get(f'util_expert_{e}', float('nan')):.3f}" for e in range(num_experts)]
        rows.append(row)
    return _table(header, rows)


def _marker(xs: list) -> str | None:
    """A marker when a curve has few points (one point alone is invisible without it; a dozen still read as points)."""
    return "o" if len(xs) <= 12 else None


def _step_axis(ax, steps: list[int]) -> None:
    """Whole optimizer steps on x, from 0 to the last step with a margin (a single step is not a 0.96-1.04 axis)."""
    from matplotlib.ticker import MaxNLocator

    last = max(steps, default=1) or 1
    margin = max(0.5, 0.03 * last)
    ax.set_xlim(-margin, last + margin)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def format_duration(seconds: float) -> str:
    """Wall time for the summary: seconds for a short run ("42 s"), minutes beyond two ("7.5 min"), hours beyond
    two hours ("3.1 h")."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plot_losses(path: Path, logs: list[dict], evals: dict[str, list[tuple[int, float]]]) -> None:
    """Training LM loss per logged step, and each domain's eval loss at each evaluation; returns the figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = [r["step"] for r in logs]
    ax.plot(steps, [r.get("lm_loss", r["loss"]) for r in logs], marker=_marker(steps), label="train (LM loss)")
    for domain, points in evals.items():
        ax.plot([s for s, _ in points], [v for _, v in points], "o--", label=f"eval {domain}")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats/token)", title="Loss")
    _step_axis(ax, steps + [step for points in evals.values() for step, _ in points])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return fig


def plot_utilization(path: Path, final: dict[str, dict], logs: list[dict], num_experts: int) -> None:
    """Left: each expert's share of routed tokens per domain (final model). Right: shares over training. Returns the
    figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=110)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    width = 0.8 / max(len(final), 1)
    for i, (domain, m) in enumerate(final.items()):
        left.bar([e + (i - (len(final) - 1) / 2) * width for e in range(num_experts)], m["util"], width, label=domain)
    left.set(xlabel="expert", ylabel="share of routed tokens", title="Expert utilisation per domain (final)")
    left.set_xticks(range(num_experts))
    left.legend()
    steps = [r["step"] for r in logs]
    for e in range(num_experts):
        shares = [r.get(f"util_expert_{e}", float("nan")) for r in logs]
        right.plot(steps, shares, marker=_marker(steps), label=f"expert {e}")
    even = 1 / max(num_experts, 1)
    right.axhline(even, color="k", lw=0.8, ls=":", label=f"even load (1/{num_experts})")
    top = max([even, *(r.get(f"util_expert_{e}", 0.0) for r in logs for e in range(num_experts))])
    right.set_ylim(0, min(1.0, 1.15 * top) if top > 0 else 1.0)  # shares from 0: the gaps between experts read true
    _step_axis(right, steps)
    right.set(xlabel="optimizer step", ylabel="share of routed tokens", title="Expert utilisation in training")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def eval_history(records: list[dict], domains: list[str]) -> dict[str, list[tuple[int, float]]]:
    """``{domain: [(step, eval loss), ...]}`` from the evaluation records of ``metrics.jsonl``."""
    history: dict[str, dict[int, float]] = {d: {} for d in domains}
    for r in records:
        for d in domains:
            if f"eval_{d}_loss" in r:
                history[d][r["step"]] = r[f"eval_{d}_loss"]
    return {d: sorted(points.items()) for d, points in history.items()}


def write_report(
    output_dir: str | Path,
    *,
    initial: dict[str, float],
    final: dict[str, float],
    domains: list[str],
    num_experts: int,
    run_info: dict[str, str],
    specialisation: SpecialisationStats | None = None,
    tokenizer=None,
) -> Path:
    """Write ``summary.md``, ``loss.png`` and ``utilization.png`` into ``output_dir``; returns the summary's path.
    With ``specialisation`` (the final evaluation's routing masses) also the specialisation section and its pictures
    (:func:`~dylora_moe.train.specialisation_report.specialisation_section`; ``tokenizer`` prints the tokens)."""
    output_dir = Path(output_dir)
    records = read_metrics(output_dir / "metrics.jsonl")[0]  # the valid rows (a torn last line is left out)
    logs = training_logs(records)
    first, last = domain_metrics(initial, domains, num_experts), domain_metrics(final, domains, num_experts)
    plot_losses(output_dir / LOSS_PLOT, logs, eval_history(records, domains))
    plot_utilization(output_dir / UTIL_PLOT, last, logs, num_experts)
    spec_text = (
        ""
        if specialisation is None
        else specialisation_section(specialisation, tokenizer, output_dir, records, final_metrics=final, load=False)
        + "\n"
    )
    utilisation = (  # with a specialisation section its table holds these shares and entropies already
        f"## Expert utilisation per domain (final model; share of routed tokens)\n\n{utilization_table(last)}\n\n"
        if specialisation is None
        else ""
    )
    info = "\n".join(f"- {key}: {value}" for key, value in run_info.items())
    text = f"""# DyLoRA-MoE training summary

{info}

## Evaluation per domain (initial = before training, final = the model kept at the end)

{domain_table(first, last)}

## Load balance (final model, evaluation tokens)

{load_section(last, num_experts, specialisation)}

{utilisation}{spec_text}## Training (logged steps)

{training_table(logs, num_experts) if logs else "No training step was logged."}

![loss curves]({LOSS_PLOT})

![expert utilisation]({UTIL_PLOT})
"""
    path = output_dir / SUMMARY_FILE
    path.write_text(text)
    return path
