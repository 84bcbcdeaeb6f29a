"""Detection metrics: the book's class error and bbox MAE, VOC mAP."""

from src.metrics.book import BBoxMAE, ClassError

__all__ = ["BBoxMAE", "ClassError"]
