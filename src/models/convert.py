"""Load weights trained by other SSD implementations into :class:`src.models.ssd.SSD`.

* ``ssd.pytorch`` (amdegroot): :func:`convert_ssd_pytorch_state_dict` /
  :func:`load_ssd_pytorch_state_dict`. Key layout of ``build_ssd('train', 300, 21)``::

      vgg.{0..34}.*   the 35-layer list of ``vgg(base['300'], 3)`` (convs at 0, 2, 5, 7, 10,
                      12, 14, 17, 19, 21, 24, 26, 28, fc6 at 31, fc7 at 33)
      L2Norm.weight   conv4_3's scale
      extras.{0..7}.* conv8_1, conv8_2, ..., conv11_2 (ReLU applied after each in forward)
      loc.{0..5}.*    box predictors;  conf.{0..5}.*: class predictors (class 0 = background)

  ``ssd.pytorch`` feeds BGR ``0..255`` images minus ``(104, 117, 123)``. Our SSD takes RGB in
  ``[0, 1]``; with ``bgr_to_rgb=True`` (default) conv1_1's input channels are reversed, and the
  model must be built with :data:`SSD_PYTORCH_PIXEL_MEAN` / :data:`SSD_PYTORCH_PIXEL_STD`
  (``backbone.pixel_mean`` / ``backbone.pixel_std``) to reproduce its input scaling exactly.
  Its priors are ``SSDDefaultBoxGenerator(..., clip="cxcywh")`` and its box encoding is the
  ``BoxCoder`` default (variances 0.1, 0.2), so outputs decode identically.
* The book's :class:`src.models.tiny_ssd.TinySSD`: :func:`convert_tiny_ssd_state_dict`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from src.models.backbones.vgg16 import VGG_CONV_INDICES, vgg_layer_path
from src.models.ssd import SSD
from src.utils.checkpoint import (
    CheckpointMismatchError,
    NotACheckpointError,
    describe_foreign,
    describe_model,
    load_checkpoint,
)

__all__ = [
    "net_run_config",
    "load_initial_weights",
    "SSD_PYTORCH_PIXEL_MEAN",
    "SSD_PYTORCH_PIXEL_STD",
    "convert_ssd_pytorch_state_dict",
    "convert_tiny_ssd_state_dict",
    "load_ssd_pytorch_state_dict",
]

log = logging.getLogger(__name__)

#: ``ssd.pytorch``'s BGR means ``(104, 117, 123)`` as RGB fractions of 255.
SSD_PYTORCH_PIXEL_MEAN: tuple[float, float, float] = (123 / 255, 117 / 255, 104 / 255)
#: ``ssd.pytorch`` does not divide by a std; its pixels are on a ``0..255`` scale.
SSD_PYTORCH_PIXEL_STD: tuple[float, float, float] = (1 / 255, 1 / 255, 1 / 255)

_CONV1_1 = f"backbone.{vgg_layer_path(0)}.weight"
_PARAM = r"(weight|bias)"


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a ``module.`` prefix left by ``nn.DataParallel`` checkpoints."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _ssd_pytorch_key(key: str) -> str | None:
    """Our key for one ``ssd.pytorch`` key, or ``None`` if it is not part of that layout."""
    if key == "L2Norm.weight":
        return "backbone.l2norm.weight"
    m = re.fullmatch(rf"vgg\.(\d+)\.{_PARAM}", key)
    if m:
        idx = int(m.group(1))
        if idx not in VGG_CONV_INDICES:
            return None
        return f"backbone.{vgg_layer_path(idx)}.{m.group(2)}"
    m = re.fullmatch(rf"extras\.(\d+)\.{_PARAM}", key)
    if m:
        k = int(m.group(1))
        return f"backbone.extras.{k // 2}.conv{8 + k // 2}_{1 + k % 2}.{m.group(2)}"
    m = re.fullmatch(rf"(loc|conf)\.(\d+)\.{_PARAM}", key)
    if m:
        head = "box_predictors" if m.group(1) == "loc" else "cls_predictors"
        return f"head.{head}.{m.group(2)}.{m.group(3)}"
    return None


def convert_ssd_pytorch_state_dict(
    state_dict: Mapping[str, Tensor], bgr_to_rgb: bool = True
) -> dict[str, Tensor]:
    """Rename an ``ssd.pytorch`` SSD state dict to this project's :class:`SSD` keys.

    Args:
        state_dict: ``ssd.pytorch`` weights (``vgg.*``, ``L2Norm.weight``, ``extras.*``,
            ``loc.*``, ``conf.*``; a ``module.`` prefix is accepted).
        bgr_to_rgb: reverse conv1_1's input channels so the network takes RGB instead of
            ``ssd.pytorch``'s BGR input.

    Returns:
        A new dict with our keys (tensors shared with the input, except a flipped conv1_1).

    Raises:
        ValueError: listing the keys that do not belong to the ``ssd.pytorch`` layout.
    """
    sd = _strip_prefix(state_dict)
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        ours = _ssd_pytorch_key(key)
        if ours is None:
            unexpected.append(key)
        else:
            out[ours] = value
    if unexpected:
        raise ValueError(
            f"not an ssd.pytorch SSD state dict: unexpected keys {sorted(unexpected)}; expected "
            "only vgg.<conv index>.{weight,bias}, L2Norm.weight, extras.<i>.*, loc.<i>.*, "
            "conf.<i>.*"
        )
    if bgr_to_rgb and _CONV1_1 in out:
        out[_CONV1_1] = out[_CONV1_1].flip(1)
    return out


def load_ssd_pytorch_state_dict(
    model: SSD, state_dict: Mapping[str, Tensor], bgr_to_rgb: bool = True
) -> None:
    """Load ``ssd.pytorch`` weights into ``model`` (a VGG16 SSD300/512 of this project).

    Args:
        model: the SSD to fill (modified in place).
        state_dict: ``ssd.pytorch`` weights, e.g. ``torch.load("ssd300_mAP_77.43_v2.pth")``.
        bgr_to_rgb: see :func:`convert_ssd_pytorch_state_dict`.

    Raises:
        ValueError: listing missing keys, unexpected keys and shape mismatches (with the
            ``ssd.pytorch`` name of each), e.g. when ``data.num_classes`` differs from the
            checkpoint's.
    """
    sd = _strip_prefix(state_dict)
    converted = convert_ssd_pytorch_state_dict(sd, bgr_to_rgb=bgr_to_rgb)
    origin = {_ssd_pytorch_key(k): k for k in sd}
    target = model.state_dict()
    missing = sorted(set(target) - set(converted))
    unexpected = sorted(f"{origin[k]} -> {k}" for k in set(converted) - set(target))
    mismatched = sorted(
        f"{origin[k]} {tuple(v.shape)} -> {k} {tuple(target[k].shape)}"
        for k, v in converted.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing (model keys absent from the checkpoint): {missing}")
        if unexpected:
            problems.append(f"unexpected (checkpoint keys the model lacks): {unexpected}")
        if mismatched:
            problems.append(
                f"shape mismatches (checkpoint -> model): {mismatched}; conf.* channels are "
                "anchors x (data.num_classes + 1): check data.num_classes and backbone.anchors"
            )
        raise ValueError(
            "cannot load the ssd.pytorch state dict into "
            f"SSD({type(model.backbone).__name__}): " + "; ".join(problems)
        )
    model.load_state_dict(converted, strict=True)
    mean = torch.tensor(SSD_PYTORCH_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(SSD_PYTORCH_PIXEL_STD).view(1, 3, 1, 1)
    if not (
        torch.allclose(model.pixel_mean.cpu(), mean) and torch.allclose(model.pixel_std.cpu(), std)
    ):
        log.warning(
            "ssd.pytorch weights expect backbone.pixel_mean=%s and backbone.pixel_std=%s; this "
            "model uses %s and %s, so its predictions will differ from ssd.pytorch's",
            [round(v, 6) for v in SSD_PYTORCH_PIXEL_MEAN],
            [round(v, 6) for v in SSD_PYTORCH_PIXEL_STD],
            model.pixel_mean.flatten().tolist(),
            model.pixel_std.flatten().tolist(),
        )


def convert_tiny_ssd_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the book's :class:`~src.models.tiny_ssd.TinySSD` weights for ``SSD(TinyBackbone())``.

    ``blk_i.*`` -> ``backbone.blk_i.*``, ``cls_i.*`` -> ``head.cls_predictors.i.*``,
    ``bbox_i.*`` -> ``head.box_predictors.i.*`` (BatchNorm running statistics included). The
    SSD must use ``pixel_mean=0``, ``pixel_std=1/255`` to see the book's ``0..255`` input.

    Args:
        state_dict: ``TinySSD(num_classes).state_dict()``.

    Returns:
        A new dict with our keys.

    Raises:
        ValueError: listing keys that are not TinySSD keys.
    """
    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in _strip_prefix(state_dict).items():
        m = re.fullmatch(r"(blk|cls|bbox)_(\d+)\.(.+)", key)
        if m is None:
            unexpected.append(key)
            continue
        kind, level, rest = m.groups()
        if kind == "blk":
            out[f"backbone.blk_{level}.{rest}"] = value
        else:
            head = "cls_predictors" if kind == "cls" else "box_predictors"
            out[f"head.{head}.{level}.{rest}"] = value
    if unexpected:
        raise ValueError(f"not a TinySSD state dict: unexpected keys {sorted(unexpected)}")
    return out


def net_run_config(net: SSD) -> dict[str, Any]:
    """The run-config keys :func:`~src.utils.checkpoint.describe_model` reads, from a built net.

    ``backbone.name`` is the net's ``name`` (``backbone.name`` of the config that built it;
    the backbone's class name for a net built by hand), ``backbone.anchors`` the anchor
    generator's public attributes (the config's keys), ``head.name`` the head's ``name``.

    Args:
        net: a built SSD.

    Returns:
        ``{"backbone": {name, image_size, anchors}, "head": {name}, "model": {"net":
        {num_classes}}}``.
    """
    generator = net.anchor_generator
    anchors = {k: v for k, v in vars(generator).items() if not k.startswith("_")}
    return {
        "backbone": {
            "name": net.name or type(net.backbone).__name__,
            "image_size": int(net.image_size[0]),
            "anchors": anchors,
        },
        "head": {"name": getattr(net.head, "name", type(net.head).__name__)},
        "model": {"net": {"num_classes": int(net.num_classes)}},
    }


def _mismatch(state: Mapping[str, Tensor], net: SSD) -> list[str]:
    """Keys missing, unexpected or of another shape between ``state`` and ``net``."""
    target = net.state_dict()
    problems = sorted(set(target) - set(state)) + sorted(set(state) - set(target))
    problems += [
        k for k, v in state.items() if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    return problems


#: what ``model.init_from`` messages ask for.
_INIT_FROM_HINT = (
    "pass a .ckpt written by `python -m src.train` (outputs/train/runs/<run>/checkpoints/) or "
    "an ssd.pytorch SSD300 state dict (.pth)"
)


def load_initial_weights(net: SSD, path: str | Path) -> None:
    """Load ``path`` into ``net``: an ``src.train`` checkpoint or an ``ssd.pytorch`` state dict.

    The file is read with ``torch.load(weights_only=True)``.

    Args:
        net: the SSD network (modified in place: it is the module's own parameters).
        path: a ``.ckpt`` written by ``src.train`` or a ``.pth`` state dict of ``ssd.pytorch``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotACheckpointError: anything else than those two (``model.init_from=<file> is not a
            checkpoint written by src.train (<why>)``): an image, a text file, a truncated
            file, another network's state dict, a Lightning checkpoint of another module, ...
        CheckpointMismatchError: the checkpoint's network is another backbone or class count
            (one sentence naming both sides).
        ValueError: an ``ssd.pytorch`` state dict that does not fit ``net``.
    """
    key = "model.init_from"
    blob = load_checkpoint(path, key=key, hint=_INIT_FROM_HINT)
    state = blob.get("state_dict", blob)
    if not isinstance(state, Mapping) or not _is_tensor_dict(state):
        raise NotACheckpointError(key, path, describe_foreign(blob), _INIT_FROM_HINT)
    if any(k.startswith("net.") for k in state):
        own = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        problems = _mismatch(own, net)
        if problems:
            theirs = (
                describe_model(blob["run_config"])
                if isinstance(blob.get("run_config"), Mapping)
                else "another network"
            )
            raise CheckpointMismatchError(
                f"model.init_from={path} does not fit this network: checkpoint: {theirs}; this "
                f"run: {describe_model(net_run_config(net))} (first differing weights: "
                f"{', '.join(problems[:3])}). Choose the checkpoint's backbone and head (and data "
                "with the same classes), or another checkpoint"
            )
        net.load_state_dict(own)
        log.info("Initialised the net from the src.train checkpoint %s", path)
        return
    if any(
        k.split(".", 1)[-1].startswith(("vgg.", "L2Norm.")) or k.startswith("vgg.") for k in state
    ):
        load_ssd_pytorch_state_dict(net, state)
        log.info("Initialised the net from the ssd.pytorch weights %s", path)
        return
    raise NotACheckpointError(
        key,
        path,
        f"{describe_foreign(blob)}; its keys fit neither src.train's ('net.*') nor "
        "ssd.pytorch's ('vgg.*', 'L2Norm.weight', ...)",
        _INIT_FROM_HINT,
    )


def _is_tensor_dict(state: Mapping[Any, Any]) -> bool:
    """Whether ``state`` maps string keys to tensors (a state dict; empty counts)."""
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
