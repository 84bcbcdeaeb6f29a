"""Learning-rate schedules not in ``torch.optim.lr_scheduler`` as one object."""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_cosine", "warmup_multistep"]


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


def warmup_cosine(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int = 100,
    warmup_factor: float = 0.01,
    min_factor: float = 0.0,
) -> LambdaLR:
    """Linear warm-up, then a cosine decay to ``min_factor`` at the last step.

    Step it every iteration (``model.scheduler_interval: step``). ``SSDLitModule`` passes
    ``total_steps`` (``trainer.estimated_stepping_batches``) when the config leaves it out.

    Args:
        optimizer: the optimiser whose base learning rates are scaled.
        total_steps: optimiser steps of the whole run.
        warmup_steps: steps of linear warm-up from ``warmup_factor`` to 1 (at most
            ``total_steps - 1``: shorter runs warm up over all but their last step).
        warmup_factor: initial fraction of the base rate, in (0, 1].
        min_factor: final fraction of the base rate, in [0, 1).

    Returns:
        A ``LambdaLR`` whose factor at step ``t`` is the warm-up ramp for ``t < warmup_steps``,
        then ``min + (1 - min) * (1 + cos(pi * p)) / 2`` with ``p`` the fraction of the decay
        done.
    """
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(
            "scheduler.warmup_steps must be >= 0 and the run at least one step; got "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    warmup_steps = min(warmup_steps, total_steps - 1)  # a short run (debug) warms up less
    if not 0.0 < warmup_factor <= 1.0 or not 0.0 <= min_factor < 1.0:
        raise ValueError(
            "scheduler.warmup_factor must be in (0, 1] and scheduler.min_factor in [0, 1); got "
            f"{warmup_factor} and {min_factor}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            alpha = step / warmup_steps
            return warmup_factor * (1 - alpha) + alpha
        done = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * done))

    return LambdaLR(optimizer, factor)
