"""Detection confusion matrix with a background class, matched the way Ultralytics does.

Rows are the true class, columns the predicted class; index ``C`` (last) is *background*:

* ``counts[t, p]``: a ground truth of class ``t`` matched by a detection of class ``p``
  (the diagonal: correct; off the diagonal: right place, wrong class);
* ``counts[t, C]`` (background column): a ground truth of class ``t`` that no detection matched
  (a miss);
* ``counts[C, p]`` (background row): a detection of class ``p`` that matched no ground truth
  (a false positive: background, a duplicate or a badly placed box).

``counts[C, C]`` is always 0.

**Matching rule** (``ultralytics.utils.metrics.ConfusionMatrix.process_batch``), per image:

1. keep the detections with ``score > score_threshold`` (strict, Ultralytics' ``conf``);
2. candidate pairs are all (ground truth, detection) pairs with ``IoU > iou_threshold``
   (strict), *whatever their classes*;
3. each detection keeps its highest-IoU candidate ground truth;
4. of those pairs, each ground truth keeps its highest-IoU detection; the pairs left are the
   matches (one-to-one). Ties go to the lower index (Ultralytics leaves them to ``argsort``).

This is not the same as the class-aware, score-ranked matching of mAP: a detection with the right
box and the wrong class is a confusion here, and a duplicate counts in the background row.
Ground truths flagged ``difficult`` or ``iscrowd`` take part in the matching, but neither they
(matched or not) nor the detections matched to them are counted (VOC's "ignore").

One deliberate difference: every unmatched detection counts in the background row. Ultralytics
skips them in an image where no pair matched at all (its ``if n:`` guard, reported as a bug in
ultralytics/yolov5#11635 and ultralytics/ultralytics#13350), so an image whose detections all
miss its objects adds no false positive there. Ultralytics' matrix is ``[predicted, true]``; this
one is its transpose, ``[true, predicted]``. No Lightning or Hydra here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from src.metrics._inputs import check_images, infer_num_classes

__all__ = ["DetectionConfusion", "confusion_matrix"]


@dataclass(frozen=True)
class DetectionConfusion:
    """A detection confusion matrix (see the module docstring for the layout).

    Attributes:
        counts: Tensor[C+1, C+1] int64, rows true class, columns predicted class, background
            last.
        class_names: the C class names.
        iou_threshold: the IoU a match needs (strictly above).
        score_threshold: the score a detection needs to be counted (strictly above).
    """

    counts: Tensor
    class_names: list[str]
    iou_threshold: float
    score_threshold: float

    @property
    def labels(self) -> list[str]:
        """Row and column labels: the class names, then ``"background"``."""
        return [*self.class_names, "background"]

    def normalised(self) -> Tensor:
        """Row-normalised matrix: each true class's row divided by its total.

        Returns:
            Tensor[C+1, C+1] float64; a row sums to 1 (what became of that class's ground truths;
            for the background row, which classes the false positives were given), or is nan
            when it has no count.
        """
        counts = self.counts.to(torch.float64)
        return counts / counts.sum(dim=1, keepdim=True)

    def recall(self) -> Tensor:
        """Tensor[C] float64: right-class matches / ground truths of the class (nan if none)."""
        counts = self.counts.to(torch.float64)
        return counts.diagonal()[:-1] / counts[:-1].sum(dim=1)

    def precision(self) -> Tensor:
        """Tensor[C] float64: right-class matches / detections of the class (nan if none)."""
        counts = self.counts.to(torch.float64)
        return counts.diagonal()[:-1] / counts[:, :-1].sum(dim=0)


def _match(iou: Tensor, iou_threshold: float) -> Tensor:
    """Ultralytics' two-pass one-to-one matching of one image.

    Args:
        iou: Tensor[M, N] IoU of the ground truths (rows) with the kept detections (columns).
        iou_threshold: candidates need ``IoU > iou_threshold``.

    Returns:
        Tensor[M] int64: the detection matched to each ground truth, -1 if none.
    """
    if iou.numel() == 0:
        return torch.full((iou.shape[0],), -1, dtype=torch.int64)
    scored = torch.where(iou > iou_threshold, iou, -1.0)
    best_gt = scored.argmax(dim=0)  # [N] first highest-IoU ground truth of each detection
    has_gt = scored.gather(0, best_gt[None]).squeeze(0) >= 0
    kept = torch.zeros_like(scored, dtype=torch.bool)
    kept[best_gt[has_gt], has_gt.nonzero()[:, 0]] = True
    scored = torch.where(kept, iou, -1.0)
    best_det = scored.argmax(dim=1)  # [M] highest-IoU detection left for each ground truth
    return torch.where(kept.any(dim=1), best_det, -1)


def confusion_matrix(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str] | None = None,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> DetectionConfusion:
    """Detection confusion matrix with background, Ultralytics' matching (module docstring).

    Args:
        preds: per image ``{"boxes": Tensor[N, 4] xyxy pixels float, "scores": Tensor[N],
            "labels": Tensor[N] int64 0-based}``.
        targets: per image ``{"boxes": Tensor[M, 4] xyxy pixels, "labels": Tensor[M] int64,
            optional "difficult" / "iscrowd": Tensor[M] bool}`` (flagged boxes are not counted).
        class_names: the C class names (inferred as ``"0"``, ``"1"``, ... if None).
        iou_threshold: a match needs ``IoU > iou_threshold``.
        score_threshold: detections with ``score <= score_threshold`` are dropped
            (Ultralytics' default ``conf`` is 0.25).

    Returns:
        A :class:`DetectionConfusion`.

    Raises:
        ValueError: inconsistent inputs, or an IoU threshold outside ``[0, 1)``.
    """
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"confusion_matrix: iou_threshold must be in [0, 1), got {iou_threshold}")
    images = check_images(preds, targets, None if class_names is None else len(class_names))
    num_classes = infer_num_classes(images, class_names)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    bg = num_classes
    true, pred = [], []
    for im in images:  # loop over images only
        keep = im.det_scores > score_threshold
        det_labels = im.det_labels[keep]
        det_of_gt = _match(box_iou(im.gt_boxes, im.det_boxes[keep]), iou_threshold)
        matched = det_of_gt >= 0
        det_used = torch.zeros(det_labels.shape[0], dtype=torch.bool)
        det_used[det_of_gt[matched]] = True
        counted = ~im.gt_ignored
        # ground truths: matched -> [true, predicted]; unmatched -> [true, background]
        lookup = torch.cat([det_labels, torch.tensor([bg])])
        gt_pred = lookup[torch.where(matched, det_of_gt, det_labels.shape[0])]
        true += [im.gt_labels[counted]]
        pred += [gt_pred[counted]]
        # detections matched to nothing -> [background, predicted]
        true += [torch.full((int((~det_used).sum()),), bg, dtype=torch.int64)]
        pred += [det_labels[~det_used]]
    size = num_classes + 1
    flat = torch.cat(true) * size + torch.cat(pred) if true else torch.zeros(0, dtype=torch.int64)
    counts = torch.bincount(flat, minlength=size * size).reshape(size, size)
    return DetectionConfusion(counts, names, float(iou_threshold), float(score_threshold))
