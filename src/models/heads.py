"""SSD prediction heads, chosen by the ``head`` config group (``conf/head/*.yaml``).

* :class:`SSDHead` (``head=ssd``): one 3x3 class and one 3x3 box predictor per feature level.
* :class:`SSDLiteHead` (``head=ssdlite``): torchvision's SSDLite head, a depthwise-separable
  predictor (3x3 depthwise + BatchNorm + ReLU6, then 1x1) per level.

Every head is built as ``Head(in_channels, num_anchors_per_location, num_classes, init)`` and
returns ``(cls_logits[B, A, C + 1], box_deltas[B, A, 4])`` in the anchors' order
(:func:`flatten_predictions`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import ssdlite

__all__ = ["SSDHead", "SSDLiteHead", "flatten_predictions", "init_convs"]

_INITS = ("default", "xavier", "normal")


def init_convs(module: nn.Module, init: str) -> None:
    """Initialise every ``Conv2d`` inside ``module`` in place.

    Args:
        module: the head (or any module).
        init: ``"default"``: PyTorch's own (``reset_parameters``, the book); ``"xavier"``:
            Xavier-uniform weights, zero biases (``ssd.pytorch``, torchvision's SSD300);
            ``"normal"``: ``N(0, 0.03)`` weights, zero biases (torchvision's SSDLite).

    Raises:
        ValueError: another ``init``.
    """
    if init not in _INITS:
        raise ValueError(f"head init must be one of {_INITS}, got {init!r}")
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if init == "default":
            conv.reset_parameters()
            continue
        if init == "xavier":
            nn.init.xavier_uniform_(conv.weight)
        else:
            nn.init.normal_(conv.weight, mean=0.0, std=0.03)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


def flatten_predictions(preds: Sequence[Tensor], last_dim: int) -> Tensor:
    """Flatten per-level predictions the book's way and concatenate them.

    Each ``Tensor[B, k_l * D, H_l, W_l]`` is permuted to channels-last and flattened
    (``permute(0, 2, 3, 1).flatten(1)``), the levels are concatenated, and the result is
    reshaped to ``[B, A, D]``. Anchor ``a`` is therefore ordered level by level, then row by
    row, column by column, then anchor shape: the order of
    :mod:`src.detection.anchors`.

    Args:
        preds: per-level raw predictor outputs.
        last_dim: ``D`` (``C + 1`` for class logits, ``4`` for box offsets).

    Returns:
        ``Tensor[B, A, D]`` with ``A = sum_l H_l * W_l * k_l``.
    """
    flat = torch.cat([p.permute(0, 2, 3, 1).flatten(1) for p in preds], dim=1)
    return flat.reshape(flat.shape[0], -1, last_dim)


class SSDHead(nn.Module):
    """Per-level 3x3 convolutional class and box predictors.

    Level ``l`` has ``cls_predictors[l]: Conv2d(in_channels[l], k_l * (C + 1), 3, padding=1)``
    and ``box_predictors[l]: Conv2d(in_channels[l], k_l * 4, 3, padding=1)``; channel
    ``j * (C + 1) + c`` of a class predictor is the logit of class ``c`` (0 = background) for
    anchor shape ``j``, and channel ``j * 4 + i`` of a box predictor is offset ``i`` of shape
    ``j`` (the layout of the book and of ``ssd.pytorch``).

    Args:
        in_channels: channels of each feature map (the backbone's ``out_channels``).
        num_anchors_per_location: ``k_l``, anchors per cell of each level (the anchor
            generator's ``num_anchors_per_location()``).
        num_classes: number of object classes ``C`` (background excluded).
        init: ``"default"`` keeps PyTorch's initialisation (the book); ``"xavier"`` uses
            Xavier-uniform weights and zero biases (``ssd.pytorch`` / torchvision);
            ``"normal"`` ``N(0, 0.03)`` and zero biases (see :func:`init_convs`).

    Attributes:
        name: ``"ssd"``, its ``head`` option (``conf/head/ssd.yaml``).

    Raises:
        ValueError: on inconsistent arguments.
    """

    name: str = "ssd"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors_per_location: Sequence[int],
        num_classes: int,
        init: str = "default",
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors_per_location):
            raise ValueError(
                f"SSDHead: {len(in_channels)} feature levels (in_channels={list(in_channels)}) but "
                f"{len(num_anchors_per_location)} anchors-per-location entries "
                f"({list(num_anchors_per_location)}); give one per level"
            )
        if int(num_classes) < 1:
            raise ValueError(f"SSDHead: num_classes must be >= 1, got {num_classes}")
        if init not in _INITS:
            raise ValueError(f"SSDHead: init must be one of {_INITS}, got {init!r}")
        self.num_classes = int(num_classes)
        self.in_channels = [int(c) for c in in_channels]
        self.num_anchors_per_location = [int(k) for k in num_anchors_per_location]
        q1 = self.num_classes + 1
        self.cls_predictors = nn.ModuleList(
            nn.Conv2d(c, k * q1, kernel_size=3, padding=1)
            for c, k in zip(self.in_channels, self.num_anchors_per_location, strict=True)
        )
        self.box_predictors = nn.ModuleList(
            nn.Conv2d(c, k * 4, kernel_size=3, padding=1)
            for c, k in zip(self.in_channels, self.num_anchors_per_location, strict=True)
        )
        if init != "default":  # the book's "default" keeps the constructors' initialisation
            init_convs(self, init)

    @torch.no_grad()
    def init_background_bias(self, value: float | None) -> None:
        """Set every level's background-logit bias to ``value`` and the other class biases to 0.

        Used with a focal-loss prior (``MultiBoxLoss.background_bias``) so that training starts
        predicting background with high probability. ``None`` leaves the head unchanged.

        Args:
            value: bias of class 0 (background) for every anchor shape of every level.
        """
        if value is None:
            return
        for conv, k in zip(self.cls_predictors, self.num_anchors_per_location, strict=True):
            bias = torch.zeros(k, self.num_classes + 1, dtype=conv.bias.dtype)
            bias[:, 0] = float(value)
            conv.bias.copy_(bias.reshape(-1))

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Predict class logits and box offsets for every anchor.

        Args:
            features: per-level ``Tensor[B, in_channels[l], H_l, W_l]``.

        Returns:
            ``(cls_logits[B, A, C + 1], box_deltas[B, A, 4])`` in the anchors' order.

        Raises:
            ValueError: if the number of feature maps differs from the number of levels.
        """
        if len(features) != len(self.cls_predictors):
            raise ValueError(
                f"SSDHead got {len(features)} feature maps but was built for "
                f"{len(self.cls_predictors)} levels"
            )
        cls = [p(f) for p, f in zip(self.cls_predictors, features, strict=True)]
        box = [p(f) for p, f in zip(self.box_predictors, features, strict=True)]
        return flatten_predictions(cls, self.num_classes + 1), flatten_predictions(box, 4)


class SSDLiteHead(ssdlite.SSDLiteHead):
    """torchvision's SSDLite head: per level a depthwise-separable class and box predictor.

    Level ``l`` has ``classification_head.module_list[l]``: 3x3 depthwise conv, BatchNorm,
    ReLU6, then ``Conv2d(in_channels[l], k_l * (C + 1), 1)``, and
    ``regression_head.module_list[l]`` the same with ``k_l * 4`` outputs: torchvision's modules
    and names (``torchvision.models.detection.ssdlite.SSDLiteHead``), built with ``C + 1``
    classes. The channel layout is :class:`SSDHead`'s, so the outputs come in the anchors' order.

    Args:
        in_channels: channels of each feature map (the backbone's ``out_channels``).
        num_anchors_per_location: ``k_l`` per level (the anchor generator's).
        num_classes: number of object classes ``C`` (background excluded).
        init: ``"normal"`` (torchvision's ``N(0, 0.03)``, zero biases), ``"xavier"`` or
            ``"default"`` (see :func:`init_convs`); BatchNorm layers keep ones and zeros.
        norm_layer: the BatchNorm; default torchvision SSDLite's (``eps=0.001,
            momentum=0.03``).

    Attributes:
        name: ``"ssdlite"``, its ``head`` option (``conf/head/ssdlite.yaml``).

    Raises:
        ValueError: on inconsistent arguments.
    """

    name: str = "ssdlite"

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors_per_location: Sequence[int],
        num_classes: int,
        init: str = "normal",
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        if len(in_channels) != len(num_anchors_per_location):
            raise ValueError(
                f"SSDLiteHead: {len(in_channels)} feature levels (in_channels="
                f"{list(in_channels)}) but {len(num_anchors_per_location)} anchors-per-location "
                f"entries ({list(num_anchors_per_location)}); give one per level"
            )
        if int(num_classes) < 1:
            raise ValueError(f"SSDLiteHead: num_classes must be >= 1, got {num_classes}")
        if init not in _INITS:
            raise ValueError(f"SSDLiteHead: init must be one of {_INITS}, got {init!r}")
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
        channels = [int(c) for c in in_channels]
        per_location = [int(k) for k in num_anchors_per_location]
        super().__init__(channels, per_location, int(num_classes) + 1, norm_layer)
        self.num_classes = int(num_classes)
        self.in_channels = channels
        self.num_anchors_per_location = per_location
        if init != "normal":  # torchvision's constructors already drew N(0, 0.03)
            init_convs(self, init)

    @torch.no_grad()
    def init_background_bias(self, value: float | None) -> None:
        """Set the background-logit bias of every level to ``value``, the other class biases to 0.

        See :meth:`SSDHead.init_background_bias`; here the bias is that of each level's last
        (1x1) class convolution. ``None`` leaves the head unchanged.
        """
        if value is None:
            return
        for block, k in zip(
            self.classification_head.module_list, self.num_anchors_per_location, strict=True
        ):
            conv = block[-1]
            bias = torch.zeros(k, self.num_classes + 1, dtype=conv.bias.dtype)
            bias[:, 0] = float(value)
            conv.bias.copy_(bias.reshape(-1))

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Predict class logits and box offsets for every anchor.

        Args:
            features: per-level ``Tensor[B, in_channels[l], H_l, W_l]``.

        Returns:
            ``(cls_logits[B, A, C + 1], box_deltas[B, A, 4])`` in the anchors' order.

        Raises:
            ValueError: if the number of feature maps differs from the number of levels.
        """
        if len(features) != len(self.num_anchors_per_location):
            raise ValueError(
                f"SSDLiteHead got {len(features)} feature maps but was built for "
                f"{len(self.num_anchors_per_location)} levels"
            )
        features = list(features)
        return self.classification_head(features), self.regression_head(features)
