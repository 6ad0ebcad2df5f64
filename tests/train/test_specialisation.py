"""Specialisation metrics (issue 12, item 1): known answers on hand-made routings, the recorder against the model's
own routing outputs, and the report pictures for token and sequence routing."""

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dylora_moe.model import DyLoRA_MoE
from dylora_moe.train.data import PackedDataset
from dylora_moe.train.specialisation import (
    SpecialisationStats,
    Tally,
    collect_specialisation,
    lift_table,
    load_figures,
    mi_permutation_baseline,
    mutual_information,
)
from dylora_moe.train.specialisation_report import specialisation_report

# ----- mutual information and load ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "joint",
    [
        [[5, 5], [5, 5]],
        [[2, 6], [1, 3]],  # the same per-domain distribution, domains of different sizes
        [[1, 2, 3, 0], [10, 20, 30, 0]],  # an unused expert changes nothing
    ],
)
def test_mutual_information_is_zero_for_identical_domain_distributions(joint):
    mi, nmi = mutual_information(np.array(joint, dtype=float))
    assert mi == pytest.approx(0.0, abs=1e-12) and nmi == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "joint",
    [
        [[7, 0], [0, 3]],  # one-to-one, unequal domain sizes
        [[0, 0, 4], [0, 9, 0], [5, 0, 0]],  # three domains, permuted
        [[3, 3, 0, 0], [0, 0, 1, 2]],  # each of 4 experts serves one of 2 domains
    ],
)
def test_mutual_information_is_one_for_a_one_to_one_map(joint):
    joint = np.array(joint, dtype=float)
    mi, nmi = mutual_information(joint)
    p_domain = joint.sum(1) / joint.sum()
    assert mi == pytest.approx(-(p_domain * np.log(p_domain)).sum(), rel=1e-12)  # MI = H(domain)
    assert nmi == pytest.approx(1.0, rel=1e-12)


def test_mutual_information_by_hand():
    # p(d, e) = [[3, 1], [1, 3]] / 8: MI = 2 * 3/8 ln(3/2) + 2 * 1/8 ln(1/2), H = ln 2
    mi, nmi = mutual_information(np.array([[3.0, 1.0], [1.0, 3.0]]))
    expected = 0.75 * math.log(1.5) - 0.25 * math.log(2)
    assert mi == pytest.approx(expected, rel=1e-12)
    assert nmi == pytest.approx(expected / math.log(2), rel=1e-12)
    assert mutual_information(np.array([[4.0], [2.0]])) == (0.0, 0.0)  # one expert: nothing to specialise


def test_load_figures():
    assert load_figures(np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(
        {"load_max_over_mean": 1.0, "expert_entropy": 1.0}
    )
    one = load_figures(np.array([0.0, 8.0, 0.0, 0.0]))
    assert one["load_max_over_mean"] == 4.0 and one["expert_entropy"] == 0.0


# ----- lift table -----------------------------------------------------------------------------------------------


def test_lift_table_finds_the_one_token_an_expert_gets():
    # A synthetic corpus: token 7 (10% of the tokens) always goes to expert 1, every other token to expert 0.
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (8, 50), generator=gen)
    ids[ids == 7] = 8
    ids[:, ::10] = 7
    real = torch.ones_like(ids, dtype=torch.bool)
    real[-1, 45:] = False  # padding is not counted
    flat = ids[real]
    mass = torch.nn.functional.one_hot((flat == 7).long(), 2).double()
    tally = Tally()
    tally.add(ids, real, mass, vocab=20, keep=2)
    tables = lift_table(tally.token_mass.numpy(), top=5, min_count=5)
    count_7, total = int((flat == 7).sum()), flat.numel()
    assert [row.token for row in tables[1]] == [7]
    assert tables[1][0].share == 1.0 and tables[1][0].count == count_7
    assert tables[1][0].lift == pytest.approx(total / count_7)  # P(7 | e1) = 1, P(7) = count / total
    assert 7 not in [row.token for row in tables[0]]
    assert all(row.lift == pytest.approx(total / (total - count_7)) for row in tables[0])
    assert [len(x[0]) for x in tally.examples] == [50, 50]  # the first two rows are kept as examples


# ----- the recorder on a model ------------------------------------------------------------------------------------


def _model(routing, **kwargs) -> DyLoRA_MoE:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = DyLoRA_MoE(LlamaForCausalLM(config), 3, 4, 8, 0.0, kernel="eager", routing=routing, **kwargs)
    with torch.no_grad():
        for layer in model.handle.layers.values():
            layer.lora_B.normal_(0, 0.1)  # experts that differ, so sequence mixtures matter
    return model


def _datasets():
    def packed(rows, last):
        ids = torch.randint(0, 64, (rows, 16))
        lengths = torch.full((rows,), 16)
        lengths[-1] = last
        return PackedDataset(ids, lengths, pad_id=0)

    return {"alpha": packed(5, 9), "beta": packed(3, 16)}


def _reference_masses(model, datasets):
    """Per domain, the expert masses from the model's forward outputs directly: token routing at top_k = 1 picks
    one expert per token (expert_token_fraction x tokens); sequence routing weights every real token of a row."""
    out = {}
    model.eval()
    with torch.no_grad():
        for domain, dataset in datasets.items():
            total = torch.zeros(model.num_experts, dtype=torch.float64)
            for batch in torch.utils.data.DataLoader(dataset, batch_size=2):
                o = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                tokens = batch["attention_mask"].sum(1).double()
                if o.sequence_weights is not None:
                    total += (o.sequence_weights.double() * tokens[:, None]).sum(0)
                else:
                    total += o.expert_token_fraction.double() * tokens.sum()
            out[domain] = total.numpy()
    return out


@pytest.mark.parametrize("routing,kwargs", [("token", {"top_k": 1}), ("sequence", {"sequence_top_k": 2})])
def test_recorder_matches_the_model_outputs(routing, kwargs):
    model = _model(routing, **kwargs)
    datasets = _datasets()
    stats = collect_specialisation(model, datasets, batch_size=2)
    assert "route" not in vars(model.router)  # the spy is gone
    expected = _reference_masses(model, datasets)
    for d, domain in enumerate(stats.domains):
        np.testing.assert_allclose(stats.domain_mass[d], expected[domain], rtol=1e-6, atol=1e-9)
    tokens = sum(ds.num_tokens for ds in datasets.values())
    assert stats.token_mass.sum() == pytest.approx(tokens)  # each real token gives mass 1
    assert len(stats.examples) == 4 and len(stats.examples[1].ids) == 16
    np.testing.assert_allclose(stats.examples[0].mass.sum(1), 1.0, rtol=1e-6)
    metrics = stats.metrics()
    assert 0.0 <= metrics["eval_spec_nmi"] <= 1.0
    # one row mass per evaluation row, summing to its real tokens; their domain sums are the domain masses
    assert [len(r) for r in stats.row_mass] == [5, 3]
    np.testing.assert_allclose(stats.row_mass[0].sum(1), [16, 16, 16, 16, 9], rtol=1e-6)
    for d in range(2):
        np.testing.assert_allclose(stats.row_mass[d].sum(0), stats.domain_mass[d], rtol=1e-6)
    chance = metrics["eval_spec_nmi"] - metrics["eval_spec_nmi_chance"]
    assert metrics["eval_spec_nmi_above_chance"] == pytest.approx(chance)
    assert 0 < metrics["eval_spec_mi_p_value"] <= 1
    assert sum(metrics[f"eval_spec_alpha_share_expert_{e}"] for e in range(3)) == pytest.approx(1.0)


def test_top2_token_masses_are_the_normalised_weights():
    model = _model("token", top_k=2)
    stats = collect_specialisation(model, {"alpha": _datasets()["alpha"]}, batch_size=5)
    mass = stats.examples[0].mass
    assert ((mass > 0).sum(1) == 2).all()  # two experts per token
    np.testing.assert_allclose(mass.sum(1), 1.0, rtol=1e-6)


def _tokenizer():
    class Letters:  # decode: one letter per id, a space and a newline among them
        def decode(self, ids):
            return "".join(" " if i == 0 else "\n" if i == 1 else chr(ord("a") + i % 26) for i in ids)

    return Letters()


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_report_sections_and_pictures(routing, tmp_path):
    model = _model(routing)
    metrics = specialisation_report(model, _datasets(), _tokenizer(), tmp_path, batch_size=4)
    text = (tmp_path / "specialisation.md").read_text()
    for heading in (
        "## Specialisation (final model, evaluation splits)",
        "**domain-expert mutual information: ",
        "**above chance: ",
        "shuffles of the domain labels across the 8 evaluation rows",
        "| domain | expert 0 | expert 1 | expert 2 | effective experts |",
        "### Tokens each expert receives more often than their overall frequency (lift)",
        "| rank | expert 0 | expert 1 | expert 2 |",
        "### Evaluation examples coloured by top expert",
    ):
        assert heading in text, heading
    assert f"{metrics['eval_spec_nmi']:.3f} (normalised" in text
    assert ("sequence's expert weights" in text) == (routing == "sequence")
    for picture in ("specialisation.png", "routing_examples.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "routing_examples.html").read_text()
    assert page.count("<h2>") == 4 and page.count('class="t"') == 16 + 16 + 16 + 16


def test_stats_need_some_tokens():
    with pytest.raises(ValueError, match="no evaluation token was recorded"):
        SpecialisationStats.from_tallies({"alpha": Tally()}, "token")


def _rows(shares, n, seed):
    rng = np.random.default_rng(seed)
    return rng.multinomial(16, shares, size=n).astype(float)  # 16 tokens a row, routed with these expert shares


def test_permutation_baseline_tells_specialisation_from_chance():
    """Domains with their own experts: MI far above the shuffles, p at its floor 1/201. Domains routed alike: the
    MI is of the size of chance (a small sample alone gives MI > 0), nothing above it, p not small."""
    special = mi_permutation_baseline([_rows([0.9, 0.1, 0, 0], 40, 1), _rows([0, 0.1, 0.9, 0], 6, 2)])
    assert special["mi_p_value"] == pytest.approx(1 / 201)
    assert special["nmi_above_chance"] > 0.5 and special["nmi_chance"] < 0.2
    alike = mi_permutation_baseline([_rows([0.25] * 4, 40, 5), _rows([0.25] * 4, 6, 6)])
    assert alike["mi"] > 0  # the plain MI of a finite sample is never exactly 0 ...
    assert abs(alike["mi_above_chance"]) < 0.5 * alike["mi_chance"] + 1e-3 and alike["mi_p_value"] > 0.05


def test_permutation_baseline_by_hand():
    """Two rows, one per domain: every shuffle is the identity or the swap, both give the same MI -> nothing above
    chance, p = 1."""
    out = mi_permutation_baseline([np.array([[3.0, 1.0]]), np.array([[1.0, 3.0]])], permutations=10)
    assert out["mi"] == pytest.approx(mutual_information(np.array([[3, 1], [1, 3]]))[0])
    assert out["mi_above_chance"] == pytest.approx(0.0, abs=1e-12) and out["mi_p_value"] == 1.0
