"""COCO AP/AR by object size: equal to pycocotools' COCOeval on real detections; hand counts."""

from __future__ import annotations

import contextlib
import io
import math
import xml.etree.ElementTree as ET

import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from benchmarks.voc_mini_map import load_voc_mini
from src.data.voc import VOC_CLASSES, VOCDataset
from src.metrics.sizes import size_breakdown
from tests.conftest import shared_data


def _cocoeval_stats(targets: list[dict], preds: list[dict]) -> list[float]:
    """pycocotools' COCOeval run directly on the detections written in the COCO format."""
    images, annotations, results = [], [], []
    for i, (t, p) in enumerate(zip(targets, preds, strict=True)):
        images.append({"id": i})
        for box, label, crowd in zip(
            t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist(), strict=True
        ):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": label,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(crowd),
                }
            )
        for box, score, label in zip(
            p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist(), strict=True
        ):
            bbox = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            results.append({"image_id": i, "category_id": label, "bbox": bbox, "score": score})
    categories = [{"id": c, "name": n} for c, n in enumerate(VOC_CLASSES)]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def test_equals_cocoeval_on_voc_mini() -> None:
    shared_data("voc-mini-detections")
    targets, preds = load_voc_mini(shared_data())
    stats = _cocoeval_stats(targets, preds)
    result = size_breakdown(preds, targets, VOC_CLASSES)
    expected_ap = {"all": stats[0], "small": stats[3], "medium": stats[4], "large": stats[5]}
    expected_ar = {"all": stats[8], "small": stats[9], "medium": stats[10], "large": stats[11]}
    for size in expected_ap:
        assert result.ap[size] == pytest.approx(expected_ap[size], abs=1e-6), size
        assert result.ar[size] == pytest.approx(expected_ar[size], abs=1e-6), size
    assert min(expected_ap.values()) > 0  # every size occurs in VOC-mini

    # the counts, by hand from the annotation files (devkit pixels, difficult objects left out)
    dataset = VOCDataset(shared_data("VOCdevkit-mini"), image_sets=[[2012, "trainval"]])
    counts = dict.fromkeys(("all", "small", "medium", "large"), 0)
    for record in dataset.records:
        xml = shared_data("VOCdevkit-mini", "VOC2012", "Annotations", f"{record.image_id}.xml")
        for obj in ET.parse(xml).findall("object"):
            if int(obj.find("difficult").text):
                continue
            box = obj.find("bndbox")
            w = float(box.find("xmax").text) - float(box.find("xmin").text)
            h = float(box.find("ymax").text) - float(box.find("ymin").text)
            counts["all"] += 1
            counts["small"] += w * h <= 32**2
            counts["medium"] += 32**2 <= w * h <= 96**2
            counts["large"] += w * h >= 96**2
    assert result.num_gt == counts
    assert [r[0] for r in result.rows()] == ["all", "small", "medium", "large"]


def test_boundary_box_counts_in_two_sizes() -> None:
    """A 32 x 32 box is small and medium for COCOeval (inclusive ranges)."""
    boxes = torch.tensor([[10.0, 10.0, 42.0, 42.0], [0.0, 0.0, 200.0, 50.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 0])}]
    preds = [{"boxes": boxes, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])}]
    result = size_breakdown(preds, targets)
    assert result.num_gt == {"all": 2, "small": 1, "medium": 1, "large": 1}
    assert result.ap == {"all": 1.0, "small": 1.0, "medium": 1.0, "large": 1.0}
    crowd = [dict(targets[0], iscrowd=torch.tensor([False, True]))]
    only_small = size_breakdown(preds, crowd)
    assert only_small.num_gt == {"all": 1, "small": 1, "medium": 1, "large": 0}
    assert math.isnan(only_small.ap["large"]) and math.isnan(only_small.ar["large"])
