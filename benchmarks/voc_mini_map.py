"""VOC AP@0.5 of the real detections on VOC-mini, with both VOC variants and torchmetrics.

    python benchmarks/voc_mini_map.py [--data ../shared/data]

Ground truth comes through ``VOCDataset.pixel_target`` (the project's loader); the detections
are the text files of ``voc-mini-detections`` (``class score xmin ymin xmax ymax`` in pixels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchmetrics.detection import MeanAveragePrecision  # noqa: E402

from src.data.voc import VOC_CLASSES, VOCDataset  # noqa: E402
from src.metrics.voc_map import VOCMeanAveragePrecision  # noqa: E402


def read_detections(path: Path) -> dict[str, torch.Tensor]:
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return {
        "boxes": torch.tensor([[float(v) for v in r[2:6]] for r in rows]).reshape(-1, 4),
        "scores": torch.tensor([float(r[1]) for r in rows]),
        "labels": torch.tensor([VOC_CLASSES.index(r[0]) for r in rows], dtype=torch.int64),
    }


def load_voc_mini(data: Path) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    """VOC-mini trainval ground truth (pixels, difficult flags) and its real detections."""
    dataset = VOCDataset(
        data / "VOCdevkit-mini", image_sets=[[2012, "trainval"]], keep_difficult=True
    )
    targets = [dataset.pixel_target(i) for i in range(len(dataset))]
    preds = [
        read_detections(data / "voc-mini-detections" / f"{r.image_id}.txt") for r in dataset.records
    ]
    return targets, preds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    targets, preds = load_voc_mini(args.data)
    results = {}
    for name, use07 in (("VOC07 11-point", True), ("VOC area (2010+)", False)):
        metric = VOCMeanAveragePrecision(use_07_metric=use07, class_names=VOC_CLASSES)
        metric.update(preds, targets)
        results[name] = metric.compute()
    coco = MeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5])
    coco.update(
        preds,
        [
            {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()}
            for t in targets
        ],
    )
    coco_map = float(coco.compute()["map_50"])
    num_objects = sum(len(t["labels"]) for t in targets)
    print(f"VOC-mini trainval: {len(targets)} images, {num_objects} objects")
    print("| class | VOC07 AP | area AP |")
    print("| --- | ---: | ---: |")
    a07, aar = (
        results["VOC07 11-point"]["ap_per_class"],
        results["VOC area (2010+)"]["ap_per_class"],
    )
    for c, name in enumerate(VOC_CLASSES):
        print(f"| {name} | {float(a07[c]):.4f} | {float(aar[c]):.4f} |")
    for name, res in results.items():
        print(f"mAP@0.5 {name}: {float(res['map_50']):.6f}")
    print(f"torchmetrics map_50 (COCO 101-point, difficult as iscrowd): {coco_map:.6f}")


if __name__ == "__main__":
    main()
