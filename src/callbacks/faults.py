"""Callbacks that make runs resumable: random states in checkpoints, a checkpoint on a signal.

* :class:`ResumeCallback`: saves the Python, NumPy and torch random states in every checkpoint
  and restores them on resume; makes sure the training loader's saved position is restored
  (:class:`src.data.collate.ResumableDataLoader`), so a run resumed from any batch draws the
  same data order and augmentation as an uninterrupted one.
* :class:`InterruptCallback`: on SIGTERM or SIGINT (Ctrl+C) during ``fit`` stops after the
  current training batch, saves a resumable ``last.ckpt``, logs the command that resumes (the
  whole sweep's inside a multirun) and raises :class:`~src.utils.faults.RunInterruptedError`;
  defers Lightning's SLURM requeue checkpoint (SIGUSR1) to the end of the current batch.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.utils.faults import (
    DivergedError,
    current_sweep_dir,
    resume_command,
    rng_states,
    set_rng_states,
    sweep_resume_command,
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
        """Restore the training loader's position if Lightning has not; forget the RNG states.

        Lightning restores a stateful training loader when it builds it after the checkpoint
        is loaded. A ``configure_optimizers`` that reads ``trainer.estimated_stepping_batches``
        (the per-step schedulers do) builds it before, and Lightning then drops the saved
        position (Lightning issue #20550): it is loaded here, before the first batch is drawn
        (:class:`~src.data.collate.ResumableDataLoader` starts drawing at the first batch).
        """
        self._pending = None
        fit_loop = trainer.fit_loop
        states = getattr(fit_loop, "_combined_loader_states_to_load", None)
        combined = getattr(fit_loop, "_combined_loader", None)
        if states and combined is not None:
            combined._load_state_dicts(states)
            fit_loop._combined_loader_states_to_load = []


class InterruptCallback(Callback):
    """On SIGTERM or SIGINT in ``fit``: stop after the batch, save ``last.ckpt``, say how to resume.

    Lightning stops at the end of the current training batch on SIGTERM (raising
    ``SIGTERMException``, which would otherwise end the process with status 0). The first
    Ctrl+C (SIGINT) is turned into the same graceful stop (a second one stops at once, without
    saving; the DataLoader workers ignore SIGINT). This callback then writes
    ``<dirpath>/last.ckpt`` from the current state (weights, optimiser, schedulers, loops, the
    training loader's position and random states), unless the weights are not finite, and logs
    one line with the exact command to resume: the run's own command with
    ``ckpt_path=<last.ckpt>``, or inside a multirun or an Optuna search the whole sweep's
    command with ``hydra.sweep.dir=<sweep dir>`` (each job resumes from its own ``last.ckpt``,
    see ``src.train.main``). ``src.train`` raises :class:`RunInterruptedError` afterwards, so
    the process exits with 143 (SIGTERM) or 130 (SIGINT).

    On SLURM with Lightning's auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the
    default under ``srun``), the requeue signal (SIGUSR1) makes Lightning write
    ``hpc_ckpt_*.ckpt`` and requeue the job; this callback defers that to the end of the current
    training batch, so the requeued job resumes exactly too.

    Args:
        dirpath: where ``last.ckpt`` is written (the run's ``checkpoints/`` folder).
        filename: the checkpoint's file name.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        #: set after an interrupt: ``(signal name, checkpoint path or None)``.
        self.interrupted: tuple[str, str | None] | None = None
        self._requested: str | None = None  # "SIGINT" after a first Ctrl+C
        self._handlers: dict[int, Any] = {}  # signal -> the handler replaced during fit
        self._requeue: tuple[int, Any] | None = None  # a deferred SLURM requeue signal

    # ------------------------------------------------------------------ signal handlers
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._requested is not None:  # a second Ctrl+C: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self._requested = "SIGINT"
        log.warning(
            "SIGINT received: stopping after the current training batch and saving last.ckpt "
            "(press Ctrl+C again to stop at once, without saving)"
        )
        # Lightning's SIGTERM handler flags the trainer; its loops stop after this batch
        os.kill(os.getpid(), signal.SIGTERM)

    def _defer_requeue(self, signum: int, frame: FrameType | None) -> None:
        self._requeue = (signum, self._handlers[signum])
        log.warning("Signal %d (SLURM requeue): checkpointing after the current batch", signum)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the graceful SIGINT handler and defer Lightning's SLURM requeue handler."""
        self._requested = None
        if threading.current_thread() is not threading.main_thread():
            return
        self._handlers[signal.SIGINT] = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_sigint)
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
        requeue = getattr(env, "requeue_signal", None)
        if getattr(env, "auto_requeue", False) and requeue is not None:
            handler = signal.getsignal(requeue)
            if callable(handler):
                self._handlers[int(requeue)] = handler
                signal.signal(requeue, self._defer_requeue)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Run a deferred SLURM requeue handler (Lightning's: ``hpc_ckpt_*.ckpt``, requeue)."""
        if self._requeue is not None:
            signum, handler = self._requeue
            self._requeue = None
            handler(signum, None)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Put the replaced signal handlers back."""
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
        self._handlers = {}

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Save ``last.ckpt`` when the exception is a SIGTERM or a first Ctrl+C."""
        if isinstance(exception, SIGTERMException):
            name = self._requested or "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            # a second Ctrl+C, or one outside the training loop: the state may be mid-step
            log.error("SIGINT: stopped at once; %s was not written", self.dirpath / self.filename)
            self.interrupted = ("SIGINT", None)
            return
        else:
            return
        if not trainer.training and trainer.state.fn != "fit":
            return
        path = self.dirpath / self.filename
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the whole state
        except DivergedError as err:
            log.error("%s received; not saving the current state: %s", name, err)
            self.interrupted = (name, None)
            return
        self.interrupted = (name, str(path))
        if not trainer.is_global_zero:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        done = trainer.fit_loop.epoch_progress.current.completed
        batches = epoch_loop.batch_progress.current.completed
        where = f"{done} completed epochs"
        if 0 < batches < trainer.num_training_batches:
            where += f" and {batches} of {trainer.num_training_batches} batches of epoch {done}"
        sweep_dir = current_sweep_dir()
        command = resume_command(path) if sweep_dir is None else sweep_resume_command(sweep_dir)
        log.warning(
            "%s received after %s (global step %d): saved %s. Resume %s with: %s",
            name,
            where,
            trainer.global_step,
            path,
            "the run" if sweep_dir is None else "the whole sweep",
            command,
        )
