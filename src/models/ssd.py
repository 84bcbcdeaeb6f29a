"""Single Shot MultiBox Detector: backbone + prediction head + anchors.

``SSD(TinyBackbone(), GridAnchorGenerator(...), num_classes=1, image_size=256, pixel_mean=0,
pixel_std=1/255)`` is the book's TinySSD (1,010,376 parameters); ``SSD(VGG16Backbone(),
SSDDefaultBoxGenerator(300, ...), num_classes=20, image_size=300, ImageNet mean/std)`` is
SSD300 (8732 default boxes, the parameter count of torchvision's ``ssd300_vgg16`` with 21
classes).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from src.models.heads import SSDHead

__all__ = ["AnchorGenerator", "HeadFactory", "SSD", "SSDOutput"]

log = logging.getLogger(__name__)


class SSDOutput(NamedTuple):
    """Raw SSD predictions.

    Attributes:
        cls_logits: ``Tensor[B, A, C + 1]`` logits, class 0 = background, object class k is k+1.
        box_deltas: ``Tensor[B, A, 4]`` offsets w.r.t. the anchors (decode with ``BoxCoder``).
        anchors: ``Tensor[A, 4]`` normalised xyxy, same device/dtype as the images (cached by the
            generator: do not modify it in place).
    """

    cls_logits: Tensor
    box_deltas: Tensor
    anchors: Tensor


class AnchorGenerator(Protocol):
    """What :class:`SSD` needs from an anchor generator (see :mod:`src.detection.anchors`)."""

    def num_anchors_per_location(self) -> list[int]:
        """Anchors per feature-map cell, per level."""
        ...

    def __call__(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        image_size: tuple[int, int],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``Tensor[A, 4]`` normalised xyxy anchors for these feature-map sizes."""
        ...


#: Builds the head: ``factory(in_channels=[C_l], num_anchors_per_location=[k_l], num_classes=C,
#: init=...)``, e.g. ``functools.partial(SSDHead)`` (``conf/head/*.yaml`` with ``_partial_``).
#: The module maps the feature maps to ``(cls_logits[B, A, C+1], box_deltas[B, A, 4])`` in the
#: anchors' order and has ``num_anchors_per_location`` and ``init_background_bias(value)``.
HeadFactory = Callable[..., nn.Module]


def _pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    size = [int(s) for s in image_size]
    if len(size) == 1:
        return (size[0], size[0])
    if len(size) != 2:
        raise ValueError(f"backbone.image_size must be an int or [H, W], got {list(image_size)}")
    return (size[0], size[1])


def _channel_stats(values: float | Sequence[float], key: str) -> Tensor:
    vals = [float(values)] * 3 if isinstance(values, int | float) else [float(v) for v in values]
    if len(vals) != 3:
        raise ValueError(f"{key} needs 3 values (R, G, B), got {vals}")
    return torch.tensor(vals, dtype=torch.float32).view(1, 3, 1, 1)


class SSD(nn.Module):
    """SSD detector.

    Args:
        backbone: module mapping normalised ``Tensor[B, 3, H, W]`` to a list of feature maps,
            with an ``out_channels: list[int]`` attribute (one entry per map) and optionally
            ``head_init`` (how the head is initialised, see :class:`src.models.heads.SSDHead`).
        anchor_generator: e.g. ``GridAnchorGenerator`` or ``SSDDefaultBoxGenerator``; must
            provide ``num_anchors_per_location()`` and
            ``__call__(feature_sizes, image_size, device, dtype) -> Tensor[A, 4]``.
        num_classes: number of object classes ``C`` (background excluded; the head outputs
            ``C + 1`` logits).
        image_size: training/inference input size, ``int`` or ``(H, W)``.
        pixel_mean: per-channel mean subtracted from the ``[0, 1]`` RGB input.
        pixel_std: per-channel std the input is divided by (``1/255`` reproduces the book's
            ``0..255`` input scale).
        head_init: ``"default"``, ``"xavier"`` or ``"normal"``; ``None`` takes
            ``backbone.head_init`` (falling back to ``"default"``).
        head: builds the head (:data:`HeadFactory`, the ``head`` config group); ``None``:
            :class:`src.models.heads.SSDHead`.
        name: the name of the backbone option that built this net (``backbone.name``: tiny,
            vgg16, ...), for messages; ``None`` for a net built by hand.

    Attributes:
        num_classes, image_size (``(H, W)``), name, backbone, head, anchor_generator; buffers
        ``pixel_mean`` / ``pixel_std`` (``[1, 3, 1, 1]`` float32, not saved in state dicts: they
        come from the config).

    Raises:
        ValueError: inconsistent configuration; the message names the disagreeing config keys.
    """

    def __init__(
        self,
        backbone: nn.Module,
        anchor_generator: AnchorGenerator,
        num_classes: int,
        image_size: int | Sequence[int],
        pixel_mean: float | Sequence[float] = (0.0, 0.0, 0.0),
        pixel_std: float | Sequence[float] = (1.0, 1.0, 1.0),
        head_init: str | None = None,
        name: str | None = None,
        head: HeadFactory | None = None,
    ) -> None:
        super().__init__()
        self.name = None if name is None else str(name)
        if int(num_classes) < 1:
            raise ValueError(f"data.num_classes must be >= 1 (object classes), got {num_classes}")
        self.num_classes = int(num_classes)
        self.image_size = _pair(image_size)
        mean = _channel_stats(pixel_mean, "backbone.pixel_mean")
        std = _channel_stats(pixel_std, "backbone.pixel_std")
        if bool((std <= 0).any()):
            raise ValueError(f"backbone.pixel_std must be > 0, got {std.flatten().tolist()}")
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

        out_channels = getattr(backbone, "out_channels", None)
        if out_channels is None:
            raise ValueError(
                f"backbone.net ({type(backbone).__name__}) must expose `out_channels: list[int]`"
            )
        out_channels = [int(c) for c in out_channels]
        num_anchors = [int(k) for k in anchor_generator.num_anchors_per_location()]
        if len(out_channels) != len(num_anchors):
            raise ValueError(
                f"backbone.net ({type(backbone).__name__}) returns {len(out_channels)} feature "
                f"maps but backbone.anchors ({type(anchor_generator).__name__}) defines "
                f"{len(num_anchors)} levels; give the anchor generator one entry per feature map"
            )
        gen_size = getattr(anchor_generator, "image_size", None)
        if gen_size is not None and _pair(gen_size) != self.image_size:
            raise ValueError(
                f"backbone.image_size={list(self.image_size)} but backbone.anchors.image_size="
                f"{gen_size}; make them equal"
            )
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        if head_init is None:
            head_init = getattr(backbone, "head_init", "default")
        self.head = (head or SSDHead)(
            in_channels=out_channels,
            num_anchors_per_location=num_anchors,
            num_classes=self.num_classes,
            init=head_init,
        )
        self._check_head()

    def _check_head(self) -> None:
        expected = [int(k) for k in self.anchor_generator.num_anchors_per_location()]
        if self.head.num_anchors_per_location != expected:
            raise ValueError(
                f"the SSD head predicts {self.head.num_anchors_per_location} anchors per location "
                f"but backbone.anchors ({type(self.anchor_generator).__name__}) generates "
                f"{expected}; rebuild the model (or fix backbone.anchors)"
            )

    def normalize(self, images: Tensor) -> Tensor:
        """``(images - pixel_mean) / pixel_std``; a new tensor (the input is not modified)."""
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def anchors_for(self, features: Sequence[Tensor], images: Tensor) -> Tensor:
        """Anchors ``Tensor[A, 4]`` for these feature maps (cached by the generator)."""
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        return self.anchor_generator(
            sizes, (int(images.shape[-2]), int(images.shape[-1])), images.device, images.dtype
        )

    def forward(self, images: Tensor) -> SSDOutput:
        """Predict class logits and box offsets for every anchor.

        Args:
            images: ``Tensor[B, 3, H, W]`` float RGB in ``[0, 1]``. With a generator that has a
                fixed ``image_size`` (SSD default boxes), ``(H, W)`` must equal it.

        Returns:
            :class:`SSDOutput` ``(cls_logits[B, A, C+1], box_deltas[B, A, 4], anchors[A, 4])``.

        Raises:
            ValueError: wrong input shape, or the backbone / anchors disagree at run time.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"SSD expects images of shape [B, 3, H, W], got {tuple(images.shape)}")
        gen_size = getattr(self.anchor_generator, "image_size", None)
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        if gen_size is not None and _pair(gen_size) != hw:
            raise ValueError(
                f"images are {hw[0]}x{hw[1]} but backbone.image_size is "
                f"{self.image_size[0]}x{self.image_size[1]} (its default boxes are tied to it); "
                "resize the images to backbone.image_size"
            )
        features = self.backbone(self.normalize(images))
        num_levels = len(self.head.num_anchors_per_location)
        if len(features) != num_levels:
            raise ValueError(
                f"backbone.net ({type(self.backbone).__name__}) returned {len(features)} feature "
                f"maps but backbone.anchors defines {num_levels} levels"
            )
        cls_logits, box_deltas = self.head(features)
        anchors = self.anchors_for(features, images)
        if anchors.shape[0] != cls_logits.shape[1]:
            raise ValueError(
                f"backbone.anchors produced {anchors.shape[0]} anchors for feature maps "
                f"{[tuple(f.shape[-2:]) for f in features]} but the head predicts "
                f"{cls_logits.shape[1]}; check backbone.anchors against backbone.net"
            )
        return SSDOutput(cls_logits, box_deltas, anchors)
