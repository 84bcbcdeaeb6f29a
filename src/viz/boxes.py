"""Drawing boxes on images (pixels live here and in metrics only).

Labels are written in a filled box above each box (inside the image when the box touches the
top), in a font scaled to the image (:func:`font_size_for`), so they read on busy backgrounds;
:func:`detection_grid` adds a legend strip under the grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from src.detection.box_ops import scale_boxes

__all__ = ["to_uint8", "draw_detections", "detection_grid", "font_size_for", "legend_strip"]

PRED_COLOR = (255, 40, 40)
TRUE_COLOR = (0, 230, 0)
TEXT_ON_PRED = (255, 255, 255)
TEXT_ON_TRUE = (0, 0, 0)


def to_uint8(image: Tensor) -> Tensor:
    """``Tensor[3, H, W]`` float in [0, 1] (or uint8) -> ``Tensor[3, H, W]`` uint8."""
    if image.dtype == torch.uint8:
        return image
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def font_size_for(height: int, width: int) -> int:
    """Label font size in pixels: 1/18 of the shorter side, at least 11 px (14 px at 256 px)."""
    return max(11, round(min(height, width) / 18))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


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


def _draw(
    draw: ImageDraw.ImageDraw,
    boxes: Tensor,
    texts: Sequence[str],
    color: tuple[int, int, int],
    text_color: tuple[int, int, int],
    width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    size: tuple[int, int],
    below: bool = False,
) -> None:
    """Outline ``boxes[N, 4]`` (pixel xyxy) and write each text in a filled box.

    One PIL call per box: PIL has no batched drawing (torchvision's ``draw_bounding_boxes`` loops
    the same way); the boxes drawn are the few of one image.
    """
    height, width_px = size
    pad = max(1, font.size // 6) if hasattr(font, "size") else 2
    for (x0, y0, x1, y1), text in zip(boxes.round().int().tolist(), texts, strict=True):
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(x0, 0), max(width_px - tw, 0))
        if below:  # ground truth labels under the box, predictions above: they do not overlap
            ty = y1 if y1 + th <= height else max(y1 - th, 0)
        else:
            ty = y0 - th if y0 - th >= 0 else y0
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=color)
        draw.text((tx + pad - left, ty + pad - top), text, fill=text_color, font=font)


def draw_detections(
    image: Tensor,
    pred: dict[str, Tensor] | None = None,
    target: dict[str, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    width: int = 2,
    font_size: int | None = None,
    max_boxes: int | None = None,
) -> Tensor:
    """Draw predicted (red, with scores, labels above) and true (green, labels below) boxes.

    Args:
        image: ``Tensor[3, H, W]``, float in [0, 1] or uint8.
        pred: ``boxes: Tensor[N, 4]`` normalised xyxy, ``scores: Tensor[N]``, ``labels: Tensor[N]``
            0-based; boxes scoring below ``score_threshold`` are not drawn.
        target: ``boxes: Tensor[G, 4]`` normalised xyxy, ``labels: Tensor[G]`` 0-based.
        class_names: names indexed by 0-based label.
        score_threshold: minimum score to draw a prediction.
        width: line width in pixels.
        font_size: label font size in pixels; default :func:`font_size_for` the image.
        max_boxes: draw at most this many predictions (the highest scores); None: all.

    Returns:
        ``Tensor[3, H, W]`` uint8 with the boxes drawn (a new tensor).
    """
    canvas = to_uint8(image.detach().cpu())
    height, width_px = canvas.shape[-2:]
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy().copy())
    draw = ImageDraw.Draw(picture)
    font = _font(font_size or font_size_for(height, width_px))
    if target is not None and len(target["boxes"]):
        boxes = scale_boxes(target["boxes"].detach().cpu().float(), width_px, height)
        texts = _label_text(target["labels"].cpu(), None, class_names)
        _draw(draw, boxes, texts, TRUE_COLOR, TEXT_ON_TRUE, width, font, (height, width_px), True)
    if pred is not None and len(pred["boxes"]):
        scores = pred["scores"].detach().cpu()
        keep = scores >= score_threshold
        if max_boxes is not None and int(keep.sum()) > max_boxes:
            top = torch.topk(torch.where(keep, scores, -1.0), int(max_boxes)).indices
            keep = torch.zeros_like(keep).index_fill_(0, top, True)
        if keep.any():
            boxes = scale_boxes(pred["boxes"].detach().cpu().float()[keep], width_px, height)
            texts = _label_text(
                pred["labels"].cpu()[keep], pred["scores"].detach().cpu()[keep], class_names
            )
            _draw(draw, boxes, texts, PRED_COLOR, TEXT_ON_PRED, width, font, (height, width_px))
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()


def legend_strip(
    width: int, text_items: Sequence[tuple[str, tuple[int, int, int]]], size: int
) -> Tensor:
    """A white strip ``Tensor[3, h, width]`` uint8 with coloured swatches and their meaning."""
    font = _font(size)
    height = int(size * 1.8)
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    x = size // 2
    for text, color in text_items:
        draw.rectangle((x, height // 2 - size // 2, x + size, height // 2 + size // 2), fill=color)
        x += int(size * 1.5)
        draw.text((x, height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        x += int(draw.textlength(text, font=font)) + size * 2
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).contiguous()


def detection_grid(
    images: Tensor,
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    nrow: int = 4,
    max_boxes: int | None = 10,
) -> Tensor:
    """A grid of images with predicted and true boxes and a legend strip: ``Tensor[3, H', W']``.

    At most ``max_boxes`` predictions per image are drawn (the highest scores; an untrained net
    has hundreds above any threshold), as the legend says.
    """
    panels = [
        draw_detections(
            img,
            pred,
            None if targets is None else targets[i],
            class_names=class_names,
            score_threshold=score_threshold,
            max_boxes=max_boxes,
        )
        for i, (img, pred) in enumerate(zip(images, preds, strict=True))
    ]
    grid = make_grid(torch.stack(panels), nrow=nrow, padding=2, pad_value=255)
    size = font_size_for(*panels[0].shape[-2:])
    cap = f", top {max_boxes} an image" if max_boxes is not None else ""
    items = [(f"prediction (score >= {score_threshold:g}{cap})", PRED_COLOR)]
    if targets is not None:
        items.insert(0, ("ground truth", TRUE_COLOR))
    return torch.cat((grid, legend_strip(grid.shape[-1], items, size)), dim=1)
