"""Box format conversion and overlap, on top of ``torchvision.ops``.

Conventions used across ``src.detection``:

* ``xyxy``: ``(xmin, ymin, xmax, ymax)``; ``cxcywh``: ``(cx, cy, w, h)``.
* Unless a docstring says otherwise, boxes are ``float`` tensors normalised to ``[0, 1]``
  by the image width and height. Pixel boxes appear only in drawing and metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert
from torchvision.ops import box_iou as _tv_box_iou

__all__ = [
    "box_iou",
    "box_xyxy_to_cxcywh",
    "box_cxcywh_to_xyxy",
    "box_corner_to_center",
    "box_center_to_corner",
    "scale_boxes",
    "to_pixels",
]


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert corner boxes to centre boxes.

    Args:
        boxes: ``Tensor[..., 4]`` float, xyxy.

    Returns:
        ``Tensor[..., 4]`` of the same dtype, cxcywh.
    """
    shape = boxes.shape
    return box_convert(boxes.reshape(-1, 4), "xyxy", "cxcywh").reshape(shape)


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert centre boxes to corner boxes.

    Args:
        boxes: ``Tensor[..., 4]`` float, cxcywh.

    Returns:
        ``Tensor[..., 4]`` of the same dtype, xyxy.
    """
    shape = boxes.shape
    return box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy").reshape(shape)


# The book's names (d2l.box_corner_to_center / d2l.box_center_to_corner).
box_corner_to_center = box_xyxy_to_cxcywh
box_center_to_corner = box_cxcywh_to_xyxy


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise Jaccard overlap (IoU), continuous areas (no +1 pixel convention).

    Args:
        boxes1: ``Tensor[N, 4]`` float, xyxy (any consistent unit).
        boxes2: ``Tensor[M, 4]`` float, xyxy, same unit.

    Returns:
        ``Tensor[N, M]`` float IoU in ``[0, 1]``; 0 where a union is empty.
    """
    iou = _tv_box_iou(boxes1, boxes2)
    return torch.nan_to_num(iou, nan=0.0)


def scale_boxes(boxes: Tensor, width: float, height: float) -> Tensor:
    """Scale boxes by ``(width, height)``: normalised -> pixels, or the inverse with ``1/w, 1/h``.

    Args:
        boxes: ``Tensor[..., 4]`` float, xyxy.
        width: factor for x coordinates.
        height: factor for y coordinates.

    Returns:
        A new ``Tensor[..., 4]``; ``boxes`` is not modified.
    """
    factor = boxes.new_tensor([width, height, width, height])
    return boxes * factor


def to_pixels(
    items: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Any]]
) -> list[dict[str, Tensor]]:
    """Copy detections or targets with boxes scaled from normalised xyxy to original-image pixels.

    Args:
        items: dicts with ``boxes: Tensor[N, 4]`` normalised xyxy and other per-box keys.
        targets: the batch's targets; ``orig_size`` ``(H, W)`` gives the pixel scale.

    Returns:
        New dicts (the inputs are not modified) with pixel boxes.
    """
    out = []
    for item, target in zip(items, targets, strict=True):
        h, w = (int(v) for v in target["orig_size"])
        converted = {k: v for k, v in item.items() if isinstance(v, Tensor)}
        converted["boxes"] = scale_boxes(item["boxes"].float(), w, h)
        out.append(converted)
    return out
