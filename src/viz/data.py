"""Figures of a detection training set, before any training (``python -m src.inspect``).

Each function returns a matplotlib ``Figure`` on the Agg canvas (no pyplot state), half a page
wide (3.4 inches, 8-9 pt text: :mod:`src.viz.style`); save it with
:func:`src.viz.style.save_figure` (PNG and PDF).

* :func:`classes_figure`: boxes per class and the anchor coverage of each class;
* :func:`objects_per_image_figure`: histogram of boxes per image;
* :func:`box_sizes_figure`: histograms of box width, height and aspect ratio in network-input
  pixels, with the anchors' widths, heights and ratios drawn over them;
* :func:`box_shapes_figure`: box width against height (log-log) with the anchor shapes;
* :func:`coverage_figure`: coverage per COCO size and the histogram of best-anchor IoU;
* :func:`anchor_search_figure`: coverage against the size-ladder scale, one line per ratio set;
* :func:`samples_figure`: training samples after the training transform, with their boxes.

Sizes are in pixels of the network input (the image resized to ``backbone.image_size``), the
frame in which the anchors and the matching live; the axis labels say so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, make_grid

from src.detection.box_ops import scale_boxes
from src.detection.coverage import SIZE_NAMES, AnchorCandidate, Coverage
from src.viz.boxes import to_uint8
from src.viz.style import HALF_PAGE_WIDTH_IN, paper_style

__all__ = [
    "anchor_search_figure",
    "box_shapes_figure",
    "box_sizes_figure",
    "classes_figure",
    "coverage_figure",
    "objects_per_image_figure",
    "samples_figure",
]

BOX_COLOR = "tab:blue"
ANCHOR_COLOR = "tab:orange"
WARN_COLOR = "tab:red"


def _figure(height: float, rows: int = 1, cols: int = 1, **kwargs: object) -> tuple[Figure, object]:
    fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def classes_figure(class_names: Sequence[str], coverage: Coverage, minimum: float = 0.9) -> Figure:
    """Boxes per class (left) and the share of them an anchor covers (right).

    Args:
        class_names: the ``C`` class names.
        coverage: from :func:`src.detection.coverage.anchor_coverage` (``class_counts``,
            ``per_class`` of length ``C``).
        minimum: the coverage below which ``src.train`` warns (a dashed line).

    Returns:
        A 3.4-inch-wide figure, one row per class (most frequent at the top).
    """
    counts = coverage.class_counts.numpy()
    shares = coverage.per_class.numpy() * 100
    order = np.argsort(-counts, kind="stable")[::-1]  # most frequent at the top
    names = [class_names[i] for i in order]
    y = np.arange(len(order))
    with paper_style():
        fig, axes = _figure(0.9 + 0.17 * len(order), 1, 2, sharey=True)
        left, right = axes[0]
        left.barh(y, counts[order], color=BOX_COLOR)
        left.set_yticks(y, names)
        left.set_xlabel("boxes")
        left.set_xlim(0, max(1, counts.max()) * 1.3)
        for row, value in zip(y, counts[order], strict=True):
            left.text(value, row, f" {value}", va="center", fontsize=8)
        drawn = np.nan_to_num(shares[order], nan=0.0)
        colors = [WARN_COLOR if s < minimum * 100 else BOX_COLOR for s in drawn]
        right.barh(y, drawn, color=colors)
        for row, value, n in zip(y, drawn, counts[order], strict=True):
            if not n:
                right.text(1, row, "no box", va="center", fontsize=8)
            elif value >= 30:  # inside the bar's end, clear of the dashed line
                right.text(4, row, f"{value:.0f}%", va="center", color="white", fontsize=8)
            else:
                right.text(value + 1, row, f"{value:.0f}%", va="center", fontsize=8)
        right.axvline(minimum * 100, color="black", linestyle="--", linewidth=1)
        right.set_xlim(0, 100)
        right.set_xlabel(f"covered % (IoU$\\geq${coverage.threshold:g})")
        left.set_ylim(-0.6, len(order) - 0.4)
        left.grid(axis="y", visible=False)
        right.grid(axis="y", visible=False)
        fig.suptitle(f"training boxes per class; dashed: {minimum:.0%} (src.train warns below)")
    return fig


def objects_per_image_figure(per_image: Tensor) -> Figure:
    """Histogram of boxes per image (integer bins).

    Args:
        per_image: ``Tensor[N]`` int64, boxes of each training image.
    """
    values = per_image.numpy()
    top = int(values.max()) if values.size else 0
    with paper_style():
        fig, axes = _figure(2.2)
        ax = axes[0][0]
        ax.hist(values, bins=np.arange(-0.5, top + 1.5), color=BOX_COLOR, rwidth=0.85)
        ax.set_xlabel("boxes in the image")
        ax.set_ylabel("images")
        ax.xaxis.get_major_locator().set_params(integer=True)
        mean = float(values.mean()) if values.size else math.nan
        ax.set_title(f"{values.size} training images, {mean:.2f} boxes per image on average")
    return fig


def _log_bins(values: np.ndarray, extra: np.ndarray, count: int = 30) -> np.ndarray:
    both = np.concatenate([values[values > 0], extra[extra > 0]])
    low, high = (both.min(), both.max()) if both.size else (1.0, 2.0)
    return np.geomspace(low / 1.05, high * 1.05, count + 1)


def _log_ticks(ax: object, which: str = "x") -> None:
    """Powers of two as plain numbers on a log axis (no overlapping 2x10^1-style labels)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    low, high = ax.get_xlim() if which == "x" else ax.get_ylim()
    first, last = math.floor(math.log2(low)), math.ceil(math.log2(high))
    step = 1 if last - first <= 8 else 2
    ticks = [2.0**k for k in range(first, last + 1, step) if low <= 2.0**k <= high]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FixedFormatter([f"{t:g}" for t in ticks]))
    axis.set_minor_formatter(NullFormatter())


def _histogram(
    ax: object, values: np.ndarray, anchors: np.ndarray, xlabel: str, anchor_label: str
) -> None:
    ax.hist(values, bins=_log_bins(values, anchors), color=BOX_COLOR, label="boxes")
    ax.set_xscale("log")
    marks = np.unique(anchors)
    for value in marks:
        ax.axvline(value, color=ANCHOR_COLOR, linewidth=1, alpha=0.8, zorder=3)
    # one triangle per anchor value above the axes: visible even where the lines cross bars
    ax.plot(
        marks,
        np.full(marks.shape, 1.0),
        "v",
        color=ANCHOR_COLOR,
        markersize=5,
        transform=ax.get_xaxis_transform(),
        clip_on=False,
        label=f"{anchor_label} ({marks.size})",
    )
    _log_ticks(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("boxes")
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.04), ncols=2, borderaxespad=0.0)


def box_sizes_figure(box_wh: Tensor, anchor_wh: Tensor, image_size: tuple[int, int]) -> Figure:
    """Histograms of box width, height and width/height ratio, anchors drawn over them.

    Args:
        box_wh: ``Tensor[G, 2]`` float ``(w, h)`` of the training boxes in network-input pixels.
        anchor_wh: ``Tensor[K, 2]`` float distinct anchor shapes, same unit.
        image_size: ``(H, W)`` of the network input (named in the title).
    """
    boxes = box_wh.numpy()
    anchors = anchor_wh.numpy()
    box_ratio = boxes[:, 0] / np.maximum(boxes[:, 1], 1e-9)
    anchor_ratio = np.round(anchors[:, 0] / np.maximum(anchors[:, 1], 1e-9), 3)
    height, width = image_size
    with paper_style():
        fig, axes = _figure(6.0, 3, 1)
        _histogram(axes[0][0], boxes[:, 0], anchors[:, 0], "box width (input px)", "anchor widths")
        _histogram(
            axes[1][0], boxes[:, 1], anchors[:, 1], "box height (input px)", "anchor heights"
        )
        _histogram(
            axes[2][0], box_ratio, anchor_ratio, "width / height (at the input)", "anchor ratios"
        )
        fig.suptitle(
            f"{boxes.shape[0]} training boxes at the {width}x{height} network input; "
            "orange: anchors",
            fontsize=8,
        )
    return fig


def box_shapes_figure(
    box_wh: Tensor, anchor_wh: Tensor, image_size: tuple[int, int], covered: Tensor
) -> Figure:
    """Box width against height (log-log), covered and missed boxes apart, anchor shapes over.

    Args:
        box_wh: ``Tensor[G, 2]`` ``(w, h)`` of the boxes in network-input pixels.
        anchor_wh: ``Tensor[K, 2]`` distinct anchor shapes, same unit.
        image_size: ``(H, W)`` of the network input.
        covered: ``Tensor[G]`` bool, boxes whose best anchor reaches the threshold.
    """
    boxes = box_wh.numpy()
    anchors = anchor_wh.numpy()
    hit = covered.numpy().astype(bool)
    height, width = image_size
    alpha = float(min(0.8, max(0.15, 300 / max(1, boxes.shape[0]))))
    with paper_style():
        fig, axes = _figure(3.9)
        ax = axes[0][0]
        ax.scatter(
            *boxes[hit].T,
            s=6,
            alpha=alpha,
            color=BOX_COLOR,
            linewidths=0,
            label=f"covered boxes ({int(hit.sum())})",
        )
        ax.scatter(
            *boxes[~hit].T,
            s=8,
            alpha=min(1.0, 2 * alpha),
            color=WARN_COLOR,
            linewidths=0,
            label=f"missed boxes ({int((~hit).sum())})",
        )
        ax.scatter(
            *anchors.T,
            s=40,
            marker="x",
            color=ANCHOR_COLOR,
            linewidths=1.5,
            label=f"anchor shapes ({anchors.shape[0]})",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        _log_ticks(ax, "x")
        _log_ticks(ax, "y")
        ax.set_xlabel("width (input px)")
        ax.set_ylabel("height (input px)")
        ax.set_title(f"box and anchor shapes at the {width}x{height} input")
        fig.legend(loc="outside lower center", ncols=2, markerscale=1.5)
    return fig


def coverage_figure(coverage: Coverage, minimum: float = 0.9) -> Figure:
    """Coverage per COCO size (top) and the histogram of best-anchor IoU (bottom).

    Args:
        coverage: from :func:`src.detection.coverage.anchor_coverage`.
        minimum: the coverage below which ``src.train`` warns (a dashed line).
    """
    shares = np.nan_to_num(coverage.per_size.numpy() * 100, nan=0.0)
    counts = coverage.size_counts.numpy()
    best = coverage.best_iou.numpy()
    with paper_style():
        fig, axes = _figure(4.2, 2, 1)
        top, bottom = axes[0][0], axes[1][0]
        x = np.arange(len(SIZE_NAMES))
        colors = [
            WARN_COLOR if n and s < minimum * 100 else BOX_COLOR
            for s, n in zip(shares, counts, strict=True)
        ]
        top.bar(x, shares, color=colors, width=0.6)
        top.axhline(minimum * 100, color="black", linestyle="--", linewidth=1)
        top.set_xticks(
            x, [f"{name}\n{n} boxes" for name, n in zip(SIZE_NAMES, counts, strict=True)]
        )
        top.set_ylim(0, 105)
        top.set_yticks([0, 25, 50, 75, 100])
        top.set_ylabel("covered %")
        for xi, s, n in zip(x, shares, counts, strict=True):
            if not n:
                top.text(xi, 2, "no box", ha="center", va="bottom")
            elif s >= 20:  # inside the bar, clear of the dashed line
                top.text(xi, s / 2, f"{s:.0f}%", ha="center", va="center", color="white")
            else:
                top.text(xi, s + 2, f"{s:.0f}%", ha="center", va="bottom")
        top.set_title(
            f"anchor coverage {coverage.overall:.1%} (best IoU $\\geq$ {coverage.threshold:g})\n"
            f"per COCO size at the input; dashed: {minimum:.0%}"
        )
        bottom.hist(best, bins=np.linspace(0, 1, 41), color=BOX_COLOR)
        bottom.axvline(
            coverage.threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"threshold {coverage.threshold:g}",
        )
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("IoU of each box with its best anchor")
        bottom.set_ylabel("boxes")
        bottom.legend(loc="upper left")
    return fig


def anchor_search_figure(candidates: Sequence[AnchorCandidate]) -> Figure:
    """Coverage against the scale of the size ladder, one line per ratio set.

    Args:
        candidates: from :func:`src.detection.coverage.search_anchors` (best first).
    """
    sets: dict[str, list[AnchorCandidate]] = {}
    for c in candidates:
        sets.setdefault(c.ratios, []).append(c)
    best = candidates[0]
    current = next(c for c in candidates if c.is_current)
    with paper_style():
        fig, axes = _figure(2.6 + 0.17 * (len(sets) + 2))
        ax = axes[0][0]
        for name, group in sets.items():
            group = sorted(group, key=lambda c: c.scale)
            ax.plot(
                [c.scale for c in group],
                [100 * c.coverage for c in group],
                marker="o",
                markersize=3,
                label=f"ratios {name} ({group[0].num_anchors} anchors)",
            )
        ax.plot(1.0, 100 * current.coverage, "*", color="black", markersize=11, label="current")
        ax.plot(
            best.scale,
            100 * best.coverage,
            "o",
            markersize=11,
            markerfacecolor="none",
            markeredgecolor=WARN_COLOR,
            markeredgewidth=1.5,
            label="suggested",
        )
        ax.set_xlabel("scale of the anchor sizes (1 = current)")
        ax.set_ylabel("covered %")
        fig.legend(loc="outside lower center", ncols=1)
        low = min(100 * c.coverage for c in candidates)
        ax.set_ylim(max(0.0, low - 5), 104)
    return fig


def samples_figure(
    images: Sequence[Tensor],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    title: str,
    ncols: int = 3,
) -> Figure:
    """Training samples as the model sees them, boxes coloured by class, a legend of classes.

    Boxes carry no text (labels of crowded images would overlap); the legend under the grid
    names the colour of each class present.

    Args:
        images: ``Tensor[3, H, W]`` float in ``[0, 1]``, the training transform's output (one
            size).
        targets: each with ``boxes`` ``Tensor[G, 4]`` normalised xyxy and ``labels`` ``Tensor[G]``.
        class_names: names indexed by label.
        title: the figure title (say which transform made them).
        ncols: images per row.
    """
    ncols = max(1, min(ncols, len(images)))
    present = sorted({int(k) for t in targets for k in t["labels"].tolist()})
    palette = matplotlib.colormaps["tab10" if len(present) <= 10 else "tab20"].colors
    colour = {k: palette[i % len(palette)] for i, k in enumerate(present)}
    height, width = (int(v) for v in images[0].shape[-2:])
    # lines about 1.2 pt wide once the grid fills the figure's 3.4 in
    line = max(2, round(1.2 * ncols * width / (HALF_PAGE_WIDTH_IN * 72)))
    panels = []
    for image, target in zip(images, targets, strict=True):
        pixels = scale_boxes(target["boxes"].float(), width, height)
        colours = [tuple(round(255 * c) for c in colour[int(k)]) for k in target["labels"]]
        panels.append(draw_bounding_boxes(to_uint8(image), pixels, colors=colours, width=line))
    grid = make_grid(torch.stack(panels), nrow=ncols, padding=2, pad_value=255)
    aspect = grid.shape[-2] / grid.shape[-1]
    rows = math.ceil(len(present) / 3)
    with paper_style():
        fig, axes = _figure(HALF_PAGE_WIDTH_IN * aspect + 0.45 + 0.2 * rows)
        ax = axes[0][0]
        ax.imshow(grid.permute(1, 2, 0).numpy())
        ax.set_axis_off()
        ax.set_title(title, fontsize=8)
        handles = [
            Patch(facecolor="none", edgecolor=colour[k], linewidth=2, label=class_names[k])
            for k in present
        ]
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)))
    return fig
