"""VGG16 backbone of SSD300 / SSD512 (Liu et al., 2016), laid out as in ``ssd.pytorch``.

Modules (attribute names are the paper's layer names)::

    to_conv4_3: conv1_1 .. relu4_3   (pool3 in ceil mode)     -> l2norm -> source 0 (38 / 64)
    to_fc7:     pool4, conv5_1 .. relu5_3, pool5 (3x3, s1, p1),
                fc6 (3x3, dilation 6, 1024), relu6, fc7 (1x1, 1024), relu7 -> source 1 (19 / 32)
    extras[i]:  conv{8+i}_1 (1x1), relu, conv{8+i}_2, relu                 -> source 2 + i

``to_conv4_3`` and ``to_fc7`` hold exactly the 35 layers of ``ssd.pytorch``'s
``vgg(base['300'], 3)`` list (and the first 30 of torchvision's ``vgg16().features``) in the
same order, so index ``i`` of those lists is :data:`VGG_LAYER_NAMES` ``[i]``.

Extra layers (``extras="ssd300"``, maps 10, 5, 3, 1)::

    conv8: 256 1x1, 512 3x3 s2 p1;  conv9: 128 1x1, 256 3x3 s2 p1;
    conv10: 128 1x1, 256 3x3 p0;    conv11: 128 1x1, 256 3x3 p0

``extras="ssd512"`` (the original Caffe SSD512, maps 16, 8, 4, 2, 1): conv8 and conv9 as above,
conv10 and conv11 ``128 1x1, 256 3x3 s2 p1``, conv12 ``128 1x1, 256 4x4 p1``.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from src.models.backbones.weights import load_torchvision_weights

__all__ = [
    "L2Norm",
    "VGG16Backbone",
    "VGG_CONV_INDICES",
    "VGG_LAYER_NAMES",
    "load_imagenet_vgg16_state_dict",
    "vgg16_imagenet_to_backbone",
    "vgg_layer_path",
]

log = logging.getLogger(__name__)

# ssd.pytorch's base['300']: conv output channels, 'M' max pool, 'C' ceil-mode max pool (pool3).
_VGG_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M",
                             512, 512, 512]  # fmt: skip
_STAGE_SPLIT = 23  # layers [0, 23) end at relu4_3 (ssd.pytorch's `range(23)`)


def _layer_names() -> list[str]:
    names: list[str] = []
    block, idx = 1, 1
    for v in _VGG_CFG:
        if isinstance(v, str):
            names.append(f"pool{block}")
            block, idx = block + 1, 1
        else:
            names += [f"conv{block}_{idx}", f"relu{block}_{idx}"]
            idx += 1
    return [*names, "pool5", "fc6", "relu6", "fc7", "relu7"]


#: Our name of each layer of ssd.pytorch's 35-layer ``vgg`` list (index -> name).
VGG_LAYER_NAMES: list[str] = _layer_names()
#: Indices of the convolutions in that list (conv1_1 .. conv5_3, fc6, fc7).
VGG_CONV_INDICES: list[int] = [
    i for i, n in enumerate(VGG_LAYER_NAMES) if n.startswith(("conv", "fc"))
]


def vgg_layer_path(index: int) -> str:
    """Path inside :class:`VGG16Backbone` of layer ``index`` of ssd.pytorch's ``vgg`` list.

    E.g. ``0 -> "to_conv4_3.conv1_1"``, ``21 -> "to_conv4_3.conv4_3"``, ``31 -> "to_fc7.fc6"``.
    """
    stage = "to_conv4_3" if index < _STAGE_SPLIT else "to_fc7"
    return f"{stage}.{VGG_LAYER_NAMES[index]}"


# extras: per block [(in, out, kernel, stride, padding) of conv_1, of conv_2]
_EXTRAS: dict[str, list[tuple[tuple[int, int, int, int, int], ...]]] = {
    "ssd300": [
        ((1024, 256, 1, 1, 0), (256, 512, 3, 2, 1)),
        ((512, 128, 1, 1, 0), (128, 256, 3, 2, 1)),
        ((256, 128, 1, 1, 0), (128, 256, 3, 1, 0)),
        ((256, 128, 1, 1, 0), (128, 256, 3, 1, 0)),
    ],
    "ssd512": [
        ((1024, 256, 1, 1, 0), (256, 512, 3, 2, 1)),
        ((512, 128, 1, 1, 0), (128, 256, 3, 2, 1)),
        ((256, 128, 1, 1, 0), (128, 256, 3, 2, 1)),
        ((256, 128, 1, 1, 0), (128, 256, 3, 2, 1)),
        ((256, 128, 1, 1, 0), (128, 256, 4, 1, 1)),
    ],
}


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet; SSD's conv4_3).

    ``y = weight[c] * x / (||x||_2 over channels + eps)``, exactly ``ssd.pytorch``'s ``L2Norm``
    (``eps`` added after the square root).

    Args:
        channels: number of channels.
        scale: initial value of every ``weight`` entry (20 in SSD).
        eps: added to the norm.
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.scale = scale
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x: Tensor[B, C, H, W]``; returns a new tensor of the same shape."""
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        return self.weight.view(1, -1, 1, 1) * (x / norm)

    def extra_repr(self) -> str:
        """Channels, initial scale and eps."""
        return f"{self.weight.numel()}, scale={self.scale}, eps={self.eps}"


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1):
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation)


def _vgg_layers() -> list[nn.Module]:
    """The 35 layers of ssd.pytorch's ``vgg(base['300'], 3)``."""
    layers: list[nn.Module] = []
    c_in = 3
    for v in _VGG_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "C":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [_conv(c_in, int(v), 3, padding=1), nn.ReLU(inplace=True)]
            c_in = int(v)
    layers += [
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5
        _conv(512, 1024, 3, padding=6, dilation=6),  # fc6, atrous
        nn.ReLU(inplace=True),
        _conv(1024, 1024, 1),  # fc7
        nn.ReLU(inplace=True),
    ]
    return layers


class VGG16Backbone(nn.Module):
    """SSD's VGG16 (reduced fc6/fc7, atrous fc6) with conv4_3 L2Norm and the extra layers.

    Args:
        pretrained: ``None`` (random init), ``"imagenet"`` (torchvision's
            ``VGG16_Weights.IMAGENET1K_V1``: conv weights copied, fc6/fc7 subsampled from the
            classifier as in the paper, see :func:`vgg16_imagenet_to_backbone`) or the path of
            a file holding a torchvision-format VGG16 state dict.
        extras: ``"ssd300"`` (6 maps: 38, 19, 10, 5, 3, 1 at 300) or ``"ssd512"`` (7 maps:
            64, 32, 16, 8, 4, 2, 1 at 512).
        progress: show a download progress bar (``pretrained="imagenet"`` only).

    Input: ``Tensor[B, 3, H, W]`` normalised with the ImageNet mean/std (done by the SSD).

    Attributes:
        out_channels: ``[512, 1024, 512, 256, 256, 256]`` (+ ``256`` for ``ssd512``).
        head_init: ``"xavier"``: the SSD head uses Xavier-uniform weights, zero biases.

    Raises:
        ValueError: unknown ``extras`` / ``pretrained`` value or a malformed weights file.
        PretrainedWeightsError: the ImageNet weights are neither cached nor downloadable.
    """

    head_init: str = "xavier"

    def __init__(
        self, pretrained: str | None = None, extras: str = "ssd300", progress: bool = True
    ) -> None:
        super().__init__()
        if extras not in _EXTRAS:
            raise ValueError(
                f"backbone.net.extras must be one of {sorted(_EXTRAS)}, got {extras!r}"
            )
        self.extras_name = extras
        layers = _vgg_layers()
        names = VGG_LAYER_NAMES
        self.to_conv4_3 = nn.Sequential(
            OrderedDict(zip(names[:_STAGE_SPLIT], layers[:_STAGE_SPLIT], strict=True))
        )
        self.l2norm = L2Norm(512, scale=20.0, eps=1e-10)
        self.to_fc7 = nn.Sequential(
            OrderedDict(zip(names[_STAGE_SPLIT:], layers[_STAGE_SPLIT:], strict=True))
        )
        blocks = []
        for i, specs in enumerate(_EXTRAS[extras]):
            mods: OrderedDict[str, nn.Module] = OrderedDict()
            for j, (c_in, c_out, k, s, p) in enumerate(specs, start=1):
                mods[f"conv{8 + i}_{j}"] = _conv(c_in, c_out, k, stride=s, padding=p)
                mods[f"relu{8 + i}_{j}"] = nn.ReLU(inplace=True)
            blocks.append(nn.Sequential(mods))
        self.extras = nn.ModuleList(blocks)
        self.out_channels = [512, 1024] + [specs[-1][1] for specs in _EXTRAS[extras]]

        # ssd.pytorch / torchvision: Xavier for the layers that are not from the ImageNet VGG.
        for conv in [self.to_fc7.fc6, self.to_fc7.fc7, *self._extra_convs()]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

        self.pretrained = pretrained
        if pretrained is not None:
            if pretrained == "imagenet":
                state_dict = load_imagenet_vgg16_state_dict(progress=progress)
                source = "torchvision VGG16_Weights.IMAGENET1K_V1"
            elif os.path.isfile(str(pretrained)):
                source = str(pretrained)
                state_dict = torch.load(source, map_location="cpu", weights_only=True)
            else:
                raise ValueError(
                    "backbone.pretrained must be null, 'imagenet' or the path of a torchvision "
                    f"VGG16 state dict file; got {pretrained!r} (no such file)"
                )
            self.load_state_dict(vgg16_imagenet_to_backbone(state_dict, source), strict=False)
            log.info("VGG16 backbone initialised from %s", source)

    def _extra_convs(self) -> list[nn.Conv2d]:
        return [m for m in self.extras.modules() if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Compute the SSD source feature maps.

        Args:
            x: ``Tensor[B, 3, H, W]`` float, normalised.

        Returns:
            ``[l2norm(conv4_3), fc7, conv8_2, conv9_2, ...]``, each ``Tensor[B, C_l, H_l, W_l]``
            (SSD300: 38, 19, 10, 5, 3, 1; SSD512: 64, 32, 16, 8, 4, 2, 1).
        """
        x = self.to_conv4_3(x)
        features = [self.l2norm(x)]
        x = self.to_fc7(x)
        features.append(x)
        for block in self.extras:
            x = block(x)
            features.append(x)
        return features


def load_imagenet_vgg16_state_dict(progress: bool = True) -> dict[str, Tensor]:
    """Torchvision's ImageNet VGG16 weights, through torchvision's weights API (torch hub cache).

    The file is looked up at ``<torch hub dir>/checkpoints/vgg16-397923af.pth`` (by default
    ``$TORCH_HOME/hub/checkpoints/``) and downloaded there if missing
    (:func:`src.models.backbones.weights.load_torchvision_weights`).

    Args:
        progress: show a progress bar while downloading.

    Returns:
        The torchvision VGG16 state dict (``features.*``, ``classifier.*``) on CPU.

    Raises:
        PretrainedWeightsError: no cached file and the download failed (e.g. offline), or the
            cached file is unreadable; the message names the URL and the exact path to use.
    """
    from torchvision.models import VGG16_Weights

    return load_torchvision_weights(VGG16_Weights.IMAGENET1K_V1, "ImageNet VGG16", progress)


def vgg16_imagenet_to_backbone(
    state_dict: Mapping[str, Tensor], source: str = "state dict"
) -> dict[str, Tensor]:
    """Map a torchvision VGG16 state dict onto :class:`VGG16Backbone` keys (paper's fc reduction).

    * ``features.{i}`` (conv1_1 .. conv5_3) -> ``to_conv4_3.<name>`` / ``to_fc7.<name>``;
    * fc6: ``classifier.0.weight`` ``[4096, 25088]`` -> ``[4096, 512, 7, 7]``, every 4th output
      channel and every 3rd spatial tap -> ``[1024, 512, 3, 3]``; bias every 4th;
    * fc7: ``classifier.3.weight`` ``[4096, 4096]`` -> every 4th output and input ->
      ``[1024, 1024, 1, 1]``; bias every 4th.

    Args:
        state_dict: torchvision ``vgg16()`` state dict.
        source: where it came from, for error messages.

    Returns:
        A new dict (``l2norm`` and ``extras`` are not included); the input is not modified.

    Raises:
        ValueError: a key is missing or has the wrong shape.
    """
    expected: dict[str, tuple[int, ...]] = {}
    c_in = 3
    conv_names = [n for n in VGG_LAYER_NAMES if n.startswith("conv")]
    for name, idx in zip(conv_names, VGG_CONV_INDICES, strict=False):
        c_out = 64 * 2 ** min(int(name[4]) - 1, 3)
        expected[f"features.{idx}.weight"] = (c_out, c_in, 3, 3)
        expected[f"features.{idx}.bias"] = (c_out,)
        c_in = c_out
    expected |= {
        "classifier.0.weight": (4096, 512 * 7 * 7),
        "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096),
        "classifier.3.bias": (4096,),
    }
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(f"{source} is not a torchvision VGG16 state dict: missing keys {missing}")
    bad = [
        f"{k}: {tuple(state_dict[k].shape)} (expected {shape})"
        for k, shape in expected.items()
        if tuple(state_dict[k].shape) != shape
    ]
    if bad:
        raise ValueError(f"{source} is not a torchvision VGG16 state dict: wrong shapes {bad}")

    out: dict[str, Tensor] = {}
    for idx in VGG_CONV_INDICES[: len(conv_names)]:
        out[f"{vgg_layer_path(idx)}.weight"] = state_dict[f"features.{idx}.weight"]
        out[f"{vgg_layer_path(idx)}.bias"] = state_dict[f"features.{idx}.bias"]
    fc6 = state_dict["classifier.0.weight"].reshape(4096, 512, 7, 7)
    out["to_fc7.fc6.weight"] = fc6[::4, :, ::3, ::3].clone()
    out["to_fc7.fc6.bias"] = state_dict["classifier.0.bias"][::4].clone()
    out["to_fc7.fc7.weight"] = state_dict["classifier.3.weight"][::4, ::4].reshape(1024, 1024, 1, 1)
    out["to_fc7.fc7.bias"] = state_dict["classifier.3.bias"][::4].clone()
    return out
