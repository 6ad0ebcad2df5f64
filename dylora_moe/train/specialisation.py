"""Did the experts specialise? Routing statistics of the evaluation splits, per domain and per token.

Shape letters: D domains, E experts, V vocabulary, T real (non-padding) tokens, S sequence length.

What each evaluation token gives its experts (its "routing mass", summing to 1 over the experts):

- token routing: its routing weights, normalised (top-k: the k picked experts' weights; k = 1: one-hot);
- sequence routing: the per-sequence weights of its sequence (every token of a row counts with the row's mixture).

From those masses, tallied per domain and per token id:

- the mutual information between domain and expert, normalised to [0, 1] by the smaller of the two entropies:
  0 when every domain spreads over the experts alike, 1 when each expert serves one domain only (a one-to-one
  domain-expert map), so one number says how specialised the routing is;
- how much of that information is above chance: the same MI with the domain labels shuffled over the evaluation
  rows (a permutation baseline; a row is the unit, since the tokens of a row share its domain), its mean over the
  shuffles subtracted, and the share of shuffles reaching the observed MI (a p-value);
- the load: each expert's share of all tokens, as the largest share x E (1 = balanced) and the entropy of the shares
  relative to log E (1 = balanced);
- per expert, the tokens it receives most often relative to their overall frequency (the lift, P(token | expert) /
  P(token)), so "expert 2 takes Python keywords" can be read off;
- a few evaluation rows with each token's routing, drawn as a PNG strip and a coloured HTML page.

:class:`RoutingRecorder` collects the masses from the model's own evaluation forwards (a forward hook, plus a spy on
``router.route`` for the per-token weights); :class:`SpecialisationCallback` does it inside ``Trainer.evaluate`` and
logs ``eval_spec_*`` metrics at every evaluation (metrics.jsonl, wandb); :func:`collect_specialisation` does it with
a plain loop over datasets. :mod:`dylora_moe.train.specialisation_report` draws the pictures and writes the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from transformers import TrainerCallback

# One colour per expert (matplotlib's tab10, then tab20's light shades), shared by the PNG strip and the HTML page.
EXPERT_COLOURS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
]  # fmt: skip


# ----- the numbers -------------------------------------------------------------------------------------------------


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (nats) of a distribution given by non-negative weights (normalised here)."""
    p = np.asarray(p, dtype=np.float64).ravel()
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log(p)).sum())


def mutual_information(joint: np.ndarray) -> tuple[float, float]:
    """``(mi, normalised)`` of the joint weights ``joint`` [D, E] of domain and expert: the mutual information in nats
    and MI / min(H(domain), H(expert)) in [0, 1] (0 when either side is a single value: nothing to specialise)."""
    p = np.asarray(joint, dtype=np.float64)
    if p.sum() <= 0:
        return 0.0, 0.0
    p = p / p.sum()
    pd, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (pd @ pe)[nz])).sum())
    mi = max(mi, 0.0)  # rounding can leave -1e-17 for independent variables
    bound = min(entropy(pd), entropy(pe))
    return mi, (min(mi / bound, 1.0) if bound > 1e-12 else 0.0)


def mi_permutation_baseline(row_mass: list[np.ndarray], permutations: int = 200, seed: int = 0) -> dict[str, float]:
    """The domain-expert MI against chance. ``row_mass``: per domain, [N_d, E] the routing mass of each evaluation
    row. The domain labels of the rows are shuffled ``permutations`` times (domain sizes kept); returns the observed
    ``mi`` / ``nmi``, the shuffles' means ``mi_chance`` / ``nmi_chance``, ``mi_above_chance`` /
    ``nmi_above_chance`` (observed minus chance) and ``mi_p_value`` = (1 + shuffles with MI >= observed) /
    (1 + shuffles)."""
    sizes = [len(rows) for rows in row_mass]
    rows = np.concatenate([np.asarray(r, dtype=np.float64).reshape(len(r), -1) for r in row_mass])
    labels = np.repeat(np.arange(len(row_mass)), sizes)

    def joint(of: np.ndarray) -> np.ndarray:
        out = np.zeros((len(row_mass), rows.shape[1]))
        np.add.at(out, of, rows)
        return out

    mi, nmi = mutual_information(joint(labels))
    rng = np.random.default_rng(seed)
    null = np.array([mutual_information(joint(rng.permutation(labels))) for _ in range(permutations)])
    mi_chance, nmi_chance = null.mean(0) if len(null) else (math.nan, math.nan)
    p_value = (1 + int((null[:, 0] >= mi - 1e-12).sum())) / (1 + permutations) if len(null) else math.nan
    return {
        "mi": mi, "nmi": nmi, "mi_chance": float(mi_chance), "nmi_chance": float(nmi_chance),
        "mi_above_chance": mi - float(mi_chance), "nmi_above_chance": nmi - float(nmi_chance), "mi_p_value": p_value,
    }  # fmt: skip


def load_figures(expert_mass: np.ndarray) -> dict[str, float]:
    """``load_max_over_mean`` (largest expert share x E; 1 = balanced, E = one expert takes all) and
    ``expert_entropy`` (entropy of the shares / log E; 1 = balanced) of the per-expert masses [E]."""
    mass = np.asarray(expert_mass, dtype=np.float64)
    num_experts = mass.size
    if mass.sum() <= 0:
        return {"load_max_over_mean": float("nan"), "expert_entropy": float("nan")}
    shares = mass / mass.sum()
    norm = entropy(shares) / math.log(num_experts) if num_experts > 1 else 1.0
    return {"load_max_over_mean": float(shares.max() * num_experts), "expert_entropy": norm}


@dataclass
class Lift:
    """One row of an expert's lift table: ``token`` id, ``lift`` = P(token | expert) / P(token), ``share`` of the
    token's occurrences routed to the expert, ``count`` its occurrences in the evaluation splits."""

    token: int
    lift: float
    share: float
    count: float


def lift_table(token_mass: np.ndarray, top: int = 8, min_count: float = 5.0) -> list[list[Lift]]:
    """Per expert, the ``top`` tokens by lift among those seen at least ``min_count`` times (rarer tokens have
    noisy lifts), from ``token_mass`` [V, E] (the routing mass each token id gave each expert)."""
    mass = np.asarray(token_mass, dtype=np.float64)
    count = mass.sum(1)  # each occurrence gives mass 1 in all: the number of occurrences
    total = count.sum()
    tables = []
    for e in range(mass.shape[1]):
        expert_total = mass[:, e].sum()
        if expert_total <= 0 or total <= 0:
            tables.append([])
            continue
        frequent = np.nonzero((count >= min_count) & (mass[:, e] > 0))[0]
        lift = (mass[frequent, e] / expert_total) / (count[frequent] / total)
        order = np.lexsort((-mass[frequent, e], -lift))[:top]  # by lift, then by mass
        tables.append(
            [
                Lift(
                    int(frequent[i]),
                    float(lift[i]),
                    float(mass[frequent[i], e] / count[frequent[i]]),
                    count[frequent[i]],
                )
                for i in order
            ]
        )
    return tables


# ----- collecting routing masses -------------------------------------------------------------------------------------


@dataclass
class Example:
    """One evaluation row: its ``domain``, real token ``ids`` [S] and each token's routing ``mass`` [S, E]."""

    domain: str
    ids: list[int]
    mass: np.ndarray


@dataclass
class Tally:
    """Routing masses of one domain: per token id ``token_mass`` [V, E] (on the model's device, float64, so adding a
    batch costs no host sync) and the first evaluation rows as :class:`Example` (ids and masses, on the host)."""

    token_mass: torch.Tensor | None = None
    examples: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    row_mass: list[torch.Tensor] = field(default_factory=list)  # per batch [B, E]: each row's routing mass

    def add(self, ids: torch.Tensor, real: torch.Tensor, mass: torch.Tensor, vocab: int, keep: int) -> None:
        """``ids`` [B, S], ``real`` [B, S] bool, ``mass`` [T, E] for the real tokens in row-major order."""
        flat = ids[real]
        if self.token_mass is None or self.token_mass.shape[1] != mass.shape[1]:
            self.token_mass = torch.zeros(vocab, mass.shape[1], dtype=torch.float64, device=mass.device)
        self.token_mass.index_add_(0, flat.to(mass.device), mass.to(torch.float64))
        row_of = torch.arange(ids.shape[0], device=real.device)[:, None].expand_as(real)[real].to(mass.device)
        rows = torch.zeros(ids.shape[0], mass.shape[1], dtype=torch.float64, device=mass.device)
        self.row_mass.append(rows.index_add_(0, row_of, mass.to(torch.float64)))
        start = 0
        for row in range(min(ids.shape[0], keep - len(self.examples))):  # host syncs for the first rows only
            n = int(real[row].sum())
            self.examples.append((ids[row][real[row]].cpu(), mass[start : start + n].float().cpu()))
            start += n


class RoutingRecorder:
    """Records the routing masses of a DyLoRA_MoE's forwards in eval mode (training forwards are ignored) into
    :attr:`pending`, a :class:`Tally`; :meth:`take` hands it over and starts a new one.

    Per-token weights come from the router's own decision: ``router.route`` is wrapped on the instance while the
    recorder is open (:meth:`close` restores it; the module's class is untouched). Sequence routing reads the
    ``sequence_weights`` of the model's output.
    """

    def __init__(self, model, num_examples: int = 2):
        self.model, self.keep = model, num_examples
        self.vocab = model.foundation_model.get_input_embeddings().num_embeddings
        self.pending = Tally()
        self._route = None
        router = model.router
        route = router.route

        def spy(x, mask=None):
            out = route(x, mask=mask)
            if not router.training:
                self._route = out
            return out

        router.route = spy
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def close(self) -> None:
        self._hook.remove()
        vars(self.model.router).pop("route", None)

    def _record(self, module, args, kwargs, output) -> None:
        if module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        if output.sequence_weights is not None:
            rows = torch.arange(ids.shape[0], device=real.device).unsqueeze(1).expand_as(real)[real]
            mass = output.sequence_weights.detach()[rows]
        elif self._route is not None and module.num_experts > 1:
            dense = self._route.dense.detach().float()
            if self._route.mask is not None:  # the router saw every position (padding masked): keep the real tokens
                dense = dense[self._route.mask]
            mass = dense / dense.sum(-1, keepdim=True).clamp_min(1e-20)
        else:  # one expert: the router is not consulted
            mass = torch.ones(int(real.sum()), 1, device=ids.device)
        self._route = None
        self.pending.add(ids, real, mass, self.vocab, self.keep)

    def take(self) -> Tally:
        tally, self.pending = self.pending, Tally()
        return tally


@dataclass
class SpecialisationStats:
    """The routing masses of one evaluation: per domain the expert masses (``domain_mass`` [D, E]), per token id
    ``token_mass`` [V, E] over all domains, a few :class:`Example` rows, the ``routing`` mode, and per domain each
    evaluation row's masses (``row_mass``, all processes' rows)."""

    domains: list[str]
    routing: str
    domain_mass: np.ndarray
    token_mass: np.ndarray
    examples: list[Example]
    row_mass: list[np.ndarray] | None = None  # per domain [N_d, E], for the permutation baseline

    @classmethod
    def from_tallies(
        cls, tallies: dict[str, Tally], routing: str, reduce: bool = True, shape: tuple[int, int] | None = None
    ) -> SpecialisationStats:
        """Combine per-domain tallies; with ``reduce`` and torch.distributed initialised, sum them over processes
        (every process must call this, with the same ``shape`` (V, E) so that a process that saw no token still
        contributes; the examples stay each process's own)."""
        masses = [t.token_mass for t in tallies.values() if t.token_mass is not None]
        vocab, width = shape if shape is not None else (masses[0].shape[0] if masses else 0, 0)
        width = max([width, *(m.shape[1] for m in masses)])
        device = masses[0].device if masses else torch.device("cpu")
        stacked = torch.stack(
            [
                torch.nn.functional.pad(t.token_mass, (0, width - t.token_mass.shape[1]))
                if t.token_mass is not None
                else torch.zeros(vocab, width, dtype=torch.float64, device=device)
                for t in tallies.values()
            ]
        )  # [D, V, E]
        if reduce and dist.is_available() and dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            stacked = stacked.to(device)
            dist.all_reduce(stacked)
        stacked = stacked.cpu().numpy()  # the one host sync of an evaluation's statistics
        if stacked.sum() <= 0:
            raise ValueError("no evaluation token was recorded: was the model run in eval mode?")
        examples = [
            Example(domain, ids.tolist(), np.pad(mass.numpy(), ((0, 0), (0, width - mass.shape[1]))))
            for domain, tally in tallies.items()
            for ids, mass in tally.examples
        ]
        row_mass = [_rows_of(t, width, device) for t in tallies.values()]
        if reduce and dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, row_mass)
            row_mass = [np.concatenate([g[d] for g in gathered]) for d in range(len(row_mass))]
        return cls(list(tallies), routing, stacked.sum(1), stacked.sum(0), examples, row_mass)

    @property
    def num_experts(self) -> int:
        return self.domain_mass.shape[1]

    def chance(self) -> dict[str, float]:
        """:func:`mi_permutation_baseline` of the rows (empty without row masses)."""
        if not self.row_mass or sum(len(r) for r in self.row_mass) == 0:
            return {}
        return mi_permutation_baseline(self.row_mass)

    def shares(self) -> np.ndarray:
        """[D, E]: each domain's share of routing mass per expert (rows sum to 1)."""
        return self.domain_mass / np.maximum(self.domain_mass.sum(1, keepdims=True), 1e-300)

    def metrics(self, prefix: str = "eval_spec_") -> dict[str, float]:
        """The numbers logged at each evaluation: ``nmi``, ``mi`` (nats), the load figures, and each domain's share
        of each expert (``<domain>_share_expert_<e>``, the heatmap's cells)."""
        mi, nmi = mutual_information(self.domain_mass)
        out = {f"{prefix}nmi": nmi, f"{prefix}mi": mi}
        chance = self.chance()
        for key in ("mi_chance", "nmi_chance", "mi_above_chance", "nmi_above_chance", "mi_p_value"):
            if key in chance:
                out[prefix + key] = chance[key]
        out.update({prefix + key: value for key, value in load_figures(self.domain_mass.sum(0)).items()})
        for d, domain in enumerate(self.domains):
            out.update({f"{prefix}{domain}_share_expert_{e}": float(s) for e, s in enumerate(self.shares()[d])})
        return out


def _rows_of(tally: Tally, width: int, device) -> np.ndarray:
    """[N, width] the row masses of a tally on the host (zero rows when it saw none)."""
    if not tally.row_mass:
        return np.zeros((0, width))
    rows = torch.cat(tally.row_mass).cpu().numpy()
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


@torch.no_grad()
def collect_specialisation(model, eval_datasets: dict, batch_size: int = 8, num_examples: int = 2):
    """Run ``model`` (a DyLoRA_MoE) in eval mode over each dataset of ``eval_datasets`` ({domain: dataset of dicts
    with input_ids / attention_mask}) and return their :class:`SpecialisationStats`."""
    was_training = model.training
    model.eval()
    recorder = RoutingRecorder(model, num_examples)
    tallies = {}
    try:
        for domain, dataset in eval_datasets.items():
            for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
                model(
                    input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device),
                )
            tallies[domain] = recorder.take()
    finally:
        recorder.close()
        model.train(was_training)
    return SpecialisationStats.from_tallies(tallies, model.routing, reduce=False)


class SpecialisationCallback(TrainerCallback):
    """Records routing masses during ``Trainer.evaluate`` on a dict of evaluation sets; after the last domain of each
    evaluation, logs :meth:`SpecialisationStats.metrics` through ``trainer.log`` (so metrics.jsonl and wandb get
    them) and keeps the stats in :attr:`latest` (the report uses the final evaluation's). Its recorder stays on the
    model (evaluations after ``train()`` are recorded too) until :meth:`close`."""

    def __init__(self, trainer, num_examples: int = 2):
        self.trainer = trainer
        self.model = trainer.accelerator.unwrap_model(trainer.model)
        datasets = trainer.eval_dataset
        self.domains = list(datasets) if isinstance(datasets, dict) else ["eval"]
        self.recorder = RoutingRecorder(self.model, num_examples)
        self.tallies: dict[str, Tally] = {}
        self.latest: SpecialisationStats | None = None

    @classmethod
    def attach(cls, trainer, num_examples: int = 2) -> SpecialisationCallback:
        """Create the callback for ``trainer`` and add it to the trainer's callbacks."""
        callback = cls(trainer, num_examples)
        trainer.add_callback(callback)
        return callback

    def close(self) -> None:
        """Take the recorder off the model (hook and ``router.route`` spy)."""
        self.recorder.close()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        done = next((d for d in self.domains if f"eval_{d}_loss" in metrics), None)
        if done is None and "eval_loss" in metrics and self.domains == ["eval"]:
            done = "eval"
        if done is None:
            return
        self.tallies[done] = self.recorder.take()
        if done == self.domains[-1]:
            tallies, self.tallies = {d: self.tallies.get(d, Tally()) for d in self.domains}, {}
            shape = (self.recorder.vocab, self.model.num_experts)
            self.latest = SpecialisationStats.from_tallies(tallies, self.model.routing, shape=shape)
            self.trainer.log(self.latest.metrics())
