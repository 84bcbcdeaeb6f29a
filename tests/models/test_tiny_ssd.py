"""The book's TinySSD and its configurable twin SSD(TinyBackbone())."""

from __future__ import annotations

import pytest
import torch

from src.detection.anchors import GridAnchorGenerator, multibox_prior
from src.models import tiny_ssd as book
from src.models.backbones.tiny import TinyBackbone
from src.models.convert import convert_tiny_ssd_state_dict
from src.models.ssd import SSD
from src.models.tiny_ssd import TinySSD

BOOK_PARAMS_ONE_CLASS = 1_010_376
BOOK_ANCHORS_256 = 5444
BOOK_STD = (1 / 255,) * 3


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_ssd(num_classes: int = 1) -> SSD:
    return SSD(
        TinyBackbone(),
        GridAnchorGenerator(book.sizes, book.ratios),
        num_classes=num_classes,
        image_size=256,
        pixel_mean=(0.0, 0.0, 0.0),
        pixel_std=BOOK_STD,
    )


def test_golden_parameter_count_book_class() -> None:
    assert n_params(TinySSD(num_classes=1)) == BOOK_PARAMS_ONE_CLASS


def test_golden_parameter_count_ssd_with_tiny_backbone() -> None:
    assert n_params(tiny_ssd(num_classes=1)) == BOOK_PARAMS_ONE_CLASS


def test_book_forward_shapes_and_anchors() -> None:
    net = TinySSD(num_classes=1)
    x = torch.zeros((2, 3, 256, 256))
    anchors, cls_preds, bbox_preds = net(x)
    # the book prints these shapes for a batch of 32
    assert anchors.shape == (1, BOOK_ANCHORS_256, 4)
    assert cls_preds.shape == (2, BOOK_ANCHORS_256, 2)
    assert bbox_preds.shape == (2, BOOK_ANCHORS_256 * 4)


def test_book_building_blocks() -> None:
    # the book's examples in 14.7.1
    y = book.down_sample_blk(3, 10)(torch.zeros((2, 3, 20, 20)))
    assert y.shape == (2, 10, 10, 10)
    assert book.base_net()(torch.zeros((2, 3, 256, 256))).shape == (2, 64, 32, 32)
    y1 = book.cls_predictor(8, 5, 10)(torch.zeros((2, 8, 20, 20)))
    y2 = book.cls_predictor(16, 3, 10)(torch.zeros((2, 16, 10, 10)))
    assert book.concat_preds([y1, y2]).shape == (2, 25300)


def test_backbone_feature_maps() -> None:
    feats = TinyBackbone()(torch.zeros((1, 3, 256, 256)))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 32, 32),
        (128, 16, 16),
        (128, 8, 8),
        (128, 4, 4),
        (128, 1, 1),
    ]


@pytest.mark.parametrize("train", [False, True])
def test_ssd_reproduces_the_book_network(train: bool) -> None:
    torch.manual_seed(0)
    ref = TinySSD(num_classes=2)
    # non-trivial BatchNorm statistics so that the buffers' mapping is exercised too
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    ours = tiny_ssd(num_classes=2)
    ours.load_state_dict(convert_tiny_ssd_state_dict(ref.state_dict()), strict=True)
    ref.train(train)
    ours.train(train)

    images = torch.rand((2, 3, 256, 256))
    images_copy = images.clone()
    anchors, cls_preds, bbox_preds = ref(images * 255)  # the book feeds 0..255 pixels
    out = ours(images)

    assert torch.equal(images, images_copy)  # input untouched
    assert out.anchors.shape == (BOOK_ANCHORS_256, 4)
    torch.testing.assert_close(out.anchors, anchors[0])
    torch.testing.assert_close(out.cls_logits, cls_preds, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.box_deltas, bbox_preds.reshape(2, -1, 4), rtol=1e-4, atol=1e-4)


def test_ssd_anchors_equal_book_multibox_prior_levels() -> None:
    out = tiny_ssd()(torch.rand((1, 3, 256, 256)))
    book_anchors = torch.cat(
        [
            multibox_prior(torch.zeros((1, 1, s, s)), book.sizes[i], book.ratios[i])[0]
            for i, s in enumerate([32, 16, 8, 4, 1])
        ]
    )
    torch.testing.assert_close(out.anchors, book_anchors)


def test_convert_tiny_rejects_foreign_keys() -> None:
    sd = TinySSD(num_classes=1).state_dict()
    sd["classifier.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="classifier.weight"):
        convert_tiny_ssd_state_dict(sd)
