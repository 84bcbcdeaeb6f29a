import itertools
import math

import pytest
import torch

from src.detection.anchors import (
    GridAnchorGenerator,
    SSDDefaultBoxGenerator,
    grid_anchors,
    multibox_prior,
    ssd_default_boxes,
)

TINY_SIZES = [[0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]]
TINY_RATIOS = [[1, 2, 0.5]] * 5
TINY_MAPS = [32, 16, 8, 4, 1]

SSD300 = dict(
    feature_sizes=[38, 19, 10, 5, 3, 1],
    image_size=300,
    steps=[8, 16, 32, 64, 100, 300],
    min_sizes=[30, 60, 111, 162, 213, 264],
    max_sizes=[60, 111, 162, 213, 264, 315],
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
)

# Half extents of the shapes for sizes [0.75, 0.5], ratios [1, 2, 0.5]:
# 0.75*sqrt(2)/2 = 0.53033009, 0.75/sqrt(2)/2 = 0.26516504.
GOLDEN_1X1 = [
    [0.125, 0.125, 0.875, 0.875],
    [0.25, 0.25, 0.75, 0.75],
    [-0.03033009, 0.23483496, 1.03033009, 0.76516504],
    [0.23483496, -0.03033009, 0.76516504, 1.03033009],
]
GOLDEN_2X2 = [
    # centre (x=0.25, y=0.25)
    [-0.125, -0.125, 0.625, 0.625],
    [0.0, 0.0, 0.5, 0.5],
    [-0.28033009, -0.01516504, 0.78033009, 0.51516504],
    [-0.01516504, -0.28033009, 0.51516504, 0.78033009],
    # centre (x=0.75, y=0.25)
    [0.375, -0.125, 1.125, 0.625],
    [0.5, 0.0, 1.0, 0.5],
    [0.21966991, -0.01516504, 1.28033009, 0.51516504],
    [0.48483496, -0.28033009, 1.01516504, 0.78033009],
    # centre (x=0.25, y=0.75)
    [-0.125, 0.375, 0.625, 1.125],
    [0.0, 0.5, 0.5, 1.0],
    [-0.28033009, 0.48483496, 0.78033009, 1.01516504],
    [-0.01516504, 0.21966991, 0.51516504, 1.28033009],
    # centre (x=0.75, y=0.75)
    [0.375, 0.375, 1.125, 1.125],
    [0.5, 0.5, 1.0, 1.0],
    [0.21966991, 0.48483496, 1.28033009, 1.01516504],
    [0.48483496, 0.21966991, 1.01516504, 1.28033009],
]


def loop_book_anchors(height, width, sizes, ratios):
    """Straightforward per-pixel loop of the book's multibox_prior (float64)."""
    shapes = [(s, ratios[0]) for s in sizes] + [(sizes[0], r) for r in ratios[1:]]
    out = []
    for i in range(height):
        for j in range(width):
            cy, cx = (i + 0.5) / height, (j + 0.5) / width
            for s, r in shapes:
                w = s * math.sqrt(r) * height / width
                h = s / math.sqrt(r)
                out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(out, dtype=torch.float64)


def loop_ssd_prior_box(feature_sizes, image_size, steps, min_sizes, max_sizes, aspect_ratios):
    """ssd.pytorch's PriorBox (clip=True) loop, converted to xyxy (float64)."""
    mean = []
    for k, f in enumerate(feature_sizes):
        for i, j in itertools.product(range(f), repeat=2):
            f_k = image_size / steps[k]
            cx = (j + 0.5) / f_k
            cy = (i + 0.5) / f_k
            s_k = min_sizes[k] / image_size
            mean.append([cx, cy, s_k, s_k])
            s_k_prime = math.sqrt(s_k * (max_sizes[k] / image_size))
            mean.append([cx, cy, s_k_prime, s_k_prime])
            for ar in aspect_ratios[k]:
                mean.append([cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)])
                mean.append([cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)])
    c = torch.tensor(mean, dtype=torch.float64).clamp(0, 1)
    return torch.stack(
        (
            c[:, 0] - c[:, 2] / 2,
            c[:, 1] - c[:, 3] / 2,
            c[:, 0] + c[:, 2] / 2,
            c[:, 1] + c[:, 3] / 2,
        ),
        dim=1,
    )


def test_golden_1x1():
    y = multibox_prior(torch.zeros(1, 3, 1, 1), [0.75, 0.5], [1, 2, 0.5])
    assert y.shape == (1, 4, 4)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0], torch.tensor(GOLDEN_1X1), atol=1e-7, rtol=0)


def test_golden_2x2():
    y = multibox_prior(torch.zeros(2, 3, 2, 2), [0.75, 0.5], [1, 2, 0.5])
    assert y.shape == (1, 16, 4)
    torch.testing.assert_close(y[0], torch.tensor(GOLDEN_2X2), atol=1e-7, rtol=0)


def test_rectangular_map_scales_width_like_the_book():
    y = multibox_prior(torch.zeros(1, 1, 1, 2), [0.5], [1])
    expected = torch.tensor([[0.125, 0.25, 0.375, 0.75], [0.625, 0.25, 0.875, 0.75]])
    torch.testing.assert_close(y[0], expected)


def test_book_example_561x728():
    y = multibox_prior(torch.zeros(1, 3, 561, 728), [0.75, 0.5, 0.25], [1, 2, 0.5])
    assert y.shape == (1, 2042040, 4)
    box = y.reshape(561, 728, 5, 4)[250, 250, 0, :]
    torch.testing.assert_close(box, torch.tensor([0.06, 0.07, 0.63, 0.82]), atol=5e-3, rtol=0)


def test_multibox_prior_returns_a_fresh_tensor():
    x = torch.zeros(1, 3, 3, 3)
    first = multibox_prior(x, [0.3], [1, 2])
    expected = first.clone()
    first.mul_(0)  # a caller modifying its anchors must not corrupt later calls
    assert torch.equal(multibox_prior(x, [0.3], [1, 2]), expected)


@pytest.mark.parametrize("sizes,ratios", [([], [1]), ([0.5], [])])
def test_multibox_prior_rejects_empty(sizes, ratios):
    with pytest.raises(ValueError):
        multibox_prior(torch.zeros(1, 1, 2, 2), sizes, ratios)


def test_tiny_ssd_geometry_matches_loop_reference():
    anchors = grid_anchors([(m, m) for m in TINY_MAPS], TINY_SIZES, TINY_RATIOS)
    assert anchors.shape == (5444, 4)
    reference = torch.cat(
        [
            loop_book_anchors(m, m, s, r)
            for m, s, r in zip(TINY_MAPS, TINY_SIZES, TINY_RATIOS, strict=True)
        ]
    )
    torch.testing.assert_close(anchors.double(), reference, atol=1e-6, rtol=0)


def test_grid_generator_equals_per_level_multibox_prior():
    gen = GridAnchorGenerator(TINY_SIZES, TINY_RATIOS)
    assert gen.num_anchors_per_location() == [4] * 5
    anchors = gen([(m, m) for m in TINY_MAPS], (256, 256))
    per_level = torch.cat(
        [
            multibox_prior(torch.zeros(1, 1, m, m), s, r)[0]
            for m, s, r in zip(TINY_MAPS, TINY_SIZES, TINY_RATIOS, strict=True)
        ]
    )
    assert torch.equal(anchors, per_level)
    assert gen([(m, m) for m in TINY_MAPS], (256, 256)) is anchors  # cached
    as64 = gen([(m, m) for m in TINY_MAPS], (256, 256), dtype=torch.float64)
    assert as64.dtype == torch.float64 and as64.shape == (5444, 4)


def test_grid_generator_validates():
    with pytest.raises(ValueError, match="size lists"):
        GridAnchorGenerator([[0.2]], [[1], [2]])
    with pytest.raises(ValueError, match="positive"):
        GridAnchorGenerator([[0.2, -0.1]], [[1]])


def test_ssd300_matches_prior_box_loop():
    boxes = ssd_default_boxes(**SSD300)
    assert boxes.shape == (8732, 4)
    torch.testing.assert_close(boxes.double(), loop_ssd_prior_box(**SSD300), atol=1e-6, rtol=0)
    # hand values: first box (cx = cy = 4/300, side 30/300) and the last one
    # (1x1 map, 1/ar box with ar = 2: w = 0.88/sqrt(2), h = 0.88*sqrt(2) clamped to 1).
    torch.testing.assert_close(
        boxes[0], torch.tensor([-0.0366667, -0.0366667, 0.0633333, 0.0633333]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        boxes[-1], torch.tensor([0.5 - 0.31112698, 0.0, 0.5 + 0.31112698, 1.0]), atol=1e-6, rtol=0
    )


def test_ssd_generator_and_clip_modes():
    gen = SSDDefaultBoxGenerator(
        SSD300["image_size"],
        SSD300["steps"],
        SSD300["min_sizes"],
        SSD300["max_sizes"],
        SSD300["aspect_ratios"],
    )
    assert gen.num_anchors_per_location() == [4, 6, 6, 6, 4, 4]
    anchors = gen([(f, f) for f in SSD300["feature_sizes"]], (300, 300))
    assert torch.equal(anchors, ssd_default_boxes(**SSD300))
    with pytest.raises(ValueError, match="square"):
        gen([(38, 37)], (300, 300))
    xyxy = ssd_default_boxes(**SSD300, clip="xyxy")
    assert xyxy.min() >= 0 and xyxy.max() <= 1
    unclipped = ssd_default_boxes(**SSD300, clip="none")
    assert unclipped.min() < 0 and unclipped.max() > 1
    with pytest.raises(ValueError, match="clip"):
        ssd_default_boxes(**SSD300, clip="bogus")
