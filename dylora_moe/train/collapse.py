"""Router collapse seen during training: a warning when one expert keeps most of the routed tokens.

A collapsed router makes a mixture one LoRA that costs E: the other experts get (almost) no tokens and no gradient.
:class:`CollapseWatch` reads each training log's expert shares (``util_expert_<e>``, token-weighted over the steps
since the previous log) and warns once when the same expert's share stays above the threshold for ``patience``
logs in a row, naming the expert and the fix.
"""

from __future__ import annotations


def default_threshold(num_experts: int) -> float:
    """2/E, at most halfway between balance (1/E) and one expert taking all (1): 0.75 for E = 2, 0.5 for E = 4."""
    return min(2.0 / num_experts, (1.0 + 1.0 / num_experts) / 2.0)


class CollapseWatch:
    """Counts consecutive logs in which one expert's share exceeds ``threshold`` (default :func:`default_threshold`);
    :meth:`update` returns the warning text the first time a streak reaches ``patience`` logs (again only after
    the share fell back below the threshold), else None."""

    def __init__(self, num_experts: int, threshold: float | None = None, patience: int = 3):
        if threshold is not None and not 0 < threshold < 1:
            raise ValueError(f"collapse threshold must be a share in (0, 1), got {threshold!r}")
        if patience < 1:
            raise ValueError(f"collapse patience must be >= 1 logged steps, got {patience!r}")
        self.num_experts = num_experts
        self.threshold = default_threshold(num_experts) if threshold is None else float(threshold)
        self.patience = patience
        self.expert, self.streak, self.first_step, self.warned = None, 0, None, False

    def update(self, logs: dict, step: int) -> str | None:
        shares = [logs.get(f"util_expert_{e}") for e in range(self.num_experts)]
        if self.num_experts < 2 or any(s is None for s in shares):
            return None
        top = max(range(self.num_experts), key=shares.__getitem__)
        if shares[top] <= self.threshold:
            self.expert, self.streak, self.warned = None, 0, False
            return None
        if top != self.expert:
            self.expert, self.streak, self.first_step, self.warned = top, 0, step, False
        self.streak += 1
        if self.streak < self.patience or self.warned:
            return None
        self.warned = True
        return (
            f"router collapse: expert {top} took {shares[top]:.0%} of the routed tokens at step {step}, above "
            f"{self.threshold:.0%} in each of the last {self.streak} logs (since step {self.first_step}); the other "
            f"experts get few tokens and little training. Fix: --balance_loss loss_free (a selection bias that "
            f"balances without a loss; raise --balance_update_rate for short runs), or a larger "
            f"--balance_coefficient with --balance_loss switch / mse"
        )
