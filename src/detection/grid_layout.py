"""Find the grid structure of anchors, so that their IoU can be computed separably.

Grid anchors (the book's ``multibox_prior``, SSD default boxes) come level by level, each level
in ``(row i, column j, shape s)`` order: anchor ``start + (i * W + j) * K + s``. Its x-interval
``(x1, x2)`` depends on ``(j, s)`` only and its y-interval on ``(i, s)`` only, so the intersection
of a box with every anchor of a level is the outer product of ``K * W`` widths and ``K * H``
heights: one broadcast multiplication instead of nine passes over ``[N, A]``.

:func:`find_grid_layout` proposes the levels from the anchor centres and then *verifies* them
exactly (every coordinate of every anchor equals its row's or column's), so the layout is never
wrong; anchors without such a structure give ``None``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["GridLevel", "find_grid_layout"]


class GridLevel(NamedTuple):
    """One level of grid anchors: anchors ``start .. start + H * W * K`` in ``(i, j, s)`` order.

    Attributes:
        start: index of the level's first anchor.
        height: ``H`` rows.
        width: ``W`` columns.
        per_cell: ``K`` anchors per cell.
        x: ``Tensor[2, W, K]``: ``x1`` and ``x2`` of the anchors of column ``j``, shape ``s``.
        y: ``Tensor[2, H, K]``: ``y1`` and ``y2`` of the anchors of row ``i``, shape ``s``.

    """

    start: int
    height: int
    width: int
    per_cell: int
    x: Tensor
    y: Tensor

    @property
    def size(self) -> int:
        """``H * W * K`` anchors."""
        return self.height * self.width * self.per_cell


def _starts(change: Tensor) -> Tensor:
    """Indices where a run starts, from ``change[i]`` = "element ``i + 1`` differs from ``i``"."""
    first = torch.ones(1, dtype=torch.bool, device=change.device)
    return torch.cat((first, change)).nonzero()[:, 0]


def find_grid_layout(anchors: Tensor, max_levels: int = 32) -> list[GridLevel] | None:
    """Split ``anchors[A, 4]`` (xyxy) into verified grid levels, or return ``None``.

    Args:
        anchors: ``Tensor[A, 4]`` float, xyxy.
        max_levels: give up (``None``) beyond this many levels, where the separable computation
            would not pay off.

    Returns:
        The levels, covering ``0 .. A`` in order, each verified exactly; ``None`` when the anchors
        are not grid anchors in ``(i, j, s)`` order.

    """
    num = anchors.shape[0]
    if anchors.dim() != 2 or anchors.shape[1] != 4 or num == 0:
        return None
    if not bool(torch.isfinite(anchors).all()):
        return None
    # Proposal: cells are runs of equal centres, rows runs of equal centre y, levels runs of rows
    # going down with equal length and cell size. The verification below makes it exact.
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2  # [A, 2]
    tol = 1e-6 * max(1.0, float(anchors.abs().max()))
    cell_start = _starts(((centre[1:] - centre[:-1]).abs() > tol).any(dim=1))  # [cells]
    per_cell = torch.diff(cell_start, append=cell_start.new_full((1,), num))
    cell_y = centre[cell_start, 1]
    row_start = _starts((cell_y[1:] - cell_y[:-1]).abs() > tol)  # in cells
    row_len = torch.diff(row_start, append=row_start.new_full((1,), cell_start.shape[0]))
    row_y, row_k = cell_y[row_start], per_cell[row_start]
    level_row = _starts(
        (row_y[1:] <= row_y[:-1] + tol) | (row_len[1:] != row_len[:-1]) | (row_k[1:] != row_k[:-1])
    )
    if level_row.shape[0] > max_levels:
        return None
    heights = torch.diff(level_row, append=level_row.new_full((1,), row_start.shape[0]))
    levels = []
    start = 0
    for first_row, height in zip(level_row.tolist(), heights.tolist(), strict=True):
        width, k = int(row_len[first_row]), int(row_k[first_row])
        size = height * width * k
        if int(cell_start[row_start[first_row]]) != start or start + size > num:
            return None
        grid = anchors[start : start + size].view(height, width, k, 4)
        x = grid[0, :, :, 0::2].permute(2, 0, 1)  # [2, W, K]
        y = grid[:, 0, :, 1::2].permute(2, 0, 1)  # [2, H, K]
        if not (
            torch.equal(grid[..., 0::2], x.permute(1, 2, 0)[None].expand(height, -1, -1, -1))
            and torch.equal(grid[..., 1::2], y.permute(1, 2, 0)[:, None].expand(-1, width, -1, -1))
        ):
            return None
        levels.append(GridLevel(start, height, width, k, x.contiguous(), y.contiguous()))
        start += size
    return levels if start == num else None
