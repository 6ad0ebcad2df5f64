"""The specialisation section of a run's report: numbers, a domain x expert heatmap over evaluations, lift tables,
and evaluation rows coloured by expert (a PNG strip and an HTML page).

Inputs are a :class:`~dylora_moe.train.specialisation.SpecialisationStats` (the final evaluation's routing masses), the
records of ``metrics.jsonl`` (the ``eval_spec_*`` metrics of every evaluation, for the heatmap) and a tokenizer (to
print tokens). Plots use matplotlib's object API (no pyplot state, no display).
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .runs import EXAMPLES_HTML, EXAMPLES_PLOT, HEATMAP_PLOT
from .specialisation import (
    EXPERT_COLOURS,
    SpecialisationStats,
    collect_specialisation,
    entropy,
    lift_table,
    load_figures,
    mutual_information,
)

EXAMPLE_TOKENS = 160  # tokens drawn per example row: enough to see the pattern, small enough to read


def _colour(expert: int) -> str:
    return EXPERT_COLOURS[expert % len(EXPERT_COLOURS)]


def token_text(tokenizer, token: int) -> str:
    """The text of one token id (``#id`` without a tokenizer)."""
    return f"#{token}" if tokenizer is None else tokenizer.decode([token])


def token_label(tokenizer, token: int) -> str:
    """A token as a markdown code span that survives a table: spaces as ␣, newlines and tabs escaped, pipes escaped."""
    text = token_text(tokenizer, token)
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣").replace("|", "\\|").replace("`", "'")
    return f"`{text}`"


def spec_history(records: list[dict], domains: list[str], num_experts: int):
    """``(steps, shares [D, E, N], nmi [N])`` of the N evaluations in ``records`` that carry ``eval_spec_nmi``."""
    evals = [r for r in records if "eval_spec_nmi" in r]
    shares = np.array(
        [
            [[r.get(f"eval_spec_{d}_share_expert_{e}", np.nan) for r in evals] for e in range(num_experts)]
            for d in domains
        ]
    ).reshape(len(domains), num_experts, len(evals))
    return [r["step"] for r in evals], shares, np.array([r["eval_spec_nmi"] for r in evals])


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_heatmap(path: Path, steps: list[int], shares: np.ndarray, nmi: np.ndarray, domains: list[str]):
    """One panel per domain: each expert's share (rows) at each evaluation (columns); a last panel: the normalised
    mutual information over the evaluations. Returns the figure."""
    num_domains, num_experts, n = shares.shape
    fig = _figure((3.2 * (num_domains + 1) + 1, 0.45 * num_experts + 2.6))
    axes = fig.subplots(1, num_domains + 1)
    labels = [str(s) for s in steps[:-1]] + ["final"] if n else []
    image = None
    for ax, domain, grid in zip(axes, domains, shares):
        image = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(title=domain, xlabel="evaluation (step)", ylabel="expert")
        ax.set_yticks(range(num_experts))
        ax.set_xticks(range(n), labels, rotation=60 if n > 6 else 0, fontsize=7)
        if num_experts * n <= 48:
            for (e, i), value in np.ndenumerate(grid):
                ax.text(i, e, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    if image is not None:
        fig.colorbar(image, ax=list(axes[:-1]), label="share of the domain's routing mass")
    ax = axes[-1]
    ax.plot(range(n), nmi, marker="o")  # markers: a run with one evaluation still shows its point
    ax.set(title="domain-expert MI (normalised)", xlabel="evaluation (step)", ylim=(-0.02, 1.02))
    ax.set_xticks(range(n), labels, rotation=60 if n > 6 else 0, fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    return fig


def example_labels(domains: list[str]) -> list[str]:
    """Row names numbered within each domain: ``code_alpaca 1``, ``code_alpaca 2``, ``mbpp 1``."""
    seen: dict[str, int] = {}
    labels = []
    for domain in domains:
        seen[domain] = seen.get(domain, 0) + 1
        labels.append(f"{domain} {seen[domain]}")
    return labels


def _shown(text: str) -> str:
    """A token as drawn in the picture: a newline as ↵ (the line then breaks), a tab as →, nothing as ·."""
    return text.replace("\t", "→").replace("\n", "↵") or "·"


def layout_tokens(texts: list[str], columns: int) -> list[tuple[int, int, str]]:
    """(line, column, text) of each token written left to right in lines of ``columns`` characters: a token that
    does not fit starts the next line, a token holding a newline ends its line."""
    placed, line, col = [], 0, 0
    for raw in texts:
        text = _shown(raw)[:columns]
        if col + len(text) > columns and col > 0:
            line, col = line + 1, 0
        placed.append((line, col, text))
        col += len(text)
        if "\n" in raw:
            line, col = line + 1, 0
    return placed


EXAMPLE_COLUMNS = 140  # characters per line of the example text


def plot_examples(path: Path, stats: SpecialisationStats, tokenizer=None):
    """The example rows as text, each token on the colour of its top expert (paler: a smaller top weight), the first
    :data:`EXAMPLE_TOKENS` tokens of each; rows named by domain and number within it. Returns the figure."""
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch, Rectangle

    blocks, height = [], 0
    for label, example in zip(example_labels([x.domain for x in stats.examples]), stats.examples):
        shown = min(len(example.ids), EXAMPLE_TOKENS)
        texts = [token_text(tokenizer, t) for t in example.ids[:shown]]
        placed = layout_tokens(texts, EXAMPLE_COLUMNS)
        cap = f"all {shown} tokens" if shown == len(example.ids) else f"first {shown} of {len(example.ids)} tokens"
        blocks.append((f"{label} ({cap})", example.mass[:shown], placed, height))
        height += 1 + (placed[-1][0] + 1 if placed else 0) + 0.6
    fig = _figure((11, 0.2 * max(height, 1) + 1.2))
    ax = fig.add_axes((0.01, 0.02, 0.86, 1 - 0.9 / fig.get_figheight()))
    ax.set_xlim(0, EXAMPLE_COLUMNS)
    ax.set_ylim(max(height, 1), 0)
    ax.set_axis_off()
    for title, mass, placed, top_line in blocks:
        ax.text(0, top_line + 0.5, title, fontsize=9, fontweight="bold", va="center")
        for (line, col, text), weights in zip(placed, mass):
            expert, weight = int(weights.argmax()), float(weights.max())
            colour = 1 - weight * (1 - np.array(to_rgb(_colour(expert))))  # blended with white by the top weight
            y = top_line + 1 + line
            ax.add_patch(Rectangle((col, y + 0.05), len(text), 0.9, facecolor=colour, edgecolor="none"))
            ax.text(col, y + 0.5, text, fontsize=8, family="monospace", va="center")
    fig.suptitle(
        f"Top expert of each token ({stats.routing} routing; paler = smaller top weight; at most {EXAMPLE_TOKENS} "
        f"tokens per row, every token in {EXAMPLES_HTML})",
        fontsize=9,
    )
    handles = [Patch(color=_colour(e), label=f"expert {e}") for e in range(stats.num_experts)]
    fig.legend(handles=handles, loc="upper right", bbox_to_anchor=(0.995, 1 - 0.45 / fig.get_figheight()), fontsize=8)
    fig.savefig(path)
    return fig


def write_examples_html(path: Path, stats: SpecialisationStats, tokenizer) -> None:
    """The example rows as text, each token on the colour of its top expert (hover: every expert's weight)."""
    legend = " ".join(
        f'<span style="background:{_colour(e)};color:#fff;padding:1px 6px">expert {e}</span>'
        for e in range(stats.num_experts)
    )
    note = (
        "each token counts with its sequence's expert weights (sequence routing)"
        if stats.routing == "sequence"
        else "each token's own routing weights (token routing)"
    )
    parts = [
        "<!doctype html><meta charset='utf-8'><title>Routing of evaluation examples</title>",
        "<style>body{font-family:sans-serif;max-width:60em} pre{white-space:pre-wrap;font-size:13px;line-height:1.7}"
        " span.t{border-radius:3px}</style>",
        f"<h1>Top expert of each token</h1><p>{legend}</p><p>Colour: top expert; paler = a smaller top weight; {note}."
        "</p>",
    ]
    for label, example in zip(example_labels([x.domain for x in stats.examples]), stats.examples):
        spans = []
        for token, mass in zip(example.ids, example.mass):
            top = int(mass.argmax())
            alpha = int(round(55 + 200 * float(mass[top])))
            tip = ", ".join(f"e{e}: {w:.2f}" for e, w in enumerate(mass))
            text = html.escape(token_text(tokenizer, token))
            spans.append(f'<span class="t" style="background:{_colour(top)}{alpha:02x}" title="{tip}">{text}</span>')
        parts.append(f"<h2>{html.escape(label)}</h2><pre>{''.join(spans)}</pre>")
    Path(path).write_text("\n".join(parts) + "\n", encoding="utf-8")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def lift_markdown(stats: SpecialisationStats, tokenizer, top: int = 8, min_count: float = 5.0) -> str:
    """Markdown table: one column per expert, its ``top`` tokens by lift ("`tok` 3.1x 92% (n=40)")."""
    tables = lift_table(stats.token_mass, top, min_count)
    rows = []
    for rank in range(max((len(t) for t in tables), default=0)):
        row = [str(rank + 1)]
        for table in tables:
            if rank < len(table):
                x = table[rank]
                row.append(f"{token_label(tokenizer, x.token)} {x.lift:.1f}x {100 * x.share:.0f}% (n={x.count:.0f})")
            else:
                row.append("")
        rows.append(row)
    if not rows:
        return f"No token occurs {min_count:.0f} times or more in the evaluation splits."
    return _table(["rank", *(f"expert {e}" for e in range(stats.num_experts))], rows)


def _chance_text(stats: SpecialisationStats) -> str:
    """The MI against the permutation baseline, as one sentence."""
    chance = stats.chance()
    if not chance:
        return "above chance: not measured (no evaluation rows recorded)."
    rows = sum(len(r) for r in stats.row_mass)
    verdict = "above chance" if chance["mi_p_value"] <= 0.05 else "not distinguishable from chance"
    return (
        f"**above chance: {chance['nmi_above_chance']:+.3f} (normalised; {chance['mi_above_chance']:+.4f} nats)**, "
        f"{verdict} (p = {chance['mi_p_value']:.3f}): the MI minus its mean ({chance['nmi_chance']:.3f} normalised) "
        f"over 200 shuffles of the domain labels across the {rows} evaluation rows."
    )


def specialisation_section(
    stats: SpecialisationStats,
    tokenizer,
    output_dir: str | Path,
    records: list[dict] = (),
    final_metrics: dict[str, float] | None = None,
    load: bool = True,
) -> str:
    """Write the heatmap, the example picture and page into ``output_dir``; return the markdown section. ``load``:
    include the load line (False where the report's load section says it)."""
    output_dir = Path(output_dir)
    mi, nmi = mutual_information(stats.domain_mass)
    figures = load_figures(stats.domain_mass.sum(0))
    load_line = (
        f"\n- load: largest expert share x E = {figures['load_max_over_mean']:.2f} (1 = balanced, {stats.num_experts} "
        f"= one expert takes all),\n  entropy of the expert shares = {figures['expert_entropy']:.3f} of log E "
        "(1 = balanced)."
        if load
        else ""
    )
    steps, shares, history = spec_history(list(records), stats.domains, stats.num_experts)
    if not steps:  # no logged evaluation (a standalone report): the final stats alone
        steps, shares, history = [0], stats.shares()[:, :, None], np.array([nmi])
    plot_heatmap(output_dir / HEATMAP_PLOT, steps, shares, history, stats.domains)
    plot_examples(output_dir / EXAMPLES_PLOT, stats, tokenizer)
    write_examples_html(output_dir / EXAMPLES_HTML, stats, tokenizer)

    how = (
        "every token counts with its sequence's expert weights (sequence routing)"
        if stats.routing == "sequence"
        else "every token counts with its own routing weights, normalised (token routing)"
    )
    shares_now = stats.shares()
    rows = []
    for d, domain in enumerate(stats.domains):
        row = [domain, *(f"{s:.3f}" for s in shares_now[d]), f"{np.exp(entropy(shares_now[d])):.2f}"]
        if final_metrics is not None:
            row.append(f"{final_metrics.get(f'eval_{domain}_router_entropy', float('nan')):.3f}")
        rows.append(row)
    total = stats.domain_mass.sum(0)
    all_row = ["all", *(f"{s:.3f}" for s in total / max(total.sum(), 1e-300)), f"{np.exp(entropy(total)):.2f}"]
    rows.append(all_row + ([""] if final_metrics is not None else []))
    header = ["domain", *(f"expert {e}" for e in range(stats.num_experts)), "effective experts"]
    header += ["router entropy (nats/token)"] if final_metrics is not None else []
    return f"""## Specialisation (final model, evaluation splits)

Routing mass per token: {how}.

- **domain-expert mutual information: {nmi:.3f} (normalised; {mi:.4f} nats)**. 0: every domain spreads over the
  experts alike; 1: each expert serves one domain only.
- {_chance_text(stats)}{load_line}

{_table(header, rows)}

"effective experts" = exp(entropy of the row's shares): 1 when a domain uses one expert, E when it uses all alike.

![domain x expert over evaluations]({HEATMAP_PLOT})

### Tokens each expert receives more often than their overall frequency (lift)

Lift = P(token | expert) / P(token), over tokens seen at least 5 times; % = share of the token's occurrences routed
to the expert; n = its occurrences.

{lift_markdown(stats, tokenizer)}

### Evaluation examples coloured by top expert

![tokens coloured by top expert]({EXAMPLES_PLOT})

The same rows as text: [{EXAMPLES_HTML}]({EXAMPLES_HTML}).
"""


def specialisation_report(model, eval_datasets: dict, tokenizer, out_dir: str | Path, batch_size: int = 8) -> dict:
    """Standalone: route ``eval_datasets`` through ``model`` (a DyLoRA_MoE), write ``specialisation.md`` and its
    pictures into ``out_dir``; returns the metrics (``eval_spec_*``). ``eval_datasets``: {domain name: dataset}, each
    dataset indexable rows of ``input_ids`` and ``attention_mask`` tensors of one length (what a
    ``torch.utils.data.DataLoader`` batches; e.g. ``build_corpus(...).eval`` of :mod:`dylora_moe.train.data`, a
    :class:`~dylora_moe.train.data.PackedDataset` per domain); ``tokenizer`` prints the tokens of the examples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = collect_specialisation(model, eval_datasets, batch_size)
    (out_dir / "specialisation.md").write_text(
        "# DyLoRA-MoE specialisation\n\n" + specialisation_section(stats, tokenizer, out_dir)
    )
    return stats.metrics()
