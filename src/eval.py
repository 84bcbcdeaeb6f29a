"""Evaluation entry point: ``python -m src.eval ckpt_path=PATH [split=val|test]``.

Writes, in the run folder, ``detections.json`` (every detection in the COCO results format:
original image and category ids, ``[x, y, w, h]`` pixels) and ``per_class_ap_<split>.md``. The
loggers get the metrics as ``eval/<name>`` (``eval/mAP_50``, ...) at the checkpoint's global step,
so they line up with the training curves; TensorBoard's Text tab gets the checkpoint, the split
and the per-class table (``eval/per_class_AP50``).

The network is rebuilt from the config stored in the checkpoint, so no training overrides need to
be repeated; the data come from the checkpoint too unless a ``data`` group is selected.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: see src/utils/malloc.py
    from src.utils.malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from src.callbacks.results import CocoResultsCallback
from src.utils.checkpoint import (
    CheckpointMismatchError,
    describe_model,
    load_module,
    load_run_config,
)
from src.utils.config import data_config, set_project_root
from src.utils.hparams import per_class_table
from src.utils.instantiate import instantiate_loggers

log = logging.getLogger(__name__)

set_project_root()


def check_backbone(cfg: DictConfig, run_config: DictConfig) -> None:
    """Accept ``backbone=`` only when it names the checkpoint's backbone.

    Raises:
        CheckpointMismatchError: ``backbone=X`` differs from the checkpoint's.
    """
    chosen = OmegaConf.select(cfg, "backbone.name", default=None)
    theirs = OmegaConf.select(run_config, "backbone.name", default=None)
    if chosen is not None and chosen != theirs:
        raise CheckpointMismatchError(
            f"backbone={chosen} does not match ckpt_path={cfg.ckpt_path} (checkpoint: "
            f"{describe_model(run_config)}): src.eval rebuilds the checkpoint's network, so drop "
            "the backbone override"
        )


def check_classes(cfg: DictConfig, run_config: DictConfig, datamodule: Any) -> None:
    """Fail with one sentence when the data have other classes than the checkpoint's model.

    Raises:
        CheckpointMismatchError: naming both class lists.
    """
    names = list(getattr(datamodule, "classes", []) or [])
    theirs = list(OmegaConf.select(run_config, "model.class_names", default=None) or [])
    count = OmegaConf.select(run_config, "model.net.num_classes", default=None)
    if not names or (theirs == names) or (not theirs and count == len(names)):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")

    raise CheckpointMismatchError(
        f"cannot evaluate ckpt_path={cfg.ckpt_path} on these data: checkpoint: "
        f"{describe_model(run_config)} [{show(theirs)}]; data: {len(names)} "
        f"class{'' if len(names) == 1 else 'es'} [{show(names)}]. The model predicts only its "
        "own classes: evaluate on data with the same class list (for VOC-format data, "
        f"data.classes=[{','.join(theirs)}]), or train a model on these data"
    )


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate a checkpoint on the validation (or test) split.

    Args:
        cfg: the composed ``conf/eval.yaml``.

    Returns:
        ``(metrics, objects)``: the logged metrics as floats, and the built objects.
    """
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    run_config, checkpoint = load_run_config(cfg.ckpt_path)
    check_backbone(cfg, run_config)
    datamodule = instantiate(data_config(cfg, run_config))
    check_classes(cfg, run_config, datamodule)
    model, run_config = load_module(cfg.ckpt_path, checkpoint=checkpoint)
    loggers = instantiate_loggers(cfg.get("logger"))
    out_dir = Path(cfg.paths.output_dir)
    writer = CocoResultsCallback(out_dir / "detections.json")
    # the loggers get eval/<name> at the checkpoint's step (below), not the module's val/* at 0
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(model=model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    for name, value in sorted(metrics.items()):
        log.info("%-20s %.6f", name, value)
    step = int(checkpoint.get("global_step") or 0)
    log_eval_metrics(loggers, metrics, step, cfg, checkpoint)
    objects: dict[str, Any] = {
        "model": model,
        "datamodule": datamodule,
        "trainer": trainer,
        "detections_json": writer.written,
    }
    voc = model.voc_results.get(cfg.split)
    if voc is not None:
        ap = model.metrics_of(cfg.split)["voc"].per_class_ap(voc)
        names = list(model.class_names or [str(c) for c in range(ap.numel())])
        table = per_class_table(names, ap.tolist(), float(voc["map_50"]))
        table_path = out_dir / f"per_class_ap_{cfg.split}.md"
        table_path.write_text(table + "\n")
        log.info("Per-class VOC AP@0.5 (%s, also in %s):\n%s", cfg.split, table_path, table)
        objects["per_class_table_path"] = table_path
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("eval/per_class_AP50", table, step)
                logger.experiment.flush()
        objects["per_class_table"] = table
    return metrics, objects


def log_eval_metrics(
    loggers: list[Any],
    metrics: dict[str, float],
    step: int,
    cfg: DictConfig,
    checkpoint: dict[str, Any],
) -> dict[str, float]:
    """Log ``<split>/<name>`` metrics as ``eval/<name>`` at the checkpoint's global ``step``.

    Non-finite values are left out. TensorBoard also gets a note (``eval/run``) naming the
    checkpoint, its epoch and step, and the split.

    Returns:
        The logged ``{eval/<name>: value}``.
    """
    prefix = f"{cfg.split}/"
    logged = {
        "eval/" + k[len(prefix) :]: v
        for k, v in metrics.items()
        if k.startswith(prefix) and math.isfinite(v)
    }
    note = (
        f"ckpt_path=`{cfg.ckpt_path}` (epoch {checkpoint.get('epoch')}, global step {step}), "
        f"split={cfg.split}"
    )
    for logger in loggers:
        if logged:
            logger.log_metrics(logged, step=step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("eval/run", note, step)
        logger.save()
    return logged


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
