"""Detections in the COCO results format, and COCO evaluation of them with pycocotools.

The results format (what ``pycocotools.COCO.loadRes`` and evaluation servers read) is a JSON
list with one entry per detection::

    [{"image_id": 7, "category_id": 18, "bbox": [x, y, w, h], "score": 0.93}, ...]

``bbox`` is in pixels of the original image, ``category_id`` the dataset's original category id
(``datamodule.category_ids[label]``) and ``image_id`` the image's id in the ground truth
(``target["coco_image_id"]``; :meth:`src.data.base.DetectionDataset.coco_ground_truth` gives the
matching ground truth for datasets that are not COCO JSON files).

No Lightning here: :mod:`src.eval` and :mod:`src.predict` call these functions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_convert

log = logging.getLogger(__name__)

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "COCO_REC_THRESHOLDS",
    "coco_evaluate",
    "coco_results",
    "write_coco_results",
]

# pycocotools' own thresholds (float64 ``np.linspace``, as ``COCOeval.Params``). torchmetrics'
# ``MeanAveragePrecision`` defaults to float32 ``torch.linspace`` values (0.550000011920929, ...):
# with pixel-integer boxes an IoU of exactly 0.55 then counts differently, and on VOC-mini its
# ``map`` differs from COCOeval's by 2e-4. Pass these to it to get COCOeval's figures.
COCO_IOU_THRESHOLDS: list[float] = np.linspace(0.5, 0.95, 10).tolist()
COCO_REC_THRESHOLDS: list[float] = np.linspace(0.0, 1.0, 101).tolist()

# names of COCOeval.stats, in order
COCO_STATS: tuple[str, ...] = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def coco_results(
    detections: Sequence[dict[str, Tensor]],
    image_ids: Sequence[int],
    label_to_category_id: Sequence[int],
) -> list[dict[str, Any]]:
    """Detections of a batch (or a whole split) as COCO result entries.

    Args:
        detections: one dict per image with ``boxes`` ``Tensor[N_i, 4]`` float **pixel** xyxy
            of the original image (e.g. ``src.detection.box_ops.to_pixels`` of the
            post-processed detections), ``scores`` ``Tensor[N_i]`` and ``labels``
            ``Tensor[N_i]`` int64 0-based object classes.
        image_ids: the COCO image id of each image (``target["coco_image_id"]``).
        label_to_category_id: the category id of each label (``datamodule.category_ids``).

    Returns:
        One dict per detection ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
        (plain Python numbers), images in the given order, detections in their order.

    Raises:
        ValueError: ``detections`` and ``image_ids`` differ in length, or a label has no
            category id.
    """
    if len(detections) != len(image_ids):
        raise ValueError(
            f"coco_results got {len(detections)} detection dicts but {len(image_ids)} image ids"
        )
    if not detections:
        return []
    lookup = torch.as_tensor(list(label_to_category_id), dtype=torch.int64)
    counts = torch.tensor([int(d["labels"].numel()) for d in detections], dtype=torch.int64)
    labels = torch.cat([d["labels"].detach().cpu().reshape(-1).long() for d in detections])
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= lookup.numel()):
        raise ValueError(
            f"detection labels must lie in [0, {lookup.numel()}) (one category id per class), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    boxes = torch.cat([d["boxes"].detach().cpu().reshape(-1, 4).double() for d in detections])
    scores = torch.cat([d["scores"].detach().cpu().reshape(-1).double() for d in detections])
    ids = torch.as_tensor(list(image_ids), dtype=torch.int64).repeat_interleave(counts)
    xywh = box_convert(boxes, "xyxy", "xywh")
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            ids.tolist(), lookup[labels].tolist(), xywh.tolist(), scores.tolist(), strict=True
        )
    ]


def write_coco_results(path: str | os.PathLike[str], results: Sequence[dict[str, Any]]) -> Path:
    """Write COCO result entries (from :func:`coco_results`) to a JSON file.

    Args:
        path: the file to write (parent folders are created).
        results: the entries.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(list(results), fh)
    log.info("Wrote %d detections in the COCO results format to %s", len(results), path)
    return path


def coco_evaluate(
    ground_truth: dict[str, Any] | str | os.PathLike[str],
    results: Sequence[dict[str, Any]] | str | os.PathLike[str],
) -> dict[str, float]:
    """COCO bbox evaluation (pycocotools ``COCOeval``) of result entries against ground truth.

    Args:
        ground_truth: a COCO detection dict or JSON file (e.g. a ``CocoDataset``'s JSON or
            :meth:`src.data.base.DetectionDataset.coco_ground_truth`).
        results: result entries or a results JSON file.

    Returns:
        The twelve ``COCOeval.stats`` by name (:data:`COCO_STATS`: ``map``, ``map_50``, ...);
        pycocotools' printed summary goes to the DEBUG log.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if isinstance(ground_truth, dict):
        dataset = json.loads(json.dumps(ground_truth))  # a copy: pycocotools mutates it
    else:
        dataset = json.loads(Path(ground_truth).read_text(encoding="utf-8"))
    for ann in dataset.get("annotations", []):  # optional in COCO files, required by COCOeval
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        entries = results if not isinstance(results, (str, os.PathLike)) else str(results)
        if isinstance(entries, str):
            entries = json.loads(Path(entries).read_text(encoding="utf-8"))
        entries = [dict(e) for e in entries]  # loadRes adds keys to the entries
        if entries:
            dt = gt.loadRes(entries)
        else:  # loadRes cannot read an empty list: no detections at all
            dt = COCO()
            dt.dataset = {**gt.dataset, "annotations": []}
            dt.createIndex()
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval:\n%s", printed.getvalue())
    return {name: float(v) for name, v in zip(COCO_STATS, evaluator.stats, strict=True)}
