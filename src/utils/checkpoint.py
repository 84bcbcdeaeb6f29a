"""Read and write checkpoints safely; rebuild a trained ``SSDLitModule`` from one.

Every checkpoint ``src.train`` writes holds tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)``: a checkpoint from someone else cannot run code. Nothing
in the project loads a checkpoint with ``weights_only=False``.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointMismatchError",
    "describe_model",
    "load_checkpoint",
    "load_module",
    "load_run_config",
    "upgrade_targets",
    "LEGACY_TARGETS",
    "model_config_for_loading",
    "plain_checkpoint",
]

#: keys Lightning writes that hold Python types rather than values.
_DROPPED_KEYS = ("hparams_type", "datamodule_hparams_type")


class CheckpointMismatchError(ValueError):
    """A checkpoint's network does not fit the network it is loaded into."""


def _plain(value: Any) -> Any:
    """``value`` with containers made plain: dicts, lists, tensors, str, int, float, bool, None."""
    if isinstance(value, torch.Tensor) or value is None:
        return value
    if isinstance(value, str | bool | int | float):
        return value
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k if isinstance(k, str | int) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    log.debug("checkpoint value of type %s stored as its string", type(value).__name__)
    return str(value)


def plain_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a Lightning checkpoint dict that ``torch.load(weights_only=True)`` can read.

    OmegaConf containers become dicts and lists, paths become strings, numpy values become
    Python numbers or tensors; anything else that is not a tensor or a plain value becomes its
    string. The Python types Lightning stores next to OmegaConf hyper-parameters are dropped.

    Args:
        checkpoint: the dict Lightning is about to save.

    Returns:
        A new dict (tensors are shared, not copied).
    """
    return {k: _plain(v) for k, v in checkpoint.items() if k not in _DROPPED_KEYS}


def load_checkpoint(ckpt_path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` and clear errors.

    Args:
        ckpt_path: a ``.ckpt`` (or ``.pth``) file.
        key: the config key that named the file, for the messages.

    Returns:
        The checkpoint's dict (tensors on CPU).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a torch checkpoint, or it holds pickled code (not loadable
            safely).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={path} does not exist; pass the .ckpt written by `python -m src.train` "
            "(look under outputs/train/runs/<run>/checkpoints/: best.ckpt or last.ckpt)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise ValueError(
                f"{key}={path} holds pickled Python objects, not only tensors and plain values, "
                "so it is not loaded (a checkpoint could run code that way). Checkpoints written "
                "by this project load safely; re-export this one as a plain state dict "
                f"({next(line for line in text.splitlines() if 'Unsupported' in line).strip()})"
            ) from err
        raise ValueError(
            f"{key}={path} is not a torch checkpoint (it does not unpickle as one); pass a .ckpt "
            "written by `python -m src.train`"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(
            f"{key}={path} is not a readable torch checkpoint ({type(err).__name__}: {err}); "
            "pass a .ckpt written by `python -m src.train` (the file may be truncated)"
        ) from err
    if not isinstance(blob, dict):
        raise ValueError(
            f"{key}={path} holds a {type(blob).__name__}, not a checkpoint dict; pass a .ckpt "
            "written by `python -m src.train`"
        )
    return blob


#: ``_target_`` paths of classes that moved, as stored in the run configs of older checkpoints,
#: and where they live now. Add a line here when a class moves.
LEGACY_TARGETS: dict[str, str] = {
    "src.utils.faults.ResumeCallback": "src.callbacks.faults.ResumeCallback",
    "src.utils.faults.InterruptCallback": "src.callbacks.faults.InterruptCallback",
    "src.utils.console.MetricsProgressBar": "src.callbacks.console.MetricsProgressBar",
    "src.utils.hparams.RunTensorBoardLogger": "src.callbacks.hparams.RunTensorBoardLogger",
    "src.utils.hparams.HParamsCallback": "src.callbacks.hparams.HParamsCallback",
    "src.utils.results.CocoResultsCallback": "src.callbacks.results.CocoResultsCallback",
    "src.viz.callbacks.AnchorPanelsCallback": "src.callbacks.pictures.AnchorPanelsCallback",
    "src.viz.callbacks.DetectionGridCallback": "src.callbacks.pictures.DetectionGridCallback",
    "src.viz.callbacks.PRCurvesCallback": "src.callbacks.pictures.PRCurvesCallback",
    "src.search.pruning.OptunaPruningCallback": "src.callbacks.pruning.OptunaPruningCallback",
}


def upgrade_targets(value: Any) -> Any:
    """A copy of a plain run config with every moved ``_target_`` renamed (:data:`LEGACY_TARGETS`).

    Args:
        value: a run config as stored in a checkpoint (dicts, lists and plain values).

    Returns:
        The same structure; ``{"_target_": old}`` entries read ``{"_target_": new}``.
    """
    if isinstance(value, Mapping):
        out = {k: upgrade_targets(v) for k, v in value.items()}
        target = out.get("_target_")
        if isinstance(target, str) and target in LEGACY_TARGETS:
            out["_target_"] = LEGACY_TARGETS[target]
        return out
    if isinstance(value, list | tuple):
        return [upgrade_targets(v) for v in value]
    return value


def load_run_config(ckpt_path: str | os.PathLike) -> tuple[DictConfig, dict[str, Any]]:
    """Read a checkpoint written by ``src.train`` and the run config stored inside it.

    Args:
        ckpt_path: path of a ``.ckpt`` file.

    Returns:
        ``(run_config, checkpoint)``: the training run's resolved config and the raw checkpoint.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a safe torch checkpoint, or no run config (not written by ``src.train``).
    """
    checkpoint = load_checkpoint(ckpt_path)
    run_config = checkpoint.get("run_config")
    if run_config is None:
        raise ValueError(
            f"{ckpt_path} has no 'run_config': it was not written by `python -m src.train`, so "
            "the network cannot be rebuilt from it"
        )
    checkpoint["run_config"] = upgrade_targets(run_config)
    return OmegaConf.create(checkpoint["run_config"]), checkpoint


def model_config_for_loading(run_config: DictConfig) -> DictConfig:
    """The ``model`` node of a run with weight downloads disabled (the checkpoint has weights)."""
    model_cfg = run_config.model.copy()
    backbone = model_cfg.get("net", {}).get("backbone", None)
    if isinstance(backbone, DictConfig) and "pretrained" in backbone:
        backbone.pretrained = None
    if "init_from" in model_cfg:
        model_cfg.init_from = None
    return model_cfg


def _anchor_range(anchors: Any) -> str | None:
    """``anchors 0.1-0.79``: the smallest and largest anchor size, as fractions of the image.

    Reads ``sizes`` (per-level fractions, ``GridAnchorGenerator``) or ``min_sizes`` /
    ``max_sizes`` / ``image_size`` (pixels, ``SSDDefaultBoxGenerator``); None for other nodes.
    """
    if not isinstance(anchors, Mapping):
        return None
    sizes = anchors.get("sizes")
    if sizes:
        flat = [float(v) for level in sizes for v in level]
        return f"anchors {min(flat):.3g}-{max(flat):.3g}"
    lows, highs, side = (
        anchors.get("min_sizes"),
        anchors.get("max_sizes"),
        anchors.get("image_size"),
    )
    if lows and highs and isinstance(side, int | float) and side > 0:
        return f"anchors {min(map(float, lows)) / side:.3g}-{max(map(float, highs)) / side:.3g}"
    return None


def describe_model(run_config: Mapping[str, Any] | DictConfig) -> str:
    """What a run config's network is, in config words.

    E.g. ``backbone=tiny, 1 class (banana), input 256, head=ssd, anchors 0.1-0.79``. Reads
    ``backbone.name``, ``model.net.num_classes``, ``model.class_names`` (listed when at most 5),
    ``backbone.image_size``, ``head.name`` and ``backbone.anchors``; missing keys are left out
    (the backbone shows as ``?``). :func:`src.models.convert.net_run_config` gives the same keys
    for a built network, so both sides of a mismatch read alike.

    Args:
        run_config: a run config (the composed config or a checkpoint's ``run_config``).
    """
    cfg = OmegaConf.create(run_config) if not OmegaConf.is_config(run_config) else run_config

    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None)

    count = get("model.net.num_classes")
    text = f"backbone={get('backbone.name') or '?'}, {count} class{'' if count == 1 else 'es'}"
    names = get("model.class_names")
    if names is not None and len(names) <= 5:
        text += f" ({', '.join(str(n) for n in names)})"
    extras = [
        f"input {get('backbone.image_size')}" if get("backbone.image_size") is not None else None,
        f"head={get('head.name')}" if get("head.name") is not None else None,
        _anchor_range(OmegaConf.to_container(cfg.backbone.anchors, resolve=True))
        if get("backbone.anchors") is not None
        else None,
    ]
    return ", ".join([text, *(e for e in extras if e)])


def load_module(
    ckpt_path: str | os.PathLike, checkpoint: dict[str, Any] | None = None, **overrides: Any
) -> tuple[Any, DictConfig]:
    """Build the module described by the checkpoint's run config and load its weights.

    Args:
        ckpt_path: a ``.ckpt`` written by ``python -m src.train``.
        checkpoint: the file's content when already read (:func:`load_run_config`), so it is
            not read twice.
        **overrides: keyword arguments passed to ``instantiate`` of the module (for example a
            different ``postprocess``).

    Returns:
        ``(module, run_config)`` with the module in eval mode on CPU.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_run_config`.
    """
    if checkpoint is None:
        run_config, checkpoint = load_run_config(ckpt_path)
    else:
        checkpoint["run_config"] = upgrade_targets(checkpoint["run_config"])
        run_config = OmegaConf.create(checkpoint["run_config"])
    module = instantiate(model_config_for_loading(run_config), **overrides)
    module.load_state_dict(checkpoint["state_dict"])
    module.run_config = checkpoint["run_config"]
    module.eval()
    log.info(
        "Loaded %s (epoch %s, %s)", ckpt_path, checkpoint.get("epoch"), describe_model(run_config)
    )
    return module, run_config
