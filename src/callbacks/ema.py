"""Exponential moving average (EMA) of the weights, validated and checkpointed in their place.

:class:`EMACallback` is Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (an
:class:`torch.optim.swa_utils.AveragedModel` updated after every optimiser step) with the
decay ramp of Ultralytics' ``ModelEMA``::

    d(u) = decay * (1 - exp(-u / warmup_steps))      # u: updates made so far
    ema  = d(u) * ema + (1 - d(u)) * weights

so the average follows the fast-moving weights of the first steps closely and averages over
about ``1 / (1 - decay)`` steps once ``u`` is several ``warmup_steps``. The defaults (``decay``
0.99, ``warmup_steps`` 50) suit the short CPU runs of this project (hundreds of steps); with
Ultralytics' 0.9999 and 2000 a run of 300 steps would keep almost only the newest weights.
``docs/ema.md`` has the window at each step and the measured effect.

What happens with the averaged weights:

* **validation**: they replace the trained weights from the start of the validation epoch to
  the end of validation (after the module's and every callback's epoch-end hooks, which may run
  the network), so ``val/*`` metrics, the F1 threshold and the pictures are those of the EMA;
* **checkpoints**: ``state_dict`` holds the EMA weights (what was validated, so ``best.ckpt`` is
  the best EMA), ``current_model_state`` the trained weights and ``averaging_state`` the update
  count; all tensors, so ``torch.load(weights_only=True)`` reads the file. ``src.eval``,
  ``src.predict``, ``src.export`` and ``model.init_from`` read ``state_dict``: the EMA;
* **resume** (``ckpt_path=last.ckpt``): the trained weights, the EMA and its update count come
  back exactly (a resumed run ends with the same EMA, bit for bit, as an uninterrupted one);
* **test** after ``fit`` and the end of training: the module keeps the EMA weights;
* **buffers** (``use_buffers=True``, the default): BatchNorm running means and variances are
  averaged with the same decay as the weights (as Ultralytics does), integer buffers
  (``num_batches_tracked``) are copied. ``use_buffers=False`` averages the parameters only and
  validates them with the trained model's running statistics.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = ["EMACallback", "ema_decay"]


def ema_decay(updates: int, decay: float, warmup_steps: float) -> float:
    """The decay of the EMA update after ``updates`` earlier updates.

    Args:
        updates: updates made so far (>= 1: the first one copies the weights).
        decay: the decay once warmed up, in ``[0, 1)``.
        warmup_steps: the ramp's time constant in updates; 0 turns the ramp off.

    Returns:
        ``decay * (1 - exp(-updates / warmup_steps))`` (``decay`` without a ramp).
    """
    if warmup_steps <= 0:
        return float(decay)
    return float(decay) * (1.0 - math.exp(-float(updates) / float(warmup_steps)))


class EMACallback(WeightAveraging):
    """Keep an EMA of the weights; validate, checkpoint and export it (see the module doc).

    Args:
        decay: the EMA decay once warmed up, in ``[0, 1)``: the average spans about
            ``1 / (1 - decay)`` optimiser steps (0.99: 100 steps).
        warmup_steps: time constant of the decay ramp, in updates (0: constant decay).
        every_n_steps: update after every n-th optimiser step.
        use_buffers: average the floating-point buffers (BatchNorm statistics) too; integer
            buffers are copied.
        device: where the averaged copy lives (default: the model's device; ``cpu`` saves GPU
            memory).

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``, ``warmup_steps < 0`` or ``every_n_steps < 1``.
    """

    def __init__(
        self,
        decay: float = 0.99,
        warmup_steps: float = 50,
        every_n_steps: int = 1,
        use_buffers: bool = True,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1), got {decay}")
        if float(warmup_steps) < 0:
            raise ValueError(f"callbacks.ema.warmup_steps must be >= 0, got {warmup_steps}")
        if int(every_n_steps) < 1:
            raise ValueError(f"callbacks.ema.every_n_steps must be >= 1, got {every_n_steps}")
        super().__init__(device=device, use_buffers=use_buffers, multi_avg_fn=self._update)
        self.decay = float(decay)
        self.warmup_steps = float(warmup_steps)
        self.every_n_steps = int(every_n_steps)
        #: whether the module holds the EMA weights now (between validation start and end).
        self._swapped = False

    # ------------------------------------------------------------ averaging
    @torch.no_grad()
    def _update(self, averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        """One EMA step over a group of same-dtype tensors (``AveragedModel``'s ``multi_avg_fn``).

        Args:
            averaged: the EMA's tensors, updated in place.
            current: the trained model's tensors, same shapes.
            num_averaged: int64 scalar, updates made so far (>= 1).
        """
        if not averaged[0].is_floating_point():  # num_batches_tracked: a count, not a weight
            for avg, cur in zip(averaged, current, strict=True):
                avg.copy_(cur)
            return
        d = ema_decay(int(num_averaged), self.decay, self.warmup_steps)
        torch._foreach_lerp_(averaged, current, 1.0 - d)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after every ``every_n_steps``-th optimiser step, never at an epoch end."""
        return step_idx is not None and (step_idx + 1) % self.every_n_steps == 0

    @property
    def updates(self) -> int:
        """EMA updates made so far (0 before the first optimiser step)."""
        return 0 if self._average_model is None else int(self._average_model.n_averaged)

    # ------------------------------------------------------------ validation
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Put the EMA weights into the module for the whole validation."""
        if self._average_model is not None and not self._swapped:
            self._swap_models(pl_module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the EMA weights until :meth:`on_validation_end` (epoch-end hooks may use them)."""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give the trained weights back to the module (before any checkpoint is written)."""
        if self._average_model is not None and self._swapped:
            self._swap_models(pl_module)
            self._swapped = False

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """A run stopped during validation: the module gets its trained weights back."""
        self.on_validation_end(trainer, pl_module)

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """``state_dict``: the EMA, ``current_model_state``: the trained weights.

        A checkpoint written during validation (a signal then) finds the two swapped and
        stores them the right way round.
        """
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._swapped and "current_model_state" in checkpoint:
            checkpoint["state_dict"], checkpoint["current_model_state"] = (
                checkpoint["current_model_state"],
                checkpoint["state_dict"],
            )

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Resuming ``fit``: restore the trained weights and the EMA; otherwise keep the EMA.

        Lightning has loaded ``state_dict`` (the EMA) into the module already; ``test`` and
        ``validate`` (e.g. ``src.train test=true`` on ``best.ckpt``) evaluate it as it is.
        """
        if trainer.state.fn != "fit":
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The callback's own state (the averaged weights travel in ``state_dict``)."""
        return {**super().state_dict(), "decay": self.decay, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step of the last update; warn when the decay settings changed."""
        super().load_state_dict(state_dict)
        saved = (state_dict.get("decay"), state_dict.get("warmup_steps"))
        if saved != (None, None) and saved != (self.decay, self.warmup_steps):
            log.warning(
                "callbacks.ema: the checkpoint's EMA used decay=%s warmup_steps=%s, this run "
                "decay=%s warmup_steps=%s; the EMA continues with this run's",
                *saved,
                self.decay,
                self.warmup_steps,
            )
