"""Read and write checkpoints safely; rebuild a trained ``SSDLitModule`` from one.

Every checkpoint ``src.train`` writes holds tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)``: a checkpoint from someone else cannot run code. Nothing
in the project loads a checkpoint with ``weights_only=False``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
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
    "NotACheckpointError",
    "describe_foreign",
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


#: what the project's checkpoint messages ask for.
_PASS_A_CKPT = "pass best.ckpt or last.ckpt from outputs/train/runs/<run>/checkpoints/"

#: leading bytes of files that are often passed by mistake, and what they are.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF", "an HDF5 file (Keras / h5py)"),
)


class NotACheckpointError(ValueError):
    """A file given as a checkpoint is not one written by ``src.train``.

    The message is one sentence: ``<key>=<file> is not a checkpoint written by src.train
    (<why>)``, then what to pass instead.
    """

    def __init__(self, key: str, path: str | os.PathLike, why: str, hint: str = _PASS_A_CKPT):
        super().__init__(f"{key}={path} is not a checkpoint written by src.train ({why}); {hint}")
        self.key = key
        self.path = str(path)
        self.why = why


def _first_line(text: str, limit: int = 160) -> str:
    """The first non-empty line of ``text``, cut to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_sentence(text: str, limit: int = 120) -> str:
    """The first sentence of ``text``'s first line, cut to ``limit`` characters."""
    line = _first_line(text, 10_000).split(". ")[0].rstrip(".")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _what_file(path: Path, err: BaseException) -> str:
    """What a file that ``torch.load`` cannot read is, from its first bytes (for messages)."""
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        return "it is an empty file"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "it is a WebP image"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"it is {what}"
    if head.startswith(b"PK\x03\x04"):
        return f"it is a truncated or damaged torch file: {_first_sentence(str(err))}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text[:1024]):
        return f"it is a text file starting {_first_line(text, 40)!r}"
    if isinstance(err, EOFError):
        return "it ends too early: a truncated file"
    return "it is not a torch file: its bytes do not unpickle"


def _unsupported_global(text: str) -> str | None:
    """The Python object a ``weights_only`` unpickling error refused (``pathlib.PosixPath``)."""
    match = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.]+)", text)
    return match.group(1) if match else None


def load_checkpoint(
    ckpt_path: str | os.PathLike, key: str = "ckpt_path", hint: str = _PASS_A_CKPT
) -> dict[str, Any]:
    """Load a torch file with ``torch.load(weights_only=True)``; one clear error otherwise.

    Any file that ``torch.load`` cannot read safely, or that does not hold a dict, raises
    :class:`NotACheckpointError` saying what it is (an image, a text file, a truncated torch
    file, pickled Python objects, ...). The dict itself is not checked: see
    :func:`load_run_config` for checkpoints written by ``src.train``.

    Args:
        ckpt_path: a ``.ckpt`` (or ``.pth``) file.
        key: the config key that named the file, for the messages.
        hint: what the message asks to pass instead.

    Returns:
        The file's dict (tensors on CPU).

    Raises:
        FileNotFoundError: the file does not exist.
        NotACheckpointError: a folder, a file torch cannot read, pickled Python objects (not
            loaded: they could run code), or not a dict.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        raise NotACheckpointError(key, path, "it is a folder", hint)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={path} does not exist; pass the .ckpt written by `python -m src.train` "
            "(look under outputs/train/runs/<run>/checkpoints/: best.ckpt or last.ckpt)"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises anything on arbitrary bytes
        unsupported = _unsupported_global(str(err))
        if isinstance(err, pickle.UnpicklingError) and unsupported:
            why = (
                f"it holds pickled Python objects such as {unsupported}, not only tensors and "
                "plain values: not loaded, since unpickling them could run code"
            )
        else:
            why = _what_file(path, err)
        raise NotACheckpointError(key, path, why, hint) from err
    if not isinstance(blob, dict):
        raise NotACheckpointError(
            key, path, f"it holds a {type(blob).__name__}, not a checkpoint dict", hint
        )
    return blob


def _is_state_dict(blob: Mapping[str, Any]) -> bool:
    """Whether ``blob`` is a plain state dict (every value a tensor)."""
    return bool(blob) and all(isinstance(v, torch.Tensor) for v in blob.values())


def describe_foreign(blob: Mapping[str, Any]) -> str:
    """What a loaded torch dict without ``src.train``'s run config is (for messages).

    Args:
        blob: the dict ``torch.load`` returned.

    Returns:
        E.g. ``it is a Lightning checkpoint (Lightning 2.6.0) without the run config that
        src.train stores, ...`` or ``it is a plain state dict of 244 tensors, keys
        features.0.0.weight, ..., without the run config that src.train stores``.
    """
    keys = [str(k) for k in blob]
    if "pytorch-lightning_version" in blob or {"state_dict", "loops"} <= set(blob):
        version = blob.get("pytorch-lightning_version")
        made_by = f" (Lightning {version})" if version else ""
        return (
            f"it is a Lightning checkpoint{made_by} without the run config that src.train "
            "stores, so the network cannot be rebuilt from it"
        )
    if _is_state_dict(blob):
        shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        return (
            f"it is a plain state dict of {len(keys)} tensors, keys {shown}, without the run "
            "config that src.train stores"
        )
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"it is a dict with the keys {shown or '(none)'} and no run config"


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


def load_run_config(
    ckpt_path: str | os.PathLike, key: str = "ckpt_path"
) -> tuple[DictConfig, dict[str, Any]]:
    """Read a checkpoint written by ``src.train`` and the run config stored inside it.

    Args:
        ckpt_path: path of a ``.ckpt`` file.
        key: the config key that named the file, for the messages.

    Returns:
        ``(run_config, checkpoint)``: the training run's resolved config and the raw checkpoint.

    Raises:
        FileNotFoundError: the file does not exist.
        NotACheckpointError: anything else than a checkpoint of ``src.train`` (one line saying
            what the file is: an image, a text file, a truncated file, another framework's
            checkpoint or state dict, ...).
    """
    checkpoint = load_checkpoint(ckpt_path, key=key)
    run_config = checkpoint.get("run_config")
    if run_config is None:
        raise NotACheckpointError(key, ckpt_path, describe_foreign(checkpoint))
    if not isinstance(run_config, Mapping):
        raise NotACheckpointError(
            key, ckpt_path, f"its run_config is a {type(run_config).__name__}, not a dict"
        )
    if not isinstance(checkpoint.get("state_dict"), Mapping):
        raise NotACheckpointError(key, ckpt_path, "it has a run config but no state_dict")
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
