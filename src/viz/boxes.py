"""Drawing boxes on images (pixels live here and in metrics only)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from src.detection.box_ops import scale_boxes

__all__ = ["to_uint8", "draw_detections", "detection_grid"]

PRED_COLOR = "red"
TRUE_COLOR = "lime"


def to_uint8(image: Tensor) -> Tensor:
    """``Tensor[3, H, W]`` float in [0, 1] (or uint8) -> ``Tensor[3, H, W]`` uint8."""
    if image.dtype == torch.uint8:
        return image
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _label_text(
    labels: Tensor, scores: Tensor | None, class_names: Sequence[str] | None
) -> list[str]:
    names = [
        class_names[int(k)]
        if class_names is not None and 0 <= int(k) < len(class_names)
        else str(int(k))
        for k in labels.tolist()
    ]
    if scores is None:
        return names
    return [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist(), strict=True)]


def draw_detections(
    image: Tensor,
    pred: dict[str, Tensor] | None = None,
    target: dict[str, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    width: int = 2,
) -> Tensor:
    """Draw predicted (red, with scores) and true (green) boxes, like the book's ``display``.

    Args:
        image: ``Tensor[3, H, W]``, float in [0, 1] or uint8.
        pred: ``boxes: Tensor[N, 4]`` normalised xyxy, ``scores: Tensor[N]``, ``labels: Tensor[N]``
            0-based; boxes scoring below ``score_threshold`` are not drawn.
        target: ``boxes: Tensor[G, 4]`` normalised xyxy, ``labels: Tensor[G]`` 0-based.
        class_names: names indexed by 0-based label.
        score_threshold: minimum score to draw a prediction.
        width: line width in pixels.

    Returns:
        ``Tensor[3, H, W]`` uint8 with the boxes drawn (a new tensor).
    """
    canvas = to_uint8(image.cpu())
    height, width_px = canvas.shape[-2:]
    if target is not None and len(target["boxes"]):
        boxes = scale_boxes(target["boxes"].detach().cpu().float(), width_px, height)
        canvas = draw_bounding_boxes(
            canvas,
            boxes,
            labels=_label_text(target["labels"].cpu(), None, class_names),
            colors=TRUE_COLOR,
            width=width,
        )
    if pred is not None and len(pred["boxes"]):
        keep = pred["scores"].detach().cpu() >= score_threshold
        if keep.any():
            boxes = scale_boxes(pred["boxes"].detach().cpu().float()[keep], width_px, height)
            canvas = draw_bounding_boxes(
                canvas,
                boxes,
                labels=_label_text(
                    pred["labels"].cpu()[keep], pred["scores"].detach().cpu()[keep], class_names
                ),
                colors=PRED_COLOR,
                width=width,
            )
    return canvas


def detection_grid(
    images: Tensor,
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    nrow: int = 4,
) -> Tensor:
    """A grid of images with predicted and true boxes: ``Tensor[3, H', W']`` uint8."""
    panels = [
        draw_detections(
            img,
            pred,
            None if targets is None else targets[i],
            class_names=class_names,
            score_threshold=score_threshold,
        )
        for i, (img, pred) in enumerate(zip(images, preds, strict=True))
    ]
    return make_grid(torch.stack(panels), nrow=nrow, padding=2)
