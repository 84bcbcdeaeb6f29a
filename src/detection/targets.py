"""Training targets for every anchor: the book's ``multibox_target``, batched.

A :class:`TargetEncoder` pads the per-image ground truths into the book's label layout
(:func:`pad_targets`), builds their IoU table with the anchors
(:class:`~src.detection.matching.BoxIoUTable`, which computes the IoU only where the matching
reads it, about a tenth of the ``[B, G, A]`` entries), assigns anchors with the book's rule
(:func:`~src.detection.matching.match_anchors_batched`, the default) or the SSD paper's
(:func:`~src.detection.matching.match_anchors_ssd_batched`, ``rule="ssd"``) and encodes the
matched boxes with a :class:`~src.detection.coder.BoxCoder`. The targets carry both the encoded
offsets and the matched ground-truth boxes, so that a box loss may work on offsets (L1, smooth L1)
or on boxes (GIoU, DIoU, CIoU; :mod:`src.detection.losses`).
:func:`src.detection.compat.multibox_target` is a thin wrapper around
:meth:`TargetEncoder.encode_padded`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from src.detection.coder import BoxCoder
from src.detection.matching import (
    BoxIoUTable,
    IoUTable,
    match_book_with_keys,
    match_ssd_with_keys,
)

__all__ = ["MATCHING_RULES", "MultiboxTargets", "TargetEncoder", "pad_targets"]

#: ``rule`` name -> matcher ``(IoUTable, valid[B, G], iou_threshold) -> (matched[B, A], keys)``
#: (``keys``: flat indices ``b * A + a`` of the matched anchors, possibly repeated).
MATCHING_RULES: dict[str, Callable[[IoUTable, Tensor, float], tuple[Tensor, Tensor]]] = {
    "book": match_book_with_keys,
    "ssd": match_ssd_with_keys,
}


class MultiboxTargets(NamedTuple):
    """Per-anchor training targets for a batch.

    Attributes:
        cls_labels: ``Tensor[B, A]`` int64; 0 = background, ``k + 1`` for object class ``k``.
        box_offsets: ``Tensor[B, A, 4]`` float, :class:`BoxCoder` offsets of the matched ground
            truth (``l_x, l_y, l_w, l_h``); exactly 0 at background anchors.
        pos_mask: ``Tensor[B, A]`` bool, ``True`` where an anchor has a ground truth.
        matched_idx: ``Tensor[B, A]`` int64, index of the matched ground truth in the image's
            target (row of the padded labels), ``-1`` for background.
        matched_boxes: ``Tensor[B, A, 4]`` float (dtype of ``box_offsets``), the matched ground
            truth box, xyxy normalised to ``[0, 1]`` (what ``box_offsets`` encodes); exactly 0 at
            background anchors. Read by box-space losses (GIoU, DIoU, CIoU).

    """

    cls_labels: Tensor
    box_offsets: Tensor
    pos_mask: Tensor
    matched_idx: Tensor
    matched_boxes: Tensor


def _target_name(target: Mapping[str, Any], index: int) -> str:
    image_id = target.get("image_id")
    return f"target {index}" + (f" (image_id {image_id!r})" if image_id is not None else "")


def pad_targets(
    targets: Sequence[Mapping[str, Any]],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Stack per-image targets into the book's padded label tensor.

    Args:
        targets: one dict per image with ``boxes: Tensor[G_i, 4]`` float, normalised xyxy, and
            ``labels: Tensor[G_i]`` int64, 0-based object classes. ``G_i`` may be 0. Other keys
            are ignored.
        device: device of the result; default: that of the first image's boxes (CPU if none).
        dtype: float dtype of the result; default: the promoted dtype of the boxes (at least
            float32).

    Returns:
        ``Tensor[B, G_max, 5]`` with rows ``(class, xmin, ymin, xmax, ymax)`` (class as a float,
        0-based) and padding rows filled with ``-1``. ``G_max = max_i G_i`` (0 if every image is
        empty).

    Raises:
        ValueError: if a target lacks ``boxes``/``labels`` or their shapes disagree.

    """
    boxes_list: list[Tensor] = []
    labels_list: list[Tensor] = []
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(
                f"{_target_name(target, i)} needs 'boxes' and 'labels'; got keys {sorted(target)}"
            )
        boxes = torch.as_tensor(target["boxes"])
        labels = torch.as_tensor(target["labels"])
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"{_target_name(target, i)}: 'boxes' must have shape [G, 4], got "
                f"{list(boxes.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(
                f"{_target_name(target, i)}: 'labels' must have shape [G] = [{boxes.shape[0]}] "
                f"to match 'boxes', got {list(labels.shape)}"
            )
        boxes_list.append(boxes)
        labels_list.append(labels)
    if device is None:
        device = boxes_list[0].device if boxes_list else torch.device("cpu")
    counts = [b.shape[0] for b in boxes_list]
    g_max = max(counts, default=0)
    all_boxes = torch.cat(boxes_list) if boxes_list else torch.zeros(0, 4)  # [N, 4], promoted
    if dtype is None:  # float32, or the boxes' wider float dtype (integer boxes: float32)
        dtype = torch.promote_types(torch.float32, all_boxes.dtype)
    out = torch.full((len(boxes_list), g_max, 5), -1.0, dtype=dtype, device=device)
    if g_max == 0:
        return out
    # one write for the whole batch: the first G_i slots of image i, image-major like the rows
    rows = torch.cat(
        (
            torch.cat(labels_list)[:, None].to(device=device, dtype=dtype),
            all_boxes.to(device, dtype),
        ),
        dim=1,
    )  # [N, 5]
    filled = torch.arange(g_max, device=device) < torch.tensor(counts, device=device)[:, None]
    out[filled] = rows
    return out


class TargetEncoder:
    """Assign anchors to ground truths and encode the per-anchor targets.

    Args:
        coder: box coder for the offsets; default ``BoxCoder()`` (variances 0.1/0.2, eps 1e-6).
        iou_threshold: anchors whose best IoU is ``>=`` this value take that ground truth, in
            ``(0, 1]``.
        rule: how every ground truth is also given an anchor (see
            :mod:`src.detection.matching`): ``"book"`` (default; *Dive into Deep Learning*'s
            greedy ``assign_anchor_to_bbox``) or ``"ssd"`` (the SSD paper: each ground truth is
            forced onto its best anchor, later ground truths winning ties; ssd.pytorch's
            ``match`` and torchvision's ``SSDMatcher``).

    Raises:
        ValueError: if ``iou_threshold`` is outside ``(0, 1]`` or ``rule`` is unknown.

    """

    def __init__(
        self, coder: BoxCoder | None = None, iou_threshold: float = 0.5, rule: str = "book"
    ) -> None:
        iou_threshold = float(iou_threshold)
        if not (math.isfinite(iou_threshold) and 0.0 < iou_threshold <= 1.0):
            raise ValueError(
                f"model.target_encoder.iou_threshold must be in (0, 1], got {iou_threshold}; the "
                "book and SSD use 0.5, experiment=raccoon 0.3"
            )
        if rule not in MATCHING_RULES:
            raise ValueError(
                f"model.target_encoder.rule must be one of {sorted(MATCHING_RULES)}, got "
                f"{rule!r}: 'book' is the book's greedy assignment, 'ssd' the SSD paper's"
            )
        self.coder = coder if coder is not None else BoxCoder()
        self.iou_threshold = iou_threshold
        self.rule = rule
        self._match = MATCHING_RULES[rule]

    def __call__(self, anchors: Tensor, targets: Sequence[Mapping[str, Any]]) -> MultiboxTargets:
        """Targets for a batch of per-image ground truths.

        Args:
            anchors: ``Tensor[A, 4]`` float, normalised xyxy (``[1, A, 4]`` is accepted too).
            targets: ``B`` dicts with ``boxes: Tensor[G_i, 4]`` normalised xyxy and
                ``labels: Tensor[G_i]`` int64 0-based (``G_i`` may be 0).

        Returns:
            :class:`MultiboxTargets` on ``anchors.device``; see :meth:`encode_padded`.

        """
        padded = pad_targets(targets, device=anchors.device, dtype=self._dtype(anchors))
        return self.encode_padded(anchors, padded)

    @staticmethod
    def _dtype(anchors: Tensor) -> torch.dtype:
        return anchors.dtype if anchors.is_floating_point() else torch.float32

    def encode_padded(self, anchors: Tensor, labels: Tensor) -> MultiboxTargets:
        """Targets from padded labels in the book's layout (vectorised over the batch).

        Args:
            anchors: ``Tensor[A, 4]`` or ``Tensor[1, A, 4]`` float, xyxy (normalised).
            labels: ``Tensor[B, G, 5]`` rows ``(class, xmin, ymin, xmax, ymax)``, class 0-based;
                rows with ``class < 0`` are padding and ignored. ``G`` may be 0.

        Returns:
            :class:`MultiboxTargets` with ``A`` anchors: ``cls_labels[B, A]`` int64 (0 =
            background, ``k + 1`` for class ``k``), ``box_offsets[B, A, 4]`` (0 at background),
            ``pos_mask[B, A]`` bool, ``matched_idx[B, A]`` int64 (-1 = background),
            ``matched_boxes[B, A, 4]`` xyxy (0 at background).

        """
        if anchors.dim() == 3 and anchors.shape[0] == 1:
            anchors = anchors[0]
        if anchors.dim() != 2 or anchors.shape[-1] != 4:
            raise ValueError(
                f"anchors must have shape [A, 4] or [1, A, 4], got {list(anchors.shape)}"
            )
        if labels.dim() != 3 or labels.shape[-1] != 5:
            raise ValueError(
                "labels must have shape [B, G, 5] with rows (class, xmin, ymin, xmax, ymax), got "
                f"{list(labels.shape)}"
            )
        labels = labels.to(anchors.device)
        valid = labels[..., 0] >= 0  # [B, G]
        # The matching runs a few hundred small operations: inference mode spares each of them
        # the autograd bookkeeping. Its results are inference tensors: ``matched`` (returned)
        # is copied out as a normal tensor, ``keys`` only indexes below.
        with torch.inference_mode():
            table = BoxIoUTable(labels[..., 1:], valid, anchors)  # IoU of the valid rows
            matched, keys = self._match(table, valid, self.iou_threshold)  # [B, A], [P']
        matched = matched.clone()
        dtype = torch.promote_types(self._dtype(anchors), labels.dtype)
        batch, num_anchors = matched.shape
        cls_labels = torch.zeros_like(matched)
        box_offsets = torch.zeros((batch, num_anchors, 4), dtype=dtype, device=anchors.device)
        matched_boxes = torch.zeros_like(box_offsets)
        # Only the positive anchors (a few per object) are gathered and encoded. ``keys`` may
        # name an anchor twice (matched by the threshold, then by the rule's second step); both
        # copies read its final ground truth, so the repeated writes store equal values.
        pos = torch.zeros((batch, num_anchors), dtype=torch.bool, device=anchors.device)
        pos.view(-1)[keys] = True
        b_idx, a_idx = keys // num_anchors, keys % num_anchors
        rows = labels.reshape(-1, 5)[b_idx * labels.shape[1] + matched.view(-1)[keys]]  # [P, 5]
        cls_labels.view(-1)[keys] = rows[:, 0].long() + 1
        offsets = self.coder.encode(rows[:, 1:], anchors[a_idx])  # [P, 4]
        box_offsets.view(-1, 4)[keys] = offsets.to(dtype)
        matched_boxes.view(-1, 4)[keys] = rows[:, 1:].to(dtype)
        return MultiboxTargets(cls_labels, box_offsets, pos, matched, matched_boxes)

    def __repr__(self) -> str:
        return (
            f"TargetEncoder(coder={self.coder!r}, iou_threshold={self.iou_threshold}, "
            f"rule={self.rule!r})"
        )
