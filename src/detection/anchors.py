"""Anchor (default box) generation, vectorised and cached per geometry.

Two families, both returning ``Tensor[A, 4]`` float32, xyxy, normalised to ``[0, 1]``,
ordered level by level, then row (y) by row, column (x) by column, then anchor shape:
this is the order in which :mod:`src.models.heads` flattens its predictions.

* :func:`multibox_prior` / :class:`GridAnchorGenerator`: the book's anchors
  (*Dive into Deep Learning*, 14.4): per location ``len(sizes) + len(ratios) - 1`` boxes,
  ``(s_i, r_0)`` for every size then ``(s_0, r_j)`` for the remaining ratios.
* :func:`ssd_default_boxes` / :class:`SSDDefaultBoxGenerator`: SSD300/512 default boxes as in
  the paper and ``ssd.pytorch``'s ``PriorBox``: per location the ``min_size`` square, the
  ``sqrt(min_size * max_size)`` square, then ``(ar, 1/ar)`` pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

from src.detection.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

__all__ = [
    "multibox_prior",
    "grid_anchors",
    "ssd_default_boxes",
    "GridAnchorGenerator",
    "SSDDefaultBoxGenerator",
]


def _cell_centres(height: int, width: int, step_y: float, step_x: float) -> Tensor:
    """Centres ``(cx, cy)`` of an ``height x width`` grid, row-major: ``Tensor[H*W, 2]``."""
    cy = (torch.arange(height, dtype=torch.float32) + 0.5) * step_y
    cx = (torch.arange(width, dtype=torch.float32) + 0.5) * step_x
    shift_y, shift_x = torch.meshgrid(cy, cx, indexing="ij")
    return torch.stack((shift_x.reshape(-1), shift_y.reshape(-1)), dim=1)


def _book_shapes(
    sizes: Sequence[float], ratios: Sequence[float], height: int, width: int
) -> tuple[Tensor, Tensor]:
    """The book's anchor widths and heights for one level: two ``Tensor[K]``."""
    size_t = torch.tensor(list(sizes), dtype=torch.float32)
    ratio_t = torch.tensor(list(ratios), dtype=torch.float32)
    w = torch.cat((size_t * torch.sqrt(ratio_t[0]), sizes[0] * torch.sqrt(ratio_t[1:])))
    w = w * height / width  # the book's handling of rectangular inputs
    h = torch.cat((size_t / torch.sqrt(ratio_t[0]), sizes[0] / torch.sqrt(ratio_t[1:])))
    return w, h


@lru_cache(maxsize=64)
def _grid_level(
    height: int, width: int, sizes: tuple[float, ...], ratios: tuple[float, ...]
) -> Tensor:
    w, h = _book_shapes(sizes, ratios, height, width)
    offsets = torch.stack((-w, -h, w, h), dim=1) / 2  # [K, 4]
    centres = _cell_centres(height, width, 1.0 / height, 1.0 / width)  # [HW, 2]
    grid = torch.cat((centres, centres), dim=1)  # [HW, 4]
    return (grid[:, None, :] + offsets[None, :, :]).reshape(-1, 4)


def multibox_prior(data: Tensor, sizes: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The book's ``multibox_prior``: anchors centred on every pixel of a feature map.

    Args:
        data: ``Tensor[B, C, H, W]``; only its spatial size and device are used.
        sizes: anchor scales ``s_i`` in ``(0, 1]`` relative to the image.
        ratios: width/height ratios ``r_j > 0``.

    Returns:
        ``Tensor[1, H*W*(len(sizes)+len(ratios)-1), 4]`` float32, xyxy normalised (may extend
        past ``[0, 1]`` at the border, as in the book), on ``data.device``.
    """
    if len(sizes) == 0 or len(ratios) == 0:
        raise ValueError("multibox_prior needs at least one size and one ratio")
    height, width = int(data.shape[-2]), int(data.shape[-1])
    anchors = _grid_level(
        height, width, tuple(float(s) for s in sizes), tuple(float(r) for r in ratios)
    )
    # A fresh tensor (as the book returns): callers may modify it without touching the cache.
    return anchors.to(data.device, copy=True).unsqueeze(0)


def grid_anchors(
    feature_sizes: Sequence[tuple[int, int]],
    sizes: Sequence[Sequence[float]],
    ratios: Sequence[Sequence[float]],
) -> Tensor:
    """Book anchors for several feature levels, concatenated.

    Args:
        feature_sizes: ``(H_l, W_l)`` per level.
        sizes: per level, the sizes passed to :func:`multibox_prior`.
        ratios: per level, the ratios passed to :func:`multibox_prior`.

    Returns:
        ``Tensor[A, 4]`` float32 on CPU, xyxy normalised (a cached tensor: do not modify it).
    """
    if not (len(feature_sizes) == len(sizes) == len(ratios)):
        raise ValueError(
            f"got {len(feature_sizes)} feature maps but {len(sizes)} size lists and "
            f"{len(ratios)} ratio lists; give one of each per feature map"
        )
    return torch.cat(
        [
            _grid_level(int(h), int(w), tuple(map(float, s)), tuple(map(float, r)))
            for (h, w), s, r in zip(feature_sizes, sizes, ratios, strict=True)
        ]
    )


@lru_cache(maxsize=16)
def _ssd_boxes(
    feature_sizes: tuple[int, ...],
    image_size: float,
    steps: tuple[float, ...],
    min_sizes: tuple[float, ...],
    max_sizes: tuple[float, ...],
    aspect_ratios: tuple[tuple[float, ...], ...],
    clip: str,
) -> Tensor:
    levels = []
    for f, step, smin, smax, ars in zip(
        feature_sizes, steps, min_sizes, max_sizes, aspect_ratios, strict=True
    ):
        f_k = image_size / step
        s_k = smin / image_size
        s_prime = math.sqrt(s_k * (smax / image_size))
        ws = [s_k, s_prime]
        hs = [s_k, s_prime]
        for ar in ars:
            ws += [s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
            hs += [s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
        wh = torch.tensor(list(zip(ws, hs, strict=True)), dtype=torch.float32)  # [K, 2]
        centres = _cell_centres(f, f, 1.0 / f_k, 1.0 / f_k)  # [f*f, 2]
        k = wh.shape[0]
        level = torch.cat(
            (centres[:, None, :].expand(-1, k, -1), wh[None, :, :].expand(f * f, -1, -1)), dim=2
        )
        levels.append(level.reshape(-1, 4))
    cxcywh = torch.cat(levels)
    if clip == "cxcywh":
        cxcywh = cxcywh.clamp(0.0, 1.0)
    boxes = box_cxcywh_to_xyxy(cxcywh)
    if clip == "xyxy":
        boxes = boxes.clamp(0.0, 1.0)
    return boxes


def ssd_default_boxes(
    feature_sizes: Sequence[int],
    image_size: int,
    steps: Sequence[float],
    min_sizes: Sequence[float],
    max_sizes: Sequence[float],
    aspect_ratios: Sequence[Sequence[float]],
    clip: str = "cxcywh",
) -> Tensor:
    """SSD default boxes (SSD300: 8732 boxes, SSD512: 24564).

    Args:
        feature_sizes: square feature-map sizes, e.g. ``[38, 19, 10, 5, 3, 1]``.
        image_size: input side in pixels (300 or 512).
        steps: pixel stride per level (``[8, 16, 32, 64, 100, 300]``).
        min_sizes: pixel size of the small square per level.
        max_sizes: pixel size whose geometric mean with ``min_sizes`` gives the large square.
        aspect_ratios: extra ratios per level; each ``ar`` adds ``ar`` and ``1/ar`` boxes.
        clip: ``"cxcywh"`` clamps ``(cx, cy, w, h)`` to ``[0, 1]`` exactly as ``ssd.pytorch``'s
            ``PriorBox(clip=True)`` and torchvision's ``DefaultBoxGenerator`` do (needed to run
            published ``ssd.pytorch`` weights); ``"xyxy"`` clamps the corners to the image;
            ``"none"`` leaves them.

    Returns:
        ``Tensor[A, 4]`` float32 on CPU, xyxy normalised (a cached tensor: do not modify it).
    """
    if clip not in ("cxcywh", "xyxy", "none"):
        raise ValueError(f"clip must be one of 'cxcywh', 'xyxy', 'none', got {clip!r}")
    n = len(feature_sizes)
    if not (len(steps) == len(min_sizes) == len(max_sizes) == len(aspect_ratios) == n):
        raise ValueError(
            "feature_sizes, steps, min_sizes, max_sizes and aspect_ratios need one entry per "
            f"level; got {n}, {len(steps)}, {len(min_sizes)}, {len(max_sizes)}, "
            f"{len(aspect_ratios)}"
        )
    return _ssd_boxes(
        tuple(int(f) for f in feature_sizes),
        float(image_size),
        tuple(map(float, steps)),
        tuple(map(float, min_sizes)),
        tuple(map(float, max_sizes)),
        tuple(tuple(map(float, a)) for a in aspect_ratios),
        clip,
    )


class _CachedPerDevice:
    """Keeps one copy of the anchors per (geometry, device, dtype)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Tensor] = {}

    def _get(self, key: tuple, build, device, dtype) -> Tensor:  # noqa: ANN001
        full_key = (key, str(device), dtype)
        anchors = self._cache.get(full_key)
        if anchors is None:
            anchors = build().to(device=device, dtype=dtype)
            self._cache[full_key] = anchors
        return anchors


class GridAnchorGenerator(_CachedPerDevice):
    """The book's anchors on every feature level (TinySSD: 5444 at 256x256).

    Args:
        sizes: per level, a list of sizes (fractions of the image).
        ratios: per level, a list of width/height ratios.
    """

    def __init__(self, sizes: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]]) -> None:
        super().__init__()
        if len(sizes) != len(ratios):
            raise ValueError(
                f"anchors: {len(sizes)} size lists but {len(ratios)} ratio lists; "
                "give one of each per feature level"
            )
        for i, (s, r) in enumerate(zip(sizes, ratios, strict=True)):
            if len(s) == 0 or len(r) == 0 or min(s) <= 0 or min(r) <= 0:
                raise ValueError(
                    f"anchors level {i}: sizes {list(s)} and ratios {list(r)} must be non-empty "
                    "and positive"
                )
        self.sizes = [list(map(float, s)) for s in sizes]
        self.ratios = [list(map(float, r)) for r in ratios]

    def num_anchors_per_location(self) -> list[int]:
        """Anchors per feature-map cell, per level."""
        return [len(s) + len(r) - 1 for s, r in zip(self.sizes, self.ratios, strict=True)]

    def __call__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Anchors for the given feature-map sizes.

        Args:
            feature_sizes: ``(H_l, W_l)`` per level.
            image_size: ``(H, W)`` of the input (unused: the book's anchors are relative).
            device: where the result lives.
            dtype: its dtype.

        Returns:
            ``Tensor[A, 4]`` xyxy normalised; cached, do not modify.
        """
        key = tuple((int(h), int(w)) for h, w in feature_sizes)
        return self._get(key, lambda: grid_anchors(key, self.sizes, self.ratios), device, dtype)

    def __repr__(self) -> str:
        return f"GridAnchorGenerator(sizes={self.sizes}, ratios={self.ratios})"


class SSDDefaultBoxGenerator(_CachedPerDevice):
    """SSD300/SSD512 default boxes (see :func:`ssd_default_boxes`).

    The feature-map sizes are taken from the network at run time (they must be square); the
    box centres follow ``steps`` and ``image_size``, so :class:`src.models.ssd.SSD` rejects an
    input whose size differs from ``image_size``.
    """

    def __init__(
        self,
        image_size: int,
        steps: Sequence[float],
        min_sizes: Sequence[float],
        max_sizes: Sequence[float],
        aspect_ratios: Sequence[Sequence[float]],
        clip: str = "cxcywh",
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.steps = list(map(float, steps))
        self.min_sizes = list(map(float, min_sizes))
        self.max_sizes = list(map(float, max_sizes))
        self.aspect_ratios = [list(map(float, a)) for a in aspect_ratios]
        self.clip = clip
        if not (
            len(self.steps) == len(self.min_sizes) == len(self.max_sizes) == len(self.aspect_ratios)
        ):
            raise ValueError(
                "anchors: steps, min_sizes, max_sizes, aspect_ratios need one entry per level"
            )

    def num_anchors_per_location(self) -> list[int]:
        """Default boxes per feature-map cell, per level (SSD300: 4, 6, 6, 6, 4, 4)."""
        return [2 + 2 * len(a) for a in self.aspect_ratios]

    def __call__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Default boxes for the given square feature maps; ``Tensor[A, 4]`` xyxy normalised."""
        sides = []
        for level, (h, w) in enumerate(feature_sizes):
            if h != w:
                raise ValueError(
                    f"SSD default boxes need square feature maps; level {level} is {h}x{w}"
                )
            sides.append(int(h))
        key = (tuple(sides), self.image_size)
        return self._get(
            key,
            lambda: ssd_default_boxes(
                sides,
                self.image_size,
                self.steps,
                self.min_sizes,
                self.max_sizes,
                self.aspect_ratios,
                self.clip,
            ),
            device,
            dtype,
        )

    def __repr__(self) -> str:
        return (
            f"SSDDefaultBoxGenerator(image_size={self.image_size}, steps={self.steps}, "
            f"min_sizes={self.min_sizes}, max_sizes={self.max_sizes}, "
            f"aspect_ratios={self.aspect_ratios}, clip={self.clip!r})"
        )


def anchors_to_cxcywh(anchors: Tensor) -> Tensor:
    """Convenience: ``Tensor[A, 4]`` xyxy -> cxcywh (used by the encoder)."""
    return box_xyxy_to_cxcywh(anchors)
