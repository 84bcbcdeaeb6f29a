"""A run's hyper-parameters, final metrics and notes for TensorBoard (HParams and Text tabs).

:func:`user_hparams` picks what a user compares runs by: the run's command-line overrides and
the loss, mining, optimizer, scheduler and data knobs, plus ``run``, a readable name built from
the overrides (the anchor geometry and other constants stay out unless overridden).
:class:`HParamsCallback` logs them once at fit start and, at the end of fit, the last value of
each metric in :data:`FINAL_METRICS` under ``final/``, the metric columns of the HParams tab.
Nothing is logged as a placeholder: a run stopped before the end has blank columns, never NaN.

The overridden keys are flagged as ``differs`` in the HParams experiment, so TensorBoard lists
them first and shows them by default. :class:`RunTensorBoardLogger` writes into a sub-folder named
by the overrides (``${run_name:${paths.output_dir}}`` in ``conf/logger/tensorboard.yaml``), which
makes TensorBoard's run names (and the HParams trial ids) readable, and leaves out Lightning's
``epoch`` scalar (the step axis already orders everything).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "flatten_config",
    "user_hparams",
    "run_name",
    "per_class_table",
    "HParamsCallback",
    "RunTensorBoardLogger",
    "run_dir_name",
    "FINAL_METRICS",
    "KNOB_PREFIXES",
]

#: metrics reported under ``final/`` at the end of fit, shown as columns of the HParams tab.
FINAL_METRICS = (
    "val/mAP_50",
    "val/mAP",
    "val/voc_mAP_50",
    "val/loss",
    "train/loss_epoch",
)

#: config keys (prefixes) that are hyper-parameters whether overridden or not.
KNOB_PREFIXES = (
    "loss.",
    "mining.",
    "model.optimizer.",
    "model.scheduler.",
    "model.scheduler_interval",
    "data.batch_size",
    "data.augment",
    "data.source",
    "backbone.name",
    "trainer.max_epochs",
    "seed",
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


def run_name(overrides: Sequence[str], max_len: int = 120) -> str:
    """A readable run name from its overrides: ``loss=smooth_l1 loss.sigma=0.5`` (or ``defaults``).

    Paths (``paths.*``, ``data.root``, ``ckpt_path``) are left out; the name is cut at
    ``max_len`` characters.
    """
    skip = ("paths.", "hydra.", "data.root", "data.data_dir", "ckpt_path", "optuna_trial.")
    kept = [o for o in overrides if not o.lstrip("+~").startswith(skip)]
    name = " ".join(kept) or "defaults"
    return name if len(name) <= max_len else name[: max_len - 3] + "..."


def run_dir_name(run_dir: str | None = None, max_len: int = 100) -> str:
    """A folder name from the run's overrides: ``loss=smooth_l1,loss.sigma=0.5`` (or ``defaults``).

    The ``run_name`` OmegaConf resolver: ``${run_name:${paths.output_dir}}``. The overrides come
    from Hydra, else from ``<run_dir>/.hydra/overrides.yaml`` (see
    :func:`src.utils.console.task_overrides`); ``/`` and spaces become ``_`` and ``,``.
    """
    from src.utils.console import task_overrides

    name = run_name(task_overrides(run_dir), max_len=10_000)
    name = name.replace("/", "_").replace(" ", ",")
    return name if len(name) <= max_len else name[: max_len - 3] + "..."


if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", run_dir_name)


def user_hparams(container: Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The hyper-parameters a user compares runs by.

    Args:
        container: the resolved run config (plain dict).
        overrides: the run's command-line overrides (``key=value``).

    Returns:
        ``{"run": run_name(overrides), key: value}`` for every overridden key (its resolved
        value; a group override such as ``loss=focal`` gives ``loss.name``) and every key under
        :data:`KNOB_PREFIXES`, without ``_target_`` wiring and built sub-modules.
    """
    skip = {"paths", "hydra", "callbacks", "logger", "extras"}
    flat = flatten_config({k: v for k, v in container.items() if k not in skip})
    params: dict[str, Any] = {"run": run_name(overrides)}
    for key, value in flat.items():
        if key.endswith(("_target_", "_partial_")) or ".module." in key or key.endswith(".module"):
            continue
        if key.startswith(KNOB_PREFIXES):
            params[key] = value
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if not sep or key.startswith(("hydra.", "paths.")):
            continue
        if key in flat:
            params[key] = flat[key]
        elif f"{key}.name" in flat:  # a group choice such as loss=focal
            params[f"{key}.name"] = flat[f"{key}.name"]
        elif not any(k.startswith(f"{key}.") for k in flat):
            params[key] = value
    return params


def per_class_table(names: Sequence[str], aps: Sequence[float], mean_ap: float) -> str:
    """A Markdown table of per-class AP (nan: no non-difficult ground truth) and the mean."""
    rows = ["| class | AP@0.5 |", "| --- | ---: |"]
    rows += [
        f"| {n} | {'n/a' if ap != ap else f'{ap:.4f}'} |" for n, ap in zip(names, aps, strict=True)
    ]
    rows.append(f"| **mean** | **{mean_ap:.4f}** |")
    return "\n".join(rows)


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
