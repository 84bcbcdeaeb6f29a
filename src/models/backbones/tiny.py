"""The book's TinySSD feature extractor as an SSD backbone, and the book's feature blocks.

``down_sample_blk``, ``base_net`` and ``get_blk`` are the book's code (*Dive into Deep
Learning* 14.7) verbatim; :mod:`src.models.tiny_ssd` (the book's whole network) imports them
from here. :class:`TinyBackbone` has the same modules, names (``blk_0`` .. ``blk_4``) and
default initialisation as :class:`src.models.tiny_ssd.TinySSD`; the class / box predictors
live in :class:`src.models.heads.SSDHead`.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TinyBackbone", "base_net", "down_sample_blk", "get_blk"]


def down_sample_blk(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two (3x3 conv, BatchNorm, ReLU) followed by a 2x2 max pool: halves height and width."""
    blk = []
    for _ in range(2):
        blk.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        blk.append(nn.BatchNorm2d(out_channels))
        blk.append(nn.ReLU())
        in_channels = out_channels
    blk.append(nn.MaxPool2d(2))
    return nn.Sequential(*blk)


def base_net() -> nn.Sequential:
    """Three down-sampling blocks, channels 3 -> 16 -> 32 -> 64 (256x256 -> 32x32)."""
    blk = []
    num_filters = [3, 16, 32, 64]
    for i in range(len(num_filters) - 1):
        blk.append(down_sample_blk(num_filters[i], num_filters[i + 1]))
    return nn.Sequential(*blk)


def get_blk(i: int) -> nn.Module:
    """The ``i``-th of TinySSD's five feature blocks (base net, 3 down-sampling blocks, pool)."""
    if i == 0:
        blk = base_net()
    elif i == 1:
        blk = down_sample_blk(64, 128)
    elif i == 4:
        blk = nn.AdaptiveMaxPool2d((1, 1))
    else:
        blk = down_sample_blk(128, 128)
    return blk


class TinyBackbone(nn.Module):
    """Base net (3 down-sampling blocks), 3 more down-sampling blocks and a global max pool.

    On a ``256 x 256`` input the five feature maps are ``64x32x32``, ``128x16x16``,
    ``128x8x8``, ``128x4x4`` and ``128x1x1``.

    The book feeds raw ``0..255`` pixels: use ``pixel_mean=(0, 0, 0)`` and
    ``pixel_std=(1/255,) * 3`` in :class:`src.models.ssd.SSD` (``conf/backbone/tiny.yaml``).

    Attributes:
        out_channels: channels of each returned feature map, ``[64, 128, 128, 128, 128]``.
        head_init: initialisation the SSD head should use (``"default"``: PyTorch's, as the book).
    """

    out_channels: list[int]
    head_init: str = "default"

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = [64, 128, 128, 128, 128]
        for i in range(5):
            self.add_module(f"blk_{i}", get_blk(i))

    def forward(self, x: Tensor) -> list[Tensor]:
        """Compute the feature pyramid.

        Args:
            x: ``Tensor[B, 3, H, W]`` float, already normalised by the SSD.

        Returns:
            Five ``Tensor[B, C_l, H_l, W_l]``, finest first.
        """
        features = []
        for i in range(5):
            x = getattr(self, f"blk_{i}")(x)
            features.append(x)
        return features
