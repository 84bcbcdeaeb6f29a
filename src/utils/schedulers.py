"""Learning-rate schedules not in ``torch.optim.lr_scheduler`` as one object."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_multistep"]


def warmup_multistep(
    optimizer: Optimizer,
    milestones: Sequence[int],
    gamma: float = 0.1,
    warmup_iters: int = 500,
    warmup_factor: float = 1.0 / 3.0,
) -> LambdaLR:
    """Linear warm-up, then step decay (the SSD recipe: x0.1 at 80k and 100k iterations).

    Step it every iteration (``model.scheduler_interval: step``).

    Args:
        optimizer: the optimiser whose base learning rates are scaled.
        milestones: increasing iteration numbers at which the rate is multiplied by ``gamma``.
        gamma: decay factor.
        warmup_iters: iterations of linear warm-up from ``warmup_factor`` to 1 (0: none).
        warmup_factor: initial fraction of the base rate.

    Returns:
        A ``LambdaLR`` whose factor at iteration ``t`` is
        ``warmup(t) * gamma ** (number of milestones <= t)``.
    """
    milestones = list(milestones)
    if milestones != sorted(milestones):
        raise ValueError(f"scheduler.milestones must be increasing, got {milestones}")
    if warmup_iters < 0 or not 0.0 < warmup_factor <= 1.0:
        raise ValueError(
            "scheduler.warmup_iters must be >= 0 and scheduler.warmup_factor in (0, 1]; got "
            f"{warmup_iters} and {warmup_factor}"
        )

    def factor(step: int) -> float:
        warm = 1.0
        if step < warmup_iters:
            alpha = step / warmup_iters
            warm = warmup_factor * (1 - alpha) + alpha
        return warm * gamma ** bisect_right(milestones, step)

    return LambdaLR(optimizer, factor)
