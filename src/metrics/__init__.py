"""Detection metrics: the book's class error and bbox MAE, VOC mAP with the devkit's rules."""

from src.metrics.book import BBoxMAE, ClassError
from src.metrics.coco_map import DetectionMeanAveragePrecision
from src.metrics.voc_map import VOCMeanAveragePrecision

__all__ = [
    "BBoxMAE",
    "ClassError",
    "DetectionMeanAveragePrecision",
    "VOCMeanAveragePrecision",
]
