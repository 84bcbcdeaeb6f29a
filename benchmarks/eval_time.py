"""Per-epoch evaluation time: COCO mAP (torchmetrics, both backends) and VOC AP on 5,000 images.

    python benchmarks/eval_time.py [--data ../shared/data] [--images 5000] [--repeats 3]

The real VOC-mini ground truth and detections (100 images, ``voc-mini-detections``) are repeated
to ``--images`` images, fed to each metric in batches of 32 as a validation epoch does, and the
``update`` + ``compute`` time is reported (median of ``--repeats``). The ``faster_coco_eval``
backend of torchmetrics must give the same ``map`` / ``map_50`` / ``map_75`` as ``pycocotools``
(within 1e-4) to count.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.voc_mini_map import load_voc_mini  # noqa: E402
from src.data.voc import VOC_CLASSES  # noqa: E402
from src.metrics import DetectionMeanAveragePrecision, VOCMeanAveragePrecision  # noqa: E402


def run(make_metric, preds, targets, batch: int = 32) -> tuple[float, dict]:  # noqa: ANN001
    metric = make_metric()
    tic = time.perf_counter()
    for i in range(0, len(preds), batch):
        metric.update(preds[i : i + batch], targets[i : i + batch])
    result = metric.compute()
    return time.perf_counter() - tic, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    base_t, base_p = load_voc_mini(args.data)
    reps = -(-args.images // len(base_t))
    targets = [
        {"boxes": t["boxes"], "labels": t["labels"], "difficult": t["difficult"]}
        for t in (base_t * reps)[: args.images]
    ]
    coco_targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    preds = (base_p * reps)[: args.images]
    candidates = {
        "COCO mAP, torchmetrics + pycocotools": (
            lambda: DetectionMeanAveragePrecision(box_format="xyxy", backend="pycocotools"),
            coco_targets,
        ),
        "COCO mAP, torchmetrics + faster_coco_eval": (
            lambda: DetectionMeanAveragePrecision(box_format="xyxy", backend="faster_coco_eval"),
            coco_targets,
        ),
        "VOC AP@0.5 (project, devkit rules)": (
            lambda: VOCMeanAveragePrecision(class_names=VOC_CLASSES),
            targets,
        ),
    }
    print(f"{args.images} images ({len(base_t)} real VOC-mini images repeated), batches of 32")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = {}
    for name, (make, tg) in candidates.items():
        times = []
        for _ in range(args.repeats):
            seconds, result = run(make, preds, tg)
            times.append(seconds)
        results[name] = (statistics.median(times), result)
        print(f"{name:45s} median {statistics.median(times):7.2f} s  (runs: "
              f"{', '.join(f'{t:.2f}' for t in times)})")  # fmt: skip
    ref = results["COCO mAP, torchmetrics + pycocotools"]
    fast = results["COCO mAP, torchmetrics + faster_coco_eval"]
    diffs = {k: abs(float(ref[1][k]) - float(fast[1][k])) for k in ("map", "map_50", "map_75")}
    print("pycocotools:      " + ", ".join(f"{k}={float(ref[1][k]):.6f}" for k in diffs))
    print("faster_coco_eval: " + ", ".join(f"{k}={float(fast[1][k]):.6f}" for k in diffs))
    print(f"max |difference| {max(diffs.values()):.2e}; faster_coco_eval speed-up "
          f"{ref[0] / fast[0]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
