"""Anchor-to-ground-truth assignment: the book's greedy rule and the SSD paper's rule, batched.

Both rules work on an IoU matrix ``J[g, a]`` per image (ground truths x anchors) and return, for
every anchor, the index of its ground truth or ``-1`` (background).

**The book's rule** (*Dive into Deep Learning*, 14.4, ``assign_anchor_to_bbox``):

1. every anchor whose best IoU is ``>= iou_threshold`` takes its best ground truth
   (``torch.max`` over ``g``: the lowest ``g`` among ties);
2. then ``G`` greedy rounds: take ``argmax`` of the flattened ``[A, G]`` matrix (row-major, so
   among equal values the lowest anchor, then the lowest ground truth), assign that anchor to that
   ground truth (overriding step 1), and discard the anchor's row and the ground truth's column
   (set them to ``-1``).

**The SSD paper's rule** (ssd.pytorch's ``match``, torchvision's ``SSDMatcher``):

1. the same threshold step;
2. then every ground truth ``j`` is forced onto its best anchor (first argmax over anchors),
   in order ``j = 0, 1, ...``, so that a later ground truth wins an anchor that is the best of
   several.

**How it is computed.** A few tensor operations over the whole batch (see
:class:`BoxIoUTable`): the IoU is computed for the valid ground truths only (``[N, A]``, in
place), and the only other full pass takes per-chunk maxima (``A`` is cut into chunks of ``S``
anchors):

* *threshold step*: an anchor that reaches the threshold has its best entry among the entries
  ``>= threshold``, which lie in the chunks whose maximum reaches it; only those chunks are read
  (a few percent of the table), and one scatter picks each anchor's first maximum;
* *best anchors of a ground truth*: the first ``k`` entries of a row in the order
  ``(value descending, anchor ascending)`` lie in the first ``k`` chunks in the order
  ``(chunk maximum descending, chunk ascending)`` (if an entry's chunk is not among them, ``k``
  chunks each hold a distinct entry that comes before it); so ``k`` chunks are picked from the
  ``[N, C]`` chunk maxima and the entries from the ``[N, k * S]`` gathered chunks, each with an
  exact tie-aware selection (:func:`_first_k`);
* *the greedy step, first without rounds*: where an image's valid ground truths have distinct
  first-argmax anchors, each takes its own (see :func:`_greedy_on_candidates`); only the other
  images go on to the candidate set below;
* *the greedy step on a small candidate set*: when ground truth ``g`` is picked by the greedy,
  at most ``G - 1`` anchors are discarded, and discarding only lowers entries of column ``g``, so
  its anchor is among the first ``G`` entries of its column. Restricting the greedy to the rows
  ``U`` = the union of these candidates gives the same picks: by induction, the full greedy's
  next pick lies in ``U`` and is first in the full matrix, hence first in the restricted one.
  The restricted ``[B, G, |U| <= G * G]`` problem is solved by rounds of *mutual best pairs*.

**Mutual pairs.** On the current matrix (assigned rows/columns and padding set to ``-1``),
``(a, g)`` is a mutual pair when ``g`` is the first argmax of row ``a``, ``a`` is the first argmax
of column ``g`` (columns of the candidate matrix are sorted by anchor index) and
``J[a, g] >= 0``. Each round assigns all mutual pairs at once and discards their rows and
columns. Why this equals the sequential greedy: order the entries by ``(value descending, a
ascending, g ascending)``; the flattened ``argmax`` picks the first entry in this total order,
and restricted to one row (column) the order is "value descending, then lowest index", i.e. a
row's (column's) first argmax is its first entry. Hence (a) every greedy pick is a mutual pair;
(b) a mutual pair stays mutual when other rows/columns are discarded (that only lowers other
entries of its row and column) and distinct mutual pairs share no row or column; (c) for any
mutual pair ``m``, ``greedy(J) = {m} + greedy(J without m's row and column)``: the first greedy
step touching ``m``'s row or column picks the global first entry, which lies there, where ``m``
is first, so it picks ``m``; the earlier picks avoid ``m``'s row and column. Applying (c) to the
pairs of a round shows that a round followed by the greedy on the rest equals the greedy on the
whole, ties included. A mutual pair exists while an open anchor and ground truth remain (the
global first entry, by (a)), so at most ``G`` rounds are needed (typically 1-3).

Differences from the book, none of which arise with the book's own data:

* padding ground truths (``valid == False``) are ignored entirely (the book would assign them);
* with more valid ground truths than anchors the surplus ground truths stay unassigned (the book
  then keeps picking the all-``-1`` matrix's entry ``(0, 0)``);
* NaN IoUs (degenerate boxes) are treated as 0.
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "match_anchors",
    "match_anchors_batched",
    "match_anchors_ssd",
    "match_anchors_ssd_batched",
    "pairwise_iou_batched",
]


def _check_threshold(iou_threshold: float) -> float:
    value = float(iou_threshold)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    return value


def _chunk_size(num_anchors: int) -> int:
    """Anchors per chunk: about ``sqrt(A)`` (32 at most), so both selection stages stay small."""
    return max(1, min(32, math.isqrt(max(num_anchors - 1, 0)) + 1))


def _box_iou(
    g: tuple[Tensor, Tensor, Tensor, Tensor], a: tuple[Tensor, Tensor, Tensor, Tensor]
) -> Tensor:
    """IoU of boxes given as broadcastable coordinate tensors ``(x1, y1, x2, y2)``.

    The arithmetic is the book's ``box_iou`` (and ``torchvision.ops.box_iou``) element by
    element: ``inter / (area_a + area_g - inter)``, so values and ties are bit-identical
    whatever the shapes. NaN (empty unions) is not replaced here.
    """
    gx1, gy1, gx2, gy2 = g
    ax1, ay1, ax2, ay2 = a
    width = (torch.minimum(gx2, ax2) - torch.maximum(gx1, ax1)).clamp_(min=0)
    height = (torch.minimum(gy2, ay2) - torch.maximum(gy1, ay1)).clamp_(min=0)
    inter = width.mul_(height)
    union = (ax2 - ax1) * (ay2 - ay1) + (gx2 - gx1) * (gy2 - gy1)
    return inter.div_(union.sub_(inter))


class _AnchorColumns(NamedTuple):
    """What the IoU needs of ``anchors[A, 4]`` (xyxy) in one dtype, computed once per anchors."""

    x1: Tensor  # [A] contiguous
    y1: Tensor
    x2: Tensor
    y2: Tensor
    area: Tensor  # [A] (x2 - x1) * (y2 - y1)
    proper: bool  # finite with positive sides, so that no union is 0


# the last anchors seen: (weak reference, version counter, dtype, their columns)
_last_anchors: tuple[weakref.ref[Tensor], int, torch.dtype, _AnchorColumns] | None = None


def _anchor_columns(anchors: Tensor, dtype: torch.dtype) -> _AnchorColumns:
    """:class:`_AnchorColumns` of ``anchors[A, 4]`` in ``dtype``.

    Models pass the same cached anchors every step, so the last answer is kept while that tensor
    lives unchanged (same object, same version counter, same dtype asked).
    """
    global _last_anchors
    # Inference tensors have no version counter: they are never cached.
    trackable = not anchors.is_inference()
    cached = _last_anchors
    if (
        trackable
        and cached is not None
        and cached[0]() is anchors
        and cached[1] == anchors._version
        and cached[2] == dtype
    ):
        return cached[3]
    # + 0.0: no -0.0 coordinate, so that no IoU is -0.0 (see ``BoxIoUTable.nonnegative``)
    x1, y1, x2, y2 = (c + 0.0 for c in anchors.to(dtype).unbind(-1))
    proper = bool(torch.isfinite(anchors).all() and ((x2 > x1) & (y2 > y1)).all())
    columns = _AnchorColumns(x1, y1, x2, y2, (x2 - x1) * (y2 - y1), proper)
    if trackable:
        _last_anchors = (weakref.ref(anchors), anchors._version, dtype, columns)
    return columns


class IoUTable:
    """Read access to the IoU of ``B x G`` ground truths with ``A`` anchors, for the matchers.

    The IoU is stored as ``R`` rows of ``C * chunk`` anchors (``C = ceil(A / chunk)`` chunks of
    consecutive anchors; an anchor index ``a >= A`` reads as IoU ``-1``); ``row_of[b, g]`` is the
    row of ground truth ``g`` of image ``b``. Rows of padding ground truths read 0, below every
    threshold, and the other steps mask them. Subclasses: :class:`DenseIoUTable` (a given
    ``[B, G, A]`` matrix) and :class:`BoxIoUTable` (computed from boxes, valid rows only).
    """

    batch: int
    num_gt: int
    num_anchors: int
    chunk: int
    width: int  # C * chunk
    row_of: Tensor  # [B, G] int64
    row_image: Tensor  # [R] int64: the image of each row (padding rows: any value)
    row_gt: Tensor  # [R] int64: the ground truth of each row (padding rows: any value)
    buffer: Tensor  # [R, C * chunk] float, -1 past the last anchor
    #: every IoU is +0.0 or positive (then -1, past the last anchor, is the only negative value)
    nonnegative: bool = False

    @property
    def num_chunks(self) -> int:
        """``C = ceil(A / chunk)``."""
        return -(-self.num_anchors // self.chunk)

    def row_chunk_max(self) -> Tensor:
        """``Tensor[R, C]``: each row's maximum IoU within each chunk of anchors (computed once)."""
        cached = getattr(self, "_chunk_max", None)
        if cached is None:
            cached = self.buffer.view(-1, self.num_chunks, self.chunk).amax(dim=2)
            self._chunk_max = cached
        return cached

    def row_values(self, row: Tensor, a: Tensor) -> Tensor:
        """IoU at broadcastable int64 indices (row, anchor ``< C * chunk``)."""
        return self.buffer.view(-1).take(row * self.width + a)


class DenseIoUTable(IoUTable):
    """A caller's ``iou[B, G, A]``: NaN and padding rows read as 0; ``iou`` is not modified."""

    def __init__(self, iou: Tensor, valid: Tensor) -> None:
        self.batch, self.num_gt, self.num_anchors = iou.shape
        self.chunk = _chunk_size(self.num_anchors)
        self.width = self.num_chunks * self.chunk
        self.row_of = torch.arange(self.batch * self.num_gt, device=iou.device).view(
            self.batch, self.num_gt
        )
        padded = torch.full(
            (self.batch, self.num_gt, self.width), -1.0, dtype=iou.dtype, device=iou.device
        )
        view = padded[..., : self.num_anchors]
        torch.where(valid[:, :, None], iou, torch.zeros((), dtype=iou.dtype), out=view)
        view.nan_to_num_(nan=0.0)
        self.buffer = padded.view(self.batch * self.num_gt, self.width)
        self.row_image = self.row_of.flatten() // max(self.num_gt, 1)
        self.row_gt = self.row_of.flatten() % max(self.num_gt, 1)


class BoxIoUTable(IoUTable):
    """IoU of ``gt_boxes[B, G, 4]`` (rows where ``valid[B, G]``) with ``anchors[A, 4]``, xyxy.

    Only the ``N`` valid rows are computed, in place in one ``[N + 1, C * S]`` buffer (the last
    row, all zeros, stands for every padding row); values are bit-identical to the book's
    ``box_iou`` (NaN, from an empty union, becomes 0), except that a zero IoU is always +0.0
    (a ``-0.0`` coordinate is read as +0.0, the same number). ``nonnegative`` is True when the
    boxes are proper (finite, non-negative sides; anchors with positive sides): then every IoU is
    +0.0 or positive and no NaN arises.
    """

    def __init__(
        self,
        gt_boxes: Tensor,
        valid: Tensor,
        anchors: Tensor,
    ) -> None:
        dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
        device = anchors.device
        self.batch, self.num_gt = gt_boxes.shape[:2]
        self.num_anchors = num_anchors = anchors.shape[0]
        self.chunk = _chunk_size(num_anchors)
        self.width = width = self.num_chunks * self.chunk
        b_idx, g_idx = valid.nonzero(as_tuple=True)  # [N] each, image-major
        rows = b_idx.shape[0]
        # row of the buffer for each (image, gt): its own, or the zero row N for padding
        self.row_of = torch.full((self.batch, self.num_gt), rows, dtype=torch.long, device=device)
        self.row_of[b_idx, g_idx] = torch.arange(rows, device=device)
        self.row_image = torch.cat((b_idx, b_idx.new_full((1,), self.batch)))  # [N + 1]
        self.row_gt = torch.cat((g_idx, g_idx.new_zeros(1)))  # [N + 1]
        self.buffer = torch.empty((rows + 1, width), dtype=dtype, device=device)
        self.buffer[rows].zero_()  # the padding row
        self.buffer[:, num_anchors:] = -1.0  # the end of the last chunk
        if rows == 0 or num_anchors == 0:
            return
        gt = gt_boxes[b_idx, g_idx].to(dtype) + 0.0  # [N, 4], -0.0 coordinates become +0.0
        gx1, gy1, gx2, gy2 = (c[:, None] for c in gt.unbind(-1))
        ax1, ay1, ax2, ay2, area_a, proper = _anchor_columns(anchors, dtype)  # [A] each
        # In place, the book's arithmetic: inter / (area_a + area_g - inter).
        inter = self.buffer[:rows, :num_anchors]  # [N, A] view
        torch.minimum(gx2, ax2, out=inter)
        tmp = torch.maximum(gx1, ax1)
        inter.sub_(tmp).clamp_(min=0)  # intersection width
        height = torch.minimum(gy2, ay2)
        height.sub_(torch.maximum(gy1, ay1, out=tmp)).clamp_(min=0)
        inter.mul_(height)
        area_g = (gx2 - gx1) * (gy2 - gy1)  # [N, 1]
        union = torch.add(area_a, area_g, out=tmp)
        inter.div_(union.sub_(inter))
        # A union is > 0 (no NaN) when anchors have positive and boxes non-negative, finite
        # sides (an infinite side makes the area inf or NaN; a NaN coordinate fails ``>=``).
        # Then also inter >= +0.0 (clamped, no -0.0 input) over a union > 0: every IoU is +0.0
        # or positive.
        self.nonnegative = proper and bool(
            (torch.isfinite(area_g) & (gx2 >= gx1) & (gy2 >= gy1)).all()
        )
        if not self.nonnegative:
            inter.nan_to_num_(nan=0.0)


def first_k(table: IoUTable, k: int, rows: Tensor | None = None) -> Tensor:
    """Per row of ``table``, its first ``k`` anchors in the order (IoU desc, index asc).

    Args:
        table: the IoU.
        k: ``1 <= k <= A``.
        rows: ``Tensor[R']`` int64, the rows to select for (default: all ``R`` rows).

    Returns:
        ``Tensor[R, k]`` (or ``[R', k]``) int64 anchor indices, ascending (a set, not a
        ranking); the row of ground truth ``(b, g)`` is ``table.row_of[b, g]``.

    """
    chunk_max = table.row_chunk_max()  # [R, C]
    device = chunk_max.device
    if rows is None:
        rows = torch.arange(chunk_max.shape[0], device=device)
    else:
        chunk_max = chunk_max[rows]
    num_rows, num_chunks = chunk_max.shape
    sorted_bits = table.nonnegative
    if num_chunks > k:
        chosen = _first_k(chunk_max, k, sorted_bits)  # [R', k] ascending
    else:
        chosen = torch.arange(num_chunks, device=device).expand(num_rows, num_chunks)
    ids = (chosen[..., None] * table.chunk + torch.arange(table.chunk, device=device)).flatten(1)
    chunks = table.buffer.view(-1, table.num_chunks, table.chunk)  # [R, C, S]
    values = chunks[rows[:, None], chosen].flatten(1)  # [R', k * S], at the ascending ids
    return ids.gather(1, _first_k(values, k, sorted_bits))


def _first_k(values: Tensor, k: int, sorted_bits: bool = False) -> Tensor:
    """Positions of the first ``k`` entries of each row in the order (value desc, position asc).

    Exact with ties (``torch.topk`` alone does not say which of equal values it keeps).

    Args:
        values: ``Tensor[..., N]`` float without NaN.
        k: ``1 <= k <= N``.
        sorted_bits: the caller knows that the values' bit patterns, read as signed integers,
            order them: no ``-0.0`` and at most one distinct negative value (an
            :class:`IoUTable` with ``nonnegative``, whose only negative value is the ``-1``
            past the last anchor). Saves the sign handling.

    Returns:
        ``Tensor[..., k]`` int64 positions, ascending.

    """
    if k == 1:
        return values.argmax(dim=-1, keepdim=True)  # the first maximum
    size = values.shape[-1]
    bits = _PACKABLE.get(values.dtype)
    if bits is not None and size <= 2**31:
        # One topk on unique int64 keys: (value as an order-preserving integer, -position).
        backwards = torch.arange(2**32 - 1, 2**32 - 1 - size, -1, device=values.device)
        if sorted_bits:
            ordered = values.view(bits[0]).long()
        else:
            raw = (values + 0.0).view(bits[0]).long()  # + 0.0 turns -0.0 into +0.0
            ordered = torch.where(raw < 0, raw ^ bits[1], raw)  # negative floats: reverse order
        key = ordered * 2**32 + backwards
        return key.topk(k, dim=-1).indices.sort(dim=-1).values
    position = torch.arange(size, device=values.device)
    kth = values.topk(k, dim=-1).values[..., -1:]  # [..., 1]: the k-th largest value
    # Fewer than k entries are > kth; the rest come from the entries == kth, lowest first: rank
    # them with distinct keys (2N for "greater", N - position for "equal", 0 otherwise).
    key = torch.where(values == kth, size - position, 0)
    key = torch.where(values > kth, 2 * size, key)
    return key.topk(k, dim=-1).indices.sort(dim=-1).values


# float dtype -> (integer view dtype, mask flipping the non-sign bits of a negative value)
_PACKABLE = {
    torch.float32: (torch.int32, 2**31 - 1),
    torch.float16: (torch.int16, 2**15 - 1),
    torch.bfloat16: (torch.int16, 2**15 - 1),
}


def _threshold_matches(table: IoUTable, valid: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Step 1 of both rules: anchors with best IoU ``>= threshold`` take their first-argmax gt.

    Only the IoU entries ``>= threshold`` can decide (an anchor that passes has its best entry
    among them), and they lie in the chunks whose maximum reaches the threshold: those chunks are
    gathered (``[K, S]``, a few percent of the table), their passing entries found, and each
    anchor takes the entry with the largest IoU, the lowest ground truth among ties (rows are
    ordered by ground truth within an image). Padding rows read 0 and never pass.

    Returns:
        ``matched[B, A]`` int64 and the flat indices ``b * A + a`` of its matched anchors.

    """
    batch, num_anchors, chunk = table.batch, table.num_anchors, table.chunk
    matched = torch.full((batch, num_anchors), -1, dtype=torch.long, device=valid.device)
    if table.num_gt == 0 or num_anchors == 0:
        return matched, matched.new_zeros(0)
    row, chunk_id = (table.row_chunk_max() >= threshold).nonzero(as_tuple=True)  # [K] each
    values = table.buffer.view(-1, table.num_chunks, chunk)[row, chunk_id]  # [K, S]
    k, s = (values >= threshold).nonzero(as_tuple=True)  # [E] passing entries
    value, row = values[k, s], row[k]
    key = table.row_image[row] * num_anchors + chunk_id[k] * chunk + s  # b * A + a, [E]
    win = _first_max_per_key(key, value, row, batch * num_anchors)  # [E] one per anchor
    keys = key[win]
    matched.view(-1)[keys] = table.row_gt[row[win]]
    return matched, keys


def _first_max_per_key(key: Tensor, value: Tensor, order: Tensor, size: int) -> Tensor:
    """Per key, the entry with the largest value, the lowest ``order`` among equal values.

    Args:
        key: ``Tensor[E]`` int64 in ``[0, size)``.
        value: ``Tensor[E]`` float, ``> 0`` (no NaN).
        order: ``Tensor[E]`` int64 in ``[0, 2**31)``, distinct within a key.
        size: the number of possible keys.

    Returns:
        ``Tensor[E]`` bool, ``True`` at exactly one entry of each key present.

    """
    bits = _PACKABLE.get(value.dtype)
    if bits is not None:
        # One scatter on int64 composites (value bits, then -order), unique within a key:
        # positive floats order like their bit patterns.
        composite = value.view(bits[0]).long() * 2**32 - order  # > 0: value > 0, order < 2**31
        best = torch.zeros(size, dtype=torch.long, device=key.device)
        return composite == best.scatter_reduce_(0, key, composite, "amax")[key]
    best_value = torch.zeros(size, dtype=value.dtype, device=key.device)
    top = value == best_value.scatter_reduce_(0, key, value, "amax")[key]
    later = 2**31  # beyond every order: entries below their key's maximum
    first = torch.full((size,), later, dtype=torch.long, device=key.device)
    first.scatter_reduce_(0, key, torch.where(top, order, later), "amin")
    return top & (order == first[key])


class _ImageSubset(IoUTable):
    """Some images of another table: the same rows (shared, not copied) and chunk maxima."""

    def __init__(self, table: IoUTable, images: Tensor) -> None:
        self.batch, self.num_gt = int(images.shape[0]), table.num_gt
        self.num_anchors, self.chunk, self.width = table.num_anchors, table.chunk, table.width
        self.row_of = table.row_of[images]
        self.buffer, self.nonnegative = table.buffer, table.nonnegative
        self._chunk_max = table.row_chunk_max()


def _greedy_on_candidates(table: IoUTable, valid: Tensor) -> Tensor:
    """Step 2 of the book's rule: the anchor each valid ground truth takes, or ``-1``.

    Where the valid ground truths of an image have distinct first-argmax anchors, the greedy
    gives each ground truth its own: the next greedy pick is the first entry ``(a, g)`` of the
    remaining matrix; ``g``'s first argmax ``a_g`` is still open (only other ground truths' first
    argmaxes were discarded), so ``g``'s row maximum is unchanged and first reached at ``a_g``,
    hence ``a = a_g``. Only the other images go through the rounds on candidates
    (:func:`_greedy_rounds`).

    Returns:
        ``Tensor[B, G]`` int64 anchor index per ground truth (``-1``: padding, or no anchor
        left when there are more ground truths than anchors).

    """
    best = first_k(table, 1)[table.row_of, 0]  # [B, G] first argmax (4x faster than argmax)
    # padding ground truths get distinct negative keys, so that they never pair
    gts = torch.arange(table.num_gt, device=valid.device)
    key = torch.where(valid, best, -1 - gts)
    shared = (key[:, :, None] == key[:, None, :]).sum(dim=(1, 2)) > table.num_gt  # [B]
    taken = key.clamp(min=-1)
    images = shared.nonzero()[:, 0]  # images where two valid gts share a best anchor
    if images.numel() > 0:
        taken[images] = _greedy_rounds(_ImageSubset(table, images), valid[images])
    return taken


def _greedy_rounds(table: IoUTable, valid: Tensor) -> Tensor:
    """:func:`_greedy_on_candidates` for any images: rounds of mutual best pairs on candidates.

    Returns:
        ``Tensor[B, G]`` int64 anchor index per ground truth, or ``-1``.

    """
    batch, num_gt, num_anchors = table.batch, table.num_gt, table.num_anchors
    device = valid.device
    k = min(num_gt, num_anchors)
    cand = first_k(table, k, table.row_of.flatten()).view(batch, num_gt, k)  # [B, G, k]
    # Columns of the small problem: the union of the candidates, sorted by anchor, no duplicates.
    sentinel = num_anchors
    cols = torch.where(valid[:, :, None], cand, sentinel).reshape(batch, num_gt * k)
    cols = cols.sort(dim=1).values  # [B, M]
    closed = cols == sentinel
    closed[:, 1:] |= cols[:, 1:] == cols[:, :-1]
    jac = table.row_values(table.row_of[:, :, None], cols.clamp(max=num_anchors - 1)[:, None, :])
    jac.masked_fill_(closed[:, None, :] | ~valid[:, :, None], -1.0)  # [B, G, M], a new tensor

    # Rounds of mutual best pairs (== the sequential greedy, see the module docstring). Entries
    # >= 0 are exactly the open rows and columns: closed ones are all -1.
    gt_ids = torch.arange(num_gt, device=device)  # [G]
    col_ids = torch.arange(cols.shape[1], device=device)  # [M]
    taken = torch.full((batch, num_gt), -1, dtype=torch.long, device=device)
    open_gts = int(valid.sum())  # with A >= G every valid gt is assigned, one round less
    for _ in range(num_gt):  # at least one pair per round while any remains: <= G rounds
        gt_value, best_col = jac.max(dim=2)  # [B, G] first argmax of each gt over candidates
        col_value, best_gt = jac.max(dim=1)  # [B, M] first argmax of each candidate over gts
        gt_mutual = (best_gt.gather(1, best_col) == gt_ids) & (gt_value >= 0)
        pairs = int(gt_mutual.sum())
        if pairs == 0:
            break
        taken = torch.where(gt_mutual, best_col, taken)
        open_gts -= pairs
        if open_gts == 0:
            break
        col_mutual = (best_col.gather(1, best_gt) == col_ids) & (col_value >= 0)
        jac.masked_fill_(gt_mutual[:, :, None] | col_mutual[:, None, :], -1.0)
    return torch.where(taken >= 0, cols.gather(1, taken.clamp(min=0)), -1)


def _apply(
    matched: Tensor, keys: Tensor, anchor_of_gt: Tensor, assign: Tensor
) -> tuple[Tensor, Tensor]:
    """``matched[b, anchor_of_gt[b, g]] = g`` where ``assign[b, g]`` (anchors distinct).

    ``matched`` is written in place: the callers pass the tensor they created in
    :func:`_threshold_matches`, never one of their caller's.

    Returns:
        ``matched[B, A]`` (the same tensor) and the flat indices ``b * A + a`` of its matched
        anchors (``keys`` of the matches before, then those of the new ones; may repeat).

    """
    b_idx, g_idx = assign.nonzero(as_tuple=True)
    a_idx = anchor_of_gt[b_idx, g_idx]
    matched[b_idx, a_idx] = g_idx
    return matched, torch.cat((keys, b_idx * matched.shape[1] + a_idx))


def match_book_with_keys(
    table: IoUTable, valid: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """The book's rule: ``matched[B, A]`` and the flat indices ``b * A + a`` of matched anchors.

    The indices may repeat (an anchor matched by the threshold and again by the greedy step).
    """
    matched, keys = _threshold_matches(table, valid, _check_threshold(iou_threshold))
    if table.num_gt == 0 or table.num_anchors == 0:
        return matched, keys
    anchor_of_gt = _greedy_on_candidates(table, valid)  # [B, G]
    return _apply(matched, keys, anchor_of_gt, anchor_of_gt >= 0)


def match_ssd_with_keys(
    table: IoUTable, valid: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """The SSD paper's rule: ``matched[B, A]`` and the flat indices of matched anchors."""
    matched, keys = _threshold_matches(table, valid, _check_threshold(iou_threshold))
    num_gt = table.num_gt
    if num_gt == 0 or table.num_anchors == 0:
        return matched, keys
    best_anchor = first_k(table, 1)[table.row_of, 0]  # [B, G] first argmax over anchors
    same = best_anchor[:, :, None] == best_anchor[:, None, :]  # [B, G, G']
    later = torch.ones(num_gt, num_gt, dtype=torch.bool, device=valid.device).triu(diagonal=1)
    beaten = (same & later & valid[:, None, :]).any(dim=2)  # a later valid gt takes the anchor
    return _apply(matched, keys, best_anchor, valid & ~beaten)


def _prepare(iou: Tensor, valid: Tensor | None) -> tuple[IoUTable, Tensor]:
    if iou.dim() != 3:
        raise ValueError(f"iou must have shape [B, G, A], got {list(iou.shape)}")
    batch, num_gt, _ = iou.shape
    if valid is None:
        valid = torch.ones((batch, num_gt), dtype=torch.bool, device=iou.device)
    elif valid.shape != (batch, num_gt):
        raise ValueError(
            f"valid must have shape [B, G] = {[batch, num_gt]}, got {list(valid.shape)}"
        )
    valid = valid.to(device=iou.device, dtype=torch.bool)
    if not iou.is_floating_point():
        iou = iou.to(torch.float32)
    return DenseIoUTable(iou, valid), valid


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
    dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
    g = tuple(c[..., None] for c in gt_boxes.to(dtype).unbind(-1))  # 4 x [B, G, 1]
    a = tuple(anchors.to(dtype).unbind(-1))  # 4 x [A]
    return torch.nan_to_num(_box_iou(g, a), nan=0.0)


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
    table, valid = _prepare(iou, valid)
    return match_book_with_keys(table, valid, threshold)[0]


def match_anchors_ssd_batched(
    iou: Tensor, valid: Tensor | None = None, iou_threshold: float = 0.5
) -> Tensor:
    """Assign anchors as the SSD paper does (ssd.pytorch's ``match``), for a batch.

    Anchors whose best IoU is ``>= iou_threshold`` take their best ground truth (the lowest index
    among ties); then each valid ground truth ``j`` is forced onto its best anchor (the lowest
    anchor index among ties), ``j`` ascending, so a later ground truth wins an anchor that is the
    best of several (ssd.pytorch's explicit loop; torchvision's ``SSDMatcher`` gets the same from
    its index assignment on the CPU).

    Args:
        iou: ``Tensor[B, G, A]`` float IoU (values in ``[0, 1]``). Not modified.
        valid: ``Tensor[B, G]`` bool, ``False`` for padding ground truths (ignored); ``None``
            means all valid.
        iou_threshold: in ``(0, 1]``; the paper uses 0.5.

    Returns:
        ``Tensor[B, A]`` int64: ground-truth index per anchor, ``-1`` for background.

    """
    threshold = _check_threshold(iou_threshold)
    table, valid = _prepare(iou, valid)
    return match_ssd_with_keys(table, valid, threshold)[0]


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


def match_anchors_ssd(iou: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """The SSD paper's assignment for one image, from ``iou[G, A]``.

    Args:
        iou: ``Tensor[G, A]`` float IoU. Not modified.
        iou_threshold: in ``(0, 1]``.

    Returns:
        ``Tensor[A]`` int64, the assigned ground-truth index or ``-1`` (background). See
        :func:`match_anchors_ssd_batched`.

    """
    if iou.dim() != 2:
        raise ValueError(f"iou must have shape [G, A], got {list(iou.shape)}")
    return match_anchors_ssd_batched(iou[None], iou_threshold=iou_threshold)[0]
