"""Build every ``{_target_: ...}`` entry of a config group (the callbacks, the loggers)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = ["instantiate_callbacks", "instantiate_loggers"]


def _instantiate_group(cfg: DictConfig | None, kind: str) -> list:
    objects: list = []
    if not cfg:
        return objects
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"the {kind} config must be a mapping of name -> {{_target_: ...}}")
    for name, conf in cfg.items():
        if isinstance(conf, DictConfig) and "_target_" in conf:
            log.debug("Instantiating %s <%s>", kind, conf._target_)
            objects.append(instantiate(conf))
        elif conf is not None:
            raise ValueError(f"{kind} '{name}' has no _target_; give one or set it to null")
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``{_target_: ...}`` entry of the ``callbacks`` group."""
    return _instantiate_group(cfg, "callback")


def instantiate_loggers(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``{_target_: ...}`` entry of the ``logger`` group."""
    return _instantiate_group(cfg, "logger")
