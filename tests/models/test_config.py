"""conf/backbone/*.yaml wired the way conf/model/ssd.yaml wires `model.net`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.detection.anchors import GridAnchorGenerator, SSDDefaultBoxGenerator
from src.models.backbones.tiny import TinyBackbone
from src.models.backbones.vgg16 import VGG16Backbone
from src.models.ssd import SSD
from tests.conftest import compose_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
MODEL_NET = {
    "_target_": "src.models.ssd.SSD",
    "backbone": "${backbone.net}",
    "anchor_generator": "${backbone.anchors}",
    "num_classes": "${data.num_classes}",
    "image_size": "${backbone.image_size}",
    "pixel_mean": "${backbone.pixel_mean}",
    "pixel_std": "${backbone.pixel_std}",
}


def compose(name: str, num_classes: int = 1, **overrides) -> OmegaConf:
    # the option as Hydra composes it (vgg16_512.yaml builds on vgg16.yaml in its defaults list)
    backbone = compose_config("train", [f"backbone={name}"]).backbone
    for key, value in overrides.items():
        OmegaConf.update(backbone, key, value)
    return OmegaConf.create(
        {"data": {"num_classes": num_classes}, "backbone": backbone, "model": {"net": MODEL_NET}}
    )


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_backbone_node_keys(name: str) -> None:
    node = compose_config("train", [f"backbone={name}"]).backbone
    # optim_defaults (optional): the default recipe's lr, warm-up, clipping for this network
    assert set(node.keys()) - {"optim_defaults"} == {
        "name", "image_size", "pretrained", "channels_last", "pixel_mean", "pixel_std", "net",
        "anchors", "anchor_set",
    }  # fmt: skip
    assert node.anchor_set == name  # the option's name, for the HParams tab
    # the network's name: the file's (a variant such as tiny_small_anchors keeps its net's)
    assert name.startswith(node.name)
    assert node.pretrained is None


def test_tiny_config_builds_the_book_model() -> None:
    cfg = compose("tiny")
    model = instantiate(cfg.model.net)
    assert isinstance(model, SSD) and isinstance(model.backbone, TinyBackbone)
    assert isinstance(model.anchor_generator, GridAnchorGenerator)
    assert n_params(model) == 1_010_376
    assert model.image_size == (256, 256)
    torch.testing.assert_close(model.pixel_std.flatten(), torch.full((3,), 1 / 255))
    assert torch.equal(model.pixel_mean.flatten(), torch.zeros(3))
    out = model(torch.rand(1, 3, 256, 256))
    assert out.anchors.shape == (5444, 4) and out.cls_logits.shape == (1, 5444, 2)


def test_vgg16_config_builds_ssd300() -> None:
    cfg = compose("vgg16", num_classes=20)
    model = instantiate(cfg.model.net)
    assert isinstance(model.backbone, VGG16Backbone) and model.backbone.extras_name == "ssd300"
    assert isinstance(model.anchor_generator, SSDDefaultBoxGenerator)
    assert model.image_size == (300, 300)
    assert n_params(model) == 26_285_486  # torchvision ssd300_vgg16(num_classes=21)
    assert model.head.num_anchors_per_location == [4, 6, 6, 6, 4, 4]
    anchors = model.anchor_generator([(s, s) for s in [38, 19, 10, 5, 3, 1]], (300, 300))
    assert anchors.shape == (8732, 4)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def test_vgg16_512_config_builds_ssd512() -> None:
    model = instantiate(compose("vgg16_512", num_classes=20).model.net)
    assert model.backbone.extras_name == "ssd512"
    assert model.image_size == (512, 512)
    assert model.head.num_anchors_per_location == [4, 6, 6, 6, 6, 4, 4]
    sizes = [64, 32, 16, 8, 4, 2, 1]
    anchors = model.anchor_generator([(s, s) for s in sizes], (512, 512))
    assert anchors.shape == (24564, 4)
    head_total = sum(
        s * s * k for s, k in zip(sizes, model.head.num_anchors_per_location, strict=True)
    )
    assert head_total == 24564


def test_pretrained_is_interpolated_into_the_net(tmp_path: Path) -> None:
    cfg = compose("vgg16", pretrained=str(tmp_path / "missing.pth"))
    assert cfg.backbone.net.pretrained == str(tmp_path / "missing.pth")
    with pytest.raises(Exception, match=r"backbone\.pretrained"):
        instantiate(cfg.model.net)


def test_mismatched_image_size_is_reported() -> None:
    cfg = compose("vgg16")
    cfg.backbone.anchors.image_size = 512  # break the interpolation
    with pytest.raises(Exception, match=r"backbone\.image_size.*backbone\.anchors\.image_size"):
        instantiate(cfg.model.net)
