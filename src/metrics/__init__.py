"""Detection metrics: the book's class error and bbox MAE, VOC and COCO mAP, error analysis."""

from src.metrics.book import BBoxMAE, ClassError
from src.metrics.coco_map import DetectionMeanAveragePrecision
from src.metrics.confusion import DetectionConfusion, confusion_matrix
from src.metrics.curves import F1Optimum, ScoreCurves, f1_optimal_threshold, score_curves
from src.metrics.errors import TideErrors, tide_errors
from src.metrics.sizes import SizeBreakdown, size_breakdown
from src.metrics.voc_map import VOCMeanAveragePrecision

__all__ = [
    "BBoxMAE",
    "ClassError",
    "DetectionConfusion",
    "DetectionMeanAveragePrecision",
    "F1Optimum",
    "ScoreCurves",
    "SizeBreakdown",
    "TideErrors",
    "VOCMeanAveragePrecision",
    "confusion_matrix",
    "f1_optimal_threshold",
    "score_curves",
    "size_breakdown",
    "tide_errors",
]
