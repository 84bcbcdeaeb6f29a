"""A quiet console: a two-metric progress bar, a short start summary and an end-of-run summary.

* :class:`MetricsProgressBar`: Lightning's Rich bar showing only chosen metrics under short names
  (``loss`` and ``val/mAP_50`` by default); every metric still goes to the loggers.
* :class:`StartSummaryCallback`: at fit start, after the data are prepared, logs the run's
  overrides, its folder, the data source and the model size, one line each.
* :func:`end_summary`: the run folder, ``best.ckpt`` with its epoch and ``val/mAP_50``,
  ``last.ckpt``, the final metrics and the ``src.eval`` / ``src.predict`` / ``make tensorboard``
  commands for the run.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only

from src.utils.console import SUMMARY_METRICS, data_line, quote_path

log = logging.getLogger(__name__)


class MetricsProgressBar(RichProgressBar):
    """Lightning's Rich progress bar showing only the chosen metrics, under short names.

    Args:
        metrics: ``{label: logged metric key}``, e.g. ``{"loss": "train/loss_step",
            "val/mAP_50": "val/mAP_50"}``; a metric not logged yet is left out.
        **kwargs: passed to :class:`~lightning.pytorch.callbacks.RichProgressBar`
            (``refresh_rate``, ``leave``, ``theme``, ``console_kwargs``).
    """

    def __init__(self, metrics: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        chosen = {"loss": "train/loss_step", "val/mAP_50": "val/mAP_50"}
        self.metrics = dict(metrics) if metrics is not None else chosen

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """The chosen metrics, with 4 decimals."""
        values = {**trainer.callback_metrics, **trainer.progress_bar_metrics}
        shown: dict[str, Any] = {}
        for label, key in self.metrics.items():
            if key in values:
                value = float(values[key])
                shown[label] = f"{value:.4f}"
        return shown


def model_line(pl_module: LightningModule) -> str:
    """``SSD (TinyBackbone), 1 class, 1,010,376 parameters, 4.0 MB``."""
    params = sum(p.numel() for p in pl_module.parameters())
    trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    size_mb = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 1e6
    net = getattr(pl_module, "net", pl_module)
    parts = [type(net).__name__]
    backbone = getattr(net, "backbone", None)
    if backbone is not None:
        parts[0] += f" ({type(backbone).__name__})"
    count = getattr(net, "num_classes", None)
    if count is not None:
        parts.append(f"{count} class{'' if count == 1 else 'es'}")
    text = f"{params:,} parameters"
    if trainable != params:
        text += f" ({trainable:,} trainable)"
    parts.append(f"{text}, {size_mb:.1f} MB")
    return ", ".join(parts)


class StartSummaryCallback(Callback):
    """Log the run's overrides, folder, data source and model size when fit starts.

    Runs after ``prepare_data`` and ``setup``, so the data source is the resolved one (for
    bananas ``data.source=auto`` becomes ``real`` or ``synthetic``).

    Args:
        overrides: the command-line overrides (see :func:`task_overrides`).
        run_dir: the run folder.
        config_path: where the full resolved config was written.
    """

    def __init__(
        self, overrides: Sequence[str], run_dir: str | os.PathLike, config_path: str | None = None
    ) -> None:
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.config_path = config_path
        self.lines: list[str] = []

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the four lines."""
        shown = " ".join(shlex.quote(o) for o in self.overrides) or "none (the defaults)"
        self.lines = [
            f"Overrides: {shown}",
            f"Run folder: {quote_path(self.run_dir)}"
            + (f" (full config: {quote_path(self.config_path)})" if self.config_path else ""),
        ]
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            self.lines.append(f"Data: {data_line(datamodule)}")
        self.lines.append(f"Model: {model_line(pl_module)}")
        for line in self.lines:
            log.info("%s", line)


def _ckpt_info(callback: ModelCheckpoint | None) -> tuple[str | None, int | None, float | None]:
    """``(path, epoch, score)`` of a checkpoint callback's file (None where unknown)."""
    if callback is None:
        return None, None, None
    path = callback.best_model_path or callback.last_model_path or None
    score = callback.best_model_score
    epoch = None
    if path and Path(path).is_file():
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            epoch = int(data.get("epoch")) if data.get("epoch") is not None else None
        except Exception as err:  # noqa: BLE001 - the summary must not fail a finished run
            log.debug("cannot read the epoch of %s: %s", path, err)
    return path, epoch, float(score) if score is not None else None


def end_summary(
    run_dir: str | os.PathLike,
    callbacks: Sequence[Callback],
    metrics: Mapping[str, float],
    monitor: str = "val/mAP_50",
) -> str:
    """The end-of-run summary: run folder, checkpoints, final metrics and follow-up commands.

    Args:
        run_dir: the run folder.
        callbacks: the run's callbacks; the ``ModelCheckpoint`` with a monitor is ``best.ckpt``,
            one without is ``last.ckpt``.
        metrics: the final metrics (``train``'s return value).
        monitor: the name of the best checkpoint's score.

    Returns:
        Lines of text (no trailing newline).
    """
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    best_cb = next((c for c in checkpoints if c.monitor), None)
    last_cb = next((c for c in checkpoints if not c.monitor), None)
    best, epoch, score = _ckpt_info(best_cb)
    last = last_cb.last_model_path or last_cb.best_model_path if last_cb is not None else None
    lines = [f"Run folder: {quote_path(run_dir)}"]
    if best:
        details = [f"epoch {epoch}" if epoch is not None else None]
        if score is not None:
            details.append(f"{best_cb.monitor if best_cb else monitor} {score:.4f}")
        shown = ", ".join(d for d in details if d)
        lines.append(f"Best checkpoint: {quote_path(best)}" + (f" ({shown})" if shown else ""))
    else:
        lines.append("Best checkpoint: none written (no validation ran)")
    if last:
        lines.append(f"Last checkpoint: {quote_path(last)}")
    final = [
        f"{name} {metrics[name]:.4f}"
        for name in SUMMARY_METRICS
        if name in metrics and math.isfinite(metrics[name])
    ]
    if final:
        lines.append("Final metrics: " + ", ".join(final))
    ckpt = best or last
    if ckpt:
        lines.append(f"Evaluate:  python -m src.eval ckpt_path={quote_path(ckpt)}")
        lines.append(
            f"Predict:   python -m src.predict ckpt_path={quote_path(ckpt)} image=<file or folder>"
        )
    lines.append(f"Dashboard: make tensorboard LOGDIR={quote_path(run_dir)}")
    return "\n".join(lines)
