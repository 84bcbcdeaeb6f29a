"""SSD wrapper: normalisation, anchors, configuration checks (tiny backbone: fast)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from src.detection.anchors import GridAnchorGenerator, SSDDefaultBoxGenerator
from src.models import tiny_ssd as book
from src.models.backbones.tiny import TinyBackbone
from src.models.heads import SSDHead
from src.models.ssd import SSD, SSDOutput


def make_ssd(**kwargs) -> SSD:
    args = {
        "backbone": TinyBackbone(),
        "anchor_generator": GridAnchorGenerator(book.sizes, book.ratios),
        "num_classes": 2,
        "image_size": 256,
        "pixel_mean": (0.1, 0.2, 0.3),
        "pixel_std": (0.5, 0.25, 2.0),
    }
    args.update(kwargs)
    return SSD(**args)


class Probe(nn.Module):
    """Backbone returning its (normalised) input as the only feature map."""

    out_channels = [3]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.seen = x
        return [x]


def test_attributes_and_output_type() -> None:
    model = make_ssd(image_size=[256, 320])
    assert model.num_classes == 2
    assert model.image_size == (256, 320)
    assert isinstance(model.head.cls_predictors, nn.ModuleList)
    out = model(torch.rand(1, 3, 64, 64))
    assert isinstance(out, SSDOutput)
    assert out.cls_logits.shape[-1] == 3


def test_normalisation_inside_the_net_as_buffers() -> None:
    probe = Probe()
    model = SSD(probe, GridAnchorGenerator([[0.5]], [[1.0]]), 1, 8, (0.1, 0.2, 0.3), (0.5, 0.25, 2))
    names = dict(model.named_buffers())
    assert "pixel_mean" in names and "pixel_std" in names
    assert not any("pixel" in n for n, _ in model.named_parameters())
    assert "pixel_mean" not in model.state_dict()  # they come from the config
    images = torch.rand(2, 3, 8, 8)
    copy = images.clone()
    model(images)
    assert torch.equal(images, copy)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.5, 0.25, 2.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(probe.seen, (images - mean) / std)


def test_anchors_follow_feature_maps_device_dtype_and_are_cached() -> None:
    model = make_ssd().double()
    out = model(torch.rand(1, 3, 64, 64, dtype=torch.float64))  # maps 8, 4, 2, 1, 1
    assert out.anchors.dtype == torch.float64
    assert out.anchors.shape == (4 * (64 + 16 + 4 + 1 + 1), 4)
    assert out.cls_logits.shape == (1, 344, 3) and out.box_deltas.shape == (1, 344, 4)
    again = model(torch.rand(2, 3, 64, 64, dtype=torch.float64))
    assert again.anchors is out.anchors  # cached per geometry/device/dtype
    other = model(torch.rand(1, 3, 64, 96, dtype=torch.float64))  # 8x12, 4x6, 2x3, 1x1, 1x1
    assert other.anchors.shape == (4 * (8 * 12 + 4 * 6 + 2 * 3 + 1 + 1), 4)
    assert other.cls_logits.shape[1] == other.anchors.shape[0]


def test_level_count_mismatch_names_config_keys() -> None:
    gen = GridAnchorGenerator(book.sizes[:4], book.ratios[:4])
    with pytest.raises(ValueError, match=r"backbone\.net.*5 feature maps.*backbone\.anchors.*4"):
        make_ssd(anchor_generator=gen)


def test_head_anchor_mismatch_detected() -> None:
    model = make_ssd()
    model.anchor_generator = GridAnchorGenerator(book.sizes, [[1, 2]] * 5)  # 3 per location
    with pytest.raises(ValueError, match=r"backbone\.anchors"):
        model._check_head()


def test_default_boxes_image_size_checks() -> None:
    gen = SSDDefaultBoxGenerator(300, [8], [30], [60], [[2]])
    with pytest.raises(ValueError, match=r"backbone\.image_size.*backbone\.anchors\.image_size"):
        SSD(Probe(), gen, 1, 512)
    model = SSD(Probe(), gen, 1, 300)
    with pytest.raises(ValueError, match="resize the images to backbone.image_size"):
        model(torch.rand(1, 3, 256, 256))


def test_value_checks() -> None:
    with pytest.raises(ValueError, match="backbone.pixel_std"):
        make_ssd(pixel_std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="backbone.pixel_mean"):
        make_ssd(pixel_mean=(0.0, 0.0))
    with pytest.raises(ValueError, match="data.num_classes"):
        make_ssd(num_classes=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        make_ssd()(torch.rand(3, 64, 64))


def test_head_init_follows_backbone() -> None:
    probe = Probe()
    probe.head_init = "xavier"
    model = SSD(probe, GridAnchorGenerator([[0.5]], [[1.0]]), 1, 8)
    assert torch.equal(model.head.cls_predictors[0].bias, torch.zeros(2))
    model = make_ssd()  # book: PyTorch default init (non-zero biases)
    assert model.head.cls_predictors[0].bias.abs().sum() > 0


def test_backward_reaches_backbone() -> None:
    model = make_ssd()
    out = model(torch.rand(2, 3, 64, 64))
    (out.cls_logits.sum() + out.box_deltas.sum()).backward()
    assert model.backbone.blk_0[0][0].weight.grad is not None
    assert model.pixel_mean.grad is None


def test_head_factory_builds_the_head() -> None:
    seen = {}

    def factory(**kwargs) -> SSDHead:
        seen.update(kwargs)
        return SSDHead(**kwargs)

    model = make_ssd(head=factory)
    assert seen == {
        "in_channels": [64, 128, 128, 128, 128],
        "num_anchors_per_location": [4, 4, 4, 4, 4],
        "num_classes": 2,
        "init": "default",
    }
    assert isinstance(model.head, SSDHead)
    with pytest.raises(ValueError, match="anchors per location"):
        make_ssd(head=lambda **kw: SSDHead(**{**kw, "num_anchors_per_location": [2] * 5}))
