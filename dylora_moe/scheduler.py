"""The original's two-phase learning-rate schedule: a high-rate "seeding" phase, then a low-rate "consolidation".

As in the original, the schedule is a :class:`torch.optim.lr_scheduler.LambdaLR`, so ``high_lr`` and ``low_lr`` are
FACTORS on each parameter group's initial learning rate (LambdaLR's contract), not learning rates: with an optimizer
built with ``lr=1.0`` they are the learning rates themselves. After ``seeding_steps + consolidation_steps`` the factor
stays ``low_lr`` (the original had no third phase).
"""

from __future__ import annotations

import functools

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def two_phase_lr_lambda(
    current_step: int, high_lr: float, low_lr: float, seeding_steps: int, consolidation_steps: int
) -> float:
    """``high_lr`` for the first ``seeding_steps`` steps, ``low_lr`` after (``consolidation_steps`` only documents
    the phase's intended length: the factor stays ``low_lr`` beyond it, as in the original)."""
    return high_lr if current_step < seeding_steps else low_lr


class TwoPhaseLRScheduler(LambdaLR):
    """LambdaLR with :func:`two_phase_lr_lambda` (see the module docstring for what ``high_lr``/``low_lr`` scale)."""

    def __init__(
        self,
        optimizer: Optimizer,
        high_lr: float,
        low_lr: float,
        seeding_steps: int,
        consolidation_steps: int,
        last_epoch: int = -1,
    ):
        for name, value in (("high_lr", high_lr), ("low_lr", low_lr)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name, value in (("seeding_steps", seeding_steps), ("consolidation_steps", consolidation_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.high_lr, self.low_lr = float(high_lr), float(low_lr)
        self.seeding_steps, self.consolidation_steps = seeding_steps, consolidation_steps
        # A partial, not a lambda: LambdaLR.state_dict keeps it and the scheduler pickles.
        schedule = functools.partial(
            two_phase_lr_lambda,
            high_lr=self.high_lr,
            low_lr=self.low_lr,
            seeding_steps=seeding_steps,
            consolidation_steps=consolidation_steps,
        )
        super().__init__(optimizer, schedule, last_epoch)
