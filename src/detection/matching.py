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

**How it is computed.** A few tensor operations over the whole batch, and no ``[N, A]`` IoU
matrix: ``A`` is cut into chunks of ``S`` consecutive anchors, and :class:`BoxIoUTable` keeps,
per valid ground truth and chunk, a *key*: a cheap upper bound of the chunk's maximum IoU (from
the chunk's bounding box and area range), replaced by the exact maximum where a step needs it.
IoUs are computed (bit-identical to the book's ``box_iou``) only for the chunks a step reads:

* *threshold step*: an anchor that reaches the threshold has its best entry among the entries
  ``>= threshold``, which lie in the chunks whose maximum reaches it; the chunks whose key
  reaches it get exact maxima, only those reaching it are read (a few percent of the entries),
  and one scatter picks each anchor's first maximum;
* *best anchors of a ground truth*: the first ``k`` entries of a row in the order
  ``(value descending, anchor ascending)`` lie in the first ``k`` chunks in the order
  ``(chunk maximum descending, chunk ascending)`` (if an entry's chunk is not among them, ``k``
  chunks each hold a distinct entry that comes before it). Bounds do not spoil this when the
  maxima are exact from a *floor* at most the row's ``k``-th entry up (a chunk whose bound is
  below the floor holds no such entry and ranks after every chunk that does); the floor is the
  ``k``-th entry of the chunks with the highest keys. So ``k`` chunks are picked from the
  ``[N, C]`` keys and the entries from the ``[N, k * S]`` gathered chunks, each with an exact
  tie-aware selection (:func:`_first_k`);
* *the greedy step, first without rounds*: where an image's valid ground truths have distinct
  first-argmax anchors, each takes its own (see :func:`_greedy_on_candidates`); only the other
  images go on to the rounds below;
* *the greedy step in rounds of mutual best pairs*: each open ground truth knows its first
  argmax over the open anchors from a ranked list of its best anchors (at first its first
  argmax alone; a list whose anchors are all taken is replaced by a 4 times longer one), and
  each round reads the ``[B, G, G]`` IoUs of these anchors with the image's ground truths.

**Mutual pairs.** On the open matrix (assigned anchors and ground truths and padding removed),
``(a, g)`` is a mutual pair when ``g`` is the first argmax of row ``a`` and ``a`` is the first
argmax of column ``g``. Each round assigns all mutual pairs at once and discards their rows and
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
from collections.abc import Sequence
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
    return _iou_with_areas(
        (gx1, gy1, gx2, gy2, (gx2 - gx1) * (gy2 - gy1)),
        (ax1, ay1, ax2, ay2, (ax2 - ax1) * (ay2 - ay1)),
    )


def _iou_with_areas(g: Sequence[Tensor], a: Sequence[Tensor]) -> Tensor:
    """:func:`_box_iou` from ``(x1, y1, x2, y2, area)`` of each side (areas computed by the caller).

    The areas must be ``(x2 - x1) * (y2 - y1)``; the result is a new tensor of the broadcast
    shape, bit-identical to the book's ``box_iou`` (NaN not replaced).
    """
    gx1, gy1, gx2, gy2, area_g = g
    ax1, ay1, ax2, ay2, area_a = a
    # every result below has the broadcast shape of both sides, so the in-place steps are safe
    inter = torch.minimum(gx2, ax2)
    tmp = torch.maximum(gx1, ax1)
    inter.sub_(tmp).clamp_(min=0)  # intersection width
    height = torch.minimum(gy2, ay2)
    height.sub_(torch.maximum(gy1, ay1, out=tmp)).clamp_(min=0)
    inter.mul_(height)
    union = torch.add(area_a, area_g, out=height)  # the book's order: area_a + area_g - inter
    return inter.div_(union.sub_(inter))


class _AnchorColumns(NamedTuple):
    """What the IoU needs of ``anchors[A, 4]`` (xyxy) in one dtype, computed once per anchors."""

    flat: Tensor  # [A, 5]: x1, y1, x2, y2, area = (x2 - x1) * (y2 - y1)
    chunks: Tensor  # [C, 5, S]: the same by chunks of S anchors (the last padded with anchor A-1)
    bounds: Tensor  # [6, C]: per chunk min x1, min y1, max x2, max y2, min area, max area
    proper: bool  # finite with positive sides, so that no union is 0


# the last anchors seen: (weak reference, version counter, dtype, their columns)
_last_anchors: tuple[weakref.ref[Tensor], int, torch.dtype, _AnchorColumns] | None = None


def _anchor_columns(anchors: Tensor, dtype: torch.dtype) -> _AnchorColumns:
    """:class:`_AnchorColumns` of ``anchors[A, 4]`` (``A >= 1``) in ``dtype``.

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
    num_anchors = anchors.shape[0]
    chunk = _chunk_size(num_anchors)
    num_chunks = -(-num_anchors // chunk)
    # + 0.0: no -0.0 coordinate, so that no IoU is -0.0 (see ``BoxIoUTable.nonnegative``)
    x1, y1, x2, y2 = (c + 0.0 for c in anchors.to(dtype).unbind(-1))
    proper = bool(torch.isfinite(anchors).all() and ((x2 > x1) & (y2 > y1)).all())
    flat = torch.stack((x1, y1, x2, y2, (x2 - x1) * (y2 - y1)), dim=1)  # [A, 5]
    padded = torch.cat((flat, flat[-1:].expand(num_chunks * chunk - num_anchors, 5)))
    chunks = padded.view(num_chunks, chunk, 5).transpose(1, 2).contiguous()  # [C, 5, S]
    low, high = chunks.amin(dim=2), chunks.amax(dim=2)  # [C, 5]
    bounds = torch.stack((low[:, 0], low[:, 1], high[:, 2], high[:, 3], low[:, 4], high[:, 4]))
    columns = _AnchorColumns(flat, chunks, bounds, proper)
    if trackable:
        _last_anchors = (weakref.ref(anchors), anchors._version, dtype, columns)
    return columns


class IoUTable:
    """Read access to the IoU of ``B x G`` ground truths with ``A`` anchors, for the matchers.

    The IoU has ``R`` rows (``row_of[b, g]`` is the row of ground truth ``g`` of image ``b``) of
    ``C * chunk`` anchors: ``C = ceil(A / chunk)`` chunks of consecutive anchors, an anchor index
    ``a >= A`` reading as IoU ``-1``. Rows of padding ground truths read 0, below every
    threshold, and the other steps mask them. The matchers read it through :meth:`chunk_keys`
    (per chunk maxima), :meth:`chunk_values` and :meth:`row_values`. Subclasses:
    :class:`DenseIoUTable` (a given ``[B, G, A]`` matrix) and :class:`BoxIoUTable` (computed from
    boxes where needed).
    """

    batch: int
    num_gt: int
    num_anchors: int
    chunk: int
    width: int  # C * chunk
    row_of: Tensor  # [B, G] int64
    row_image: Tensor  # [R] int64: the image of each row (padding rows: any value)
    row_gt: Tensor  # [R] int64: the ground truth of each row (padding rows: any value)
    #: every IoU is +0.0 or positive (then -1, past the last anchor, is the only negative value)
    nonnegative: bool = False

    @property
    def num_chunks(self) -> int:
        """``C = ceil(A / chunk)``."""
        return -(-self.num_anchors // self.chunk)

    def chunk_keys(self, floor: Tensor | float | None = None, rows: Tensor | None = None) -> Tensor:
        """Per row and chunk, the chunk's maximum IoU wherever it reaches ``floor``.

        Args:
            floor: ``float`` or ``Tensor[R']`` (one per row of ``rows``); ``None``: no new
                computation.
            rows: ``Tensor[R']`` int64 rows; ``None``: all ``R`` rows.

        Returns:
            ``Tensor[R', C]`` float: the exact maximum of a chunk whenever that maximum is
            ``>= floor`` (so a key ``>= floor`` is always exact); any other key is an upper bound
            of the chunk's maximum that is ``< floor`` (or exact).

        """
        raise NotImplementedError

    def chunk_values(self, rows: Tensor, chunks: Tensor) -> Tensor:
        """``Tensor[K, S]``: the IoU of row ``rows[i]`` at the anchors of chunk ``chunks[i]``."""
        raise NotImplementedError

    def row_values(self, row: Tensor, a: Tensor) -> Tensor:
        """IoU at broadcastable int64 indices (row, anchor ``< C * chunk``)."""
        raise NotImplementedError

    def selection_keys(self, rows: Tensor | None, k: int) -> Tensor:
        """Chunk keys ``Tensor[R', C]`` (all rows if ``rows`` is None) to choose ``k`` chunks from.

        The first ``k`` entries of each row (IoU desc, anchor asc) must lie in its first ``k``
        chunks in the order (key desc, chunk asc). Exact maxima satisfy this; so do keys that are
        exact from a floor at most the row's ``k``-th largest entry (bounds below the floor rank
        after every chunk holding one of those entries).
        """
        return self.chunk_keys(float("-inf"), rows)

    def row_chunk_max(self) -> Tensor:
        """``Tensor[R, C]``: each row's exact maximum IoU within each chunk of anchors."""
        return self.chunk_keys(float("-inf"))


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
        self._chunk_max = self.buffer.view(-1, self.num_chunks, self.chunk).amax(dim=2)

    def chunk_keys(self, floor: Tensor | float | None = None, rows: Tensor | None = None) -> Tensor:
        """Exact chunk maxima (every floor is met); see :meth:`IoUTable.chunk_keys`."""
        return self._chunk_max if rows is None else self._chunk_max[rows]

    def chunk_values(self, rows: Tensor, chunks: Tensor) -> Tensor:
        """See :meth:`IoUTable.chunk_values`."""
        return self.buffer.view(-1, self.num_chunks, self.chunk)[rows, chunks]

    def row_values(self, row: Tensor, a: Tensor) -> Tensor:
        """See :meth:`IoUTable.row_values`."""
        return self.buffer.view(-1).take(row * self.width + a)


#: pairs ``(row, chunk)`` per block when chunk maxima are computed (``[block, S]`` temporaries
#: of about 1 MB stay in the cache)
_BLOCK_PAIRS = 8192


class BoxIoUTable(IoUTable):
    """IoU of ``gt_boxes[B, G, 4]`` (rows where ``valid[B, G]``) with ``anchors[A, 4]``, xyxy.

    Nothing ``[R, A]`` is stored: the rows are the ``N`` valid ground truths and one row for
    every padding one (the empty box at the origin, IoU 0), and an IoU is computed where a
    matcher reads it, by the book's ``box_iou`` arithmetic element by element: values are
    bit-identical to it (NaN, from an empty union, becomes 0), except that a zero IoU is always
    +0.0 (a ``-0.0`` coordinate is read as +0.0, the same number).

    ``nonnegative`` is True when the boxes are proper (finite, non-negative sides; anchors with
    positive sides): then every IoU is +0.0 or positive and no NaN arises, and the chunk maxima
    are computed lazily. A cheap upper bound of every chunk's maximum (``[R, C]``, from the
    chunk's bounding box and area range: ``IoU <= min(overlap, max area) / max(area_g, min area)``)
    stands in for the maximum until a matcher needs the exact one (:meth:`chunk_keys`); a chunk
    whose bounding box misses the ground truth holds only +0.0, exactly. With SSD300's anchors
    and 1 to 100 random boxes per image the matchers compute about a tenth of the ``R x A``
    IoU. Otherwise every maximum is computed on first use.
    """

    def __init__(
        self,
        gt_boxes: Tensor,
        valid: Tensor,
        anchors: Tensor,
    ) -> None:
        self.dtype = dtype = torch.promote_types(gt_boxes.dtype, anchors.dtype)
        device = anchors.device
        self.batch, self.num_gt = gt_boxes.shape[:2]
        self.num_anchors = num_anchors = anchors.shape[0]
        self.chunk = _chunk_size(num_anchors)
        self.width = self.num_chunks * self.chunk
        b_idx, g_idx = valid.nonzero(as_tuple=True)  # [N] each, image-major
        rows = b_idx.shape[0]
        # row of the table for each (image, gt): its own, or the empty-box row N for padding
        self.row_of = torch.full((self.batch, self.num_gt), rows, dtype=torch.long, device=device)
        self.row_of[b_idx, g_idx] = torch.arange(rows, device=device)
        self.row_image = torch.cat((b_idx, b_idx.new_full((1,), self.batch)))  # [N + 1]
        self.row_gt = torch.cat((g_idx, g_idx.new_zeros(1)))  # [N + 1]
        gt = torch.zeros((rows + 1, 4), dtype=dtype, device=device)
        gt[:rows] = gt_boxes[b_idx, g_idx].to(dtype) + 0.0  # -0.0 coordinates become +0.0
        gx1, gy1, gx2, gy2 = gt.unbind(-1)
        area_g = (gx2 - gx1) * (gy2 - gy1)
        self._gt = torch.stack((gx1, gy1, gx2, gy2, area_g), dim=1)  # [N + 1, 5]
        num_chunks = self.num_chunks
        if num_anchors == 0:
            self._anchors = None
            self._keys = torch.zeros((rows + 1, 0), dtype=dtype, device=device)
            self._exact = torch.ones((rows + 1, 0), dtype=torch.bool, device=device)
            return
        self._anchors = _anchor_columns(anchors, dtype)
        # A union is > 0 (no NaN) when anchors have positive and boxes non-negative, finite
        # sides (an infinite side makes the area inf or NaN; a NaN coordinate fails ``>=``).
        # Then also inter >= +0.0 (clamped, no -0.0 input) over a union > 0: every IoU is +0.0
        # or positive.
        self.nonnegative = self._anchors.proper and bool(
            (torch.isfinite(area_g) & (gx2 >= gx1) & (gy2 >= gy1)).all()
        )
        if not self.nonnegative:  # no bound: every maximum is computed when first asked for
            self._keys = torch.full((rows + 1, num_chunks), math.inf, dtype=dtype, device=device)
            self._exact = torch.zeros((rows + 1, num_chunks), dtype=torch.bool, device=device)
            return
        # Upper bound of each chunk's maximum. In floating point too: an anchor's intersection
        # (width, height, product: monotone roundings) is at most the chunk box's overlap and at
        # most its area; its union is at least max(area_g, area_a) to within an ulp or two,
        # covered by the margin.
        cx1, cy1, cx2, cy2, low_area, high_area = self._anchors.bounds  # [C] each
        g = [c[:, None] for c in (gx1, gy1, gx2, gy2, area_g)]
        width = (torch.minimum(g[2], cx2) - torch.maximum(g[0], cx1)).clamp_(min=0)
        height = (torch.minimum(g[3], cy2) - torch.maximum(g[1], cy1)).clamp_(min=0)
        overlap = width.mul_(height)  # [N + 1, C]
        bound = torch.minimum(overlap, high_area).div_(torch.maximum(g[4], low_area))
        self._keys = bound.mul_(1.0 + 256 * torch.finfo(dtype).eps)
        # no overlap with the chunk's box: every entry is exactly +0.0 (0 * h over a union > 0)
        self._exact = overlap == 0

    @property
    def buffer(self) -> Tensor:
        """``Tensor[R, C * S]``: the whole table (computed on each access; for tests)."""
        num_rows, num_chunks = self._keys.shape
        rows = torch.arange(num_rows, device=self._gt.device).repeat_interleave(num_chunks)
        chunks = torch.arange(num_chunks, device=self._gt.device).repeat(num_rows)
        return self.chunk_values(rows, chunks).view(num_rows, self.width)

    def chunk_keys(self, floor: Tensor | float | None = None, rows: Tensor | None = None) -> Tensor:
        """See :meth:`IoUTable.chunk_keys`; computes the maxima not yet known that may reach it."""
        keys = self._keys if rows is None else self._keys[rows]
        if floor is None:
            return keys
        exact = self._exact if rows is None else self._exact[rows]
        limit = floor[:, None] if isinstance(floor, Tensor) else floor
        r, c = ((keys >= limit) & ~exact).nonzero(as_tuple=True)
        if r.numel() > 0:
            table_rows = r if rows is None else rows[r]
            maxima = self._chunk_max(table_rows, c)
            self._keys[table_rows, c] = maxima
            self._exact[table_rows, c] = True
            if rows is not None:  # ``keys`` is a copy
                keys[r, c] = maxima
        return keys

    def selection_keys(self, rows: Tensor | None, k: int) -> Tensor:
        """See :meth:`IoUTable.selection_keys`.

        The floor: the ``k``-th largest entry of the few chunks of highest key (``k`` entries
        reach it, so it is at most the row's ``k``-th largest entry); their maxima become exact.
        """
        keys = self._keys if rows is None else self._keys[rows]
        num_rows = keys.shape[0]
        probe = keys.topk(min(self.num_chunks, -(-k // self.chunk) + 1), dim=1).indices  # [R', m]
        pairs = (torch.arange(num_rows, device=keys.device) if rows is None else rows)[:, None]
        pairs = pairs.expand_as(probe).flatten()
        values = self.chunk_values(pairs, probe.flatten())  # [R' * m, S]
        self._keys[pairs, probe.flatten()] = values.amax(dim=1)
        self._exact[pairs, probe.flatten()] = True
        floor = values.view(num_rows, -1).topk(k, dim=1).values[:, -1]  # [R']
        return self.chunk_keys(floor, rows)

    def _chunk_max(self, rows: Tensor, chunks: Tensor) -> Tensor:
        """``Tensor[K]``: the maximum IoU of each pair (row, chunk), by blocks of pairs."""
        out = torch.empty(rows.shape[0], dtype=self.dtype, device=rows.device)
        for start in range(0, rows.shape[0], _BLOCK_PAIRS):
            end = start + _BLOCK_PAIRS
            values = self.chunk_values(rows[start:end], chunks[start:end])
            torch.amax(values, dim=1, out=out[start:end])
        return out

    def chunk_values(self, rows: Tensor, chunks: Tensor) -> Tensor:
        """See :meth:`IoUTable.chunk_values` (computed, in the book's arithmetic)."""
        anchors = self._anchors
        if anchors is None:
            return torch.zeros((rows.shape[0], 0), dtype=self.dtype, device=rows.device)
        a = anchors.chunks.index_select(0, chunks).unbind(1)  # 5 x [K, S]
        g = self._gt.index_select(0, rows)[:, :, None].unbind(1)  # 5 x [K, 1]
        values = _iou_with_areas(g, a)
        tail = self.num_anchors - (self.num_chunks - 1) * self.chunk  # anchors in the last chunk
        if tail < self.chunk:
            last = chunks == self.num_chunks - 1
            if bool(last.any()):
                values[last, tail:] = -1.0
        if not self.nonnegative:
            values.nan_to_num_(nan=0.0)
        return values

    def row_values(self, row: Tensor, a: Tensor) -> Tensor:
        """See :meth:`IoUTable.row_values` (computed, in the book's arithmetic)."""
        if self._anchors is None:
            return torch.full(torch.broadcast_shapes(row.shape, a.shape), -1.0, dtype=self.dtype)
        anchor = self._anchors.flat[a.clamp(max=self.num_anchors - 1)].unbind(-1)
        values = _iou_with_areas(self._gt[row].unbind(-1), anchor)
        if not self.nonnegative:
            values.nan_to_num_(nan=0.0)
        return values.masked_fill_(a >= self.num_anchors, -1.0)


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
    device = table.row_of.device
    sorted_bits = table.nonnegative
    num_chunks = table.num_chunks
    if num_chunks > k:
        chosen = _first_k(table.selection_keys(rows, k), k, sorted_bits)  # [R', k] ascending
    if rows is None:
        rows = torch.arange(table.row_image.shape[0], device=device)
    num_rows = rows.shape[0]
    if num_chunks <= k:
        chosen = torch.arange(num_chunks, device=device).expand(num_rows, num_chunks)
    ids = (chosen[..., None] * table.chunk + torch.arange(table.chunk, device=device)).flatten(1)
    pairs = rows[:, None].expand_as(chosen).flatten()
    values = table.chunk_values(pairs, chosen.flatten()).view(num_rows, -1)  # [R', k * S]
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
    # keys >= threshold are exact maxima, and every chunk whose maximum reaches it has one
    row, chunk_id = (table.chunk_keys(threshold) >= threshold).nonzero(as_tuple=True)  # [K]
    values = table.chunk_values(row, chunk_id)  # [K, S]
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


def _greedy_on_candidates(table: IoUTable, valid: Tensor) -> Tensor:
    """Step 2 of the book's rule: the anchor each valid ground truth takes, or ``-1``.

    Where the valid ground truths of an image have distinct first-argmax anchors, the greedy
    gives each ground truth its own: the next greedy pick is the first entry ``(a, g)`` of the
    remaining matrix; ``g``'s first argmax ``a_g`` is still open (only other ground truths' first
    argmaxes were discarded), so ``g``'s row maximum is unchanged and first reached at ``a_g``,
    hence ``a = a_g``. Only the other images go through the rounds (:func:`_greedy_rounds`).

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
        taken[images] = _greedy_rounds(
            table, table.row_of[images], valid[images], best[images, :, None]
        )
    return taken


def _ranked_candidates(table: IoUTable, rows: Tensor, k: int) -> Tensor:
    """``Tensor[R', k]`` int64: each row's first ``k`` anchors, ranked (IoU desc, anchor asc)."""
    ids = first_k(table, k, rows)  # ascending
    values = table.row_values(rows[:, None], ids)
    return ids.gather(1, values.sort(dim=1, descending=True, stable=True).indices)


#: how much longer the list of ranked candidates becomes for a ground truth whose candidates
#: are all taken
_GROWTH = 4


def _greedy_rounds(table: IoUTable, row_of: Tensor, valid: Tensor, first: Tensor) -> Tensor:
    """:func:`_greedy_on_candidates` for any images: rounds of mutual best pairs.

    Every open ground truth knows its first argmax over the open anchors from a ranked list of
    its best anchors (its first argmax at first; a ground truth whose list is all taken gets a
    list :data:`_GROWTH` times as long); a round reads the IoU of each such anchor with every
    open ground truth of its image (``[B, G, G]``), assigns all mutual pairs and closes their
    anchors and ground truths (see the module docstring).

    Args:
        table: the IoU.
        row_of: ``Tensor[B, G]`` int64, the table row of each ground truth.
        valid: ``Tensor[B, G]`` bool.
        first: ``Tensor[B, G, 1]`` int64, each valid ground truth's first argmax anchor.

    Returns:
        ``Tensor[B, G]`` int64 anchor index per ground truth, or ``-1``.

    """
    batch, num_gt = valid.shape
    num_anchors, device = table.num_anchors, valid.device
    # ranked candidates; padding entries (and the ends of short lists) are the sentinel A
    cand = torch.where(valid[:, :, None], first, num_anchors)  # [B, G, k]
    length = torch.ones((batch, num_gt), dtype=torch.long, device=device)  # of each list
    closed = torch.zeros((batch, num_anchors + 1), dtype=torch.bool, device=device)
    closed[:, num_anchors] = True  # the sentinel is never free
    open_gt = valid.clone()
    taken = torch.full((batch, num_gt), -1, dtype=torch.long, device=device)
    gt_ids = torch.arange(num_gt, device=device)
    gt_rows = row_of[:, None, :]  # [B, 1, G']
    # Each pass either lengthens the lists of some open ground truths (each list at most
    # log4(A) + 1 times) or assigns at least one pair in every image with an open ground truth
    # and an open anchor (the first entry of its open matrix is a mutual pair).
    for _ in range(num_gt * (num_anchors.bit_length() + 2) + 1):
        free = ~closed.gather(1, cand.view(batch, -1)).view_as(cand)  # [B, G, k]
        has_free = free.any(dim=2)
        short = open_gt & ~has_free
        if bool(short.any()):
            # a complete list all taken: every anchor of the image is, the gt stays unassigned
            open_gt &= ~(short & (length == num_anchors))
            short &= length < num_anchors
            if bool(short.any()):
                sb, sg = short.nonzero(as_tuple=True)
                grown = min(num_anchors, _GROWTH * int(length[sb, sg].max()))
                if grown > cand.shape[2]:
                    cand = torch.cat(
                        (cand, cand.new_full((batch, num_gt, grown - cand.shape[2]), num_anchors)),
                        dim=2,
                    )
                cand[sb, sg, :grown] = _ranked_candidates(table, row_of[sb, sg], grown)
                length[sb, sg] = grown
                continue
        if not bool(open_gt.any()):
            return taken
        slot = free.to(torch.uint8).argmax(dim=2, keepdim=True)  # first free candidate
        anchor = cand.gather(2, slot)  # [B, G, 1]: each gt's first argmax over open anchors
        # column of each such anchor over the image's gts: is g its first argmax among open ones?
        column = table.row_values(gt_rows, anchor.clamp(max=num_anchors - 1))  # [B, G, G']
        column.masked_fill_(~open_gt[:, None, :], -math.inf)
        mutual = open_gt & (column.argmax(dim=2) == gt_ids)
        anchor = anchor[..., 0]
        taken = torch.where(mutual, anchor, taken)
        closed.scatter_(1, torch.where(mutual, anchor, num_anchors), True)
        open_gt &= ~mutual
    raise RuntimeError("the greedy rounds did not finish (a bug in src/detection/matching.py)")


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
