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
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoint import load_module
from src.utils.config import load_run_config, set_project_root
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
    run_config, _ = load_run_config(cfg.ckpt_path)
    model, _ = load_module(cfg.ckpt_path)
    datamodule = instantiate(data_config(cfg, run_config))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, logger=loggers or False)
    run = trainer.validate if cfg.split == "val" else trainer.test
    results = run(model=model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    for name, value in sorted(metrics.items()):
        log.info("%-20s %.6f", name, value)
    return metrics, {"model": model, "datamodule": datamodule, "trainer": trainer}


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
