"""COCO AP and AR by object size, with the number of ground truths of each size.

COCOeval's area ranges, in square pixels of the box (``w * h``), both ends *inclusive*
(``COCOeval`` ignores a ground truth when ``area < lo or area > hi``):

* ``small``: ``[0, 32**2]``, ``medium``: ``[32**2, 96**2]``, ``large``: ``[96**2, 1e5**2]``,

so a box of exactly ``32 * 32`` or ``96 * 96`` pixels counts in two ranges, as in COCOeval.
AP is COCO's ``AP@[.50:.95]`` (101-point, 100 detections per image) restricted to the range:
ground truths outside it, and unmatched detections outside it, are ignored. AR is COCO's
``AR@100`` for the range. These are ``COCOeval.stats[3:6]`` (``APs, APm, APl``) and
``stats[9:12]`` (``ARs, ARm, ARl``), computed by the project's COCO evaluator
(:class:`src.metrics.coco_map.DetectionMeanAveragePrecision`, ``faster_coco_eval`` or
``pycocotools`` with pycocotools' own thresholds). A range without ground truth has AP and AR
nan (COCOeval's -1).

Ground truths flagged ``difficult`` or ``iscrowd`` are COCO crowd regions: they are not counted
and detections on them are ignored (the project's COCO convention for VOC difficult objects).
No Lightning or Hydra here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from src.metrics._inputs import check_images
from src.metrics.coco_map import DetectionMeanAveragePrecision

__all__ = ["SIZE_RANGES", "SizeBreakdown", "size_breakdown"]

#: COCOeval's ``areaRng`` (square pixels, inclusive) by name.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, 1e5**2),
}


@dataclass(frozen=True)
class SizeBreakdown:
    """COCO AP, AR and ground-truth count per object size.

    Attributes:
        ap: ``{"all", "small", "medium", "large"}`` -> COCO AP@[.50:.95] (nan: no ground truth).
        ar: the same keys -> COCO AR@100.
        num_gt: the same keys -> number of non-crowd ground truths in the range.
    """

    ap: dict[str, float]
    ar: dict[str, float]
    num_gt: dict[str, int]

    def rows(self) -> list[tuple[str, int, float, float]]:
        """``(size, num_gt, ap, ar)`` per size, ``all`` first (for tables)."""
        return [(k, self.num_gt[k], self.ap[k], self.ar[k]) for k in ("all", *SIZE_RANGES)]


def _nan_if_missing(value: Tensor) -> float:
    """COCO's -1 (no ground truth in the range) as nan."""
    v = float(value)
    return math.nan if v < 0 else v


def size_breakdown(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str] | None = None,
    backend: str | None = None,
) -> SizeBreakdown:
    """COCO AP and AR by object size, and ground-truth counts (see the module docstring).

    Args:
        preds: per image ``{"boxes": Tensor[N, 4] xyxy pixels float, "scores": Tensor[N],
            "labels": Tensor[N] int64 0-based}``.
        targets: per image ``{"boxes": Tensor[M, 4] xyxy pixels, "labels": Tensor[M] int64,
            optional "difficult" / "iscrowd": Tensor[M] bool}`` (crowd regions).
        class_names: the C class names, only used to validate the labels.
        backend: ``"faster_coco_eval"`` or ``"pycocotools"`` (default: the project's
            :func:`src.metrics.coco_map.default_backend`).

    Returns:
        A :class:`SizeBreakdown`.

    Raises:
        ValueError: inconsistent inputs (the message names the entry and key).
    """
    images = check_images(preds, targets, None if class_names is None else len(class_names))
    kwargs = {"backend": backend} if backend is not None else {}
    metric = DetectionMeanAveragePrecision(box_format="xyxy", iou_type="bbox", **kwargs)
    metric.update(
        [
            {
                "boxes": im.det_boxes.float(),
                "scores": im.det_scores.float(),
                "labels": im.det_labels,
            }
            for im in images
        ],
        [
            {"boxes": im.gt_boxes.float(), "labels": im.gt_labels, "iscrowd": im.gt_ignored.long()}
            for im in images
        ],
    )
    result = metric.compute()
    boxes = [im.gt_boxes[~im.gt_ignored] for im in images]
    gt = torch.cat(boxes) if boxes else torch.zeros(0, 4, dtype=torch.float64)
    area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    num_gt = {"all": int(area.numel())}
    num_gt.update(
        {k: int(((area >= lo) & (area <= hi)).sum()) for k, (lo, hi) in SIZE_RANGES.items()}
    )
    ap = {"all": _nan_if_missing(result["map"])}
    ar = {"all": _nan_if_missing(result["mar_100"])}
    for k in SIZE_RANGES:
        ap[k] = _nan_if_missing(result[f"map_{k}"])
        ar[k] = _nan_if_missing(result[f"mar_{k}"])
    return SizeBreakdown(ap=ap, ar=ar, num_gt=num_gt)
