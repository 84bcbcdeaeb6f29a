"""Drawing boxes on images (pixels live here and in metrics only).

Labels are written in a filled box above each box (inside the image when the box touches the
top), in a font scaled to the image (:func:`font_size_for`), so they read on busy backgrounds.
:func:`detection_picture` draws one image at a readable size with a legend strip under it (one
TensorBoard card per image); :func:`detection_grid` puts several images in one grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2 import functional as F
from torchvision.utils import make_grid

from src.detection.box_ops import scale_boxes

__all__ = [
    "to_uint8",
    "draw_detections",
    "detection_grid",
    "detection_picture",
    "font_size_for",
    "legend_strip",
]

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
    placed: list[tuple[int, int, int, int]] | None = None,
) -> None:
    """Outline ``boxes[N, 4]`` (pixel xyxy) and write each text in a filled box.

    A label that would overlap one already written (``placed``: their pixel rectangles, updated
    here) is left out, its box still drawn: draw the most important boxes first.

    One PIL call per box: PIL has no batched drawing (torchvision's ``draw_bounding_boxes`` loops
    the same way); the boxes drawn are the few of one image.
    """
    height, width_px = size
    pad = max(1, font.size // 6) if hasattr(font, "size") else 2
    placed = [] if placed is None else placed
    for (x0, y0, x1, y1), text in zip(boxes.round().int().tolist(), texts, strict=True):
        draw.rectangle((x0, y0, x1, y1), outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        tx = min(max(x0, 0), max(width_px - tw, 0))
        if below:  # ground truth labels under the box, predictions above: they do not overlap
            ty = y1 if y1 + th <= height else max(y1 - th, 0)
        else:
            ty = y0 - th if y0 - th >= 0 else y0
        rect = (tx, ty, tx + tw, ty + th)
        if any(
            rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for r in placed
        ):
            continue
        placed.append(rect)
        draw.rectangle(rect, fill=color)
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

    Labels never overlap: the ground truth's are written first, then the predictions' by
    decreasing score; a label that would cover one already written is left out (its box is
    drawn). Boxes with a NaN or infinite coordinate or score (a diverged net's) are not drawn.

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
    placed: list[tuple[int, int, int, int]] = []
    if target is not None and len(target["boxes"]):
        boxes = target["boxes"].detach().cpu().float().reshape(-1, 4)
        finite = torch.isfinite(boxes).all(dim=1)
        boxes = scale_boxes(boxes[finite], width_px, height)
        texts = _label_text(target["labels"].cpu().reshape(-1)[finite], None, class_names)
        size = (height, width_px)
        _draw(draw, boxes, texts, TRUE_COLOR, TEXT_ON_TRUE, width, font, size, True, placed)
    if pred is not None and len(pred["boxes"]):
        scores = pred["scores"].detach().cpu()
        finite = torch.isfinite(pred["boxes"].detach().cpu()).all(dim=1) & torch.isfinite(scores)
        keep = (scores >= score_threshold) & finite
        if max_boxes is not None and int(keep.sum()) > max_boxes:
            top = torch.topk(torch.where(keep, scores, -1.0), int(max_boxes)).indices
            keep = torch.zeros_like(keep).index_fill_(0, top, True)
        if keep.any():
            order = scores[keep].argsort(descending=True, stable=True)
            boxes = scale_boxes(pred["boxes"].detach().cpu().float()[keep][order], width_px, height)
            texts = _label_text(pred["labels"].cpu()[keep][order], scores[keep][order], class_names)
            size = (height, width_px)
            _draw(draw, boxes, texts, PRED_COLOR, TEXT_ON_PRED, width, font, size, False, placed)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).contiguous()


def legend_strip(
    width: int, text_items: Sequence[tuple[str, tuple[int, int, int] | None]], size: int
) -> Tensor:
    """A white strip ``Tensor[3, h, width]`` uint8 with coloured swatches and their meaning.

    The entries go left to right, on as many rows of ``1.8 * size`` pixels as needed to stay
    inside ``width`` (an entry wider than ``width`` gets a row of its own; keep texts short). An
    entry whose colour is None is a note: text without a swatch.
    """
    font = _font(size)
    row = int(size * 1.8)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [
        (int(size * 1.5) if color is not None else 0) + int(measure.textlength(text, font=font))
        for text, color in text_items
    ]
    places: list[tuple[int, int]] = []  # (x, row index) of each entry
    x, line = size // 2, 0
    for w in widths:  # a few legend entries
        if x > size // 2 and x + w > width:
            x, line = size // 2, line + 1
        places.append((x, line))
        x += w + size * 2
    strip = Image.new("RGB", (width, row * (line + 1)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for (text, color), (x, line) in zip(text_items, places, strict=True):
        mid = row * line + row // 2
        if color is not None:
            draw.rectangle((x, mid - size // 2, x + size, mid + size // 2), fill=color)
            x += int(size * 1.5)
        draw.text((x, mid), text, fill=(0, 0, 0), font=font, anchor="lm")
    return torch.from_numpy(np.asarray(strip).copy()).permute(2, 0, 1).contiguous()


def detection_picture(
    image: Tensor,
    pred: dict[str, Tensor] | None = None,
    target: dict[str, Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    max_boxes: int | None = 10,
    size: int = 512,
    threshold_note: str = "",
) -> Tensor:
    """One image with its true and predicted boxes and a legend, for one TensorBoard card.

    The image is resized so that its longer side is ``size`` pixels before drawing, so the
    labels are drawn sharp in a font scaled to that size (:func:`font_size_for`: 28 px at 512)
    rather than enlarged from a small input image.

    Args:
        image: ``Tensor[3, H, W]``, float in [0, 1] or uint8.
        pred: ``boxes: Tensor[N, 4]`` normalised xyxy, ``scores: Tensor[N]``, ``labels: Tensor[N]``
            0-based.
        target: ``boxes: Tensor[G, 4]`` normalised xyxy, ``labels: Tensor[G]`` 0-based.
        class_names: names indexed by 0-based label.
        score_threshold: minimum score of a drawn prediction.
        max_boxes: at most this many predictions (the highest scores); None: all.
        size: the longer side of the drawn image, in pixels.
        threshold_note: what the threshold is, a note under the legend (e.g. ``F1-optimal``).

    Returns:
        ``Tensor[3, H', W']`` uint8: the image (longer side ``size``) above its legend strip.
    """
    canvas = to_uint8(image.detach().cpu())
    height, width = canvas.shape[-2:]
    scale = size / max(height, width)
    new_size = [max(1, round(height * scale)), max(1, round(width * scale))]
    resized = F.resize(canvas, new_size, antialias=True)
    drawn = draw_detections(
        resized, pred, target, class_names, score_threshold=score_threshold, max_boxes=max_boxes
    )
    items: list[tuple[str, tuple[int, int, int] | None]] = [
        (f"prediction, score >= {score_threshold:.2f}", PRED_COLOR)
    ]
    if target is not None:
        items.insert(0, ("ground truth", TRUE_COLOR))
    notes = [threshold_note] if threshold_note else []
    if max_boxes is not None:
        notes.append(f"at most {max_boxes} predictions")
    if notes:
        items.append(("; ".join(notes), None))
    font = max(11, round(font_size_for(*new_size) * 0.7))
    return torch.cat((drawn, legend_strip(new_size[1], items, font)), dim=1)


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
