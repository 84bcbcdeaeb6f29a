"""Datasets, DataModules, transforms and collation for detection.

Names are imported lazily so that ``import src.data.transforms`` does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BananaDataModule": "src.data.banana",
    "BananaDataset": "src.data.banana",
    "CocoDataModule": "src.data.coco",
    "CocoDataset": "src.data.coco",
    "DetectionDataModule": "src.data.base",
    "DetectionDataset": "src.data.base",
    "coco_evaluate": "src.data.coco_results",
    "coco_results": "src.data.coco_results",
    "read_image": "src.data.base",
    "voc_to_coco": "src.data.convert",
    "write_coco_results": "src.data.coco_results",
    "build_transforms": "src.data.transforms",
    "detection_collate": "src.data.collate",
    "download_and_extract": "src.data.download",
    "generate_banana_dataset": "src.data.synthetic",
    "VOCDataModule": "src.data.voc",
    "VOCDataset": "src.data.voc",
    "VOC_CLASSES": "src.data.voc",
    "YoloDataset": "src.data.yolo",
    "coco_to_yolo": "src.data.convert",
    "yolo_to_coco": "src.data.convert",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
