"""Training entry point: ``python -m src.train [overrides]``.

``train(cfg)`` does the work and is called by the Hydra ``main`` and by tests with configs built
by ``hydra.compose``. It returns the metrics (so sweepers can optimise them) and the objects.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: see src/utils/malloc.py
    from src.utils.malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from src.callbacks.anchor_coverage import AnchorCoverageCheck
from src.callbacks.console import StartSummaryCallback, end_summary
from src.callbacks.faults import InterruptCallback
from src.callbacks.hparams import HParamsCallback
from src.utils.checkpoint import CheckpointMismatchError, describe_model, load_run_config
from src.utils.config import (
    check_group_keys,
    check_optimizer,
    config_to_container,
    set_project_root,
)
from src.utils.console import task_overrides
from src.utils.errors import format_user_error, report_errors, user_error
from src.utils.faults import DivergedError, RunInterruptedError, read_status, write_status
from src.utils.hparams import user_hparams
from src.utils.instantiate import instantiate_callbacks, instantiate_loggers

log = logging.getLogger(__name__)

set_project_root()


def _write_config(container: dict[str, Any], run_dir: str) -> str | None:
    """Write the resolved run config to ``<run>/config.yaml`` (rank 0); return its path."""
    if rank_zero_only.rank != 0:
        return None
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
    return str(path)


def fill_from_datamodule(cfg: DictConfig, datamodule: Any) -> None:
    """Fill the class count and names that the data decide, where the config leaves them null.

    ``model.net.num_classes`` becomes ``datamodule.num_classes``; ``model.class_names`` (and the
    VOC metric's) become ``datamodule.classes``; ``category_ids`` becomes
    ``datamodule.category_ids`` (each label's id in COCO results files). They travel with the
    run config into checkpoints, so ``src.eval`` and ``src.predict`` label boxes and per-class
    tables without the data.

    Raises:
        ValueError: ``model.net.num_classes`` was set by hand and differs from the data's.
    """
    names = list(getattr(datamodule, "classes", []) or []) or None
    count = getattr(datamodule, "num_classes", None)
    if count is None and names is not None:
        count = len(names)
    with open_dict(cfg):
        net = cfg.model.net
        if net.get("num_classes") is None:
            if count is None:
                raise ValueError(
                    f"{type(datamodule).__name__} does not say how many classes it has; set "
                    "model.net.num_classes=N"
                )
            net.num_classes = int(count)
        elif count is not None and int(net.num_classes) != int(count):
            raise ValueError(
                f"model.net.num_classes={net.num_classes} but the data have {count} classes "
                f"({names}); drop the model.net.num_classes override: the count comes from the data"
            )
        ids = getattr(datamodule, "category_ids", None)
        if ids and cfg.get("category_ids") is None:  # for COCO results files (src.predict)
            cfg.category_ids = [int(i) for i in ids]
        if names is None:
            return
        if cfg.model.get("class_names") is None:
            cfg.model.class_names = names
        voc = cfg.model.get("voc_metric")
        if voc is not None and voc.get("class_names") is None:
            voc.class_names = names


def check_resume(cfg: DictConfig, ckpt_path: str, run_config: DictConfig | None = None) -> None:
    """Fail early, in one sentence, when ``ckpt_path`` holds another network than ``cfg``.

    Args:
        cfg: this run's config (``model.net.num_classes`` already filled from the data).
        ckpt_path: the checkpoint to resume from.
        run_config: its run config when already read (:func:`load_run_config`).

    Raises:
        FileNotFoundError, NotACheckpointError: not a checkpoint of ``src.train`` (see
            :func:`load_run_config`).
        CheckpointMismatchError: another backbone, class count or input size.
    """
    if run_config is None:
        run_config, _ = load_run_config(ckpt_path)
    keys = ("backbone.name", "model.net.num_classes", "backbone.image_size")
    theirs = [OmegaConf.select(run_config, k, default=None) for k in keys]
    ours = [OmegaConf.select(cfg, k, default=None) for k in keys]
    if theirs != ours:
        raise CheckpointMismatchError(
            f"ckpt_path={ckpt_path} cannot be resumed by this run: checkpoint: "
            f"{describe_model(run_config)}; this run: {describe_model(cfg)}. Resume with the "
            "original run's overrides (its .hydra/overrides.yaml), or start a new run with "
            "model.init_from=... on the matching backbone"
        )


def resume_in_place(cfg: DictConfig) -> dict[str, float] | None:
    """Pick up an earlier attempt of this run in its own folder (``paths.output_dir``).

    A job of a multirun or Optuna search resumed with ``hydra.sweep.dir=<dir>`` runs in the
    folder of its first attempt (``<dir>/<job number>``), as does a run started again with the
    same ``hydra.run.dir``. For a training run without ``ckpt_path``:

    * ``status.json`` says ``ok``: the run is not trained again; its recorded metrics are
      returned (a resumed sweep skips its finished jobs);
    * ``checkpoints/last.ckpt`` exists: ``cfg.ckpt_path`` is set to it, so the run resumes
      exactly where it stopped instead of overwriting its checkpoints with a fresh start.

    Args:
        cfg: the run's config (``ckpt_path`` may be set here).

    Returns:
        The finished run's metrics, or ``None`` when the run is to be trained.
    """
    if not cfg.get("train", True) or cfg.get("ckpt_path"):
        return None
    run_dir = Path(str(cfg.paths.output_dir))
    status = read_status(run_dir)
    if status is not None and status.get("status") == "ok":
        metrics = {str(k): float(v) for k, v in (status.get("metrics") or {}).items()}
        log.info("%s finished earlier (status.json: ok): not training it again", run_dir)
        return metrics
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.warning("%s holds an earlier attempt of this run: resuming from %s", run_dir, last)
        with open_dict(cfg):
            cfg.ckpt_path = str(last)
    return None


def _best_checkpoint(callbacks: list[Callback]) -> ModelCheckpoint | None:
    """The checkpoint callback that monitors a metric (``best.ckpt``), if any."""
    monitored = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    return monitored[0] if monitored else None


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Train (and optionally test) the model described by ``cfg``.

    Args:
        cfg: the composed config (``conf/train.yaml``).

    Returns:
        ``(metrics, objects)``: final logged metrics as floats, and the built ``cfg``,
        ``datamodule``, ``model``, ``trainer``, ``callbacks`` and ``loggers``, with
        ``summary`` (the end-of-run summary logged on rank 0, see
        :func:`src.utils.console.end_summary`). The resolved config is written to
        ``<run>/config.yaml``.

    Raises:
        DivergedError: the loss, the weights, or the outputs or metrics of a validation (the
            sanity check included) became non-finite (nothing non-finite is saved).
        RunInterruptedError: SIGTERM or SIGINT stopped training (``last.ckpt`` was saved).
        CheckpointMismatchError: ``ckpt_path`` holds another network.
        NotACheckpointError: ``ckpt_path`` is not a checkpoint written by ``src.train``
            (checked before anything is built).
        ValueError: a setting the chosen config group ignores, an optimiser or scheduler value
            out of range, and other bad settings.
    """
    check_group_keys(cfg)
    check_optimizer(cfg)
    ckpt_path = cfg.get("ckpt_path")
    # read before Lightning touches the file: a file that is not a checkpoint is one sentence
    resumed = load_run_config(str(ckpt_path))[0] if ckpt_path else None
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)

    log.debug("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    if ckpt_path:
        check_resume(cfg, str(ckpt_path), resumed)

    log.debug("Instantiating model <%s>", cfg.model._target_)
    model = instantiate(cfg.model)
    container = config_to_container(cfg)
    model.run_config = container
    run_dir = str(cfg.paths.output_dir)
    config_path = _write_config(container, run_dir)
    overrides = task_overrides(run_dir)

    callbacks: list[Callback] = instantiate_callbacks(cfg.get("callbacks"))
    callbacks.append(StartSummaryCallback(overrides, run_dir, config_path))
    callbacks.append(AnchorCoverageCheck(overrides))  # WARNING below 90% at fit start
    loggers = instantiate_loggers(cfg.get("logger"))
    if loggers:
        callbacks.append(HParamsCallback(user_hparams(container, overrides), overrides))

    log.debug("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    objects = {
        "cfg": cfg,
        "datamodule": datamodule,
        "model": model,
        "trainer": trainer,
        "callbacks": callbacks,
        "loggers": loggers,
    }

    if cfg.get("train", True):
        log.debug("Starting training")
        try:
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except (SystemExit, KeyboardInterrupt) as err:
            stopped = [c.interrupted for c in callbacks if isinstance(c, InterruptCallback)]
            if stopped and stopped[0] is not None:
                raise RunInterruptedError(*stopped[0]) from err
            raise
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test", False):
        best = _best_checkpoint(callbacks)
        ckpt = best.best_model_path if best is not None and cfg.get("train", True) else ""
        ckpt = ckpt or (str(ckpt_path) if ckpt_path else "")
        if not ckpt:
            log.warning(
                "No checkpoint to test (train=false and no ckpt_path); testing the initial weights"
            )
        trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    if trainer.is_global_zero:
        objects["summary"] = end_summary(run_dir, callbacks, metrics)
        log.info("Run summary:\n%s", objects["summary"])
    return metrics, objects


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
@report_errors
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers (e.g. Optuna).

    The run's outcome goes to ``<run>/status.json`` (read by ``src.report``). A diverged or
    failed run exits with status 1: the project's own errors (bad settings, data or files) as
    one line, bugs with their traceback (:func:`src.utils.errors.report_errors`); a multirun
    records the job as failed. A run stopped by SIGTERM or SIGINT exits with 143 or 130 after
    saving ``last.ckpt``.
    """
    run_dir = cfg.paths.output_dir
    finished = resume_in_place(cfg)  # a resumed sweep's finished or interrupted job
    try:
        metrics = finished if finished is not None else train(cfg)[0]
    except DivergedError as err:
        write_status(
            run_dir,
            "diverged",
            message=str(err),
            step=err.step,
            terms=err.terms,
            seen_in=err.seen_in,
        )
        raise
    except RunInterruptedError as err:
        write_status(run_dir, "interrupted", signal=err.signal_name, checkpoint=err.ckpt_path)
        log.error("%s", err)
        raise SystemExit(err.exit_code) from err
    except Exception as err:
        # a trial that an Optuna pruner stopped (optuna.TrialPruned) is not a failure
        state = "pruned" if type(err).__name__ == "TrialPruned" else "failed"
        found = user_error(err) or err  # the user's error under Hydra's InstantiationException
        write_status(run_dir, state, message=f"{type(found).__name__}: {format_user_error(found)}")
        raise
    write_status(run_dir, "ok", metrics=metrics)
    name = cfg.get("optimized_metric")
    if not name or not cfg.get("train", True):
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}"
        )
    return metrics[name]


if __name__ == "__main__":
    main()
