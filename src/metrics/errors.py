"""TIDE error analysis (Bolya et al., ECCV 2020): what each false positive is, and what it costs.

:func:`tide_errors` reproduces the ``tidecv`` package (``TIDE().evaluate(gt, preds,
mode=TIDE.BOX)`` followed by ``get_main_errors()`` / ``get_special_errors()``) on the
torchmetrics detection format. It equals tidecv's figures (tests/metrics/test_errors.py compares
the base mAP and the six dAP on real VOC detections); the algorithm, step by step:

**Matching** (per image, ``pos_threshold`` = 0.5). The image's detections are ranked by score
(descending, stable) and only the first ``max_dets`` (100) take part; the others are dropped (not
false positives, no error). Ground truths flagged ``difficult`` or ``iscrowd`` become tidecv's
*ignore regions* of their class; the rest are the image's ground truths. In rank order, each
detection takes the not-yet-taken ground truth of its own class with the largest IoU (the first
one on ties), provided that IoU ``>= pos_threshold``: a true positive. An unmatched detection
whose intersection with an ignore region of its class, divided by the detection's own area
(COCO's crowd IoU), is ``> pos_threshold`` is *ignored*: it is left out of the AP, but it still
gets an error type below, as in tidecv.

**Error types** of an unmatched detection (the first test that holds), with ``iou`` over the
image's (non-ignored) ground truths and ``bg_threshold`` = 0.1:

1. ``Bkg`` if the image has no ground truth;
2. ``Loc``: ``bg <= max IoU with a same-class ground truth <= pos`` (note ``<= pos``: tidecv's
   rule), the target being that ground truth;
3. ``Cls``: ``max IoU with an other-class ground truth >= pos``, the target being that one;
4. ``Dupe``: ``max IoU with a same-class ground truth already matched >= pos``;
5. ``Bkg``: ``max IoU with any ground truth <= bg``;
6. ``Both`` otherwise (tidecv's ``OtherError``, classification and localisation wrong).

A ground truth left unmatched is a ``Miss`` unless some ``Cls`` or ``Loc`` detection targets it.

**Oracle fixes** (the dAP of type ``E`` = mAP after fixing every error of type ``E`` minus the base
mAP, clipped at 0):

* ``Cls`` / ``Loc``: among the ``Cls`` and ``Loc`` detections that target the same unmatched
  ground truth, the highest-ranked one becomes a true positive (of the ground truth's class for
  ``Cls``, of its own class for ``Loc``); the others of type ``E`` are removed, and so are ``E``
  detections whose target is already matched.
* ``Both``, ``Dupe``, ``Bkg``: the detections of that type are removed.
* ``Miss``: each missed ground truth is removed from its class's positive count.
* Special errors: ``FalsePos`` scores every true positive 1 and every false positive 0;
  ``FalseNeg`` removes every unmatched ground truth from the positive counts (not clipped).

**AP** (tidecv's ``APDataObject.get_ap``, COCO style): per class, the data points are sorted by
descending score (ties: the order in which tidecv pushes them, which this module reproduces:
image order and rank for the base mAP; after a fix, the points coming from errors first, then the
original true positives); precision is made non-increasing from the right, sampled at the 101
recalls ``k / 100`` (the first point with ``recall >= k / 100``, 0 beyond the last), and
averaged. A class with no positive has AP 0. The mAP averages over the classes that have at
least one data point or positive (a class with only false positives counts, with AP 0).

tidecv prints percentages; here every AP and dAP is a fraction in ``[0, 1]`` (``100 *`` gives
tidecv's numbers). The matching runs vectorised over all images of a chunk: the greedy is
resolved in rounds in which every detection whose higher-ranked competitors (detections sharing a
candidate ground truth) are settled takes its ground truth at once; the AP loops over classes.
No Lightning or Hydra here: ``src.eval`` calls it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from src.metrics._inputs import Image, check_images, infer_num_classes

log = logging.getLogger(__name__)

__all__ = [
    "DET_TYPES",
    "ERROR_TYPES",
    "GT_TYPES",
    "SPECIAL_ERROR_TYPES",
    "TideErrors",
    "tide_ap",
    "tide_errors",
]

#: tidecv's main error types, in its order (``TIDE._error_types``).
ERROR_TYPES: tuple[str, ...] = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
#: tidecv's special error types.
SPECIAL_ERROR_TYPES: tuple[str, ...] = ("FalsePos", "FalseNeg")
#: names of the per-detection codes of :attr:`TideErrors.det_types` (-1: not evaluated).
DET_TYPES: tuple[str, ...] = ("TP", "Cls", "Loc", "Both", "Dupe", "Bkg")
#: names of the per-ground-truth codes of :attr:`TideErrors.gt_types` (-1: ignored region).
GT_TYPES: tuple[str, ...] = ("TP", "Miss", "Fixable")

_TP, _CLS, _LOC, _BOTH, _DUPE, _BKG = range(6)
_GT_TP, _GT_MISS, _GT_FIXABLE = range(3)
_CHUNK = 64  # images per vectorised chunk (dense [I, P, G] tables)


@dataclass(frozen=True)
class TideErrors:
    """Result of :func:`tide_errors`.

    Attributes:
        map_50: tidecv's base mAP at ``pos_threshold`` (a fraction; tidecv prints ``100 *``).
        dap: ``{"Cls", "Loc", "Both", "Dupe", "Bkg", "Miss"}`` -> mAP gained by fixing every
            error of that type (fractions, ``>= 0``).
        dap_special: ``{"FalsePos", "FalseNeg"}`` -> mAP gained with perfect precision / recall.
        counts: number of errors of each type in :data:`ERROR_TYPES` (tidecv's ``error_dict``).
        ap_per_class: Tensor[C] float64 base AP per class, nan for classes left out of the mean.
        det_types: per image, Tensor[N_i] int64 code of each detection (input order):
            an index into :data:`DET_TYPES` (0 = true positive), or -1 for a detection ranked
            beyond ``max_dets`` (not evaluated).
        det_ignored: per image, Tensor[N_i] bool, unmatched detections inside an ignore region
            of their class (not counted in the AP; they still have an error type).
        det_gt: per image, Tensor[N_i] int64 index (into the image's target boxes) of the ground
            truth each detection relates to: the matched one (TP), the target (Cls, Loc), the
            already-matched one (Dupe); -1 for Both, Bkg and unevaluated detections.
        gt_types: per image, Tensor[M_i] int64 code of each ground truth: an index into
            :data:`GT_TYPES` (0 matched, 1 missed, 2 unmatched but the target of a Cls/Loc
            error), -1 for difficult/crowd ground truths (ignore regions).
        image_counts: Tensor[I, 6] int64 errors per image, columns in :data:`ERROR_TYPES` order.
        class_names: the class names (``"0"``, ``"1"``, ... when none were given).
    """

    map_50: float
    dap: dict[str, float]
    dap_special: dict[str, float]
    counts: dict[str, int]
    ap_per_class: Tensor
    det_types: list[Tensor]
    det_ignored: list[Tensor]
    det_gt: list[Tensor]
    gt_types: list[Tensor]
    image_counts: Tensor
    class_names: list[str]

    def worst_images(self, n: int) -> Tensor:
        """Indices of the ``n`` images with the most errors (all types), most first.

        Args:
            n: how many images (fewer when there are fewer images with an error).

        Returns:
            Tensor[n'] int64 image indices; ties keep the image order; images without any
            error are left out.
        """
        total = self.image_counts.sum(dim=1)
        order = torch.sort(total, descending=True, stable=True).indices
        return order[total[order] > 0][:n]

    def summary(self, prefix: str = "") -> dict[str, float]:
        """Flat scalars for logging: ``mAP_50``, ``dAP/<type>`` and ``errors/<type>``.

        Args:
            prefix: key prefix, e.g. ``"eval/tide/"``.

        Returns:
            ``{prefix + key: value}``.
        """
        out = {f"{prefix}mAP_50": self.map_50}
        out.update({f"{prefix}dAP/{k}": v for k, v in {**self.dap, **self.dap_special}.items()})
        out.update({f"{prefix}errors/{k}": float(v) for k, v in self.counts.items()})
        return out


def _pad(rows: list[Tensor], value: float) -> Tensor:
    """Stack ``rows`` (Tensor[n_i, ...]) into Tensor[I, max(max n_i, 1), ...] padded with value."""
    dummy = rows[0].new_full((1, *rows[0].shape[1:]), value)
    return pad_sequence([*rows, dummy], batch_first=True, padding_value=value)[:-1]


def _offsets(sizes: list[int]) -> Tensor:
    """Start of each image's rows in the concatenation: Tensor[I] int64."""
    counts = torch.tensor(sizes, dtype=torch.int64)
    return torch.cumsum(counts, 0) - counts


def _intersection(a: Tensor, b: Tensor) -> Tensor:
    """Batched pairwise intersection areas: Tensor[I, P, 4], Tensor[I, G, 4] xyxy -> [I, P, G]."""
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _area(boxes: Tensor) -> Tensor:
    """Areas of xyxy boxes Tensor[..., 4] -> Tensor[...]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _first_argmax(values: Tensor) -> tuple[Tensor, Tensor]:
    """Maximum over the last dim and the first index reaching it (as ``np.argmax``)."""
    idx = values.argmax(dim=-1)
    return values.gather(-1, idx[..., None]).squeeze(-1), idx


def _greedy(cand: Tensor, iou: Tensor) -> Tensor:
    """The greedy matching of tidecv, resolved in rounds over a batch of images.

    Sequentially, the detection of rank ``p`` takes the first not-yet-taken candidate ground
    truth of maximal IoU. Detection ``p`` depends only on the higher-ranked detections whose
    candidate sets meet its own; once those are settled, ``p`` is settled in the same round as
    every other such detection (their candidate sets are disjoint, so they never compete).

    Args:
        cand: Tensor[I, P, G] bool, (detection, ground truth) pairs of the same class with
            ``IoU >= pos_threshold`` (detections in rank order).
        iou: Tensor[I, P, G] float64 IoU.

    Returns:
        Tensor[I, P] int64 matched ground-truth index, -1 when unmatched.
    """
    num_images, num_det, num_gt = cand.shape
    candf = cand.to(torch.float32)
    shared = torch.bmm(candf, candf.transpose(1, 2)) > 0  # [I, P, P]: candidates in common
    earlier = torch.ones(num_det, num_det, dtype=torch.bool).tril(-1)  # [p, q]: q ranked above p
    conflict = shared & earlier
    match = torch.full((num_images, num_det), -1, dtype=torch.int64)
    taken = torch.zeros(num_images, num_gt + 1, dtype=torch.bool)  # last column: a sink
    unresolved = cand.any(dim=-1)
    while bool(unresolved.any()):
        ready = unresolved & ~(conflict & unresolved[:, None, :]).any(dim=-1)
        avail = cand & ~taken[:, None, :num_gt]
        _, best = _first_argmax(torch.where(avail, iou, -1.0))
        ok = ready & avail.any(dim=-1)
        match = torch.where(ok, best, match)
        taken.scatter_(1, torch.where(ok, best, num_gt), True)
        unresolved &= ~ready
    return match


@dataclass
class _Chunk:
    """Flat per-detection and per-ground-truth results of one chunk (evaluated detections only)."""

    det_image: Tensor  # [D] global image index
    det_rank: Tensor  # [D]
    det_index: Tensor  # [D] index in the image's preds
    det_label: Tensor
    det_score: Tensor
    det_type: Tensor  # [D] code into DET_TYPES
    det_ignored: Tensor
    det_gt: Tensor  # [D] index into the image's targets, -1 if none
    det_fix_class: Tensor  # [D] class the Cls/Loc fix pushes to (-1: removed)
    gt_image: Tensor  # [G'] non-ignored ground truths
    gt_label: Tensor
    gt_type: Tensor  # [G'] code into GT_TYPES
    gt_index: Tensor  # [G'] index in the image's targets


def _analyse_chunk(
    images: Sequence[Image], first: int, pos: float, bg: float, max_dets: int
) -> _Chunk:
    """Match and type the detections of a few images at once (see the module docstring)."""
    orders = [
        torch.sort(im.det_scores, descending=True, stable=True).indices[:max_dets] for im in images
    ]
    keep = [~im.gt_ignored for im in images]
    det_boxes = _pad([im.det_boxes[o] for im, o in zip(images, orders, strict=True)], 0.0)
    det_labels = _pad([im.det_labels[o] for im, o in zip(images, orders, strict=True)], -1)
    det_valid = _pad([torch.ones(len(o), dtype=torch.bool) for o in orders], False)
    gt_boxes = _pad([im.gt_boxes[k] for im, k in zip(images, keep, strict=True)], 0.0)
    gt_labels = _pad([im.gt_labels[k] for im, k in zip(images, keep, strict=True)], -2)
    gt_valid = _pad([torch.ones(int(k.sum()), dtype=torch.bool) for k in keep], False)
    gt_index = _pad([k.nonzero()[:, 0] for k in keep], -1)
    region_boxes = _pad([im.gt_boxes[~k] for im, k in zip(images, keep, strict=True)], 0.0)
    region_labels = _pad([im.gt_labels[~k] for im, k in zip(images, keep, strict=True)], -3)
    num_images, num_det, num_gt = det_labels.shape[0], det_labels.shape[1], gt_labels.shape[1]

    pair_valid = det_valid[:, :, None] & gt_valid[:, None, :]  # [I, P, G]
    inter = _intersection(det_boxes, gt_boxes)
    union = _area(det_boxes)[:, :, None] + _area(gt_boxes)[:, None, :] - inter
    iou = torch.where(pair_valid, torch.nan_to_num(inter / union, nan=0.0), 0.0)
    same = (det_labels[:, :, None] == gt_labels[:, None, :]) & pair_valid
    cls_iou = iou * same

    match = _greedy(same & (iou >= pos), iou)
    matched = match >= 0
    gt_used = torch.zeros(num_images, num_gt + 1, dtype=torch.bool)
    gt_used.scatter_(1, torch.where(matched, match, num_gt), True)
    gt_used = gt_used[:, :num_gt]

    # ignore regions: crowd IoU (intersection over the detection's area) > pos, same class
    crowd = _intersection(det_boxes, region_boxes) / _area(det_boxes)[:, :, None]
    region_hit = (crowd > pos) & (det_labels[:, :, None] == region_labels[:, None, :])
    ignored = det_valid & ~matched & region_hit.any(dim=-1)

    loc_val, loc_idx = _first_argmax(cls_iou)
    cls_val, cls_idx = _first_argmax(iou * (~same & pair_valid))
    dup_val, dup_idx = _first_argmax(cls_iou * gt_used[:, None, :])
    any_val, _ = _first_argmax(iou)
    has_gt = gt_valid.any(dim=1)[:, None].expand(-1, num_det)
    is_loc = has_gt & (loc_val >= bg) & (loc_val <= pos)
    is_cls = has_gt & ~is_loc & (cls_val >= pos)
    is_dup = has_gt & ~is_loc & ~is_cls & (dup_val >= pos)
    is_bkg = ~has_gt | (~is_loc & ~is_cls & ~is_dup & (any_val <= bg))
    kind = torch.full_like(det_labels, _BOTH)
    for code, mask in ((_BKG, is_bkg), (_DUPE, is_dup), (_CLS, is_cls), (_LOC, is_loc)):
        kind = torch.where(mask, code, kind)
    kind = torch.where(matched, _TP, kind)

    # tidecv's BestGTMatch: per unmatched target, the highest-ranked Cls/Loc detection fixes it
    target = torch.where(kind == _CLS, cls_idx, loc_idx)
    fixer = det_valid & ((kind == _CLS) | (kind == _LOC))
    target_free = fixer & ~gt_used.gather(1, target)
    rank = torch.arange(num_det).expand(num_images, -1)
    big = num_det + 1
    best_rank = torch.full((num_images, num_gt + 1), big, dtype=torch.int64)
    best_rank.scatter_reduce_(
        1, torch.where(target_free, target, num_gt), rank, reduce="amin", include_self=True
    )
    is_best = target_free & (best_rank.gather(1, target) == rank)
    fix_class = torch.where(kind == _CLS, gt_labels.gather(1, target), det_labels)
    fix_class = torch.where(is_best, fix_class, -1)
    usable = (best_rank[:, :num_gt] < big) & gt_valid

    related = torch.where(matched, match, -1)
    related = torch.where(fixer, target, related)
    related = torch.where(kind == _DUPE, dup_idx, related)
    related = torch.where(related >= 0, gt_index.gather(1, related.clamp(min=0)), -1)

    gt_kind = torch.where(gt_used, _GT_TP, torch.where(usable, _GT_FIXABLE, _GT_MISS))
    image_ids = torch.arange(first, first + num_images)[:, None]
    return _Chunk(
        det_image=image_ids.expand(-1, num_det)[det_valid],
        det_rank=rank[det_valid],
        det_index=_pad(orders, -1)[det_valid],
        det_label=det_labels[det_valid],
        det_score=_pad([im.det_scores[o] for im, o in zip(images, orders, strict=True)], 0.0)[
            det_valid
        ],
        det_type=kind[det_valid],
        det_ignored=ignored[det_valid],
        det_gt=related[det_valid],
        det_fix_class=fix_class[det_valid],
        gt_image=image_ids.expand(-1, num_gt)[gt_valid],
        gt_label=gt_labels[gt_valid],
        gt_type=gt_kind[gt_valid],
        gt_index=gt_index[gt_valid],
    )


def tide_ap(
    labels: np.ndarray,
    scores: np.ndarray,
    tp: np.ndarray,
    order_key: np.ndarray,
    num_pos: np.ndarray,
) -> tuple[float, np.ndarray]:
    """Per-class 101-point AP of tidecv and their mean (``ClassedAPDataObject.get_mAP``).

    Args:
        labels: int64[D] class of each data point.
        scores: float64[D] score (sorted descending per class).
        tp: bool[D] true positive flags.
        order_key: int64[D] tie-break among equal scores (smaller first): the order in which
            tidecv pushed the points.
        num_pos: int64[C] positives per class.

    Returns:
        ``(mAP, ap)``: the mean over the classes with a data point or a positive (0.0 when there
        is none), and float64[C] AP per class (nan for the classes left out of the mean).
    """
    num_classes = num_pos.shape[0]
    ap = np.full(num_classes, np.nan)
    order = np.lexsort((order_key, -scores, labels))
    labels, tp = labels[order], tp[order]
    bounds = np.searchsorted(labels, np.arange(num_classes + 1), side="left")
    recall_points = np.arange(101) / 100
    for c in range(num_classes):  # loop over classes only
        hits = tp[bounds[c] : bounds[c + 1]]
        if hits.size == 0 and num_pos[c] == 0:
            continue
        if num_pos[c] == 0 or hits.size == 0:
            ap[c] = 0.0
            continue
        ctp = np.cumsum(hits)
        precision = ctp / np.arange(1, hits.size + 1)
        recall = ctp / num_pos[c]
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, recall_points, side="left")
        sampled = np.where(idx < hits.size, envelope[np.minimum(idx, hits.size - 1)], 0.0)
        ap[c] = sampled.sum() / 101
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else 0.0), ap


def tide_errors(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str] | None = None,
    pos_threshold: float = 0.5,
    bg_threshold: float = 0.1,
    max_dets: int = 100,
) -> TideErrors:
    """TIDE error breakdown and dAP of a set of detections, equal to tidecv's (module docstring).

    Args:
        preds: per image ``{"boxes": Tensor[N, 4] xyxy pixels float, "scores": Tensor[N],
            "labels": Tensor[N] int64 0-based}``.
        targets: per image ``{"boxes": Tensor[M, 4] xyxy pixels, "labels": Tensor[M] int64,
            optional "difficult" / "iscrowd": Tensor[M] bool}``; flagged boxes become ignore
            regions of their class (tidecv's ``add_ignore_region``, as its COCO loader does with
            ``iscrowd``).
        class_names: the C class names (labels in ``[0, C)``); inferred from the labels if None.
        pos_threshold: tidecv's foreground IoU (0.5: the errors of mAP@0.5).
        bg_threshold: tidecv's background IoU (0.1).
        max_dets: detections evaluated per image, highest scores first (tidecv's ``max_dets``).

    Returns:
        A :class:`TideErrors` (APs as fractions; tidecv prints percentages).

    Raises:
        ValueError: inconsistent inputs (see :func:`src.metrics._inputs.check_images`) or
            thresholds outside ``0 <= bg_threshold <= pos_threshold <= 1``, ``pos > 0``.
    """
    if not 0.0 <= bg_threshold <= pos_threshold <= 1.0 or pos_threshold <= 0.0:
        raise ValueError(
            "tide_errors needs 0 <= bg_threshold <= pos_threshold <= 1 and pos_threshold > 0, got "
            f"bg_threshold={bg_threshold}, pos_threshold={pos_threshold}"
        )
    if max_dets < 1:
        raise ValueError(f"tide_errors: max_dets must be >= 1, got {max_dets}")
    images = check_images(preds, targets, None if class_names is None else len(class_names))
    num_classes = infer_num_classes(images, class_names)
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    chunks = [
        _analyse_chunk(images[s : s + _CHUNK], s, pos_threshold, bg_threshold, max_dets)
        for s in range(0, len(images), _CHUNK)
    ]
    if not chunks:
        raise ValueError("tide_errors needs at least one image")
    r = _Chunk(*(torch.cat([getattr(c, f) for c in chunks]) for f in _Chunk.__dataclass_fields__))

    # ---- AP data points (numpy, float64) -----------------------------------------------------
    seq = (r.det_image * (max_dets + 1) + r.det_rank).numpy()  # tidecv's push order
    label = r.det_label.numpy()
    score = r.det_score.numpy()
    kind = r.det_type.numpy()
    in_base = ~r.det_ignored.numpy()
    is_tp = kind == _TP
    fix_class = r.det_fix_class.numpy()
    num_pos = np.bincount(r.gt_label.numpy(), minlength=num_classes)
    gt_kind, gt_label = r.gt_type.numpy(), r.gt_label.numpy()
    missed = np.bincount(gt_label[gt_kind == _GT_MISS], minlength=num_classes)
    unmatched = np.bincount(gt_label[gt_kind != _GT_TP], minlength=num_classes)

    base_map, ap = tide_ap(label[in_base], score[in_base], is_tp[in_base], seq[in_base], num_pos)
    # after a fix tidecv pushes the points coming from errors first, then the true positives
    fixed_key = seq + np.where(is_tp, seq.max(initial=0) + 1, 0)

    def fixed_map(
        fixed: np.ndarray, positives: np.ndarray = num_pos, scores: np.ndarray = score
    ) -> float:
        """The mAP after fixing the detections in ``fixed`` (tidecv's ``fix_errors``)."""
        moved = fixed & (fix_class >= 0)  # the Cls/Loc detections that become true positives
        points = (in_base & ~fixed) | moved
        labels = np.where(moved, fix_class, label)
        hits = (is_tp | moved)[points]
        return tide_ap(labels[points], scores[points], hits, fixed_key[points], positives)[0]

    dap = {
        name: max(fixed_map(kind == code) - base_map, 0.0)
        for name, code in zip(ERROR_TYPES[:5], (_CLS, _LOC, _BOTH, _DUPE, _BKG), strict=True)
    }
    nothing = np.zeros_like(in_base)
    dap["Miss"] = max(fixed_map(nothing, num_pos - missed) - base_map, 0.0)
    dap_special = {
        "FalsePos": fixed_map(nothing, scores=is_tp.astype(np.float64)) - base_map,
        "FalseNeg": fixed_map(nothing, num_pos - unmatched) - base_map,
    }

    # ---- per image and per box outputs -------------------------------------------------------
    num_images = len(images)
    counts_det = torch.zeros(num_images, len(DET_TYPES), dtype=torch.int64)
    counts_det.index_put_((r.det_image, r.det_type), torch.ones_like(r.det_type), accumulate=True)
    image_counts = torch.cat(
        [
            counts_det[:, _CLS : _BKG + 1],
            torch.zeros(num_images, dtype=torch.int64)
            .index_add_(0, r.gt_image, (r.gt_type == _GT_MISS).long())
            .unsqueeze(1),
        ],
        dim=1,
    )
    # scatter into flat tensors in input order, then one split per output
    det_sizes = [im.det_scores.shape[0] for im in images]
    gt_sizes = [im.gt_labels.shape[0] for im in images]
    det_pos = _offsets(det_sizes)[r.det_image] + r.det_index
    gt_pos = _offsets(gt_sizes)[r.gt_image] + r.gt_index

    def per_image(pos: Tensor, values: Tensor, fill: int, sizes: list[int]) -> list[Tensor]:
        flat = torch.full((sum(sizes),), fill, dtype=values.dtype)
        return list(flat.index_copy_(0, pos, values).split(sizes))

    det_types = per_image(det_pos, r.det_type, -1, det_sizes)
    det_ignored = per_image(det_pos, r.det_ignored, 0, det_sizes)
    det_gt = per_image(det_pos, r.det_gt, -1, det_sizes)
    gt_types = per_image(gt_pos, r.gt_type, -1, gt_sizes)

    result = TideErrors(
        map_50=base_map,
        dap=dap,
        dap_special=dap_special,
        counts=dict(zip(ERROR_TYPES, image_counts.sum(dim=0).tolist(), strict=True)),
        ap_per_class=torch.from_numpy(ap),
        det_types=det_types,
        det_ignored=det_ignored,
        det_gt=det_gt,
        gt_types=gt_types,
        image_counts=image_counts,
        class_names=names,
    )
    log.debug("TIDE: mAP %.4f, dAP %s", base_map, dap)
    return result
