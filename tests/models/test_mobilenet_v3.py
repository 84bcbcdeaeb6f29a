"""SSDLite320 MobileNetV3-Large (backbone=mobilenet_v3) against torchvision's own."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

from src.models.backbones.mobilenet_v3 import MobileNetV3Backbone
from src.models.backbones.weights import PretrainedWeightsError
from src.models.heads import SSDHead, SSDLiteHead
from src.models.ssd import SSD
from tests.conftest import compose_config

MOBILENET_URL = "https://download.pytorch.org/models/mobilenet_v3_large-8738ca79.pth"
MOBILENET_FILE = "mobilenet_v3_large-8738ca79.pth"
SSDLITE_PARAMS_21 = 2_469_860  # ssdlite320_mobilenet_v3_large(num_classes=21), no weights
MAP_SIZES = [20, 10, 5, 3, 2, 1]
NUM_BOXES = 6 * sum(s * s for s in MAP_SIZES)  # 3234


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(*overrides: str, num_classes: int = 20) -> SSD:
    cfg = compose_config(
        "train", ["backbone=mobilenet_v3", f"model.net.num_classes={num_classes}", *overrides]
    )
    return instantiate(cfg.model.net)


def torchvision_ssdlite(num_classes: int = 21, **kwargs) -> nn.Module:
    kwargs.setdefault("weights_backbone", None)
    return ssdlite320_mobilenet_v3_large(weights=None, num_classes=num_classes, **kwargs)


def test_config_defaults() -> None:
    cfg = compose_config("train", ["backbone=mobilenet_v3"])
    assert cfg.head.name == "ssdlite"  # the backbone picks torchvision's head
    assert cfg.backbone.image_size == 320
    assert list(cfg.backbone.pixel_mean) == [0.5, 0.5, 0.5]  # torchvision's [-1, 1] scaling
    assert list(cfg.backbone.pixel_std) == [0.5, 0.5, 0.5]
    assert cfg.backbone.pretrained is None
    assert compose_config("train", ["backbone=mobilenet_v3", "head=ssd"]).head.name == "ssd"


def test_same_network_as_torchvision() -> None:
    torch.manual_seed(0)
    ours = build(num_classes=20)
    ref = torchvision_ssdlite(num_classes=21)
    assert isinstance(ours.backbone, MobileNetV3Backbone) and isinstance(ours.head, SSDLiteHead)
    assert n_params(ours) == n_params(ref) == SSDLITE_PARAMS_21
    assert n_params(ours.backbone) == n_params(ref.backbone)
    assert n_params(ours.head) == n_params(ref.head)
    assert ours.backbone.out_channels == [672, 480, 512, 256, 256, 128]
    # the same modules under the same names: torchvision's weights load as they are
    ref_state = ref.state_dict()
    assert list(ours.state_dict()) == list(ref_state)
    assert all(v.shape == ref_state[k].shape for k, v in ours.state_dict().items())
    ours.load_state_dict(ref_state)

    ours.eval()
    ref.eval()
    images = torch.rand(2, 3, 320, 320)
    with torch.no_grad():
        out = ours(images)
        features = list(ref.backbone((images - 0.5) / 0.5).values())
        expected = ref.head(features)
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, s, s) for c, s in zip(ours.backbone.out_channels, MAP_SIZES, strict=True)
    ]
    assert out.cls_logits.shape == (2, NUM_BOXES, 21)
    torch.testing.assert_close(out.cls_logits, expected["cls_logits"], rtol=0, atol=0)
    torch.testing.assert_close(out.box_deltas, expected["bbox_regression"], rtol=0, atol=0)


def test_anchors_equal_torchvision_default_boxes() -> None:
    ours = build().anchor_generator([(s, s) for s in MAP_SIZES], (320, 320))
    # torchvision's ssdlite320 generator; its output is xyxy in pixels of the 320 input
    ref_gen = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    images = ImageList(torch.zeros(1, 3, 320, 320), [(320, 320)])
    maps = [torch.zeros(1, 1, s, s) for s in MAP_SIZES]
    ref = ref_gen(images, maps)[0] / 320
    assert ours.shape == ref.shape == (NUM_BOXES, 4)
    # same boxes in the same order (level, row, column, shape); float32 rounding differs
    # (torchvision rounds in pixels): at most 1.2e-7 apart
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ref_gen.num_anchors_per_location() == [6] * 6


def test_ssd_head_on_mobilenet_v3() -> None:
    net = build("head=ssd", num_classes=20)
    assert isinstance(net.head, SSDHead)
    # SSD's 3x3 head, initialised as the backbone asks (torchvision SSDLite's N(0, 0.03))
    assert net.head.cls_predictors[0].weight.shape == (6 * 21, 672, 3, 3)
    assert torch.equal(net.head.cls_predictors[0].bias, torch.zeros(6 * 21))
    assert abs(float(net.head.cls_predictors[0].weight.detach().std()) - 0.03) < 1e-3
    out = net.eval()(torch.rand(1, 3, 320, 320))
    assert out.cls_logits.shape == (1, NUM_BOXES, 21)


def test_ssdlite_head_background_bias_and_validation() -> None:
    head = SSDLiteHead([8, 16], [4, 6], num_classes=3)
    head.init_background_bias(2.0)
    for block, k in zip(head.classification_head.module_list, [4, 6], strict=True):
        bias = block[-1].bias.detach().reshape(k, 4)
        assert torch.equal(bias[:, 0], torch.full((k,), 2.0))
        assert torch.equal(bias[:, 1:], torch.zeros(k, 3))
    # with zero weights every anchor's background logit is the bias
    for block in head.classification_head.module_list:
        nn.init.zeros_(block[-1].weight)
    cls, box = head.eval()([torch.rand(1, 8, 3, 3), torch.rand(1, 16, 2, 1)])
    assert cls.shape == (1, 9 * 4 + 2 * 6, 4) and box.shape == (1, 9 * 4 + 2 * 6, 4)
    assert torch.equal(cls[..., 0], torch.full_like(cls[..., 0], 2.0))
    with pytest.raises(ValueError, match="one per level"):
        SSDLiteHead([8, 16], [4], num_classes=1)
    with pytest.raises(ValueError, match="init"):
        SSDLiteHead([8], [4], num_classes=1, init="kaiming")
    with pytest.raises(ValueError, match="2 levels"):
        head([torch.zeros(1, 8, 2, 2)])


def test_trainable_layers_freeze_the_first_stages() -> None:
    frozen = MobileNetV3Backbone(trainable_layers=0)
    assert not any(p.requires_grad for p in frozen.features.parameters())
    assert all(p.requires_grad for p in frozen.extra.parameters())  # torchvision: extras train
    assert all(p.requires_grad for p in MobileNetV3Backbone().parameters())
    with pytest.raises(ValueError, match="trainable_layers"):
        MobileNetV3Backbone(trainable_layers=7)


def fake_imagenet_file(torch_home: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised torchvision mobilenet_v3_large saved where the ImageNet file goes."""
    torch.manual_seed(1)
    state = torchvision.models.mobilenet_v3_large().state_dict()
    path = torch_home / "hub" / "checkpoints" / MOBILENET_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path, state


def test_imagenet_weights_loaded_from_the_torch_hub_cache(torch_home: Path) -> None:
    assert MobileNet_V3_Large_Weights.IMAGENET1K_V1.url == MOBILENET_URL
    path, state = fake_imagenet_file(torch_home)
    net = build("backbone.pretrained=imagenet", num_classes=20)
    backbone = net.backbone
    assert backbone.reduced_tail is False  # torchvision: the full tail with ImageNet weights
    assert backbone.out_channels == [672, 960, 512, 256, 256, 128]
    # conv1 and the last 1x1 conv (C5) hold the file's weights
    torch.testing.assert_close(backbone.features[0][0][0].weight, state["features.0.0.weight"])
    torch.testing.assert_close(backbone.features[1][-1][0].weight, state["features.16.0.weight"])
    assert not torch.equal(
        MobileNetV3Backbone(reduced_tail=False).features[0][0][0].weight,
        state["features.0.0.weight"],
    )
    # the network torchvision builds from the same cached file
    ref = torchvision_ssdlite(weights_backbone=MobileNet_V3_Large_Weights.IMAGENET1K_V1)
    assert n_params(net) == n_params(ref)
    ref_state, ours = ref.state_dict(), net.state_dict()
    assert list(ours) == list(ref_state)
    loaded = [k for k in ours if k.startswith("backbone.features.")]
    assert len(loaded) == 308
    for key in loaded:
        assert torch.equal(ours[key], ref_state[key]), key

    # the same file given as a path
    again = MobileNetV3Backbone(pretrained=str(path))
    assert torch.equal(again.features[0][0][0].weight, backbone.features[0][0][0].weight)
    # the ImageNet weights have the full tail
    with pytest.raises(ValueError, match=r"reduced_tail"):
        MobileNetV3Backbone(pretrained=str(path), reduced_tail=True)


def test_imagenet_weights_missing_offline_names_path_and_url(torch_home: Path) -> None:
    with pytest.raises(PretrainedWeightsError) as info:
        MobileNetV3Backbone(pretrained="imagenet", progress=False)
    message = str(info.value)
    assert os.path.join(str(torch_home), "hub", "checkpoints", MOBILENET_FILE) in message
    assert MOBILENET_URL in message
    assert "backbone.pretrained" in message
    assert isinstance(info.value.__cause__, URLError)


def test_bad_pretrained_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"backbone\.pretrained"):
        MobileNetV3Backbone(pretrained=str(tmp_path / "missing.pth"))
