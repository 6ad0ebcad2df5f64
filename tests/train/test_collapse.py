"""The router-collapse warning of training logs."""

import pytest

from dylora_moe.train.collapse import CollapseWatch, default_threshold


def logs(*shares):
    return {f"util_expert_{e}": s for e, s in enumerate(shares)}


def test_default_threshold_is_two_over_e_at_most_halfway_to_one():
    assert default_threshold(4) == 0.5 and default_threshold(8) == 0.25 and default_threshold(2) == 0.75


def test_warns_once_after_patience_logs_naming_the_expert_and_the_fix():
    watch = CollapseWatch(4, patience=3)
    assert watch.update(logs(0.2, 0.6, 0.1, 0.1), 5) is None
    assert watch.update(logs(0.1, 0.7, 0.1, 0.1), 10) is None
    text = watch.update(logs(0.05, 0.87, 0.04, 0.04), 15)
    assert "expert 1 took 87%" in text and "since step 5" in text and "--balance_loss loss_free" in text
    assert watch.update(logs(0.05, 0.9, 0.03, 0.02), 20) is None  # once per streak


def test_a_streak_breaks_when_the_share_falls_or_another_expert_takes_over():
    watch = CollapseWatch(4, patience=2)
    assert watch.update(logs(0.6, 0.2, 0.1, 0.1), 1) is None
    assert watch.update(logs(0.3, 0.3, 0.2, 0.2), 2) is None  # back below 50%: the streak restarts
    assert watch.update(logs(0.6, 0.2, 0.1, 0.1), 3) is None
    assert watch.update(logs(0.2, 0.6, 0.1, 0.1), 4) is None  # another expert: a new streak
    assert "expert 1" in watch.update(logs(0.2, 0.6, 0.1, 0.1), 5)


def test_balanced_logs_and_a_single_expert_never_warn():
    watch = CollapseWatch(4, patience=1)
    assert all(watch.update(logs(0.25, 0.25, 0.25, 0.25), s) is None for s in range(5))
    assert CollapseWatch(1, patience=1).update(logs(1.0), 1) is None
    assert CollapseWatch(4, patience=1).update({"loss": 1.0}, 1) is None  # an evaluation log: no shares


@pytest.mark.parametrize("kw", [{"threshold": 1.0}, {"threshold": 0.0}, {"patience": 0}])
def test_bad_settings_are_refused(kw):
    with pytest.raises(ValueError):
        CollapseWatch(4, **kw)


def test_summary_load_section_flags_a_collapse_and_not_a_balanced_router():
    import numpy as np

    from dylora_moe.train.report import load_section
    from dylora_moe.train.specialisation import SpecialisationStats

    def section(domain_mass):
        mass = np.array(domain_mass, dtype=float)
        stats = SpecialisationStats(["a", "b"], "token", mass, np.zeros((3, 4)), [])
        return load_section({}, 4, stats)

    collapsed = section([[5, 5, 80, 10], [0, 0, 20, 0]])  # expert 2 takes 100 of 120 tokens
    assert "**Largest expert share x E over all evaluation tokens: 3.33** (expert 2;" in collapsed
    assert "> **Router collapse:** expert 2 takes 83% of the evaluation tokens" in collapsed
    assert "Per domain: the table of the specialisation section below" in collapsed  # said once, there
    per_domain = load_section({"a": {"util": [0.25] * 4}, "b": {"util": [0, 0, 1, 0]}}, 4, None)
    assert "| b | 4.00 | 2 | 1.00 |" in per_domain  # within a domain: one expert, reported, not a collapse by itself
    assert "Router collapse" not in per_domain
    balanced = section([[30, 30, 0, 0], [0, 0, 30, 30]])  # each domain its own two experts, the whole balanced
    assert "evaluation tokens: 1.00**" in balanced and "4.00 effective experts of 4" in balanced
    assert "Router collapse" not in balanced


def test_training_table_shows_the_bias_spread_under_loss_free_balancing_and_the_loss_otherwise():
    from dylora_moe.train.report import training_table

    step = {"step": 1, "loss": 2.0, "lm_loss": 2.0, "router_entropy": 1.0, "util_expert_0": 0.5, "util_expert_1": 0.5}
    loss_free = training_table([{**step, "balance_loss": 0.0, "balance_bias_expert_0": 0.2,
                                 "balance_bias_expert_1": -0.1}], 2)  # fmt: skip
    assert "| bias spread |" in loss_free and "| 0.300 |" in loss_free and "balance loss" not in loss_free
    switch = training_table([{**step, "balance_loss": 0.0123}], 2)
    assert "| balance loss |" in switch and "| 0.01230 |" in switch
