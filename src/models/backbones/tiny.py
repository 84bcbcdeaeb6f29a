"""The book's TinySSD feature extractor as an SSD backbone.

Same modules, same names (``blk_0`` .. ``blk_4``) and the same default initialisation as
:class:`src.models.tiny_ssd.TinySSD`; the class / box predictors live in
:class:`src.models.heads.SSDHead`.
"""

from __future__ import annotations

from torch import Tensor, nn

from src.models.tiny_ssd import get_blk

__all__ = ["TinyBackbone"]


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
