"""The book's multibox API (*Dive into Deep Learning*, 14.4 "Anchor Boxes"), drop-in.

Same names, signatures, tensor layouts and results as the book's ``multibox_prior``,
``box_iou``, ``assign_anchor_to_bbox``, ``offset_boxes``, ``multibox_target``,
``offset_inverse``, ``nms`` and ``multibox_detection``, so code written against the book runs
unchanged. They are thin wrappers over the general, vectorised pieces
(:class:`~src.detection.coder.BoxCoder`,
:func:`~src.detection.matching.match_anchors_batched`,
:class:`~src.detection.targets.TargetEncoder`, ``torchvision.ops.nms``): there is one
implementation of matching and encoding in the project.

The only extension: in :func:`multibox_target`, label rows whose class is ``< 0`` are padding
and are ignored (the book would assign anchors to them).
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

from src.detection.anchors import multibox_prior
from src.detection.box_ops import box_iou
from src.detection.coder import BoxCoder
from src.detection.matching import match_anchors, pairwise_iou_batched
from src.detection.targets import TargetEncoder

__all__ = [
    "multibox_prior",
    "box_iou",
    "assign_anchor_to_bbox",
    "offset_boxes",
    "offset_inverse",
    "multibox_target",
    "nms",
    "multibox_detection",
]

_BOOK_CODER = BoxCoder(variances=(0.1, 0.2), eps=1e-6)
_BOOK_ENCODER = TargetEncoder(coder=_BOOK_CODER, iou_threshold=0.5)


def assign_anchor_to_bbox(
    ground_truth: Tensor, anchors: Tensor, device: torch.device | str, iou_threshold: float = 0.5
) -> Tensor:
    """Assign a ground truth to each anchor (the book's ``assign_anchor_to_bbox``).

    Anchors with max IoU ``>= iou_threshold`` take their best ground truth; then every ground
    truth, in global max-IoU order, takes its best remaining anchor (overriding). Vectorised,
    identical results including ties (see :mod:`src.detection.matching`).

    Args:
        ground_truth: ``Tensor[G, 4]`` float, xyxy.
        anchors: ``Tensor[A, 4]`` float, xyxy.
        device: device of the result.
        iou_threshold: in ``(0, 1]``.

    Returns:
        ``Tensor[A]`` int64 on ``device``: ground-truth index per anchor, ``-1`` = background.

    """
    iou = pairwise_iou_batched(ground_truth[None].to(anchors.device), anchors)[0]  # [G, A]
    return match_anchors(iou, iou_threshold).to(device)


def offset_boxes(anchors: Tensor, assigned_bb: Tensor, eps: float = 1e-6) -> Tensor:
    """Encode boxes as anchor offsets (the book's ``offset_boxes``).

    ``10 * (c - c_a) / wh_a`` and ``5 * log(eps + wh / wh_a)``.

    Args:
        anchors: ``Tensor[A, 4]`` float, xyxy.
        assigned_bb: ``Tensor[A, 4]`` float, xyxy, the box assigned to each anchor.
        eps: added inside the log.

    Returns:
        ``Tensor[A, 4]`` float offsets ``(l_x, l_y, l_w, l_h)``.

    """
    coder = _BOOK_CODER if eps == _BOOK_CODER.eps else BoxCoder(eps=eps)
    return coder.encode(assigned_bb, anchors)


def offset_inverse(anchors: Tensor, offset_preds: Tensor) -> Tensor:
    """Decode predicted offsets into boxes (the book's ``offset_inverse``).

    Args:
        anchors: ``Tensor[A, 4]`` float, xyxy.
        offset_preds: ``Tensor[A, 4]`` offsets (integer tensors are accepted, as in the book).

    Returns:
        ``Tensor[A, 4]`` float, xyxy.

    """
    return _BOOK_CODER.decode(offset_preds, anchors)


def multibox_target(anchors: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Label anchors with classes and offsets (the book's ``multibox_target``), batched.

    Args:
        anchors: ``Tensor[1, A, 4]`` (or ``[A, 4]``) float, normalised xyxy.
        labels: ``Tensor[B, G, 5]`` float rows ``(class, xmin, ymin, xmax, ymax)``, class
            0-based; rows with ``class < 0`` are padding and ignored (the only extension).

    Returns:
        ``(bbox_offset, bbox_mask, class_labels)``: ``bbox_offset: Tensor[B, A*4]`` float offsets
        (0 at background), ``bbox_mask: Tensor[B, A*4]`` float 1/0, ``class_labels: Tensor[B, A]``
        int64 (0 = background, ``k + 1`` for class ``k``).

    """
    targets = _BOOK_ENCODER.encode_padded(anchors.reshape(-1, 4), labels)
    batch = labels.shape[0]
    bbox_mask = targets.pos_mask[..., None].expand(-1, -1, 4).to(targets.box_offsets.dtype)
    return (
        targets.box_offsets.reshape(batch, -1),
        bbox_mask.reshape(batch, -1),
        targets.cls_labels,
    )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Run the book's greedy ``nms`` (drop IoU ``> iou_threshold``) via ``torchvision.ops.nms``.

    Boxes are ranked with the very call the book uses (``torch.argsort(scores,
    descending=True)``), so equal scores come out in the same (implementation-defined, not
    necessarily index) order as the book's on the same device; ``torchvision.ops.nms`` then runs
    on strictly decreasing stand-in scores that encode this ranking.

    Args:
        boxes: ``Tensor[N, 4]`` float, xyxy.
        scores: ``Tensor[N]`` float.
        iou_threshold: IoU above which the lower-ranked box is dropped.

    Returns:
        ``Tensor[K]`` int64 indices of the kept boxes, by decreasing score.

    """
    if not boxes.is_floating_point() or boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.to(torch.float32)
    order = torch.argsort(scores, dim=-1, descending=True)  # the book's ranking, ties included
    # Strictly decreasing stand-in scores make the order unambiguous for torchvision.
    ranks = torch.arange(order.numel(), 0, -1, dtype=boxes.dtype, device=boxes.device)
    keep_sorted = torchvision.ops.nms(boxes[order], ranks, float(iou_threshold))
    return order[keep_sorted.sort().values]


def multibox_detection(
    cls_probs: Tensor,
    offset_preds: Tensor,
    anchors: Tensor,
    nms_threshold: float = 0.5,
    pos_threshold: float = 0.009999999,
) -> Tensor:
    """Predict boxes with class-agnostic NMS (the book's ``multibox_detection``).

    Args:
        cls_probs: ``Tensor[B, C+1, A]`` float probabilities, row 0 = background.
        offset_preds: ``Tensor[B, A*4]`` predicted offsets.
        anchors: ``Tensor[1, A, 4]`` (or ``[A, 4]``) float, normalised xyxy.
        nms_threshold: NMS IoU threshold.
        pos_threshold: confidences below it are reported as background.

    Returns:
        ``Tensor[B, A, 6]`` float rows ``(class_id, conf, xmin, ymin, xmax, ymax)``: first the
        boxes kept by NMS (by decreasing confidence), then the others (increasing anchor index)
        with ``class_id = -1``; rows with ``conf < pos_threshold`` get ``class_id = -1`` and
        ``conf = 1 - conf``. ``class_id`` is the 0-based object class.

    """
    batch, num_anchors = cls_probs.shape[0], cls_probs.shape[2]
    anchors = anchors.reshape(-1, 4)
    conf, class_id = torch.max(cls_probs[:, 1:], dim=1)  # [B, A] each
    boxes = _BOOK_CODER.decode(offset_preds.reshape(batch, num_anchors, 4), anchors)  # [B, A, 4]
    out = []
    for i in range(batch):  # NMS per image (the book's loop); everything else is vectorised
        keep = nms(boxes[i], conf[i], nms_threshold)
        is_kept = torch.zeros(num_anchors, dtype=torch.bool, device=conf.device)
        is_kept[keep] = True
        order = torch.cat((keep, torch.nonzero(~is_kept).reshape(-1)))
        cls_i = torch.where(is_kept, class_id[i], -1)[order]
        conf_i = conf[i][order]
        below = conf_i < pos_threshold
        cls_i = torch.where(below, -1, cls_i)
        conf_i = torch.where(below, 1 - conf_i, conf_i)
        out.append(
            torch.cat((cls_i[:, None].to(conf_i.dtype), conf_i[:, None], boxes[i][order]), 1)
        )
    return torch.stack(out)
