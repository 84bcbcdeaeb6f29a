"""TinySSD, verbatim from *Dive into Deep Learning*, section 14.7 (Single Shot Multibox Detection).

This module keeps the book's code as written (helper functions, module-level ``sizes`` /
``ratios``, ``blk_i`` / ``cls_i`` / ``bbox_i`` attributes, the book's return values) so that
results can be compared with the book line by line. Only ``d2l.multibox_prior`` is replaced
by :func:`src.detection.anchors.multibox_prior`, which computes the same anchors, and the
feature blocks (``down_sample_blk``, ``base_net``, ``get_blk``) live in
:mod:`src.models.backbones.tiny`, which this module imports (the book's code there is unchanged).

The book feeds raw ``0..255`` float pixels to this network. The configurable equivalent used
by the training pipeline is :class:`src.models.ssd.SSD` with
:class:`src.models.backbones.tiny.TinyBackbone`, ``pixel_mean=0`` and ``pixel_std=1/255``
(``conf/backbone/tiny.yaml``); :func:`src.models.convert.convert_tiny_ssd_state_dict` maps the
weights of this class onto it.

With ``num_classes=1`` the network has 1,010,376 parameters and, on a ``256 x 256`` input,
5444 anchors (feature maps 32, 16, 8, 4 and 1, four anchors per location).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from src.detection.anchors import multibox_prior
from src.models.backbones.tiny import base_net, down_sample_blk, get_blk

__all__ = [
    "TinySSD",
    "base_net",
    "bbox_predictor",
    "blk_forward",
    "cls_predictor",
    "concat_preds",
    "down_sample_blk",
    "flatten_pred",
    "get_blk",
    "num_anchors",
    "ratios",
    "sizes",
]


def cls_predictor(num_inputs: int, num_anchors: int, num_classes: int) -> nn.Conv2d:
    """Class prediction layer: ``num_anchors * (num_classes + 1)`` channels, 3x3, padding 1."""
    return nn.Conv2d(num_inputs, num_anchors * (num_classes + 1), kernel_size=3, padding=1)


def bbox_predictor(num_inputs: int, num_anchors: int) -> nn.Conv2d:
    """Bounding box prediction layer: ``num_anchors * 4`` channels, 3x3, padding 1."""
    return nn.Conv2d(num_inputs, num_anchors * 4, kernel_size=3, padding=1)


def flatten_pred(pred: Tensor) -> Tensor:
    """``Tensor[B, C, H, W] -> Tensor[B, H*W*C]`` (channels last, then flattened)."""
    return torch.flatten(pred.permute(0, 2, 3, 1), start_dim=1)


def concat_preds(preds: list[Tensor]) -> Tensor:
    """Flatten the per-level predictions and concatenate them: ``Tensor[B, sum_l H_l*W_l*C_l]``."""
    return torch.cat([flatten_pred(p) for p in preds], dim=1)


def blk_forward(
    X: Tensor,  # noqa: N803 (the book's name)
    blk: nn.Module,
    size: list[float],
    ratio: list[float],
    cls_predictor: nn.Module,
    bbox_predictor: nn.Module,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level: feature map, its anchors ``[1, H*W*k, 4]`` and raw class / box predictions."""
    Y = blk(X)
    anchors = multibox_prior(Y, sizes=size, ratios=ratio)
    cls_preds = cls_predictor(Y)
    bbox_preds = bbox_predictor(Y)
    return (Y, anchors, cls_preds, bbox_preds)


sizes = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
ratios = [[1, 2, 0.5]] * 5
num_anchors = len(sizes[0]) + len(ratios[0]) - 1


class TinySSD(nn.Module):
    """The book's TinySSD.

    Args:
        num_classes: number of object classes ``q`` (background excluded).

    ``forward(X)`` takes ``Tensor[B, 3, H, W]`` float images with raw ``0..255`` pixel values
    (as in the book) and returns ``(anchors, cls_preds, bbox_preds)``:

    * ``anchors``: ``Tensor[1, A, 4]`` float32, normalised xyxy (``A = 5444`` at 256x256);
    * ``cls_preds``: ``Tensor[B, A, q + 1]`` logits, class 0 = background;
    * ``bbox_preds``: ``Tensor[B, A * 4]`` offsets, flattened the book's way.
    """

    def __init__(self, num_classes: int, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.num_classes = num_classes
        idx_to_in_channels = [64, 128, 128, 128, 128]
        for i in range(5):
            # Equivalent to the assignment statement `self.blk_i = get_blk(i)`
            setattr(self, f"blk_{i}", get_blk(i))
            setattr(
                self, f"cls_{i}", cls_predictor(idx_to_in_channels[i], num_anchors, num_classes)
            )
            setattr(self, f"bbox_{i}", bbox_predictor(idx_to_in_channels[i], num_anchors))

    def forward(self, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # noqa: N803
        """Run the five levels; see the class docstring for shapes."""
        anchors, cls_preds, bbox_preds = [None] * 5, [None] * 5, [None] * 5
        for i in range(5):
            # Here `getattr(self, 'blk_%d' % i)` accesses `self.blk_i`
            X, anchors[i], cls_preds[i], bbox_preds[i] = blk_forward(
                X,
                getattr(self, f"blk_{i}"),
                sizes[i],
                ratios[i],
                getattr(self, f"cls_{i}"),
                getattr(self, f"bbox_{i}"),
            )
        anchors = torch.cat(anchors, dim=1)
        cls_preds = concat_preds(cls_preds)
        cls_preds = cls_preds.reshape(cls_preds.shape[0], -1, self.num_classes + 1)
        bbox_preds = concat_preds(bbox_preds)
        return anchors, cls_preds, bbox_preds
