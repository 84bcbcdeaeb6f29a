"""Lightning callback that reports a metric to an Optuna trial and prunes the run."""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

__all__ = ["OptunaPruningCallback", "connect_trial"]


def connect_trial(
    storage: str, study_name: str, number: int, pruner: optuna.pruners.BasePruner | None = None
) -> optuna.trial.Trial:
    """A handle on trial ``number`` of a stored study, usable from any process.

    Args:
        storage: the study's storage URL (``sqlite:///.../optuna.db``).
        study_name: the study's name.
        number: the trial's number in the study.
        pruner: the pruner ``should_prune`` asks; Optuna's default (median) when ``None``.

    Returns:
        The live ``optuna.trial.Trial``.

    Raises:
        KeyError: the study has no such trial.
    """
    store = optuna.storages.get_storage(storage)
    study = optuna.load_study(study_name=study_name, storage=store, pruner=pruner)
    study_id = store.get_study_id_from_name(study_name)
    trial_id = store.get_trial_id_from_study_id_trial_number(study_id, int(number))
    return optuna.trial.Trial(study, trial_id)


class OptunaPruningCallback(Callback):
    """Report ``monitor`` after each validation epoch to an Optuna trial; prune when told to.

    The trial is found through the storage URL, study name and trial number that the Optuna
    sweeper (:class:`src.search.sweeper.OptunaSweeper`) passes to each trial's job as
    ``optuna_trial.*`` overrides, so it works in the sweeper's process and in launcher
    processes (submitit) alike. When ``storage`` is null (a run outside a sweep) the callback
    does nothing. Only global rank 0 talks to the study; its decision is broadcast to all ranks,
    which all raise ``optuna.TrialPruned``, so the sweeper marks the trial PRUNED.

    Args:
        monitor: the logged metric to report (``val/mAP_50``).
        storage: the study's storage URL, or null outside a sweep.
        study_name: the study's name.
        trial_number: the trial's number.
        pruner: the pruner deciding (``optuna.pruners.MedianPruner`` by default).
    """

    def __init__(
        self,
        monitor: str,
        storage: str | None = None,
        study_name: str | None = None,
        trial_number: int | None = None,
        pruner: optuna.pruners.BasePruner | None = None,
    ) -> None:
        if storage and (study_name is None or trial_number is None):
            raise ValueError(
                "callbacks.optuna_pruning: storage is set, so study_name and trial_number "
                f"must be too (got study_name={study_name!r}, trial_number={trial_number!r})"
            )
        self.monitor = monitor
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.pruner = pruner if pruner is not None else optuna.pruners.MedianPruner()
        self._trial: optuna.trial.Trial | None = None

    @property
    def active(self) -> bool:
        """Whether this run belongs to a study (``storage`` set)."""
        return bool(self.storage)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Connect to the trial (global rank 0 only)."""
        if not self.active:
            log.info("callbacks.optuna_pruning: not an Optuna trial (no storage); pruning is off")
            return
        if trainer.is_global_zero:
            assert self.storage is not None and self.study_name is not None
            assert self.trial_number is not None
            self._trial = connect_trial(
                self.storage, self.study_name, self.trial_number, self.pruner
            )

    def _report(self, trainer: Trainer) -> tuple[bool, str]:
        """Report the metric (rank 0); return ``(prune?, message)``."""
        if self._trial is None:
            return False, ""
        value: Any = trainer.callback_metrics.get(self.monitor)
        if value is None:
            log.warning(
                "callbacks.optuna_pruning: %s was not logged this epoch (logged: %s); "
                "nothing reported",
                self.monitor,
                sorted(trainer.callback_metrics),
            )
            return False, ""
        value = float(value)
        epoch = int(trainer.current_epoch)
        if not math.isfinite(value):
            log.warning(
                "callbacks.optuna_pruning: %s=%s at epoch %d; not reported",
                self.monitor,
                value,
                epoch,
            )
            return False, ""
        self._trial.report(value, step=epoch)
        if self._trial.should_prune():
            return True, (
                f"trial {self.trial_number} pruned at epoch {epoch}: {self.monitor}={value:.4g} "
                f"({type(self.pruner).__name__})"
            )
        return False, ""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Report this epoch's value and raise ``optuna.TrialPruned`` when the pruner says so."""
        if not self.active or trainer.sanity_checking:
            return
        prune, message = self._report(trainer) if trainer.is_global_zero else (False, "")
        prune = bool(trainer.strategy.broadcast(prune, src=0))
        if prune:
            message = trainer.strategy.broadcast(message, src=0)
            raise optuna.TrialPruned(message)
