"""SSD300 / SSD512 with the VGG16 backbone: structure, golden counts, ImageNet weights loading."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from src.detection.anchors import SSDDefaultBoxGenerator, ssd_default_boxes
from src.models.backbones.vgg16 import (
    VGG_CONV_INDICES,
    VGG_LAYER_NAMES,
    L2Norm,
    VGG16Backbone,
    vgg_layer_path,
)
from src.models.backbones.weights import PretrainedWeightsError
from src.models.ssd import SSD

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SSD300_BOXES = dict(
    image_size=300,
    steps=[8, 16, 32, 64, 100, 300],
    min_sizes=[30, 60, 111, 162, 213, 264],
    max_sizes=[60, 111, 162, 213, 264, 315],
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
)
SSD512_BOXES = dict(
    image_size=512,
    steps=[8, 16, 32, 64, 128, 256, 512],
    min_sizes=[35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8],
    max_sizes=[76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6],
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
)
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG_FILE = "vgg16-397923af.pth"


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def ssd300(num_classes: int = 20, **backbone_kwargs) -> SSD:
    return SSD(
        VGG16Backbone(**backbone_kwargs),
        SSDDefaultBoxGenerator(**SSD300_BOXES),
        num_classes=num_classes,
        image_size=300,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
    )


def feature_sizes(model: SSD, images: torch.Tensor) -> tuple[list[tuple[int, int, int]], object]:
    seen: list[torch.Tensor] = []
    handle = model.backbone.register_forward_hook(lambda m, i, o: seen.extend(o))
    with torch.no_grad():
        out = model(images)
    handle.remove()
    return [tuple(f.shape[1:]) for f in seen], out


def test_ssd300_parameter_count_equals_torchvision() -> None:
    ours = ssd300(num_classes=20)
    # built without weights; on the meta device to skip allocating/initialising the 138M
    # parameters of the full VGG16 torchvision constructs first (the structure is the same)
    with torch.device("meta"):
        ref = torchvision.models.detection.ssd300_vgg16(
            weights=None, weights_backbone=None, num_classes=21
        )
    assert n_params(ours) == n_params(ref) == 26_285_486
    assert n_params(ours.backbone) == n_params(ref.backbone)  # incl. the L2Norm scale
    assert n_params(ours.head) == n_params(ref.head)
    assert ours.head.num_anchors_per_location == [4, 6, 6, 6, 4, 4]
    assert ref.anchor_generator.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]


def test_layer_structure_matches_ssd_pytorch() -> None:
    backbone = VGG16Backbone()
    layers = [*backbone.to_conv4_3, *backbone.to_fc7]
    assert len(layers) == len(VGG_LAYER_NAMES) == 35
    assert VGG_CONV_INDICES == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33]
    assert vgg_layer_path(21) == "to_conv4_3.conv4_3" and vgg_layer_path(33) == "to_fc7.fc7"
    pools = [(i, m) for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    assert [i for i, _ in pools] == [4, 9, 16, 23, 30]
    assert [m.ceil_mode for _, m in pools] == [False, False, True, False, False]
    pool5 = pools[-1][1]
    assert (pool5.kernel_size, pool5.stride, pool5.padding) == (3, 1, 1)
    fc6, fc7 = backbone.to_fc7.fc6, backbone.to_fc7.fc7
    assert (
        fc6.weight.shape == (1024, 512, 3, 3) and fc6.dilation == (6, 6) and fc6.padding == (6, 6)
    )
    assert fc7.weight.shape == (1024, 1024, 1, 1)
    assert isinstance(backbone.l2norm, L2Norm)
    convs = [m for m in backbone.extras.modules() if isinstance(m, nn.Conv2d)]
    spec = [
        (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs
    ]
    assert spec == [
        (1024, 256, 1, 1, 0), (256, 512, 3, 2, 1),
        (512, 128, 1, 1, 0), (128, 256, 3, 2, 1),
        (256, 128, 1, 1, 0), (128, 256, 3, 1, 0),
        (256, 128, 1, 1, 0), (128, 256, 3, 1, 0),
    ]  # fmt: skip
    relus = [m for m in backbone.extras.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == len(convs)
    assert backbone.out_channels == [512, 1024, 512, 256, 256, 256]


def test_ssd300_forward() -> None:
    model = ssd300(num_classes=20).eval()
    sizes, out = feature_sizes(model, torch.rand(1, 3, 300, 300))
    assert sizes == [(512, 38, 38), (1024, 19, 19), (512, 10, 10), (256, 5, 5), (256, 3, 3),
                     (256, 1, 1)]  # fmt: skip
    assert out.anchors.shape == (8732, 4)
    assert out.cls_logits.shape == (1, 8732, 21) and out.box_deltas.shape == (1, 8732, 4)
    expected = ssd_default_boxes([38, 19, 10, 5, 3, 1], **SSD300_BOXES)
    torch.testing.assert_close(out.anchors, expected)


def test_ssd512_structure_and_forward() -> None:
    model = SSD(
        VGG16Backbone(extras="ssd512"),
        SSDDefaultBoxGenerator(**SSD512_BOXES),
        num_classes=20,
        image_size=512,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
    ).eval()
    assert model.backbone.out_channels == [512, 1024, 512, 256, 256, 256, 256]
    assert model.head.num_anchors_per_location == [4, 6, 6, 6, 6, 4, 4]
    conv12_2 = model.backbone.extras[4].conv12_2
    assert (conv12_2.kernel_size, conv12_2.padding) == ((4, 4), (1, 1))
    sizes, out = feature_sizes(model, torch.rand(1, 3, 512, 512))
    assert [s[1] for s in sizes] == [64, 32, 16, 8, 4, 2, 1]
    assert out.anchors.shape == (24564, 4)
    assert out.cls_logits.shape == (1, 24564, 21)


def test_l2norm_matches_definition() -> None:
    norm = L2Norm(6)
    assert torch.equal(norm.weight.detach(), torch.full((6,), 20.0)) and norm.eps == 1e-10
    with torch.no_grad():
        norm.weight.uniform_(1, 3)
    x = torch.randn(2, 6, 4, 5)
    x_copy = x.clone()
    y = norm(x)
    assert torch.equal(x, x_copy)
    expected = norm.weight.view(1, -1, 1, 1) * F.normalize(x, dim=1)
    torch.testing.assert_close(y, expected)
    assert torch.equal(norm(torch.zeros(1, 6, 1, 1)), torch.zeros(1, 6, 1, 1))  # eps: no NaN


def test_backbone_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"backbone\.net\.extras"):
        VGG16Backbone(extras="ssd600")
    with pytest.raises(ValueError, match=r"backbone\.pretrained"):
        VGG16Backbone(pretrained="imagenet21k")


# --- ImageNet weights through torchvision's weights API ------------------------------------


def _lean(shape: tuple[int, int], strides: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A full-shape tensor viewing a small random storage (a few hundred kB on disk)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    return torch.as_strided(torch.randn(size, generator=gen), shape, strides)


def _fake_torchvision_vgg16() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    c_in = 3
    for idx, c_out in zip(VGG_CONV_INDICES[:13], [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6,
                          strict=True):  # fmt: skip
        sd[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=gen)
        sd[f"features.{idx}.bias"] = torch.randn(c_out, generator=gen)
        c_in = c_out
    sd["classifier.0.weight"] = _lean((4096, 25088), (1, 5), gen)
    sd["classifier.0.bias"] = torch.randn(4096, generator=gen)
    sd["classifier.3.weight"] = _lean((4096, 4096), (1, 7), gen)
    sd["classifier.3.bias"] = torch.randn(4096, generator=gen)
    sd["classifier.6.weight"] = _lean((1000, 4096), (1, 1), gen)
    sd["classifier.6.bias"] = torch.randn(1000, generator=gen)
    return sd


def test_imagenet_weights_loaded_and_fc_subsampled(torch_home: Path) -> None:
    sd = _fake_torchvision_vgg16()
    path = torch_home / "hub" / "checkpoints" / VGG_FILE
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    assert torchvision.models.VGG16_Weights.IMAGENET1K_V1.url == VGG_URL

    backbone = VGG16Backbone(pretrained="imagenet", progress=False)

    # conv1_1 .. conv5_3: copied from features.{i}
    for idx in VGG_CONV_INDICES[:13]:
        conv = backbone.get_submodule(vgg_layer_path(idx))
        assert torch.equal(conv.weight, sd[f"features.{idx}.weight"]), idx
        assert torch.equal(conv.bias, sd[f"features.{idx}.bias"]), idx

    # fc6[o', c, y', x'] = classifier.0.weight[4 o', c*49 + 7*(3 y') + 3 x'] (storage strides 1, 5)
    storage = sd["classifier.0.weight"].untyped_storage()
    flat6 = torch.tensor([], dtype=torch.float32).set_(storage)
    o = torch.arange(1024).view(-1, 1, 1, 1)
    c = torch.arange(512).view(1, -1, 1, 1)
    y = torch.arange(3).view(1, 1, -1, 1)
    x = torch.arange(3).view(1, 1, 1, -1)
    expected6 = flat6[4 * o * 1 + (c * 49 + 7 * (3 * y) + 3 * x) * 5]
    assert backbone.to_fc7.fc6.weight.shape == (1024, 512, 3, 3)
    assert torch.equal(backbone.to_fc7.fc6.weight, expected6)
    assert torch.equal(backbone.to_fc7.fc6.bias, sd["classifier.0.bias"][torch.arange(0, 4096, 4)])

    # fc7[o', i'] = classifier.3.weight[4 o', 4 i'] (storage strides 1, 7)
    flat7 = torch.tensor([], dtype=torch.float32).set_(sd["classifier.3.weight"].untyped_storage())
    o7, i7 = torch.arange(1024).view(-1, 1), torch.arange(1024).view(1, -1)
    expected7 = flat7[4 * o7 + 7 * (4 * i7)].view(1024, 1024, 1, 1)
    assert torch.equal(backbone.to_fc7.fc7.weight, expected7)
    assert torch.equal(backbone.to_fc7.fc7.bias, sd["classifier.3.bias"][torch.arange(0, 4096, 4)])

    # layers the ImageNet VGG lacks keep their SSD initialisation
    assert torch.equal(backbone.l2norm.weight.detach(), torch.full((512,), 20.0))
    assert torch.equal(backbone.extras[0].conv8_1.bias, torch.zeros(256))

    # the same file given as a path
    again = VGG16Backbone(pretrained=str(path))
    assert torch.equal(again.to_fc7.fc6.weight, backbone.to_fc7.fc6.weight)


def test_imagenet_weights_offline_error_names_path_and_url(torch_home: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        VGG16Backbone(pretrained="imagenet", progress=False)
    message = str(info.value)
    expected_path = os.path.join(str(torch_home), "hub", "checkpoints", VGG_FILE)
    assert expected_path in message
    assert VGG_URL in message
    assert "backbone.pretrained" in message
    assert isinstance(info.value.__cause__, URLError)


def test_imagenet_weights_unreadable_file(torch_home: Path) -> None:
    path = torch_home / "hub" / "checkpoints" / VGG_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(PretrainedWeightsError, match="could not be read"):
        VGG16Backbone(pretrained="imagenet", progress=False)


def test_wrong_state_dict_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(
        ValueError, match=r"not a torchvision VGG16 state dict.*features\.0\.weight"
    ):
        VGG16Backbone(pretrained=str(path))
