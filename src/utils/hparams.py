"""A run's hyper-parameters, final metrics and notes for TensorBoard (HParams and Text tabs).

:func:`user_hparams` picks what a user compares runs by: the run's command-line overrides and
the loss, mining, optimizer, scheduler and data knobs, plus ``run``, a readable name built from
the overrides (the anchor geometry and other constants stay out unless overridden).
:class:`src.callbacks.hparams.HParamsCallback` logs them; ``${run_name:RUN_DIR}`` names the
TensorBoard sub-folder of :class:`src.callbacks.hparams.RunTensorBoardLogger`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "flatten_config",
    "user_hparams",
    "run_name",
    "per_class_table",
    "run_dir_name",
    "FINAL_METRICS",
    "KNOB_PREFIXES",
]

#: metrics shown as columns of the HParams tab (the last logged value of each).
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
