"""TensorBoard's HParams and Text tabs for a run, and a TensorBoard logger that orders the charts.

TensorBoard sorts its charts by tag, groups them by the part before the first ``/`` and opens only
the first two groups (Time Series and Scalars alike). :class:`RunTensorBoardLogger` therefore
writes the headline curves under two groups that sort first, with the metric key kept whole after
the group name (:func:`tensorboard_tag`):

* ``loss/train/loss_epoch`` and ``loss/val/loss``: the training and validation loss;
* ``mAP/val/mAP``, ``mAP/val/mAP_50``, ``mAP/val/mAP_75``, ``mAP/val/voc_mAP_50``.

Every other metric keeps its key as its tag (``train/...``, ``val/...`` groups below, closed),
and the learning rate (``lr-SGD`` from ``LearningRateMonitor``) joins ``train/``. Other loggers
(CSV, MLflow, ...) get the keys unchanged. The logger writes into a sub-folder named by the
overrides (``${run_name:${paths.output_dir}}`` in ``conf/logger/tensorboard.yaml``) and leaves out
Lightning's ``epoch`` scalar (the step axis already orders everything).

:class:`HParamsCallback` logs the hyper-parameters picked by :func:`src.utils.hparams.user_hparams`
once at fit start, with the resolved data source and the anchor set; the metric columns of the
HParams tab are the last values of :data:`METRIC_COLUMNS` read from the curves themselves, so no
one-point chart is written. The session is closed at the end of fit (status *Success*) or when
fit stops on an exception (*Failure*; an interrupted run keeps the columns of its last
validation).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from src.utils.hparams import FINAL_METRICS, flatten_config, per_class_table

log = logging.getLogger(__name__)

__all__ = [
    "HEADLINE_GROUPS",
    "METRIC_COLUMNS",
    "HParamsCallback",
    "RunTensorBoardLogger",
    "tensorboard_tag",
]

#: metric key -> the TensorBoard group written in front of it; these groups sort before
#: ``train`` and ``val``, so TensorBoard opens on them.
HEADLINE_GROUPS: dict[str, str] = {
    "train/loss_epoch": "loss",
    "val/loss": "loss",
    "val/mAP": "mAP",
    "val/mAP_50": "mAP",
    "val/mAP_75": "mAP",
    "val/voc_mAP_50": "mAP",
}

#: the metric columns of the HParams tab (the last logged value of each).
METRIC_COLUMNS: tuple[str, ...] = (*FINAL_METRICS, "val/F1", "val/f1_threshold")

#: TensorBoard's HParams tab ticks (shows as columns) the first five hyper-parameters flagged
#: ``differs``, in alphabetical order; at most this many are flagged, so all of them show.
_SHOWN = 5


def tensorboard_tag(key: str) -> str:
    """The TensorBoard tag of a logged metric key.

    ``val/mAP_50`` -> ``mAP/val/mAP_50`` (a :data:`HEADLINE_GROUPS` key), ``lr-SGD`` ->
    ``train/lr-SGD``, any other key unchanged.
    """
    group = HEADLINE_GROUPS.get(key)
    if group is not None:
        return f"{group}/{key}"
    if key.startswith("lr-"):
        return f"train/{key}"
    return key


class RunTensorBoardLogger(TensorBoardLogger):
    """Lightning's ``TensorBoardLogger``: tags by :func:`tensorboard_tag`, no ``epoch`` scalar.

    Same arguments as :class:`~lightning.pytorch.loggers.TensorBoardLogger`.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log every metric except ``epoch``, under its :func:`tensorboard_tag`."""
        super().log_metrics(
            {tensorboard_tag(k): v for k, v in metrics.items() if k != "epoch"}, step
        )


def _plugin_summary(tag: str, data: Any) -> Any:
    """A ``Summary`` holding HParams plugin data (``HParamsPluginData``) under ``tag``."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata

    data.version = metadata.PLUGIN_DATA_VERSION
    meta = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString()
        )
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def _hparams_summaries(
    params: Mapping[str, Any], columns: Mapping[str, str], shown: set[str]
) -> tuple[Any, Any]:
    """The HParams experiment and session-start summaries.

    Args:
        params: the hyper-parameters, in the order the table lists them.
        columns: metric column tag -> its display name (the metric key).
        shown: keys flagged ``differs``: TensorBoard lists them first and ticks the first five.

    Returns:
        ``(experiment, session_start)`` ``Summary`` protos.
    """
    from tensorboard.plugins.hparams import plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams

    exp, ssi, _ = hparams(dict(params), dict.fromkeys(columns, 0.0))
    value = exp.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in shown
    for info in data.experiment.metric_infos:
        info.display_name = columns[info.name.tag]
    value.metadata.plugin_data.content = data.SerializeToString()
    return exp, ssi


def _session_end(status: str) -> Any:
    """The HParams session-end summary with ``status`` (``STATUS_SUCCESS``, ...)."""
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(
        status=api_pb2.Status.Value(status), end_time_secs=time.time()
    )
    return _plugin_summary(
        metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(session_end_info=info)
    )


class HParamsCallback(Callback):
    """Log hyper-parameters, the HParams session and notes once per run to every logger.

    * Fit start (after ``prepare_data`` and ``setup``): the hyper-parameters, among them ``run``
      (the overrides), ``datamodule.resolved_source`` (the data actually used, e.g.
      ``synthetic`` for ``data.source=auto`` without the real bananas) and
      ``backbone.anchor_set`` (the backbone option, e.g. ``tiny_small_anchors``, whose net is
      ``backbone.name=tiny``). These three and the first overridden keys, five in all, are
      flagged ``differs``: TensorBoard lists them first and shows them as the table's columns
      (the others can be ticked; ``run`` names every override). In TensorBoard, the HParams
      session with :data:`METRIC_COLUMNS` as metric columns (read from the curves'
      :func:`tensorboard_tag` tags, shown under their metric keys) and the overrides in the Text
      tab (``run/overrides``).
    * Fit end: the per-class VOC AP@0.5 table of the last validation in the Text tab
      (``val/per_class_AP50``) and the session closed with status *Success*; on an exception
      the session is closed with status *Failure*.

    Args:
        params: flat hyper-parameters (see :func:`src.utils.hparams.user_hparams`).
        overrides: the run's command-line overrides (for the Text tab).
    """

    def __init__(self, params: Mapping[str, Any], overrides: Sequence[str] = ()) -> None:
        self.params = {k: v for k, v in params.items() if not k.endswith("_target_")}
        self.overrides = list(overrides)
        self._open = False

    @staticmethod
    def _leading(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        """``datamodule.resolved_source`` and ``backbone.anchor_set``, where known."""
        lead: dict[str, Any] = {}
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            data = flatten_config(dict(datamodule.hparams), prefix="datamodule.")
            lead.update({k: v for k, v in data.items() if k.endswith("resolved_source")})
        run_config = getattr(pl_module, "run_config", None)
        if run_config is not None:
            anchor_set = OmegaConf.select(
                OmegaConf.create(run_config), "backbone.anchor_set", default=None
            )
            if anchor_set is not None:
                lead["backbone.anchor_set"] = str(anchor_set)
        return lead

    def _overridden(self, params: Mapping[str, Any]) -> list[str]:
        """The keys of ``params`` set on the command line, in the order they were given.

        A group choice such as ``loss=smooth_l1`` gives its ``loss.name``.
        """
        out: list[str] = []
        for item in self.overrides:
            key = item.lstrip("+~").partition("=")[0]
            for name in (key, f"{key}.name"):
                if name in params and name not in out:
                    out.append(name)
        return out

    @rank_zero_only
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the hyper-parameters (with the data source and anchor set) and the overrides."""
        lead = self._leading(trainer, pl_module)
        params = {k: v for k, v in self.params.items() if k == "run"}
        params.update(lead)
        params.update({k: v for k, v in self.params.items() if k not in params})
        overrides = "\n".join(f"    {o}" for o in self.overrides) or "    (none: the defaults)"
        shown = {"run", *lead, *self._overridden(params)[: _SHOWN - 1 - len(lead)]}
        columns = {tensorboard_tag(m): m for m in METRIC_COLUMNS}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, TensorBoardLogger):
                # the metric columns read the curves' own tags: no value is logged here
                writer = logger.experiment._get_file_writer()
                for summary in _hparams_summaries(params, columns, shown):
                    writer.add_summary(summary)
                logger.experiment.add_text(
                    "run/overrides",
                    f"`{params['run']}`\n\n" + overrides if "run" in params else overrides,
                    0,
                )
                self._open = True

    def _close(self, trainer: Trainer, status: str) -> None:
        if not self._open:
            return
        self._open = False
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment._get_file_writer().add_summary(_session_end(status))
                logger.experiment.flush()

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Log the per-class AP table and close the HParams session (*Success*)."""
        table = self._per_class_table(pl_module)
        for logger in trainer.loggers:
            if table is not None and isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("val/per_class_AP50", table, trainer.global_step)
            logger.save()
        self._close(trainer, "STATUS_SUCCESS")

    @rank_zero_only
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Close the HParams session with status *Failure* (diverged, interrupted, crashed)."""
        self._close(trainer, "STATUS_FAILURE")

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
