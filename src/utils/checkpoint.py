"""Rebuild a trained ``SSDLitModule`` from a checkpoint written by ``src.train``."""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from src.utils.config import load_run_config, model_config_for_loading

log = logging.getLogger(__name__)

__all__ = ["load_module"]


def load_module(ckpt_path: str | os.PathLike, **overrides: Any) -> tuple[Any, DictConfig]:
    """Build the module described by the checkpoint's run config and load its weights.

    Args:
        ckpt_path: a ``.ckpt`` written by ``python -m src.train``.
        **overrides: keyword arguments passed to ``instantiate`` of the module (for example a
            different ``postprocess``).

    Returns:
        ``(module, run_config)`` with the module in eval mode on CPU.
    """
    run_config, checkpoint = load_run_config(ckpt_path)
    module = instantiate(model_config_for_loading(run_config), **overrides)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["run_config"]
    module.eval()
    log.info("Loaded %s (epoch %s)", ckpt_path, checkpoint.get("epoch"))
    return module, run_config
