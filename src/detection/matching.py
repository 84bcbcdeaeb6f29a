"""Anchor-to-ground-truth assignment: the book's ``assign_anchor_to_bbox``, vectorised.

The book (*Dive into Deep Learning*, 14.4) assigns, for one image with IoU matrix
``J[a, g]`` (anchors x ground truths):

1. every anchor whose best IoU is ``>= iou_threshold`` takes its best ground truth
   (``torch.max`` over ``g``: the lowest ``g`` among ties);
2. then ``G`` greedy rounds: take ``argmax`` of the flattened ``J`` (row-major, so among equal
   values the lowest anchor, then the lowest ground truth), assign that anchor to that ground
   truth (overriding step 1), and discard the row and the column (set them to ``-1``).

Step 2 is a sequential loop over ground truths. Here it runs as a few rounds of
*mutual best pairs*, each round a handful of tensor ops over the whole batch.

**Mutual pair.** On the current matrix (assigned rows/columns and padding columns set to
``-1``), ``(a, g)`` is a mutual pair when ``g`` is the first argmax of row ``a``, ``a`` is the
first argmax of column ``g`` and ``J[a, g] >= 0``. Each round assigns all mutual pairs at once,
discards their rows and columns, and the rounds repeat until no pair is left.

**Why this equals the book's sequential greedy.** Order the entries by
``(value descending, a ascending, g ascending)``; the book's flattened ``argmax`` picks the
first entry in this total order. Restricted to one row (or one column) this order is exactly
"value descending, then lowest index", i.e. a row's (column's) first argmax is its first entry
in the total order. Hence:

* (a) *every greedy pick is a mutual pair*: the globally first entry is first in its row and in
  its column;
* (b) *a mutual pair stays mutual when other rows/columns are discarded*: discarding only lowers
  other entries of its row and column to ``-1`` and leaves the pair's own entry, so it remains
  first in both; distinct mutual pairs never share a row or a column (a row has one first
  argmax);
* (c) *for any mutual pair* ``m``, ``greedy(J) = {m} + greedy(J without m's row and column)``:
  let step ``k`` be the first greedy step whose pick touches ``m``'s row or column. Until then
  ``m`` stays mutual by (b); the step-``k`` pick is the global first entry and lies in
  ``m``'s row or column, where ``m`` is the first entry, so the pick is ``m`` itself. The picks
  before ``k`` avoid ``m``'s row and column, so they are also the first entries of the matrix
  with ``m`` removed, in the same order; after step ``k`` both runs see the same matrix.

Applying (c) to the mutual pairs of a round one after the other (they stay mutual by (b)) shows
that one round followed by the greedy on the rest equals the greedy on the whole, including the
tie-breaking. A mutual pair always exists while an open anchor and an open ground truth remain
(the global first entry, by (a)), so every valid ground truth is assigned after at most ``G``
rounds (typically 1-3), provided there are at least as many anchors as ground truths.

Differences from the book, none of which arise with the book's own data:

* padding ground truths (``valid == False``) are ignored entirely (the book would assign them);
* with more valid ground truths than anchors the surplus ground truths stay unassigned (the book
  then keeps picking the all-``-1`` matrix's entry ``(0, 0)``);
* NaN IoUs (degenerate boxes) are treated as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["match_anchors", "match_anchors_batched", "pairwise_iou_batched"]


def _check_threshold(iou_threshold: float) -> float:
    value = float(iou_threshold)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return value


def pairwise_iou_batched(gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of every ground truth of every image with every anchor.

    The arithmetic matches the book's ``box_iou`` (and ``torchvision.ops.box_iou``) element by
    element, so the values (and therefore ties) are bit-identical.

    Args:
        gt_boxes: ``Tensor[B, G, 4]`` float, xyxy.
        anchors: ``Tensor[A, 4]`` float, xyxy, same unit.

    Returns:
        ``Tensor[B, G, A]`` float IoU; 0 where the union is empty.

    """
    if gt_boxes.dim() != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape [B, G, 4], got {list(gt_boxes.shape)}")
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must have shape [A, 4], got {list(anchors.shape)}")
    g = gt_boxes[:, :, None, :]  # [B, G, 1, 4]
    a = anchors[None, None, :, :]  # [1, 1, A, 4]
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])  # [B, G, 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])  # [1, 1, A]
    inter_w = (torch.minimum(g[..., 2], a[..., 2]) - torch.maximum(g[..., 0], a[..., 0])).clamp(
        min=0
    )
    inter_h = (torch.minimum(g[..., 3], a[..., 3]) - torch.maximum(g[..., 1], a[..., 1])).clamp(
        min=0
    )
    inter = inter_w * inter_h
    iou = inter / (area_a + area_g - inter)
    return torch.nan_to_num(iou, nan=0.0)


def match_anchors_batched(
    iou: Tensor, valid: Tensor | None = None, iou_threshold: float = 0.5
) -> Tensor:
    """Assign anchors to ground truths as the book does, for a batch, fully vectorised.

    See the module docstring for the algorithm and its equivalence proof.

    Args:
        iou: ``Tensor[B, G, A]`` float, IoU of ground truth ``g`` of image ``b`` with anchor
            ``a`` (values in ``[0, 1]``). Not modified.
        valid: ``Tensor[B, G]`` bool, ``False`` for padding ground truths, which are ignored.
            ``None`` means all valid.
        iou_threshold: anchors whose best IoU with a valid ground truth is ``>=`` this value take
            that ground truth (before the greedy step). In ``(0, 1]``.

    Returns:
        ``Tensor[B, A]`` int64 on ``iou.device``: the index ``g`` of the ground truth assigned to
        each anchor, or ``-1`` for background. Every valid ground truth gets at least one anchor
        (when ``A >= G``), even one that overlaps no anchor; an image without valid ground
        truths is all ``-1``.

    """
    threshold = _check_threshold(iou_threshold)
    if iou.dim() != 3:
        raise ValueError(f"iou must have shape [B, G, A], got {list(iou.shape)}")
    batch, num_gt, num_anchors = iou.shape
    device = iou.device
    matched = torch.full((batch, num_anchors), -1, dtype=torch.long, device=device)
    if valid is None:
        valid = torch.ones((batch, num_gt), dtype=torch.bool, device=device)
    elif valid.shape != (batch, num_gt):
        raise ValueError(
            f"valid must have shape [B, G] = {[batch, num_gt]}, got {list(valid.shape)}"
        )
    valid = valid.to(device=device, dtype=torch.bool)
    if num_gt == 0 or num_anchors == 0:
        return matched

    # Working copy: padding columns discarded (-1) from the start. Never writes into `iou`.
    jac = torch.nan_to_num(iou, nan=0.0).masked_fill(~valid[:, :, None], -1.0)

    # Step 1: anchors whose best (valid) IoU reaches the threshold take their first-argmax gt.
    max_iou, best_gt = jac.max(dim=1)  # [B, A]
    matched = torch.where(max_iou >= threshold, best_gt, matched)

    # Step 2: rounds of mutual best pairs (== the book's sequential greedy, see module docstring).
    # Gathers only (no scatter), so it is deterministic on every device. Entries >= 0 are exactly
    # the open (unassigned, valid) rows and columns: closed ones are all -1.
    gt_ids = torch.arange(num_gt, device=device)[None, :]  # [1, G]
    anchor_ids = torch.arange(num_anchors, device=device)[None, :]  # [1, A]
    for _ in range(num_gt):  # at least one pair per round while any remains: <= G rounds
        best_anchor = jac.argmax(dim=2)  # [B, G] first argmax of each column g
        best_gt = jac.argmax(dim=1)  # [B, A] first argmax of each row a
        # gt side: g is paired when its best anchor's best gt is g again
        gt_value = jac.gather(2, best_anchor[:, :, None]).squeeze(2)  # [B, G]
        gt_mutual = (best_gt.gather(1, best_anchor) == gt_ids) & (gt_value >= 0)
        if not bool(gt_mutual.any()):
            break
        # anchor side (the same pairs, seen from the rows)
        anchor_value = jac.gather(1, best_gt[:, None, :]).squeeze(1)  # [B, A]
        anchor_mutual = (best_anchor.gather(1, best_gt) == anchor_ids) & (anchor_value >= 0)
        matched = torch.where(anchor_mutual, best_gt, matched)  # overrides step 1
        jac = jac.masked_fill(gt_mutual[:, :, None] | anchor_mutual[:, None, :], -1.0)
    return matched


def match_anchors(iou: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Assign anchors of one image as the book's ``assign_anchor_to_bbox``, from ``iou[G, A]``.

    Anchors with max IoU ``>= iou_threshold`` take their best ground truth, then each ground
    truth greedily takes its best anchor in global max order, overriding (ties: lowest anchor,
    then lowest ground truth, as the book's flattened ``argmax``). Vectorised; see
    :func:`match_anchors_batched`.

    Args:
        iou: ``Tensor[G, A]`` float IoU of ground truth ``g`` with anchor ``a``. Not modified.
        iou_threshold: in ``(0, 1]``.

    Returns:
        ``Tensor[A]`` int64, the assigned ground-truth index or ``-1`` (background).

    """
    if iou.dim() != 2:
        raise ValueError(f"iou must have shape [G, A], got {list(iou.shape)}")
    return match_anchors_batched(iou[None], iou_threshold=iou_threshold)[0]
