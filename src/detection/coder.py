"""Anchor-relative box encoding (the book's ``offset_boxes`` / ``offset_inverse``).

An anchor ``(cx_a, cy_a, w_a, h_a)`` and a box ``(cx, cy, w, h)`` (both cxcywh, converted from
xyxy here and nowhere else) give the offsets

* ``l_x = (cx - cx_a) / w_a / v0``, ``l_y = (cy - cy_a) / h_a / v0``,
* ``l_w = log(eps + w / w_a) / v1``, ``l_h = log(eps + h / h_a) / v1``,

with variances ``(v0, v1) = (0.1, 0.2)`` and ``eps = 1e-6`` as in *Dive into Deep Learning*
(14.4). The arithmetic is ordered exactly like the book's (``10 * (c - c_a) / w_a``,
``5 * log(eps + w / w_a)``, ``l * w_a / 10 + c_a``, ``exp(l / 5) * w_a``; ``1 / 0.1`` and
``1 / 0.2`` are exactly 10 and 5 in floating point) so results are bit-identical to the book.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from src.detection.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = ["BoxCoder"]


def _as_float(t: Tensor) -> Tensor:
    """Integer/bool tensors become float32 (the book accepts integer offsets); floats unchanged."""
    return t if t.is_floating_point() else t.to(torch.float32)


class BoxCoder:
    """Encode boxes as offsets relative to anchors and decode them back.

    Args:
        variances: ``(v0, v1)``, the scale of the centre offsets and of the log-size offsets.
            Both must be > 0. The book (and SSD) use ``(0.1, 0.2)``.
        eps: added inside the log of :meth:`encode` (``log(eps + w / w_a)``) so that a
            zero-size box gives a finite offset. Must be >= 0. The book uses ``1e-6``.
        size_clip: :meth:`decode` clamps the scaled size offsets ``v1 * l_w``, ``v1 * l_h`` at
            this value before ``exp``, so that huge predicted offsets give large but finite
            boxes (torchvision's ``BoxCoder`` uses ``log(1000 / 16)``, the default: at most
            62.5 times the anchor). Must be > 0.

    Raises:
        ValueError: if a variance is not a finite number > 0 or ``eps`` is negative.

    """

    def __init__(
        self,
        variances: Sequence[float] = (0.1, 0.2),
        eps: float = 1e-6,
        size_clip: float = math.log(1000.0 / 16),
    ) -> None:
        variances = tuple(float(v) for v in variances)
        if len(variances) != 2:
            raise ValueError(
                f"BoxCoder variances must be two numbers (centre, size), got {list(variances)}"
            )
        for name, v in zip(("variances[0]", "variances[1]"), variances, strict=True):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"BoxCoder {name} must be a finite number > 0, got {v}")
        eps = float(eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"BoxCoder eps must be a finite number >= 0, got {eps}")
        size_clip = float(size_clip)
        if not size_clip > 0:
            raise ValueError(f"BoxCoder size_clip must be > 0, got {size_clip}")
        self.variances: tuple[float, float] = variances  # type: ignore[assignment]
        self.eps = eps
        self.size_clip = size_clip
        # Multiplying by 1/v (10 and 5 for the defaults, exact) reproduces the book's arithmetic.
        self._scale_xy = 1.0 / variances[0]
        self._scale_wh = 1.0 / variances[1]

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Offsets of ``boxes`` relative to ``anchors`` (the book's ``offset_boxes``).

        Args:
            boxes: ``Tensor[..., 4]`` float, xyxy (normalised or pixels, same unit as anchors).
            anchors: ``Tensor[..., 4]`` float, xyxy, broadcastable against ``boxes``.
                Anchors must have positive width and height.

        Returns:
            ``Tensor[..., 4]`` (broadcast shape, promoted float dtype) of offsets
            ``(l_x, l_y, l_w, l_h)``. Inputs are not modified.

        """
        anchors, boxes = _as_float(anchors), _as_float(boxes)
        # cxcywh from the corner pairs, element by element as ``box_convert`` (centre
        # ``(x1 + x2) / 2``, size ``x2 - x1``) but without its unbind/stack (the encoder runs on
        # a few thousand matched rows per batch, where each operation's overhead dominates).
        a_min, a_max = anchors[..., :2], anchors[..., 2:]
        b_min, b_max = boxes[..., :2], boxes[..., 2:]
        a_size = a_max - a_min
        offset_xy = self._scale_xy * ((b_min + b_max) / 2 - (a_min + a_max) / 2) / a_size
        offset_wh = self._scale_wh * torch.log(self.eps + (b_max - b_min) / a_size)
        return torch.cat((offset_xy, offset_wh), dim=-1)

    def decode(self, offsets: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from offsets relative to anchors (the book's ``offset_inverse``).

        ``cx = cx_a + v0 * l_x * w_a`` and ``w = w_a * exp(min(v1 * l_w, size_clip))``
        (likewise for y/h): huge offsets give boxes at most ``exp(size_clip)`` times the anchor,
        never infinite ones. Boxes are not clipped to the image.

        Args:
            offsets: ``Tensor[..., 4]`` ``(l_x, l_y, l_w, l_h)``; integer tensors are
                converted to float32.
            anchors: ``Tensor[..., 4]`` float, xyxy, broadcastable against ``offsets``.

        Returns:
            ``Tensor[..., 4]`` (broadcast shape, promoted float dtype), xyxy in the anchors'
            unit. Inputs are not modified.

        """
        offsets = _as_float(offsets)
        anc = box_xyxy_to_cxcywh(_as_float(anchors))
        pred_xy = offsets[..., :2] * anc[..., 2:] / self._scale_xy + anc[..., :2]
        pred_wh = torch.exp((offsets[..., 2:] / self._scale_wh).clamp(max=self.size_clip))
        pred_wh = pred_wh * anc[..., 2:]
        return box_cxcywh_to_xyxy(torch.cat((pred_xy, pred_wh), dim=-1))

    def __repr__(self) -> str:
        return (
            f"BoxCoder(variances={self.variances}, eps={self.eps}, size_clip={self.size_clip:.4f})"
        )
