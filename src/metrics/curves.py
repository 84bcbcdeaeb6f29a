"""Precision, recall and F1 as functions of the score threshold, and the F1-optimal threshold.

Detections are matched with the VOC devkit's rules at ``iou_threshold`` (0.5), through
:func:`src.metrics.voc_map.voc_match_class` (the matching behind
:class:`~src.metrics.voc_map.VOCMeanAveragePrecision`): per class, detections ranked by score,
each compared with its best ground truth of the same image and class; the first to claim a
non-difficult ground truth is a true positive, later claimants and unmatched detections are false
positives, detections on difficult ground truths are ignored.

Keeping the detections with ``score >= t`` gives, for each class,

* ``precision(t) = TP(t) / (TP(t) + FP(t))`` (nan when no counted detection is kept),
* ``recall(t) = TP(t) / npos`` (``npos``: the class's non-difficult ground truths),
* ``F1(t) = 2 P R / (P + R)`` (0 when ``P + R = 0``),

evaluated at every distinct score (``thresholds``, descending; tied scores enter together). The
F1-optimal threshold of a class is the threshold of its largest F1 (the highest such threshold on
ties: the fewest detections). *Overall* is the micro average over classes: the detections of all
classes under one common threshold, ``TP``, ``FP`` and ``npos`` summed over classes.

From the validation metric, with ``metric`` the module's ``VOCMeanAveragePrecision`` after its
updates and before ``reset()`` (e.g. in ``on_validation_epoch_end``, beside ``compute()``)::

    from src.metrics.curves import f1_optimal_threshold

    best = f1_optimal_threshold(metric)      # an F1Optimum
    self.log("val/f1_best", best.f1)         # micro F1 at best.threshold
    self.log("val/score_threshold", best.threshold)
    best.per_class_threshold                 # Tensor[C], nan for classes without a positive

No Lightning or Hydra here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from src.metrics._inputs import check_images, infer_num_classes
from src.metrics.voc_map import VOCMeanAveragePrecision, voc_match_class

__all__ = ["F1Optimum", "ScoreCurve", "ScoreCurves", "f1_optimal_threshold", "score_curves"]


@dataclass(frozen=True)
class ScoreCurve:
    """Precision, recall and F1 of one class (or of all classes pooled) against the threshold.

    Attributes:
        thresholds: Tensor[K] float64 distinct detection scores, descending.
        precision: Tensor[K] float64 precision keeping the detections with ``score >=``
            threshold (nan when none of them counts).
        recall: Tensor[K] float64 recall at each threshold.
        f1: Tensor[K] float64 F1 at each threshold.
        num_pos: number of (non-difficult) ground truths.
    """

    thresholds: Tensor
    precision: Tensor
    recall: Tensor
    f1: Tensor
    num_pos: int

    @classmethod
    def from_ranked(cls, scores: Tensor, tp: Tensor, fp: Tensor, num_pos: int) -> ScoreCurve:
        """Curve from detections ranked by descending score.

        Args:
            scores: Tensor[D] float scores, non-increasing.
            tp: Tensor[D] bool true positive flags.
            fp: Tensor[D] bool false positive flags (both False: ignored detection).
            num_pos: number of ground truths (> 0).

        Returns:
            The curve at the ``K`` distinct scores.
        """
        scores = scores.to(torch.float64)
        ctp = torch.cumsum(tp.to(torch.float64), 0)
        cfp = torch.cumsum(fp.to(torch.float64), 0)
        last = torch.ones_like(scores, dtype=torch.bool)  # last detection of each tied group
        last[:-1] = scores[1:] != scores[:-1]
        ctp, cfp = ctp[last], cfp[last]
        precision = ctp / (ctp + cfp)
        recall = ctp / num_pos
        f1 = torch.nan_to_num(2 * precision * recall / (precision + recall), nan=0.0)
        return cls(scores[last], precision, recall, f1, int(num_pos))

    def best(self) -> tuple[float, float]:
        """``(threshold, F1)`` at the largest F1 (highest threshold on ties); nan, 0 if empty."""
        if self.f1.numel() == 0:
            return math.nan, 0.0
        i = int(self.f1.argmax())
        return float(self.thresholds[i]), float(self.f1[i])


@dataclass(frozen=True)
class F1Optimum:
    """F1-optimal score thresholds.

    Attributes:
        threshold: the common threshold maximising the micro F1 over classes (nan: no
            detection or no ground truth).
        f1: the micro F1 at ``threshold``.
        precision: micro precision at ``threshold``.
        recall: micro recall at ``threshold``.
        per_class_threshold: Tensor[C] float64, each class's own F1-optimal threshold (nan for a
            class without ground truth or detection).
        per_class_f1: Tensor[C] float64 F1 at that threshold (nan without ground truth).
    """

    threshold: float
    f1: float
    precision: float
    recall: float
    per_class_threshold: Tensor
    per_class_f1: Tensor


@dataclass(frozen=True)
class ScoreCurves:
    """Per-class curves and the micro curve over all classes.

    Attributes:
        per_class: one :class:`ScoreCurve` per class, None for a class without non-difficult
            ground truth.
        overall: the micro curve (detections of all classes, one threshold), None when there is
            no ground truth at all.
        class_names: the C class names.
    """

    per_class: list[ScoreCurve | None]
    overall: ScoreCurve | None
    class_names: list[str]

    def f1_optimum(self) -> F1Optimum:
        """The F1-optimal thresholds of these curves (see :class:`F1Optimum`)."""
        best = [c.best() if c is not None else (math.nan, math.nan) for c in self.per_class]
        thresholds = torch.tensor([b[0] for b in best], dtype=torch.float64)
        f1s = torch.tensor([b[1] for b in best], dtype=torch.float64)
        if self.overall is None or self.overall.f1.numel() == 0:
            return F1Optimum(math.nan, 0.0, math.nan, 0.0, thresholds, f1s)
        i = int(self.overall.f1.argmax())
        return F1Optimum(
            threshold=float(self.overall.thresholds[i]),
            f1=float(self.overall.f1[i]),
            precision=float(self.overall.precision[i]),
            recall=float(self.overall.recall[i]),
            per_class_threshold=thresholds,
            per_class_f1=f1s,
        )


def _curves(
    s: dict[str, Tensor],
    num_classes: int,
    class_names: list[str],
    iou_threshold: float,
    pixel_inclusive: bool,
) -> ScoreCurves:
    """Curves from flat arrays (the layout of ``VOCMeanAveragePrecision``'s states)."""
    per_class: list[ScoreCurve | None] = []
    ranked = []  # (scores, tp, fp) of every class, for the micro curve
    total_pos = 0
    for c in range(num_classes):  # loop over classes only
        dmask = s["det_labels"] == c
        gmask = s["gt_labels"] == c
        difficult = s["gt_difficult"][gmask]
        tp, fp, order = voc_match_class(
            s["det_boxes"][dmask],
            s["det_scores"][dmask],
            s["det_images"][dmask],
            s["gt_boxes"][gmask],
            s["gt_images"][gmask],
            difficult,
            iou_threshold,
            pixel_inclusive,
        )
        scores = s["det_scores"][dmask][order]
        ranked.append((scores, tp, fp))
        num_pos = int((~difficult).sum())
        total_pos += num_pos
        per_class.append(ScoreCurve.from_ranked(scores, tp, fp, num_pos) if num_pos else None)
    overall = None
    if total_pos:
        scores = torch.cat([r[0] for r in ranked]).to(torch.float64)
        order = torch.sort(scores, descending=True, stable=True).indices
        tp = torch.cat([r[1] for r in ranked])[order]
        fp = torch.cat([r[2] for r in ranked])[order]
        overall = ScoreCurve.from_ranked(scores[order], tp, fp, total_pos)
    return ScoreCurves(per_class, overall, class_names)


def score_curves(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    pixel_inclusive: bool = True,
) -> ScoreCurves:
    """Precision, recall and F1 against the score threshold, per class and micro-averaged.

    Args:
        preds: per image ``{"boxes": Tensor[N, 4] xyxy pixels float, "scores": Tensor[N],
            "labels": Tensor[N] int64 0-based}``.
        targets: per image ``{"boxes": Tensor[M, 4] xyxy pixels, "labels": Tensor[M] int64,
            optional "difficult" / "iscrowd": Tensor[M] bool}`` (flagged: VOC difficult).
        class_names: the C class names (inferred as ``"0"``, ``"1"``, ... if None).
        iou_threshold: IoU a detection needs with its best ground truth (devkit: ``>=``).
        pixel_inclusive: VOC's ``+1`` pixel areas (see :func:`src.metrics.voc_map.voc_box_iou`).

    Returns:
        :class:`ScoreCurves`; ``.f1_optimum()`` gives the F1-optimal thresholds.
    """
    images = check_images(preds, targets, None if class_names is None else len(class_names))
    num_classes = infer_num_classes(images, class_names)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    det_counts = torch.tensor([im.det_labels.numel() for im in images], dtype=torch.int64)
    gt_counts = torch.tensor([im.gt_labels.numel() for im in images], dtype=torch.int64)
    image_ids = torch.arange(len(images))

    def cat(field: str, width: int = 0) -> Tensor:
        parts = [getattr(im, field) for im in images]
        if parts:
            return torch.cat(parts)
        return torch.zeros((0, width) if width else (0,), dtype=torch.float64)

    flat = {
        "det_boxes": cat("det_boxes", 4),
        "det_scores": cat("det_scores"),
        "det_labels": cat("det_labels").long(),
        "det_images": image_ids.repeat_interleave(det_counts),
        "gt_boxes": cat("gt_boxes", 4),
        "gt_labels": cat("gt_labels").long(),
        "gt_difficult": cat("gt_ignored").bool(),
        "gt_images": image_ids.repeat_interleave(gt_counts),
    }
    return _curves(flat, num_classes, names, float(iou_threshold), pixel_inclusive)


_STATE_DTYPES: dict[str, torch.dtype] = {
    "det_boxes": torch.float64,
    "det_scores": torch.float64,
    "det_labels": torch.int64,
    "det_images": torch.int64,
    "gt_boxes": torch.float64,
    "gt_labels": torch.int64,
    "gt_difficult": torch.bool,
    "gt_images": torch.int64,
}


def _metric_states(metric: VOCMeanAveragePrecision) -> dict[str, Tensor]:
    """The metric's list states as flat CPU tensors (boxes Tensor[N, 4])."""
    out = {}
    for name, dtype in _STATE_DTYPES.items():
        state = getattr(metric, name)
        t = dim_zero_cat(state) if isinstance(state, Tensor) or state else torch.zeros(0)
        t = t.detach().cpu().to(dtype)
        out[name] = t.reshape(-1, 4) if name.endswith("boxes") else t.reshape(-1)
    return out


def f1_optimal_threshold(source: VOCMeanAveragePrecision | ScoreCurves) -> F1Optimum:
    """F1-optimal score thresholds, per class and overall (micro over classes).

    Args:
        source: either the validation ``VOCMeanAveragePrecision`` after its ``update`` calls and
            before ``reset()`` (its IoU threshold and pixel convention are used; in a
            distributed run the states are gathered first, so every rank must call this), or
            the :class:`ScoreCurves` of :func:`score_curves`.

    Returns:
        An :class:`F1Optimum`: ``threshold`` / ``f1`` / ``precision`` / ``recall`` (micro) and
        ``per_class_threshold`` / ``per_class_f1`` (Tensor[C]).
    """
    if isinstance(source, ScoreCurves):
        return source.f1_optimum()
    metric = source
    with metric.sync_context(dist_sync_fn=metric.dist_sync_fn):
        states = _metric_states(metric)
    labels = torch.cat([states["det_labels"], states["gt_labels"]])
    num_classes = metric.num_classes or (int(labels.max()) + 1 if labels.numel() else 0)
    names = metric.class_names or [str(c) for c in range(num_classes)]
    curves = _curves(states, num_classes, names, metric.iou_threshold, metric.pixel_inclusive)
    return curves.f1_optimum()
