"""Anchor coverage and the anchor search, on hand-built boxes and anchors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from src.detection.anchors import GridAnchorGenerator, SSDDefaultBoxGenerator
from src.detection.coverage import (
    anchor_coverage,
    anchor_shapes,
    best_anchor_iou,
    dataset_boxes,
    feature_sizes,
    format_overrides,
    low_coverage_message,
    ratio_options,
    scale_sizes,
    search_anchors,
    size_categories,
)

# two anchors: the top-left and the bottom-right quarter of the image
ANCHORS = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
# best IoU by hand: 1 (= A0); 0.125/0.25 = 0.5 exactly (on the threshold: covered);
# 0.03125/0.25 = 0.125; 0.16/0.25 = 0.64 (inside A1); 0.25/1 = 0.25 (the whole image)
BOXES = torch.tensor(
    [
        [0.0, 0.0, 0.5, 0.5],
        [0.0, 0.0, 0.25, 0.5],
        [0.0, 0.0, 0.125, 0.25],
        [0.5, 0.5, 0.9, 0.9],
        [0.0, 0.0, 1.0, 1.0],
    ]
)
LABELS = torch.tensor([0, 1, 1, 2, 0])
# at a 128 x 128 input: 64x64 medium, 32x64 medium, 16x32 small, 51x51 medium, 128x128 large


def _nan_list(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def test_best_anchor_iou_by_hand() -> None:
    best = best_anchor_iou(BOXES, ANCHORS)
    assert best.tolist() == pytest.approx([1.0, 0.5, 0.125, 0.64, 0.25])
    assert best_anchor_iou(torch.zeros(0, 4), ANCHORS).shape == (0,)


def test_size_categories_follow_coco_limits_at_the_input() -> None:
    # sides 16, 32, 64, 96 px at a 128 px input: areas 256, 1024 (= 32^2), 4096, 9216 (= 96^2)
    sides = torch.tensor([0.125, 0.25, 0.5, 0.75])
    boxes = torch.stack((torch.zeros(4), torch.zeros(4), sides, sides), dim=1)
    assert size_categories(boxes, (128, 128)).tolist() == [0, 1, 1, 2]
    # (H, W) = (64, 256): a box 0.25 wide, 0.5 high is 64 x 32 px = 2048: medium
    assert size_categories(torch.tensor([[0.0, 0.0, 0.25, 0.5]]), (64, 256)).tolist() == [1]


def test_anchor_coverage_overall_per_class_and_size_by_hand() -> None:
    cov = anchor_coverage(BOXES, LABELS, ANCHORS, 0.5, (128, 128), num_classes=4)
    assert cov.covered.tolist() == [True, True, False, True, False]
    assert (cov.num_covered, cov.total) == (3, 5)
    assert cov.overall == pytest.approx(0.6)
    # class 0: boxes 0 (covered) and 4; class 1: 1 (covered) and 2; class 2: 3; class 3: none
    assert _nan_list(cov.per_class) == pytest.approx([0.5, 0.5, 1.0, None])
    assert cov.class_counts.tolist() == [2, 2, 1, 0]
    # small: box 2 (missed); medium: 0, 1, 3 (covered); large: box 4 (missed)
    assert cov.size_counts.tolist() == [1, 3, 1]
    assert cov.per_size.tolist() == pytest.approx([0.0, 1.0, 0.0])
    # a stricter threshold drops the 0.5 and 0.64 boxes
    assert anchor_coverage(BOXES, LABELS, ANCHORS, 0.7, (128, 128), 4).overall == pytest.approx(0.2)


def test_low_coverage_message_fires_below_the_minimum_only() -> None:
    cov = anchor_coverage(BOXES, LABELS, ANCHORS, 0.5, (128, 128), 4)  # 60%
    message = low_coverage_message(cov, 0.9, "python -m src.inspect backbone=tiny")
    assert message is not None
    assert "anchor coverage 60.0% is below 90%" in message
    assert "2 of 5 training boxes" in message and "IoU >= 0.5" in message
    assert "small 0% of 1, medium 100% of 3, large 0% of 1" in message
    assert message.endswith("python -m src.inspect backbone=tiny")
    assert low_coverage_message(cov, 0.6, "cmd") is None  # exactly at the minimum: no warning
    assert low_coverage_message(cov, 0.5, "cmd") is None


def test_anchor_shapes_are_distinct_and_sorted_by_area() -> None:
    anchors = torch.tensor(
        [[0.0, 0.0, 0.2, 0.1], [0.5, 0.5, 0.7, 0.6], [0.0, 0.0, 0.1, 0.1], [0.2, 0.2, 0.6, 0.6]]
    )
    expected = torch.tensor([[0.1, 0.1], [0.2, 0.1], [0.4, 0.4]])
    torch.testing.assert_close(anchor_shapes(anchors), expected)


def test_scale_sizes_and_overrides_are_readable() -> None:
    grid = {"sizes": [[0.1, 0.141], [0.2, 0.272]], "ratios": [[1, 2, 0.5], [1, 2, 0.5]]}
    assert scale_sizes(grid, 1.0) == {}
    assert scale_sizes(grid, 0.8) == {"sizes": [[0.08, 0.113], [0.16, 0.218]]}
    ssd = {"min_sizes": [30, 60], "max_sizes": [60, 111], "aspect_ratios": [[2], [2, 3]]}
    assert scale_sizes(ssd, 1.25) == {"min_sizes": [37.5, 75.0], "max_sizes": [75.0, 139.0]}
    text = format_overrides({"sizes": [[0.08, 0.113]], "ratios": [[1.0, 2.0, 0.5]]})
    assert text == "'backbone.anchors.sizes=[[0.08,0.113]]' 'backbone.anchors.ratios=[[1,2,0.5]]'"


def test_ratio_options_read_the_data() -> None:
    # widths/heights at a square input: 0.5, 1, 1.5 (x 3 each): median 1, q90 1.5, q10 0.5
    wh = torch.tensor([[0.1, 0.2], [0.2, 0.2], [0.3, 0.2]]).repeat(3, 1)
    boxes = torch.cat((torch.zeros(9, 2), wh), dim=1)
    grid = {"sizes": [[0.2], [0.4]], "ratios": [[1, 2, 0.5], [1, 2, 0.5]]}
    options = ratio_options(grid, boxes, (100, 100))
    # "1,2,1/2" equals the current ratios and is left out
    assert list(options) == ["current", "1,2,1/2,3,1/3", "data"]
    assert options["current"] == {}
    assert options["data"] == {"ratios": [[1.0, 1.5, 0.5], [1.0, 1.5, 0.5]]}
    ssd = {"min_sizes": [30], "max_sizes": [60], "aspect_ratios": [[2]]}
    options = ratio_options(ssd, boxes, (100, 100))
    # max(r, 1/r): 2, 1, 1.5 -> median 1.5, q90 2; "2" is the current set
    assert list(options) == ["current", "2,3", "data"]
    assert options["data"] == {"aspect_ratios": [[1.5, 2.0]]}
    # the data's ratios equal to the current ones are not tried twice
    assert "data" not in ratio_options(
        {"sizes": [[0.2]], "ratios": [[1.0, 1.5, 0.5]]}, boxes, (100, 100)
    )


def _build_grid(cfg: dict, feats: list[tuple[int, int]]):  # noqa: ANN202
    return lambda overrides: GridAnchorGenerator(**{**cfg, **overrides})(feats, (64, 64))


def test_search_never_lowers_coverage_and_finds_a_better_scale() -> None:
    feats = [(8, 8), (4, 4), (2, 2)]
    # anchors far too large for the boxes: 0.3 .. 0.9 of the image; boxes 0.08 .. 0.2
    cfg = {"sizes": [[0.3, 0.35], [0.5, 0.6], [0.8, 0.9]], "ratios": [[1, 2, 0.5]] * 3}
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(200, 2, generator=gen) * 0.6 + 0.2
    sides = torch.rand(200, 2, generator=gen) * 0.12 + 0.08
    boxes = torch.cat((centres - sides / 2, centres + sides / 2), dim=1)
    build = _build_grid(cfg, feats)
    candidates = search_anchors(boxes, cfg, build, 0.5, (64, 64))
    current = next(c for c in candidates if c.is_current)
    expected = int((best_anchor_iou(boxes, build({})) >= 0.5).sum())
    assert (current.covered, current.scale, current.ratios) == (expected, 1.0, "current")
    best = candidates[0]
    assert best.covered > current.covered and best.scale < 1.0
    # the best candidate's overrides rebuild anchors that cover what it claims
    assert int((best_anchor_iou(boxes, build(best.overrides)) >= 0.5).sum()) == best.covered
    assert [c.covered for c in candidates] == sorted((c.covered for c in candidates), reverse=True)
    assert {c.scale for c in candidates} == {0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_search_result_is_never_worse_than_the_current_anchors(seed: int) -> None:
    # SSD default boxes at a 64 px input; random boxes of every size
    feats = [(8, 8), (4, 4), (2, 2)]
    cfg = {
        "image_size": 64,
        "steps": [8, 16, 32],
        "min_sizes": [8, 20, 40],
        "max_sizes": [20, 40, 64],
        "aspect_ratios": [[2], [2, 3], [2]],
    }
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(50, 2, generator=gen) * 0.5
    wh = torch.rand(50, 2, generator=gen) * 0.5 + 0.02
    boxes = torch.cat((xy, xy + wh), dim=1)

    def build(overrides: dict) -> Tensor:
        return SSDDefaultBoxGenerator(**{**cfg, **overrides})(feats, (64, 64))

    candidates = search_anchors(boxes, cfg, build, 0.5, (64, 64), scales=[0.7, 1.3])
    current = next(c for c in candidates if c.is_current)
    assert candidates[0].covered >= current.covered
    assert current.covered == int((best_anchor_iou(boxes, build({})) >= 0.5).sum())


class _Images:
    """Two annotated images of different sizes (the AnnotatedDataset protocol)."""

    sizes = [(100, 200), (50, 50)]
    boxes = [
        torch.tensor([[0.0, 0.0, 100.0, 50.0], [50.0, 25.0, 200.0, 100.0]]),
        torch.tensor([[10.0, 5.0, 20.0, 45.0]]),
    ]
    labels = [torch.tensor([2, 0]), torch.tensor([1])]

    def __len__(self) -> int:
        return 2

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        return {"boxes": self.boxes[index].clone(), "labels": self.labels[index].clone()}


def test_dataset_boxes_normalise_each_image_by_its_size() -> None:
    boxes, labels, index = dataset_boxes(_Images())
    expected = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 1.0, 1.0], [0.2, 0.1, 0.4, 0.9]])
    torch.testing.assert_close(boxes, expected)
    assert labels.tolist() == [2, 0, 1] and index.tolist() == [0, 0, 1]
    first, _, index = dataset_boxes(_Images(), max_images=1)
    assert first.shape == (2, 4) and index.tolist() == [0, 0]


class _TwoLevels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.norm(self.conv(x))
        return [a, nn.functional.max_pool2d(a, 2)]


def test_feature_sizes_leave_the_backbone_untouched() -> None:
    net = _TwoLevels().train()
    before = net.norm.running_mean.clone()
    assert feature_sizes(net, (32, 48)) == [(16, 24), (8, 12)]
    assert net.training and torch.equal(net.norm.running_mean, before)
    assert int(net.norm.num_batches_tracked) == 0
