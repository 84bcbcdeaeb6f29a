"""Per-class precision/recall curves of the VOC metric: a half-page figure and TensorBoard's.

:func:`ranked_matches` reads the detections of a
:class:`~src.metrics.voc_map.VOCMeanAveragePrecision` (after its updates, before ``reset()``) and
matches them class by class with the devkit's rules (:func:`~src.metrics.voc_map.voc_match_class`):
per class, the detections by descending score with their true/false positive flags and the number
of (non-difficult) ground truths. From them, :func:`devkit_curve` gives the devkit's ranked
recall/precision (what :func:`pr_curves_figure` draws) and :func:`pr_curve_counts` the counts of
TensorBoard's PR Curves plugin at fixed score thresholds.

Why counts rather than ``SummaryWriter.add_pr_curve(labels, predictions)``: a detector's PR
curve has positives that no detection found. ``add_pr_curve`` only sees scored items, so the
missed ground truths would have to enter as positives with score 0, and at threshold 0 the
plugin would count them as found (recall 1 at the last point). The counts here are exact at every
threshold ``t``: ``TP(t)`` and ``FP(t)`` count the detections scoring ``>= t``, ``FN(t) = npos -
TP(t)`` (missed ground truths included), ``TN = 0`` (a detector has no negatives to count), and
precision is ``TP / (TP + FP)`` (0 where no detection is kept, TensorBoard's convention), so
``SummaryWriter.add_pr_curve_raw`` writes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from src.metrics.voc_map import voc_ap, voc_match_class
from src.viz.style import HALF_PAGE_WIDTH_IN, PAPER_RC

__all__ = [
    "RankedMatches",
    "devkit_curve",
    "pr_curve_counts",
    "pr_curves_figure",
    "ranked_matches",
]


@dataclass(frozen=True)
class RankedMatches:
    """The detections of one class, ranked by descending score, matched at the metric's IoU.

    Attributes:
        scores: Tensor[D] float64, non-increasing (ties in update order, as the devkit).
        tp: Tensor[D] bool, true positives.
        fp: Tensor[D] bool, false positives (``tp`` and ``fp`` both False: ignored, matched to a
            difficult ground truth).
        num_pos: the class's non-difficult ground truths (> 0).
    """

    scores: Tensor
    tp: Tensor
    fp: Tensor
    num_pos: int


def _state(metric: object, name: str, dtype: torch.dtype, width: int = 0) -> Tensor:
    value = getattr(metric, name)
    t = dim_zero_cat(value) if isinstance(value, Tensor) or value else torch.zeros(0)
    t = t.detach().cpu().to(dtype)
    return t.reshape(-1, width) if width else t.reshape(-1)


def ranked_matches(metric: object) -> list[RankedMatches | None]:
    """Per class, the ranked detections of a VOC metric with their true/false positive flags.

    Args:
        metric: a :class:`~src.metrics.voc_map.VOCMeanAveragePrecision` after its ``update``
            calls (its states on this process: call it on one process, or after syncing).

    Returns:
        One :class:`RankedMatches` per class ``0..C-1`` (``C``: ``metric.num_classes``, else
        ``1 +`` the largest label seen), None for a class without non-difficult ground truth.
        Detections with a NaN or infinite box or score (a diverged net's) are left out: they
        can be neither ranked nor matched.
    """
    f64, i64 = torch.float64, torch.int64
    det_boxes, gt_boxes = _state(metric, "det_boxes", f64, 4), _state(metric, "gt_boxes", f64, 4)
    det_scores = _state(metric, "det_scores", f64)
    det_labels, gt_labels = _state(metric, "det_labels", i64), _state(metric, "gt_labels", i64)
    det_images, gt_images = _state(metric, "det_images", i64), _state(metric, "gt_images", i64)
    finite = torch.isfinite(det_boxes).all(dim=1) & torch.isfinite(det_scores)
    if not bool(finite.all()):
        det_boxes, det_scores = det_boxes[finite], det_scores[finite]
        det_labels, det_images = det_labels[finite], det_images[finite]
    difficult = _state(metric, "gt_difficult", torch.bool)
    count = getattr(metric, "num_classes", None)
    if count is None:
        labels = torch.cat([det_labels, gt_labels])
        count = int(labels.max()) + 1 if labels.numel() else 0
    out: list[RankedMatches | None] = []
    for c in range(count):  # loop over classes only
        dmask, gmask = det_labels == c, gt_labels == c
        num_pos = int((~difficult[gmask]).sum())
        if num_pos == 0:
            out.append(None)
            continue
        tp, fp, order = voc_match_class(
            det_boxes[dmask],
            det_scores[dmask],
            det_images[dmask],
            gt_boxes[gmask],
            gt_images[gmask],
            difficult[gmask],
            getattr(metric, "iou_threshold", 0.5),
            getattr(metric, "pixel_inclusive", True),
        )
        out.append(RankedMatches(det_scores[dmask][order], tp, fp, num_pos))
    return out


def devkit_curve(matches: RankedMatches) -> tuple[Tensor, Tensor]:
    """The devkit's ranked ``(recall[D], precision[D])`` float64 (as ``VOCMeanAveragePrecision``).

    After each ranked detection: ``recall = cumsum(tp) / npos``, ``precision = cumsum(tp) /
    (cumsum(tp) + cumsum(fp))``; ignored detections keep the previous counts.
    """
    ctp = torch.cumsum(matches.tp.to(torch.float64), 0)
    cfp = torch.cumsum(matches.fp.to(torch.float64), 0)
    eps = torch.finfo(torch.float64).eps
    return ctp / matches.num_pos, ctp / torch.clamp(ctp + cfp, min=eps)


def pr_curve_counts(matches: RankedMatches, num_thresholds: int = 101) -> dict[str, Tensor]:
    """Counts, precision and recall at ``num_thresholds`` score thresholds, for TensorBoard.

    Args:
        matches: one class's ranked detections.
        num_thresholds: thresholds ``t_k = k / (num_thresholds - 1)``, ``k = 0..n-1`` (>= 2).

    Returns:
        ``true_positive_counts``, ``false_positive_counts``, ``true_negative_counts`` (zeros),
        ``false_negative_counts``, ``precision``, ``recall``: Tensor[num_thresholds] float64 each,
        the keyword arguments of ``SummaryWriter.add_pr_curve_raw`` (see the module docstring).
    """
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    steps = torch.arange(num_thresholds, dtype=torch.float64)
    thresholds = steps / (num_thresholds - 1)  # k / (n - 1) exactly: 6 / 10 is 0.6
    ascending = matches.scores.to(torch.float64).flip(0)
    # the detections scoring >= t are the first `kept` of the ranking
    kept = ascending.numel() - torch.searchsorted(ascending, thresholds, side="left")
    zero = torch.zeros(1, dtype=torch.float64)
    ctp = torch.cat([zero, torch.cumsum(matches.tp.to(torch.float64), 0)])[kept]
    cfp = torch.cat([zero, torch.cumsum(matches.fp.to(torch.float64), 0)])[kept]
    return {
        "true_positive_counts": ctp,
        "false_positive_counts": cfp,
        "true_negative_counts": torch.zeros_like(ctp),
        "false_negative_counts": matches.num_pos - ctp,
        "precision": torch.where(ctp + cfp > 0, ctp / (ctp + cfp).clamp(min=1.0), 0.0),
        "recall": ctp / matches.num_pos,
    }


def pr_curves_figure(
    curves: Sequence[tuple[Tensor, Tensor] | None],
    class_names: Sequence[str] | None = None,
    max_classes: int = 10,
    title: str | None = None,
    use_07_metric: bool = False,
) -> Figure:
    """Precision against recall for each class (the devkit's ranked curves).

    Args:
        curves: per class ``(recall[D], precision[D])`` or None (no ground truth), as returned by
            :meth:`~src.metrics.voc_map.VOCMeanAveragePrecision.pr_curves`.
        class_names: names indexed by class; default the class index.
        max_classes: the classes with the largest AP are drawn, at most this many.
        title: figure title.
        use_07_metric: AP in the legend with the VOC07 11-point rule.

    Returns:
        A 3.4-inch-wide matplotlib ``Figure`` (Agg canvas attached); the legend, under the
        axes in two columns, gives each class name with its AP@0.5. Points with a NaN or
        infinite recall or precision are left out (of the curve and its AP).
    """
    names = list(class_names or [])
    entries = []
    for c, curve in enumerate(curves):  # loop over classes only
        if curve is None:
            continue
        recall, precision = (t.detach().cpu().double() for t in curve)
        finite = torch.isfinite(recall) & torch.isfinite(precision)
        recall, precision = recall[finite], precision[finite]
        ap = float(voc_ap(recall, precision, use_07_metric)) if recall.numel() else 0.0
        name = names[c] if c < len(names) else str(c)
        entries.append((ap, name, recall, precision))
    entries.sort(key=lambda e: -e[0])
    shown = entries[:max_classes]
    with matplotlib.rc_context(PAPER_RC):
        rows = (len(shown) + 1) // 2  # the legend's rows, under the axes
        fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, 3.0 + 0.17 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for ap, name, recall, precision in shown:
            if recall.numel():
                ax.step(recall.numpy(), precision.numpy(), where="post", label=f"{name} {ap:.3f}")
            else:
                ax.plot([], [], label=f"{name} {ap:.3f} (no detection)")
        if not shown:
            ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        hidden = len(entries) - len(shown)
        ax.set_title(
            (title or "Precision/recall per class")
            + (f"\nthe {len(shown)} largest APs of {len(entries)} classes" if hidden else ""),
            fontsize=9,
        )
        if shown:  # under the axes: it never covers a curve
            fig.legend(
                title="class, AP@0.5",
                fontsize=8,
                title_fontsize=8,
                loc="outside lower center",
                ncols=2,
                frameon=False,
                columnspacing=1.0,
                handlelength=1.5,
            )
    return fig
