"""Evaluation entry point: ``python -m src.eval ckpt_path=PATH [split=val|test]``.

The network is rebuilt from the config stored in the checkpoint, so no training overrides need to
be repeated; the data come from the checkpoint too unless a ``data`` group is selected.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoint import load_module
from src.utils.config import set_project_root
from src.utils.instantiate import instantiate_loggers

log = logging.getLogger(__name__)

set_project_root()


def data_config(cfg: DictConfig, run_config: DictConfig) -> DictConfig:
    """The ``data`` node to evaluate on: the selected group, else the training run's."""
    if cfg.get("data") is None:
        return run_config.data
    merged = OmegaConf.merge(
        run_config,
        {"paths": OmegaConf.to_container(cfg.paths, resolve=True)},
        {"data": OmegaConf.to_container(cfg.data, resolve=False)},
    )
    return merged.data


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
    model, run_config = load_module(cfg.ckpt_path)
    datamodule = instantiate(data_config(cfg, run_config))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, logger=loggers or False)
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(model=model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    for name, value in sorted(metrics.items()):
        log.info("%-20s %.6f", name, value)
    objects: dict[str, Any] = {"model": model, "datamodule": datamodule, "trainer": trainer}
    voc = model.voc_results.get(cfg.split)
    if voc is not None:
        ap = model.val_voc.per_class_ap(voc)
        names = list(model.class_names or [str(c) for c in range(ap.numel())])
        table = per_class_table(names, ap.tolist(), float(voc["map_50"]))
        log.info("Per-class VOC AP@0.5 (%s):\n%s", cfg.split, table)
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text(f"{cfg.split}/per_class_AP50", table, 0)
                logger.experiment.flush()
        objects["per_class_table"] = table
    return metrics, objects


def per_class_table(names: list[str], aps: list[float], mean_ap: float) -> str:
    """A Markdown table of per-class AP (nan: no non-difficult ground truth) and the mean."""
    rows = ["| class | AP@0.5 |", "| --- | ---: |"]
    rows += [
        f"| {n} | {'n/a' if ap != ap else f'{ap:.4f}'} |" for n, ap in zip(names, aps, strict=True)
    ]
    rows.append(f"| **mean** | **{mean_ap:.4f}** |")
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
