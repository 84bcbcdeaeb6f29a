"""TensorBoard's HParams and Text tabs for a run, and a TensorBoard logger with readable run names.

:class:`HParamsCallback` logs the hyper-parameters picked by :func:`src.utils.hparams.user_hparams`
once at fit start and, at the end of fit, the last value of each metric in
:data:`~src.utils.hparams.FINAL_METRICS` under ``final/``, the metric columns of the HParams tab.
Nothing is logged as a placeholder: a run stopped before the end has blank columns, never NaN.

:class:`RunTensorBoardLogger` writes into a sub-folder named by the overrides
(``${run_name:${paths.output_dir}}`` in ``conf/logger/tensorboard.yaml``) and leaves out
Lightning's ``epoch`` scalar (the step axis already orders everything).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from src.utils.hparams import FINAL_METRICS, flatten_config, per_class_table

log = logging.getLogger(__name__)


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` without the ``epoch`` scalar Lightning adds to every log.

    Same arguments as :class:`~lightning.pytorch.loggers.TensorBoardLogger`.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log every metric except ``epoch``."""
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


def _hparams_summaries(params: Mapping[str, Any], columns: Mapping[str, float], varied: set[str]):
    """TensorBoard's HParams summaries, the ``varied`` keys flagged ``differs`` (shown first)."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, sei = hparams(dict(params), dict(columns))
    value = exp.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in varied
    value.metadata.plugin_data.content = data.SerializeToString()
    return exp, ssi, sei


class HParamsCallback(Callback):
    """Log hyper-parameters, final metrics and notes once per run to every logger.

    * Fit start (after ``prepare_data`` and ``setup``): the hyper-parameters plus the
      datamodule's own ``hparams`` (for example the resolved banana ``source``); in TensorBoard
      the HParams tab's session with :data:`FINAL_METRICS` as its metric columns, and the
      overrides in the Text tab (``run/overrides``).
    * Fit end: the last value of each metric in :data:`FINAL_METRICS` as ``final/<name>`` (only
      metrics that were logged and are finite), and the per-class VOC AP@0.5 table of the last
      validation in the Text tab (``val/per_class_AP50``).

    Args:
        params: flat hyper-parameters (see :func:`user_hparams`).
        overrides: the run's command-line overrides (for the Text tab).
    """

    def __init__(self, params: Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
        self.params = {k: v for k, v in params.items() if not k.endswith("_target_")}
        self.overrides = list(overrides)

    @staticmethod
    def _final_key(name: str) -> str:
        return "final/" + name.replace("/", "_")

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the hyper-parameters (with the datamodule's resolved values) and the overrides."""
        params = dict(self.params)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            data = flatten_config(dict(datamodule.hparams), prefix="datamodule.")
            params.update({k: v for k, v in data.items() if k.endswith("resolved_source")})
        columns = {self._final_key(m): 0.0 for m in FINAL_METRICS}
        overrides = "\n".join(f"    {o}" for o in self.overrides) or "    (none: the defaults)"
        keys = {o.lstrip("+~").partition("=")[0] for o in self.overrides}
        varied = {"run"} | {k for k in params if k in keys or k.removesuffix(".name") in keys}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                # the HParams session: its metric columns are the final/ scalars written at the
                # end, so no value (and no NaN placeholder) is logged now
                writer = logger.experiment._get_file_writer()
                for summary in _hparams_summaries(params, columns, varied):
                    writer.add_summary(summary)
                logger.experiment.add_text(
                    "run/overrides",
                    f"`{params['run']}`\n\n" + overrides if "run" in params else overrides,
                    0,
                )

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the final metrics under ``final/`` and the per-class AP table."""
        final = {}
        for name in FINAL_METRICS:
            if name in trainer.callback_metrics:
                value = float(trainer.callback_metrics[name])
                if math.isfinite(value):
                    final[self._final_key(name)] = value
        table = self._per_class_table(pl_module)
        for logger in trainer.loggers:
            if final:
                logger.log_metrics(final, step=trainer.global_step)
            if table is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/per_class_AP50", table, trainer.global_step)
            logger.save()

    @staticmethod
    def _per_class_table(pl_module: LightningModule) -> str | None:
        results = getattr(pl_module, "voc_results", {}).get("val")
        if results is None:
            return None
        aps = results["ap_per_class"].reshape(-1).tolist()
        names = list(getattr(pl_module, "class_names", None) or [str(c) for c in range(len(aps))])
        if len(names) != len(aps):
            names = [str(c) for c in range(len(aps))]
        return per_class_table(names, aps, float(results["map"]))
