"""Config helpers shared by the entry points."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = ["set_project_root", "load_run_config", "config_to_container"]


def set_project_root() -> None:
    """Set ``PROJECT_ROOT`` (used by ``conf/paths``) to the current directory unless already set."""
    os.environ.setdefault("PROJECT_ROOT", str(Path.cwd()))


def config_to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve a run config into a plain dict (stored in checkpoints)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return container


def load_run_config(ckpt_path: str | os.PathLike) -> tuple[DictConfig, dict[str, Any]]:
    """Read a checkpoint written by ``src.train`` and the run config stored inside it.

    Args:
        ckpt_path: path of a ``.ckpt`` file.

    Returns:
        ``(run_config, checkpoint)``: the training run's resolved config and the raw checkpoint.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the checkpoint carries no run config (not written by ``src.train``).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={path} does not exist; pass the .ckpt written by `python -m src.train` "
            "(look under outputs/<task>/runs/<date>/checkpoints/)"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    run_config = checkpoint.get("run_config")
    if run_config is None:
        raise ValueError(
            f"{path} has no 'run_config': it was not written by `python -m src.train`, so the "
            "network cannot be rebuilt from it"
        )
    return OmegaConf.create(run_config), checkpoint


def model_config_for_loading(run_config: DictConfig) -> DictConfig:
    """The ``model`` node of a run with weight downloads disabled (the checkpoint has weights)."""
    model_cfg = run_config.model.copy()
    backbone = model_cfg.get("net", {}).get("backbone", None)
    if isinstance(backbone, DictConfig) and "pretrained" in backbone:
        backbone.pretrained = None
    if "init_from" in model_cfg:
        model_cfg.init_from = None
    return model_cfg
