"""The project's COCO mAP: faster_coco_eval backend equal to pycocotools on real detections."""

from __future__ import annotations

import pytest

from benchmarks.voc_mini_map import load_voc_mini
from src.metrics import DetectionMeanAveragePrecision
from src.metrics.coco_map import default_backend
from tests.conftest import shared_data


def test_faster_coco_eval_equals_pycocotools_on_voc_mini() -> None:
    shared_data("voc-mini-detections")
    targets, preds = load_voc_mini(shared_data())
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    assert default_backend() == "faster_coco_eval"  # a default dependency
    results = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        metric = DetectionMeanAveragePrecision(box_format="xyxy", backend=backend)
        metric.update(preds, targets)
        results[backend] = metric.compute()
    for key in ("map", "map_50", "map_75", "map_small", "map_large", "mar_100"):
        ref = float(results["pycocotools"][key])
        assert float(results["faster_coco_eval"][key]) == pytest.approx(ref, abs=1e-4), key
    assert float(results["pycocotools"]["map_50"]) > 0.5  # real detections, not a degenerate case
