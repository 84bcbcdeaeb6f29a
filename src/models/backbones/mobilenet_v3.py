"""MobileNetV3-Large feature extractor of SSDLite320, built as torchvision builds it.

torchvision's ``ssdlite320_mobilenet_v3_large`` (Howard et al., 2019, section 6.3):
``mobilenet_v3_large`` with BatchNorm ``eps=0.001, momentum=0.03``, the reduced tail (C5 at half
width) unless ImageNet weights are loaded, ``N(0, 0.03)`` initialisation of every convolution
when it is trained from scratch, and ``SSDLiteFeatureExtractorMobileNet`` on top: six maps,
20, 10, 5, 3, 2, 1 at 320 x 320 input::

    features[0]: conv1 .. the expansion (1x1) layer of the C4 block       -> 672 x 20 x 20
    features[1]: C4's depthwise conv .. the last 1x1 conv (C5)            -> 480 (960) x 10 x 10
    extra[0..3]: 1x1 to half width, 3x3 depthwise stride 2, 1x1 (ReLU6)    -> 512, 256, 256, 128

The blocks are torchvision's (:func:`torchvision.models.mobilenet_v3_large`,
``torchvision.models.detection.ssdlite._mobilenet_extractor``), not copies; the module names
are theirs too (``features.*``, ``extra.*``), so with :class:`src.models.heads.SSDLiteHead`
the state dict of :class:`src.models.ssd.SSD` has the keys of torchvision's SSDLite.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models import MobileNet_V3_Large_Weights, mobilenet_v3_large
from torchvision.models.detection.ssdlite import _mobilenet_extractor, _normal_init

from src.models.backbones.weights import load_torchvision_weights

__all__ = ["MobileNetV3Backbone", "ssdlite_norm_layer"]

log = logging.getLogger(__name__)

#: torchvision SSDLite's BatchNorm (``partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)``).
ssdlite_norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class MobileNetV3Backbone(nn.Module):
    """SSDLite's MobileNetV3-Large feature extractor (six maps).

    Args:
        pretrained: ``None`` (random init, torchvision's ``N(0, 0.03)``), ``"imagenet"``
            (torchvision's ``MobileNet_V3_Large_Weights.IMAGENET1K_V1``, the backbone weights
            torchvision's SSDLite starts from; read from the torch hub cache,
            ``$TORCH_HOME/hub/checkpoints/mobilenet_v3_large-8738ca79.pth``) or the path of a
            file holding a torchvision ``mobilenet_v3_large`` state dict.
        reduced_tail: halve the channels of the last blocks (C5), as the MobileNetV3 paper's
            Table 6 does for detection; ``None``: torchvision's rule, reduced only when no
            pre-trained weights are loaded (the ImageNet weights have the full tail).
        trainable_layers: how many of the 6 stages, counted from the last, train; the others
            are frozen (``requires_grad=False``). torchvision's default 6: all of them.
        progress: show a download progress bar (``pretrained="imagenet"`` only).

    Input: ``Tensor[B, 3, H, W]`` normalised by the SSD (torchvision's SSDLite: ``(x - 0.5) /
    0.5``, i.e. ``[-1, 1]``).

    Attributes:
        features: the two MobileNetV3 stages (``nn.Sequential``), torchvision's layout.
        extra: the four extra blocks (``nn.ModuleList``).
        out_channels: ``[672, 480, 512, 256, 256, 128]`` (``960`` for the second map with
            the full tail).
        head_init: ``"normal"``: the head uses torchvision SSDLite's ``N(0, 0.03)``.

    Raises:
        ValueError: a bad ``pretrained`` / ``trainable_layers`` value or a weights file that
            does not fit (the message names the key to change).
        PretrainedWeightsError: the ImageNet weights are neither cached nor downloadable.
    """

    head_init: str = "normal"

    def __init__(
        self,
        pretrained: str | None = None,
        reduced_tail: bool | None = None,
        trainable_layers: int = 6,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if not 0 <= int(trainable_layers) <= 6:
            raise ValueError(
                f"backbone.net.trainable_layers must be in 0..6, got {trainable_layers}"
            )
        self.pretrained = pretrained
        self.reduced_tail = (pretrained is None) if reduced_tail is None else bool(reduced_tail)
        net = mobilenet_v3_large(norm_layer=ssdlite_norm_layer, reduced_tail=self.reduced_tail)
        if pretrained is None:
            _normal_init(net)  # torchvision: "change the default initialization scheme"
        else:
            state_dict, source = self._read_weights(str(pretrained), progress)
            try:
                net.load_state_dict(state_dict)
            except RuntimeError as err:
                raise ValueError(
                    f"{source} does not fit MobileNetV3-Large with reduced_tail="
                    f"{self.reduced_tail} ({str(err).splitlines()[0]}); the ImageNet weights "
                    "need backbone.net.reduced_tail=null (or false)"
                ) from err
            log.info("MobileNetV3-Large backbone initialised from %s", source)
        extractor = _mobilenet_extractor(net, int(trainable_layers), ssdlite_norm_layer)
        self.features = extractor.features
        self.extra = extractor.extra
        self.out_channels = [
            int(self.features[0][-1].out_channels),
            int(self.features[1][-1].out_channels),
            *(int(block[-1].out_channels) for block in self.extra),
        ]

    @staticmethod
    def _read_weights(pretrained: str, progress: bool) -> tuple[dict[str, Tensor], str]:
        if pretrained == "imagenet":
            weights = MobileNet_V3_Large_Weights.IMAGENET1K_V1
            state_dict = load_torchvision_weights(weights, "ImageNet MobileNetV3-Large", progress)
            return state_dict, "torchvision MobileNet_V3_Large_Weights.IMAGENET1K_V1"
        if os.path.isfile(pretrained):
            return torch.load(pretrained, map_location="cpu", weights_only=True), pretrained
        raise ValueError(
            "backbone.pretrained must be null, 'imagenet' or the path of a torchvision "
            f"mobilenet_v3_large state dict file; got {pretrained!r} (no such file)"
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Compute the six SSDLite feature maps.

        Args:
            x: ``Tensor[B, 3, H, W]`` float, normalised.

        Returns:
            Six ``Tensor[B, C_l, H_l, W_l]``, finest first (20, 10, 5, 3, 2, 1 at 320).
        """
        features = []
        for block in [*self.features, *self.extra]:
            x = block(x)
            features.append(x)
        return features
