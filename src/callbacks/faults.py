"""Callbacks that make runs resumable: random states in checkpoints, a checkpoint on SIGTERM/SIGINT.

* :class:`ResumeCallback`: saves the Python, NumPy and torch random states in every checkpoint
  and restores them on resume, so a resumed run draws the same data order and augmentation.
* :class:`InterruptCallback`: on SIGTERM or SIGINT (Ctrl+C) during ``fit`` saves a resumable
  ``last.ckpt``, logs the command that resumes and raises
  :class:`~src.utils.faults.RunInterruptedError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.utils.faults import (
    DivergedError,
    resume_command,
    rng_states,
    set_rng_states,
)

log = logging.getLogger(__name__)


class ResumeCallback(Callback):
    """Save the random states in checkpoints and restore them when training resumes.

    The states are taken when the checkpoint is written; on resume they are set again right
    before the training data are first drawn (after the sanity-check validation, which draws
    random numbers of its own), so the shuffling order, the augmentation and any dropout of a
    resumed run continue exactly as in an uninterrupted run with the same seed.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The random states at save time."""
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the states until the training data are about to be drawn."""
        self._pending = state_dict.get("rng")
        if self._pending is not None:
            set_rng_states(self._pending)

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the saved states again: the sanity check consumed random numbers."""
        if self._pending is not None:
            set_rng_states(self._pending)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forget the saved states once training runs."""
        self._pending = None


class InterruptCallback(Callback):
    """On SIGTERM or SIGINT during ``fit``, save a resumable ``last.ckpt`` and say how to resume.

    Lightning stops at the end of the current batch on SIGTERM (raising ``SIGTERMException``,
    which would otherwise end the process with status 0) and on Ctrl+C (``KeyboardInterrupt``).
    This callback then writes ``<dirpath>/last.ckpt`` from the current state (weights,
    optimiser, schedulers, loops and random states), unless the weights are not finite, and
    logs one line with the exact command to resume. ``src.train`` raises
    :class:`RunInterruptedError` afterwards, so the process exits with 143 (SIGTERM) or 130
    (SIGINT).

    On SLURM with Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the
    default under ``srun``), the requeue signal (SIGUSR1) still writes Lightning's
    ``hpc_ckpt_*.ckpt`` and requeues the job; this callback does not interfere.

    Args:
        dirpath: where ``last.ckpt`` is written (the run's ``checkpoints/`` folder).
        filename: the checkpoint's file name.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        #: set after an interrupt: ``(signal name, checkpoint path or None)``.
        self.interrupted: tuple[str, str | None] | None = None

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Save ``last.ckpt`` when the exception is a SIGTERM or a Ctrl+C."""
        if isinstance(exception, SIGTERMException):
            name = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            name = "SIGINT"
        else:
            return
        if not trainer.training and trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        try:
            trainer.save_checkpoint(path)
        except DivergedError as err:
            log.error("%s received; not saving the current state: %s", name, err)
            self.interrupted = (name, None)
            return
        self.interrupted = (name, str(path))
        if trainer.is_global_zero:
            log.warning(
                "%s received after %d completed epochs (global step %d): saved %s. Resume with: %s",
                name,
                trainer.fit_loop.epoch_progress.current.completed,
                trainer.global_step,
                path,
                resume_command(path),
            )
