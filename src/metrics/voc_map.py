"""Pascal VOC mean average precision (the devkit's ``VOCevaldet``) as a torchmetrics Metric.

The computation reproduces the VOC development kit (and its Python port ``voc_eval.py`` from
py-faster-rcnn) exactly:

* IoU on pixel boxes with the devkit's inclusive-pixel areas (``x2 - x1 + 1``); see
  ``pixel_inclusive``.
* Per class, all detections of the whole data set are sorted by descending score (stable sort: ties
  keep the update order). Each detection is compared with the ground truths of its image and class,
  and only with the one of maximal IoU (``jmax``, the first one on ties). If that IoU reaches the
  threshold and the ground truth is not difficult, the detection is a true positive when it is
  the first to claim that ground truth and a false positive (duplicate) otherwise. A detection
  whose best ground truth is difficult is ignored (neither TP nor FP); any other detection is a
  false positive.
  There is no fall-back to the second best ground truth (unlike COCO).
* ``npos`` counts the non-difficult ground truths; recall ``= cumsum(tp) / npos`` and precision
  ``= cumsum(tp) / max(cumsum(tp) + cumsum(fp), eps)`` in float64.
* AP is the area under the precision envelope (VOC2010+ "all points", the default) or the VOC2007
  11-point interpolated average (``use_07_metric=True``: mean over ``t in {0, 0.1, ..., 1}`` of
  ``max(precision[recall >= t])``, with the thresholds computed as ``k * 0.1`` like ``np.arange``).
* mAP is the mean over the classes with at least one non-difficult ground truth.

The threshold test is ``IoU >= iou_threshold`` as in the MATLAB devkit (``ovmax >= minoverlap``);
py-faster-rcnn's port uses ``>``. They differ only for an IoU exactly equal to the threshold.

Boxes given to the metric are pixel ``xyxy``. IoU is translation invariant, so any consistent pixel
frame gives the devkit numbers: with :class:`src.data.voc.VOCDataset` (normalised boxes
``(x - 1) / W``), multiply both predictions and targets by ``(W, H)`` of ``orig_size``; to write
devkit result files add 1 to every coordinate.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

log = logging.getLogger(__name__)

__all__ = ["VOCMeanAveragePrecision", "voc_ap", "voc_box_iou", "voc_match_class"]

# Image keys are (rank << _RANK_SHIFT) + a process-wide counter: unique across ranks after
# gathering, across forward()'s reset/merge and across merge_state() of instances in one process.
_RANK_SHIFT = 40
_IMAGE_KEYS = itertools.count()


def voc_box_iou(boxes1: Tensor, boxes2: Tensor, pixel_inclusive: bool = True) -> Tensor:
    """Element-wise IoU of two aligned sets of pixel boxes, the devkit's formula.

    Args:
        boxes1: Tensor[P, 4] xyxy pixel boxes (float).
        boxes2: Tensor[P, 4] xyxy pixel boxes (float), paired row by row with ``boxes1``.
        pixel_inclusive: if True, widths/heights are ``x2 - x1 + 1`` (VOC's inclusive pixel
            coordinates, as the devkit); if False, ``x2 - x1`` (continuous coordinates, as COCO).

    Returns:
        Tensor[P] IoU in the dtype of the inputs (0 where the boxes do not intersect).

    """
    one = 1.0 if pixel_inclusive else 0.0
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt + one).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0] + one) * (boxes1[:, 3] - boxes1[:, 1] + one)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + one) * (boxes2[:, 3] - boxes2[:, 1] + one)
    return inter / (area1 + area2 - inter)


def voc_ap(recall: Tensor, precision: Tensor, use_07_metric: bool = False) -> Tensor:
    """Average precision from a PR curve, the devkit's ``VOCap`` / py-faster-rcnn's ``voc_ap``.

    Args:
        recall: Tensor[D] float64, non-decreasing recall after each ranked detection.
        precision: Tensor[D] float64 precision after each ranked detection.
        use_07_metric: if True, the VOC2007 11-point metric, else the area under the precision
            envelope (VOC2010+).

    Returns:
        Scalar float64 tensor.

    """
    recall = recall.to(torch.float64)
    precision = precision.to(torch.float64)
    if use_07_metric:
        # np.arange(0., 1.1, 0.1) computes k * 0.1; keep the exact same float values.
        thresholds = torch.arange(11, dtype=torch.float64, device=recall.device) * 0.1
        if recall.numel() == 0:
            return recall.new_zeros(())
        # max(precision[recall >= t]) == envelope at the first index with recall >= t.
        envelope = precision.flip(0).cummax(0).values.flip(0)
        idx = torch.searchsorted(recall, thresholds, side="left")
        padded = torch.cat([envelope, envelope.new_zeros(1)])
        return padded[idx].sum() / 11.0
    zero = recall.new_zeros(1)
    mrec = torch.cat([zero, recall, zero + 1.0])
    mpre = torch.cat([zero, precision, zero])
    mpre = mpre.flip(0).cummax(0).values.flip(0)
    change = torch.nonzero(mrec[1:] != mrec[:-1]).squeeze(1)
    return ((mrec[change + 1] - mrec[change]) * mpre[change + 1]).sum()


def voc_match_class(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_images: Tensor,
    gt_boxes: Tensor,
    gt_images: Tensor,
    gt_difficult: Tensor,
    iou_threshold: float = 0.5,
    pixel_inclusive: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Devkit matching of all detections of one class against the ground truths of that class.

    Args:
        det_boxes: Tensor[D, 4] pixel xyxy detections.
        det_scores: Tensor[D] scores.
        det_images: Tensor[D] int64 image ids.
        gt_boxes: Tensor[G, 4] pixel xyxy ground truths.
        gt_images: Tensor[G] int64 image ids.
        gt_difficult: Tensor[G] bool difficult flags.
        iou_threshold: a detection matches its best ground truth when ``IoU >= iou_threshold``.
        pixel_inclusive: see :func:`voc_box_iou`.

    Returns:
        ``(tp, fp, order)``: Tensor[D] bool true/false positive flags in ranked order (both False
        for a detection ignored because it matched a difficult ground truth) and Tensor[D] int64,
        the permutation of the inputs that gives the ranked order (descending score, stable).

    """
    device = det_boxes.device
    num_det = det_boxes.shape[0]
    order = torch.sort(det_scores, descending=True, stable=True).indices
    if num_det == 0 or gt_boxes.shape[0] == 0:
        none = torch.zeros(num_det, dtype=torch.bool, device=device)
        return none, ~none, order
    boxes = det_boxes[order].to(torch.float64)
    images = det_images[order]

    # Group the ground truths by image (stable: file order kept inside an image) and pair every
    # detection with the ground truths of its image only.
    gt_order = torch.sort(gt_images, stable=True).indices
    g_images = gt_images[gt_order]
    g_boxes = gt_boxes[gt_order].to(torch.float64)
    g_difficult = gt_difficult[gt_order]
    start = torch.searchsorted(g_images, images, side="left")
    stop = torch.searchsorted(g_images, images, side="right")
    counts = stop - start
    det_idx = torch.repeat_interleave(torch.arange(num_det, device=device), counts)
    seg_start = torch.cumsum(counts, 0) - counts
    offset = torch.arange(det_idx.numel(), device=device) - seg_start[det_idx]
    gt_idx = start[det_idx] + offset

    iou = voc_box_iou(boxes[det_idx], g_boxes[gt_idx], pixel_inclusive)
    ovmax = torch.full((num_det,), -1.0, dtype=torch.float64, device=device)
    ovmax = ovmax.scatter_reduce(0, det_idx, iou, reduce="amax", include_self=True)
    # jmax: the first ground truth (in file order) reaching ovmax, as np.argmax.
    big = torch.iinfo(torch.int64).max
    cand = torch.where(iou == ovmax[det_idx], gt_idx, torch.full_like(gt_idx, big))
    jmax = torch.full((num_det,), big, dtype=torch.int64, device=device)
    jmax = jmax.scatter_reduce(0, det_idx, cand, reduce="amin", include_self=True)

    matched = (counts > 0) & (ovmax >= iou_threshold)
    jsafe = torch.where(matched, jmax, torch.zeros_like(jmax))
    hit_difficult = matched & g_difficult[jsafe]
    claim = matched & ~hit_difficult
    # The first claimant (in ranked order) of each ground truth is the true positive.
    rank = torch.arange(num_det, device=device)
    first = torch.full((g_boxes.shape[0],), big, dtype=torch.int64, device=device)
    first = first.scatter_reduce(0, jsafe[claim], rank[claim], reduce="amin", include_self=True)
    tp = claim & (first[jsafe] == rank)
    fp = ~matched | (claim & ~tp)
    return tp, fp, order


class VOCMeanAveragePrecision(Metric):
    """Pascal VOC detection mAP (official devkit numbers), distributed-safe.

    ``update(preds, target)`` takes the same format as
    :class:`torchmetrics.detection.MeanAveragePrecision`:

    * ``preds``: list (one per image) of dicts with ``boxes`` Tensor[N, 4] pixel xyxy,
      ``scores`` Tensor[N] and ``labels`` Tensor[N] int64 (0-based classes).
    * ``target``: list of dicts with ``boxes`` Tensor[G, 4] pixel xyxy, ``labels`` Tensor[G]
      and optional ``difficult`` Tensor[G] bool (default all False).

    ``compute()`` returns a dict:

    * ``map``: mean AP over the classes that have at least one non-difficult ground truth
      (nan if there is none), ``map_50`` the same value when ``iou_threshold == 0.5``.
    * ``ap_per_class``: Tensor[C] float64 AP, nan for classes without non-difficult ground truth.
    * ``num_gt_per_class``: Tensor[C] int64 non-difficult ground-truth counts (``npos``).
    * ``classes``: Tensor[C] int64 class indices ``0..C-1`` (names in ``self.class_names``).

    States are flat tensors in list states with ``dist_reduce_fx="cat"``; every box row carries an
    image key (rank and per-process counter) so images stay distinct after gathering.

    Args:
        iou_threshold: IoU a detection needs with a ground truth to match it (devkit: 0.5).
        use_07_metric: True for the VOC2007 11-point AP, False for the area under the precision
            envelope (VOC2010-2012 devkit; the default).
        class_names: optional class names; fixes ``C = len(class_names)`` and validates labels.
            Without it ``C`` is ``1 + max label`` seen.
        pixel_inclusive: True (devkit) to compute areas with ``+1`` (inclusive pixel
            coordinates); False for continuous coordinates as COCO/torchmetrics.
        **kwargs: forwarded to :class:`torchmetrics.Metric`.

    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    det_boxes: list[Tensor]
    det_scores: list[Tensor]
    det_labels: list[Tensor]
    det_images: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_difficult: list[Tensor]
    gt_images: list[Tensor]

    def __init__(
        self,
        iou_threshold: float = 0.5,
        use_07_metric: bool = False,
        class_names: Sequence[str] | None = None,
        pixel_inclusive: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < float(iou_threshold) <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = float(iou_threshold)
        self.use_07_metric = bool(use_07_metric)
        self.pixel_inclusive = bool(pixel_inclusive)
        self.class_names = list(class_names) if class_names is not None else None
        for name in ("det_boxes", "det_scores", "det_labels", "det_images"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        for name in ("gt_boxes", "gt_labels", "gt_difficult", "gt_images"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def num_classes(self) -> int | None:
        """Number of classes fixed by ``class_names`` (None when inferred from the labels)."""
        return len(self.class_names) if self.class_names is not None else None

    def _check_item(self, item: dict[str, Tensor], kind: str, i: int, keys: Sequence[str]) -> None:
        if not isinstance(item, dict):
            raise TypeError(f"{kind}[{i}] must be a dict with keys {list(keys)}, got {type(item)}")
        for key in keys:
            if key not in item:
                raise ValueError(f"{kind}[{i}] is missing key '{key}' (expected {list(keys)})")
        boxes = item["boxes"]
        if (boxes.ndim != 2 or boxes.shape[-1] != 4) and boxes.numel() != 0:
            raise ValueError(
                f"{kind}[{i}]['boxes'] must have shape [N, 4] (pixel xyxy), "
                f"got {tuple(boxes.shape)}"
            )
        n = boxes.reshape(-1, 4).shape[0]
        for key in keys:
            if key != "boxes" and item[key].numel() != n:
                raise ValueError(
                    f"{kind}[{i}]['{key}'] has {item[key].numel()} entries but 'boxes' has {n}"
                )
        labels = item["labels"]
        if labels.numel():
            if labels.is_floating_point():
                raise ValueError(f"{kind}[{i}]['labels'] must be integer class indices")
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or (self.num_classes is not None and hi >= self.num_classes):
                raise ValueError(
                    f"{kind}[{i}]['labels'] must be 0-based class indices in "
                    f"[0, {self.num_classes}), got range [{lo}, {hi}]"
                )

    def update(self, preds: list[dict[str, Tensor]], target: list[dict[str, Tensor]]) -> None:
        """Add one batch of images.

        Args:
            preds: per image ``{"boxes": [N, 4] pixel xyxy, "scores": [N], "labels": [N] int64}``.
            target: per image ``{"boxes": [G, 4] pixel xyxy, "labels": [G] int64,
                "difficult": optional [G] bool}``.

        """
        if len(preds) != len(target):
            raise ValueError(
                f"preds and target must have one entry per image, got {len(preds)} and "
                f"{len(target)}"
            )
        rank = 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank()
        for i, (pred, tgt) in enumerate(zip(preds, target, strict=True)):
            self._check_item(pred, "preds", i, ("boxes", "scores", "labels"))
            self._check_item(tgt, "target", i, ("boxes", "labels"))
            key = (rank << _RANK_SHIFT) + next(_IMAGE_KEYS)

            boxes = pred["boxes"].detach().reshape(-1, 4).to(self.device, torch.float64)
            n = boxes.shape[0]
            self.det_boxes.append(boxes)
            self.det_scores.append(
                pred["scores"].detach().reshape(-1).to(self.device, torch.float64)
            )
            self.det_labels.append(pred["labels"].detach().reshape(-1).to(self.device, torch.int64))
            self.det_images.append(torch.full((n,), key, dtype=torch.int64, device=self.device))

            gboxes = tgt["boxes"].detach().reshape(-1, 4).to(self.device, torch.float64)
            g = gboxes.shape[0]
            difficult = tgt.get("difficult")
            if difficult is None:
                difficult = torch.zeros(g, dtype=torch.uint8, device=self.device)
            elif difficult.numel() != g:
                raise ValueError(
                    f"target[{i}]['difficult'] has {difficult.numel()} entries but 'boxes' has {g}"
                )
            self.gt_boxes.append(gboxes)
            self.gt_labels.append(tgt["labels"].detach().reshape(-1).to(self.device, torch.int64))
            # uint8 rather than bool: all backends can all_gather it.
            self.gt_difficult.append(difficult.detach().reshape(-1).to(self.device, torch.uint8))
            self.gt_images.append(torch.full((g,), key, dtype=torch.int64, device=self.device))

    def _gathered(self) -> dict[str, Tensor]:
        def cat(state: list[Tensor] | Tensor, dtype: torch.dtype, width: int = 0) -> Tensor:
            if isinstance(state, list):
                t = dim_zero_cat(state) if state else torch.zeros(0, device=self.device)
            else:
                t = state
            t = t.to(dtype)
            return t.reshape(-1, width) if width else t.reshape(-1)

        f64, i64 = torch.float64, torch.int64
        return {
            "det_boxes": cat(self.det_boxes, f64, 4),
            "det_scores": cat(self.det_scores, f64),
            "det_labels": cat(self.det_labels, i64),
            "det_images": cat(self.det_images, i64),
            "gt_boxes": cat(self.gt_boxes, f64, 4),
            "gt_labels": cat(self.gt_labels, i64),
            "gt_difficult": cat(self.gt_difficult, torch.bool),
            "gt_images": cat(self.gt_images, i64),
        }

    def _infer_num_classes(self, s: dict[str, Tensor]) -> int:
        if self.num_classes is not None:
            return self.num_classes
        labels = torch.cat([s["det_labels"], s["gt_labels"]])
        return int(labels.max()) + 1 if labels.numel() else 0

    def pr_curves(self) -> list[tuple[Tensor, Tensor] | None]:
        """Per-class ranked recall/precision (the devkit's ``rec``, ``prec``), from the states.

        Returns:
            For each class ``c`` in ``0..C-1``: ``(recall[D_c], precision[D_c])`` float64 over the
            ranked detections of class ``c`` (ignored detections keep the previous counts, as in
            the devkit), or None when the class has no non-difficult ground truth.

        """
        return self._curves(self._gathered())

    def _curves(self, s: dict[str, Tensor]) -> list[tuple[Tensor, Tensor] | None]:
        curves: list[tuple[Tensor, Tensor] | None] = []
        for c in range(self._infer_num_classes(s)):  # loop over classes only
            dmask = s["det_labels"] == c
            gmask = s["gt_labels"] == c
            npos = int((~s["gt_difficult"][gmask]).sum())
            if npos == 0:
                curves.append(None)
                continue
            tp, fp, _ = voc_match_class(
                s["det_boxes"][dmask],
                s["det_scores"][dmask],
                s["det_images"][dmask],
                s["gt_boxes"][gmask],
                s["gt_images"][gmask],
                s["gt_difficult"][gmask],
                self.iou_threshold,
                self.pixel_inclusive,
            )
            ctp = torch.cumsum(tp.to(torch.float64), 0)
            cfp = torch.cumsum(fp.to(torch.float64), 0)
            recall = ctp / npos
            eps = torch.finfo(torch.float64).eps
            precision = ctp / torch.clamp(ctp + cfp, min=eps)
            curves.append((recall, precision))
        return curves

    def compute(self) -> dict[str, Tensor]:
        """Per-class AP and mAP over all updated images (see the class docstring for keys)."""
        s = self._gathered()
        curves = self._curves(s)
        num_classes = len(curves)
        ap = torch.full((num_classes,), float("nan"), dtype=torch.float64, device=self.device)
        for c, curve in enumerate(curves):
            if curve is not None:
                ap[c] = voc_ap(curve[0], curve[1], self.use_07_metric)
        npos = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        if num_classes:
            keep = ~s["gt_difficult"]
            npos = npos.index_add(0, s["gt_labels"][keep], torch.ones_like(s["gt_labels"][keep]))
        valid = ~torch.isnan(ap)
        if valid.any():
            mean_ap = ap[valid].mean()
        else:
            log.warning("VOCMeanAveragePrecision: no non-difficult ground truth; mAP is nan")
            mean_ap = torch.tensor(float("nan"), dtype=torch.float64, device=self.device)
        out = {
            "map": mean_ap,
            "ap_per_class": ap,
            "num_gt_per_class": npos,
            "classes": torch.arange(num_classes, dtype=torch.int64, device=self.device),
        }
        if self.iou_threshold == 0.5:
            out["map_50"] = mean_ap
        return out

    @staticmethod
    def per_class_ap(results: dict[str, Tensor]) -> Tensor:
        """``compute()``'s per-class AP as ``Tensor[C]`` (torchmetrics squeezes C = 1 to 0-d)."""
        return results["ap_per_class"].reshape(-1)

    def ap_dict(self, results: dict[str, Tensor], prefix: str = "ap50/") -> dict[str, float]:
        """Flatten ``compute()``'s per-class AP into scalars for logging (classes with AP only).

        Args:
            results: the dict returned by :meth:`compute`.
            prefix: key prefix, e.g. ``"val/ap50/"``.

        Returns:
            ``{prefix + class_name: ap}`` for classes with a non-nan AP.

        """
        ap = self.per_class_ap(results)
        names = self.class_names or [str(c) for c in range(ap.numel())]
        return {f"{prefix}{names[c]}": float(ap[c]) for c in range(ap.numel()) if ap[c] == ap[c]}
