"""Log a run's hyper-parameters with its final metrics (TensorBoard's HParams tab)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

__all__ = ["flatten_config", "HParamsCallback", "FINAL_METRICS"]

#: metrics reported under ``final/`` at the end of fit, shown as columns of the HParams tab.
FINAL_METRICS = (
    "val/mAP_50",
    "val/mAP",
    "val/loss",
    "val/class_err",
    "val/bbox_mae",
    "train/loss_epoch",
    "train/class_err",
    "train/bbox_mae",
)


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested config into ``{"a.b.c": scalar}``; lists become strings.

    Args:
        cfg: a plain (resolved) mapping.
        prefix: prepended to every key.

    Returns:
        A flat dict of str, int, float, bool values (None becomes ``"null"``).
    """
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, Sequence):
            flat[name] = str(list(value))
        else:
            flat[name] = str(value)
    return flat


class HParamsCallback(Callback):
    """Log hyper-parameters once per run, with the final metrics, to every logger.

    The hyper-parameters are the run's config (flattened, without ``_target_`` wiring), plus the
    datamodule's own ``hparams`` (for example the resolved banana ``source``), logged at fit start,
    after ``prepare_data`` and ``setup``. At the end of fit, the last value of each metric in
    :data:`FINAL_METRICS` is logged as ``final/<name>``, the columns of TensorBoard's HParams tab.

    Args:
        params: flat hyper-parameters (see :func:`flatten_config`).
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = {k: v for k, v in params.items() if not k.endswith("_target_")}

    @staticmethod
    def _final_key(name: str) -> str:
        return "final/" + name.replace("/", "_")

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the hyper-parameters (with the datamodule's resolved values)."""
        params = dict(self.params)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            params.update(flatten_config(dict(datamodule.hparams), prefix="datamodule."))
        placeholders = {self._final_key(m): math.nan for m in FINAL_METRICS}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # declares the HParams tab's metric columns
                logger.log_hyperparams(params, metrics=placeholders)
            else:
                logger.log_hyperparams(params)

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the final metrics under ``final/``."""
        final = {
            self._final_key(m): float(trainer.callback_metrics[m])
            for m in FINAL_METRICS
            if m in trainer.callback_metrics
        }
        if not final:
            return
        for logger in trainer.loggers:
            logger.log_metrics(final, step=trainer.global_step)
            logger.save()
