"""Validation of the torchmetrics detection format shared by the error-analysis metrics.

Every metric of :mod:`src.metrics.errors`, :mod:`src.metrics.confusion`,
:mod:`src.metrics.sizes` and :mod:`src.metrics.curves` takes, per image,

* ``preds[i]``: ``{"boxes": Tensor[N, 4] xyxy pixels float, "scores": Tensor[N],
  "labels": Tensor[N] int64 0-based}``,
* ``targets[i]``: ``{"boxes": Tensor[M, 4] xyxy pixels, "labels": Tensor[M] int64 0-based,
  optional "difficult" and/or "iscrowd": Tensor[M] bool}``.

No Lightning or Hydra here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Image", "check_images", "ignored_mask", "infer_num_classes"]


class Image(NamedTuple):
    """One image's detections and ground truths on the CPU, float64 boxes.

    Attributes:
        det_boxes: Tensor[N, 4] float64, xyxy pixels.
        det_scores: Tensor[N] float64.
        det_labels: Tensor[N] int64, 0-based classes.
        gt_boxes: Tensor[M, 4] float64, xyxy pixels.
        gt_labels: Tensor[M] int64, 0-based classes.
        gt_ignored: Tensor[M] bool, ``difficult | iscrowd`` (False when neither key is given).
    """

    det_boxes: Tensor
    det_scores: Tensor
    det_labels: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_ignored: Tensor


def ignored_mask(target: dict[str, Tensor], num: int) -> Tensor:
    """``difficult | iscrowd`` of one target dict as ``Tensor[M]`` bool (all False if absent).

    Args:
        target: one image's target dict.
        num: ``M``, the number of ground-truth boxes.

    Returns:
        Tensor[M] bool on the CPU.
    """
    mask = torch.zeros(num, dtype=torch.bool)
    for key in ("difficult", "iscrowd"):
        flag = target.get(key)
        if flag is not None:
            mask |= flag.detach().reshape(-1).cpu().to(torch.bool)
    return mask


def _check_dict(item: object, kind: str, i: int, keys: Sequence[str]) -> None:
    """Keys, shapes, lengths and label dtype of one entry (labels' range: see check_images)."""
    if not isinstance(item, dict):
        raise TypeError(f"{kind}[{i}] must be a dict with keys {list(keys)}, got {type(item)}")
    for key in keys:
        if key not in item:
            raise ValueError(f"{kind}[{i}] is missing key '{key}' (expected {list(keys)})")
    boxes = item["boxes"]
    if boxes.numel() and (boxes.ndim != 2 or boxes.shape[-1] != 4):
        raise ValueError(
            f"{kind}[{i}]['boxes'] must have shape [N, 4] (xyxy pixels), got {tuple(boxes.shape)}"
        )
    n = boxes.numel() // 4
    for key in (*keys, "difficult", "iscrowd"):
        if key != "boxes" and key in item and item[key].numel() != n:
            raise ValueError(
                f"{kind}[{i}]['{key}'] has {item[key].numel()} entries but 'boxes' has {n}"
            )
    if item["labels"].is_floating_point():
        raise ValueError(f"{kind}[{i}]['labels'] must be integer class indices")


def _check_labels(images: Sequence[Image], num_classes: int | None) -> None:
    """One range check over all labels; on failure, name the first entry out of range."""
    labels = [t for im in images for t in (im.det_labels, im.gt_labels)]
    every = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)
    if not every.numel():
        return
    if int(every.min()) >= 0 and (num_classes is None or int(every.max()) < num_classes):
        return
    for i, im in enumerate(images):
        for kind, lab in (("preds", im.det_labels), ("targets", im.gt_labels)):
            if lab.numel() and (
                int(lab.min()) < 0 or (num_classes is not None and int(lab.max()) >= num_classes)
            ):
                raise ValueError(
                    f"{kind}[{i}]['labels'] must be 0-based class indices in [0, {num_classes}) "
                    f"(one per class name), got range [{int(lab.min())}, {int(lab.max())}]"
                )


def check_images(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    num_classes: int | None = None,
) -> list[Image]:
    """Validate ``preds`` and ``targets`` and return them as CPU float64 :class:`Image` tuples.

    Args:
        preds: one dict per image with ``boxes`` Tensor[N, 4] xyxy pixels, ``scores`` Tensor[N],
            ``labels`` Tensor[N] int64 (0-based).
        targets: one dict per image with ``boxes`` Tensor[M, 4] xyxy pixels, ``labels``
            Tensor[M] int64 and optional ``difficult`` / ``iscrowd`` Tensor[M] bool.
        num_classes: when given, every label must lie in ``[0, num_classes)``.

    Returns:
        One :class:`Image` per image, in order.

    Raises:
        ValueError: the lists differ in length, or an entry misses a key, has a wrong shape or an
            out-of-range label (the message names the entry and the key).
        TypeError: an entry is not a dict.
    """
    if len(preds) != len(targets):
        raise ValueError(
            f"preds and targets must have one entry per image, got {len(preds)} and {len(targets)}"
        )
    images = []
    f64, i64 = torch.float64, torch.int64
    for i, (pred, tgt) in enumerate(zip(preds, targets, strict=True)):
        _check_dict(pred, "preds", i, ("boxes", "scores", "labels"))
        _check_dict(tgt, "targets", i, ("boxes", "labels"))
        gt_boxes = tgt["boxes"].detach().to("cpu", f64).reshape(-1, 4)
        images.append(
            Image(
                det_boxes=pred["boxes"].detach().to("cpu", f64).reshape(-1, 4),
                det_scores=pred["scores"].detach().to("cpu", f64).reshape(-1),
                det_labels=pred["labels"].detach().to("cpu", i64).reshape(-1),
                gt_boxes=gt_boxes,
                gt_labels=tgt["labels"].detach().to("cpu", i64).reshape(-1),
                gt_ignored=ignored_mask(tgt, gt_boxes.shape[0]),
            )
        )
    _check_labels(images, num_classes)
    return images


def infer_num_classes(images: Sequence[Image], class_names: Sequence[str] | None) -> int:
    """``len(class_names)``, or ``1 + `` the largest label seen (0 when there is none).

    Args:
        images: the validated images.
        class_names: the class names, or None.

    Returns:
        The number of object classes ``C``.
    """
    if class_names is not None:
        return len(class_names)
    labels = [t for im in images for t in (im.det_labels, im.gt_labels) if t.numel()]
    return int(torch.cat(labels).max()) + 1 if labels else 0
