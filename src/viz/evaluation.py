"""Figures and Markdown of ``src.eval``'s failure report (``report.md`` in the run folder).

Everything here draws or formats results computed by :mod:`src.metrics` (no metric is computed
here, no Lightning):

* :func:`confusion_figure`: the detection confusion matrix
  (:class:`~src.metrics.confusion.DetectionConfusion`) as counts or row-normalised percentages,
  true class in rows, predicted class in columns, background last;
* :func:`tide_figure`: the mAP@0.5 gained by fixing each TIDE error type
  (:class:`~src.metrics.errors.TideErrors`), one bar per type with its error count;
* :func:`score_curves_figure`: precision against recall, and precision, recall and F1 against the
  score threshold, of one class (:class:`~src.metrics.curves.ScoreCurve`), the F1-optimal
  threshold marked on both panels;
* :func:`operating_point_errors` and :func:`error_image_figure`: which boxes of an image are
  true positives, false positives (with their TIDE type) and misses once the detections below a
  score threshold are dropped, and one image drawn with them;
* :func:`markdown_table`, :func:`figure_link` and :func:`write_report` for ``report.md``.

Half-page figures (bars, curves) are :data:`~src.viz.style.HALF_PAGE_WIDTH_IN` wide with text of
at least 8 pt; the confusion matrix and the error images, which need room for 21 classes or a
photograph with labels, are at most :data:`FULL_PAGE_WIDTH_IN` wide with text of at least 8 pt at
that width (:func:`~src.viz.style.smallest_font_at` ``(fig, FULL_PAGE_WIDTH_IN)``).
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox
from torch import Tensor

from src.metrics.confusion import DetectionConfusion
from src.metrics.curves import ScoreCurve
from src.metrics.errors import DET_TYPES, ERROR_TYPES, TideErrors
from src.viz.boxes import to_uint8
from src.viz.style import HALF_PAGE_WIDTH_IN, paper_style

__all__ = [
    "ERROR_NAMES",
    "FULL_PAGE_WIDTH_IN",
    "ImageErrors",
    "confusion_figure",
    "error_image_figure",
    "figure_link",
    "markdown_table",
    "operating_point_errors",
    "score_curves_figure",
    "tide_figure",
    "write_report",
]

#: the text width of an A4 / Letter page with usual margins, in inches (wide figures).
FULL_PAGE_WIDTH_IN = 6.8

#: what each TIDE error type means, for legends and tables.
ERROR_NAMES: dict[str, str] = {
    "Cls": "classification (right box, wrong class)",
    "Loc": "localisation (right class, 0.1 <= IoU <= 0.5)",
    "Both": "classification and localisation",
    "Dupe": "duplicate (object already detected)",
    "Bkg": "background (IoU <= 0.1 with every object)",
    "Miss": "missed object (no detection, nor a Cls/Loc one)",
}

TP_COLOR = "#1a9850"  # green
FP_COLOR = "#d73027"  # red
MISS_COLOR = "#2c7bb6"  # blue
IGNORED_COLOR = "#8c8c8c"  # grey: difficult / crowd objects, detections on them


# ------------------------------------------------------------------------- small helpers
def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fmt(value: float, digits: int = 3) -> str:
    """A float for tables: ``n/a`` for nan."""
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """A Markdown table.

    Args:
        header: the column titles.
        rows: the cells (``str(cell)`` each; floats should be formatted by the caller).
        align: one character per column, ``l`` or ``r`` (default: first left, others right).

    Returns:
        The table, one line per row, without a trailing newline.
    """
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def figure_link(paths: Mapping[str, Path], base: Path, alt: str) -> str:
    """Markdown showing a figure's PNG, with links to the PNG and the PDF, relative to ``base``.

    Args:
        paths: ``{"png": Path, "pdf": Path}`` (as :func:`src.viz.style.save_figure` returns).
        base: the folder of the Markdown file.
        alt: the image's alternative text.
    """
    png = Path(os.path.relpath(paths["png"], base)).as_posix()
    pdf = Path(os.path.relpath(paths["pdf"], base)).as_posix()
    return f"![{alt}]({png})\n\n[PNG]({png}) · [PDF]({pdf})"


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a Markdown report: ``# title``, then one ``## heading`` and its body per section.

    Args:
        path: the ``.md`` file (its folder is created).
        title: the document title.
        sections: ``(heading, Markdown body)`` in order; an empty heading writes the body alone.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}" if heading else body.strip())
    path.write_text("\n\n".join(parts) + "\n")
    return path


# ------------------------------------------------------------------------- confusion matrix
def confusion_figure(
    confusion: DetectionConfusion, normalise: bool = False, score_label: str | None = None
) -> Figure:
    """The detection confusion matrix as a heatmap, every non-zero cell written in it.

    Args:
        confusion: rows true class, columns predicted class (``counts`` Tensor[C+1, C+1] int64),
            background last (see :mod:`src.metrics.confusion`).
        normalise: row-normalised percentages (each row: what became of that class's ground
            truths; the background row: which classes the unmatched detections were given)
            instead of counts.
        score_label: how the title states the detections kept (default
            ``score > <confusion.score_threshold>``, the matrix's own rule).

    Returns:
        A figure between 3.4 and :data:`FULL_PAGE_WIDTH_IN` inches wide; text >= 8 pt at that
        width; the colour scale starts at 0.
    """
    counts = confusion.counts.to(torch.int64)
    size = counts.shape[0]
    labels = list(confusion.labels)
    labels[-1] = "background"
    values = confusion.normalised() * 100 if normalise else counts.double()
    cell_in = 0.28
    longest = max(len(s) for s in labels)
    label_in = 0.065 * longest + 0.45  # tick labels (8 pt) and the axis title
    # at least 1.6 in of matrix: the axis titles fit beside it even for one class
    side = max(1.6, size * cell_in)
    width = min(FULL_PAGE_WIDTH_IN, max(HALF_PAGE_WIDTH_IN, side + label_in + 0.9))
    side = min(side, width - label_in - 0.9)
    with paper_style():
        fig = _new_figure(width, side + label_in + 0.8)
        ax = fig.subplots()
        vmax = 100.0 if normalise else max(float(values.max()), 1.0)
        cmap = matplotlib.colormaps["Blues"].with_extremes(bad="#d9d9d9")
        image = ax.imshow(values.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, aspect="equal")
        ax.grid(False)
        ax.set_xticks(range(size), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(size), labels, fontsize=8)
        # the background row and column are explained in the report beside the figure
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        for y, x in counts.nonzero().tolist():  # text per non-zero cell (drawing only)
            v = float(values[y, x])
            text = f"{v:.0f}" if normalise else str(int(counts[y, x]))
            ax.text(
                x,
                y,
                text,
                ha="center",
                va="center",
                fontsize=8,
                color="white" if v > 0.55 * vmax else "black",
            )
        ax.axhline(size - 1.5, color="black", lw=0.8)
        ax.axvline(size - 1.5, color="black", lw=0.8)
        bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
        bar.set_label("% of the row (grey: no count)" if normalise else "count", fontsize=8)
        bar.ax.tick_params(labelsize=8)
        if not normalise:
            bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        kind = "row-normalised (%)" if normalise else "counts"
        rule = score_label or f"score > {confusion.score_threshold:g}"
        # two short lines: what the cells hold, and which detections were kept
        ax.set_title(
            f"Confusion matrix, {kind}\nIoU > {confusion.iou_threshold:g}, {rule}", fontsize=9
        )
    return fig


# ------------------------------------------------------------------------- TIDE bars
def tide_figure(tide: TideErrors) -> Figure:
    """Horizontal bars: the mAP@0.5 gained by fixing each TIDE error type, with its count.

    Args:
        tide: the breakdown of :func:`src.metrics.errors.tide_errors` (``dap`` fractions).

    Returns:
        A 3.4-inch-wide figure; the x axis starts at 0 and is in mAP@0.5 points (fractions).
    """
    names = list(ERROR_TYPES)
    gains = np.array([tide.dap[k] for k in names])
    short = {
        "Cls": "classification",
        "Loc": "localisation",
        "Both": "cls. + loc.",
        "Dupe": "duplicate",
        "Bkg": "background",
        "Miss": "missed",
    }
    with paper_style():
        fig = _new_figure(HALF_PAGE_WIDTH_IN, 2.6)
        ax = fig.subplots()
        y = np.arange(len(names))
        ax.barh(y, gains, color="#4575b4")
        ax.set_yticks(y, [f"{short[k]} ({k})" for k in names], fontsize=8)
        ax.invert_yaxis()
        top = max(float(gains.max()), 1e-3)
        ax.set_xlim(0.0, top * 1.6)
        for yi, (gain, k) in enumerate(zip(gains, names, strict=True)):
            ax.text(
                gain + top * 0.03, yi, f"{gain:.3f}  (n={tide.counts[k]})", va="center", fontsize=8
            )
        ax.set_xlabel("mAP@0.5 gained by fixing the errors")
        ax.grid(axis="y", visible=False)
        ax.set_title(f"TIDE error breakdown (mAP@0.5 {tide.map_50:.3f})", fontsize=9)
    return fig


# ------------------------------------------------------------------------- score curves
def score_curves_figure(
    curve: ScoreCurve, name: str, threshold: float | None = None, ap: float | None = None
) -> Figure:
    """Precision-recall, and precision / recall / F1 against the score threshold, of one class.

    Args:
        curve: the class's curve (:class:`~src.metrics.curves.ScoreCurve`, thresholds descending).
        name: the class name (or ``"all classes"`` for the micro curve).
        threshold: the threshold to mark (default: the curve's own F1-optimal one).
        ap: AP@0.5 written in the title, if given.

    Returns:
        A 3.4-inch-wide figure of two panels (top: precision against recall, bottom: the three
        quantities against the score threshold); both axes of each panel span [0, 1].
    """
    if threshold is None:
        threshold = curve.best()[0]
    t = curve.thresholds.numpy()
    p = curve.precision.numpy()
    r = curve.recall.numpy()
    f1 = curve.f1.numpy()
    marked = None
    if threshold is not None and math.isfinite(threshold) and t.size:
        i = int(np.searchsorted(-t, -threshold, side="right")) - 1  # last score >= threshold
        marked = min(max(i, 0), t.size - 1)
    with paper_style():
        fig = _new_figure(HALF_PAGE_WIDTH_IN, 5.4)
        ax_pr, ax_t = fig.subplots(2, 1)
        title = f"{name}: {curve.num_pos} objects"
        if ap is not None:
            title += f", AP@0.5 {_fmt(ap)}"
        fig.suptitle(title, fontsize=9)
        if t.size:
            ax_pr.plot(r, p, color="#4575b4", drawstyle="steps-post")
            ax_t.plot(t, p, color="#4575b4", label="precision", drawstyle="steps-post")
            ax_t.plot(t, r, color="#d73027", ls="--", label="recall", drawstyle="steps-post")
            ax_t.plot(t, f1, color="black", label="F1", drawstyle="steps-post")
        else:
            for ax in (ax_pr, ax_t):
                ax.text(0.5, 0.5, "no detection of this class", ha="center", va="center")
        if marked is not None and f1[marked] > 0:
            ax_pr.plot(r[marked], p[marked], "o", color="black", ms=6)
            ax_t.axvline(threshold, color="grey", lw=1, ls=":", label="F1-optimal threshold")
            ax_pr.set_title(
                f"dot: score >= {threshold:.3f}, F1 {f1[marked]:.3f} "
                f"(P {p[marked]:.2f}, R {r[marked]:.2f})",
                fontsize=8,
            )
        elif t.size:
            ax_pr.set_title("F1 is 0 at every threshold", fontsize=8)
            ax_pr.text(
                0.5,
                0.5,
                "no true positive at\nany score threshold",
                ha="center",
                va="center",
                transform=ax_pr.transAxes,
            )
        for ax in (ax_pr, ax_t):
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
        ax_pr.set_xlabel("recall")
        ax_pr.set_ylabel("precision")
        ax_t.set_xlabel("score threshold (detections with score >= threshold)")
        ax_t.set_ylabel("value")
        if t.size:
            fig.legend(
                *ax_t.get_legend_handles_labels(),
                loc="outside lower center",
                ncols=2,
                fontsize=8,
                frameon=False,
            )
    return fig


# ------------------------------------------------------------------------- error images
@dataclass(frozen=True)
class ImageErrors:
    """Boxes of each image at an operating point (detections with ``score >= threshold``).

    Attributes:
        threshold: the score threshold.
        shown: per image, Tensor[N_i] bool: detections kept (``score >= threshold`` and
            evaluated by TIDE).
        missed: per image, Tensor[M_i] bool: non-ignored ground truths that no kept true
            positive matches.
        counts: Tensor[I, 7] int64 per image: true positives, then false positives of each
            type in ``Cls, Loc, Both, Dupe, Bkg`` order (detections on ignored regions left out),
            then misses.
    """

    threshold: float
    shown: list[Tensor]
    missed: list[Tensor]
    counts: Tensor

    @property
    def errors(self) -> Tensor:
        """Tensor[I] int64: false positives plus misses of each image."""
        return self.counts[:, 1:].sum(dim=1)

    def worst(self, n: int) -> list[int]:
        """The ``n`` images with the most errors (ties: image order), images with none left out."""
        total = self.errors
        order = torch.sort(total, descending=True, stable=True).indices
        return order[total[order] > 0][:n].tolist()


def operating_point_errors(
    tide: TideErrors, preds: Sequence[Mapping[str, Tensor]], threshold: float
) -> ImageErrors:
    """TIDE's per-box verdicts restricted to the detections scoring at least ``threshold``.

    TIDE matches in score order, so the matches among the kept detections are those of TIDE;
    a ground truth whose true positive scores below the threshold counts as missed here.

    Args:
        tide: :func:`src.metrics.errors.tide_errors` on ``preds`` (same image order).
        preds: per image ``{"scores": Tensor[N_i]}``.
        threshold: the score threshold (kept: ``score >= threshold``).

    Returns:
        An :class:`ImageErrors`.
    """
    shown, missed, rows = [], [], []
    for pred, types, ignored, gt_of, gt_types in zip(  # loop over images only
        preds, tide.det_types, tide.det_ignored, tide.det_gt, tide.gt_types, strict=True
    ):
        keep = (pred["scores"].detach().cpu().double() >= threshold) & (types >= 0)
        tp = keep & (types == 0)
        covered = torch.zeros(gt_types.shape[0] + 1, dtype=torch.bool)
        covered[torch.where(tp, gt_of, gt_types.shape[0])] = True
        miss = (gt_types >= 0) & ~covered[:-1]
        counted = keep & ~ignored
        per_type = torch.bincount(types[counted], minlength=len(DET_TYPES))
        shown.append(keep)
        missed.append(miss)
        rows.append(torch.cat([per_type, miss.sum().reshape(1)]))
    counts = torch.stack(rows) if rows else torch.zeros(0, len(DET_TYPES) + 1, dtype=torch.int64)
    return ImageErrors(float(threshold), shown, missed, counts)


def _label_boxes(
    fig: Figure, ax: object, items: Sequence[tuple[Sequence[float], str, str, bool]]
) -> None:
    """Write each label next to its box where it overlaps no label written before.

    Candidates in order: above the box's top-left corner, inside it, below the bottom-left corner,
    inside it (for ground truths the bottom ones first), then the same at the right edge; the
    first that stays in the image and overlaps nothing is kept, else the first in the image.
    One text per box (matplotlib draws no batches; an image shows a few dozen boxes at most).

    Args:
        fig: the figure (drawn once to measure text).
        ax: the image axes (data coordinates: pixels, y down).
        items: ``(box xyxy pixels, text, colour, bottom_first)``.
    """
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    for (x0, y0, x1, y1), text, color, bottom_first in items:
        top = [(x0, y0, "left", "bottom"), (x0, y0, "left", "top")]
        bottom = [(x0, y1, "left", "top"), (x0, y1, "left", "bottom")]
        spots = bottom + top if bottom_first else top + bottom
        spots += [(x1, y, "right", va) for _, y, _, va in spots]
        chosen = None
        fallback = None
        for x, y, ha, va in spots:
            label = ax.text(
                x,
                y,
                text,
                ha=ha,
                va=va,
                fontsize=8,
                color="white",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0},
            )
            label.draw(renderer)
            box = label.get_bbox_patch().get_window_extent(renderer)
            inside = (
                box.x0 >= frame.x0 - 0.5
                and box.x1 <= frame.x1 + 0.5
                and box.y0 >= frame.y0 - 0.5
                and box.y1 <= frame.y1 + 0.5
            )
            if inside and not any(box.overlaps(other) for other in placed):
                chosen = (label, box)
                break
            if inside and fallback is None:
                fallback = (x, y, ha, va)
            label.remove()
        if chosen is None:
            x, y, ha, va = fallback or spots[0]
            label = ax.text(
                x,
                y,
                text,
                ha=ha,
                va=va,
                fontsize=8,
                color="white",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0},
            )
            label.draw(renderer)
            chosen = (label, label.get_bbox_patch().get_window_extent(renderer))
        placed.append(chosen[1])


def error_image_figure(
    image: Tensor,
    pred: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    det_types: Tensor,
    det_gt: Tensor,
    shown: Tensor,
    missed: Tensor,
    det_ignored: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """One image with its true positives, false positives (labelled with the TIDE type) and misses.

    Args:
        image: ``Tensor[3, H, W]`` the original image (uint8, or float in [0, 1]).
        pred: ``boxes: Tensor[N, 4]`` xyxy pixels of that image, ``labels: Tensor[N]``
            0-based, ``scores: Tensor[N]``.
        target: ``boxes: Tensor[M, 4]`` xyxy pixels, ``labels: Tensor[M]``.
        det_types: Tensor[N] int64 codes into :data:`src.metrics.errors.DET_TYPES`.
        det_gt: Tensor[N] int64 the ground truth each detection relates to (-1: none).
        shown: Tensor[N] bool detections to draw (see :func:`operating_point_errors`).
        missed: Tensor[M] bool ground truths drawn as misses.
        det_ignored: Tensor[N] bool detections on difficult / crowd objects (drawn grey).
        class_names: names indexed by 0-based label.
        title: written above the image (wrapped).

    Returns:
        A figure at most :data:`FULL_PAGE_WIDTH_IN` wide and 7 inches high, the image with its
        pixel aspect, labels of 8 pt, and a legend under the image.
    """
    names = list(class_names or [])

    def name(k: int) -> str:
        return names[k] if 0 <= k < len(names) else str(k)

    picture = to_uint8(image.detach().cpu()).permute(1, 2, 0).numpy()
    height, width = picture.shape[:2]
    fig_w = FULL_PAGE_WIDTH_IN
    img_h = fig_w * height / width
    if img_h > 6.0:
        img_h, fig_w = 6.0, 6.0 * width / height
    fig_w = max(fig_w, 4.5)
    ignored = det_ignored if det_ignored is not None else torch.zeros_like(shown)
    items: list[tuple[Sequence[float], str, str, bool]] = []
    with paper_style():
        fig = _new_figure(fig_w, img_h + 0.95)
        ax = fig.subplots()
        ax.imshow(picture, extent=(0, width, height, 0), interpolation="antialiased")
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        gt_boxes = target["boxes"].detach().cpu().double()
        gt_labels = target["labels"].detach().cpu().long()
        for j in missed.nonzero()[:, 0].tolist():  # per drawn box: drawing only
            box = gt_boxes[j].tolist()
            ax.add_patch(
                Rectangle(
                    (box[0], box[1]),
                    box[2] - box[0],
                    box[3] - box[1],
                    fill=False,
                    ec=MISS_COLOR,
                    lw=2,
                    ls="--",
                )
            )
            items.append((box, f"missed: {name(int(gt_labels[j]))}", MISS_COLOR, True))
        boxes = pred["boxes"].detach().cpu().double()
        labels = pred["labels"].detach().cpu().long()
        scores = pred["scores"].detach().cpu().double()
        order = torch.sort(scores, descending=True, stable=True).indices
        for i in order[shown[order]].tolist():
            box = boxes[i].tolist()
            kind = DET_TYPES[int(det_types[i])]
            label = name(int(labels[i]))
            if bool(ignored[i]):
                color, text = IGNORED_COLOR, f"on difficult: {label} {scores[i]:.2f}"
            elif kind == "TP":
                color, text = TP_COLOR, f"{label} {scores[i]:.2f}"
            else:
                color = FP_COLOR
                text = f"{kind}: {label} {scores[i]:.2f}"
                if kind == "Cls" and int(det_gt[i]) >= 0:
                    truth = name(int(gt_labels[int(det_gt[i])]))
                    text = f"Cls: {label} (is {truth}) {scores[i]:.2f}"
            ax.add_patch(
                Rectangle(
                    (box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec=color, lw=2
                )
            )
            items.append((box, text, color, False))
        handles = [
            Patch(fc="none", ec=TP_COLOR, lw=2, label="true positive (class, score)"),
            Patch(fc="none", ec=FP_COLOR, lw=2, label="false positive (TIDE type: class, score)"),
            Line2D([], [], color=MISS_COLOR, lw=2, ls="--", label="missed object"),
        ]
        if bool((ignored & shown).any()):
            handles.append(
                Patch(
                    fc="none", ec=IGNORED_COLOR, lw=2, label="on a difficult object (not counted)"
                )
            )
        fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
        if title:
            chars = max(40, int(fig_w * 72 / 9 * 1.7))
            ax.set_title("\n".join(textwrap.wrap(title, chars)), fontsize=9)
        fig.canvas.draw()
        _label_boxes(fig, ax, items)
    return fig
