"""The book's API (Dive into Deep Learning, 14.4) against a faithful copy of the book's code."""

import pytest
import torch

# Reference: the book's code (d2l PyTorch edition, 14.3 / 14.4), kept verbatim in one place.
from benchmarks.d2l_reference import assign_anchor_to_bbox as book_assign_anchor_to_bbox  # noqa: E402
from benchmarks.d2l_reference import box_iou as book_box_iou  # noqa: E402
from benchmarks.d2l_reference import multibox_detection as book_multibox_detection  # noqa: E402
from benchmarks.d2l_reference import multibox_prior as book_multibox_prior  # noqa: E402
from benchmarks.d2l_reference import multibox_target as book_multibox_target  # noqa: E402
from benchmarks.d2l_reference import nms as book_nms  # noqa: E402
from benchmarks.d2l_reference import offset_boxes as book_offset_boxes  # noqa: E402
from benchmarks.d2l_reference import offset_inverse as book_offset_inverse  # noqa: E402
from src.detection import (
    assign_anchor_to_bbox,
    box_iou,
    multibox_detection,
    multibox_prior,
    multibox_target,
    nms,
    offset_boxes,
    offset_inverse,
)

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def grid_aligned_anchors():
    """Book anchors on a 4x4 map plus duplicated rows: many exact IoU ties with aligned gts."""
    anchors = multibox_prior(torch.zeros(1, 3, 4, 4), [0.5, 0.25], [1, 2, 0.5])[0]  # [64, 4]
    return torch.cat((anchors, anchors[[5, 17, 40]]))  # duplicates tie across anchors


def random_labels(batch, num_gt, generator, quantum=None):
    """Book label rows (class, xmin, ymin, xmax, ymax); quantised corners give exact ties."""
    xy = torch.rand(batch, num_gt, 2, generator=generator) * 0.7
    wh = torch.rand(batch, num_gt, 2, generator=generator) * 0.5 + 0.05
    boxes = torch.cat((xy, xy + wh), dim=-1)
    if quantum is not None:
        boxes = (boxes / quantum).round() * quantum
        boxes[..., 2:] = torch.maximum(boxes[..., 2:], boxes[..., :2] + quantum)
    cls = torch.randint(0, 3, (batch, num_gt, 1), generator=generator).float()
    labels = torch.cat((cls, boxes), dim=-1)
    labels[:, -1] = labels[:, 0]  # a duplicated ground truth in every image: tied columns
    labels[:, -1, 0] = 2.0
    return labels


def assert_targets_equal(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The book's worked examples
# ---------------------------------------------------------------------------------------------

BOOK_GT = torch.tensor([[0, 0.1, 0.08, 0.52, 0.92], [1, 0.55, 0.2, 0.9, 0.88]])
BOOK_ANCHORS = torch.tensor(
    [
        [0, 0.1, 0.2, 0.3],
        [0.15, 0.2, 0.4, 0.4],
        [0.63, 0.05, 0.88, 0.98],
        [0.66, 0.45, 0.8, 0.8],
        [0.57, 0.3, 0.92, 0.9],
    ]
)


def test_book_multibox_target_example():
    labels = multibox_target(BOOK_ANCHORS.unsqueeze(dim=0), BOOK_GT.unsqueeze(dim=0))
    assert labels[2].tolist() == [[0, 1, 2, 0, 2]]
    assert labels[1].tolist() == [[0.0] * 4 + [1.0] * 8 + [0.0] * 4 + [1.0] * 4]
    # printed in the book with 3 significant digits
    printed = torch.tensor(
        [
            [0, 0, 0, 0, 1.40, 10.0, 2.59, 7.18, -1.20, 0.269, 1.68, -1.57]
            + [0, 0, 0, 0, -0.571, -1.00, 4.17e-06, 0.626]
        ]
    )
    torch.testing.assert_close(labels[0], printed, atol=6e-3, rtol=5e-3)
    assert_targets_equal(
        labels, book_multibox_target(BOOK_ANCHORS.unsqueeze(0), BOOK_GT.unsqueeze(0))
    )


def test_book_multibox_detection_example():
    anchors = torch.tensor(
        [
            [0.1, 0.08, 0.52, 0.92],
            [0.08, 0.2, 0.56, 0.95],
            [0.15, 0.3, 0.62, 0.91],
            [0.55, 0.2, 0.9, 0.88],
        ]
    )
    offset_preds = torch.tensor([0] * anchors.numel())  # int64, as in the book
    cls_probs = torch.tensor(
        [[0] * 4, [0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]]  # background, dog, cat
    )
    output = multibox_detection(
        cls_probs.unsqueeze(dim=0),
        offset_preds.unsqueeze(dim=0),
        anchors.unsqueeze(dim=0),
        nms_threshold=0.5,
    )
    expected = torch.tensor(
        [
            [
                [0.00, 0.90, 0.10, 0.08, 0.52, 0.92],
                [1.00, 0.90, 0.55, 0.20, 0.90, 0.88],
                [-1.00, 0.80, 0.08, 0.20, 0.56, 0.95],
                [-1.00, 0.70, 0.15, 0.30, 0.62, 0.91],
            ]
        ]
    )
    assert output.shape == (1, 4, 6) and output.dtype == torch.float32
    torch.testing.assert_close(output, expected)
    ref = book_multibox_detection(cls_probs[None], offset_preds[None], anchors[None], 0.5)
    assert torch.equal(output, ref)
    # the book's way of reading the result
    kept = [row for row in output[0].tolist() if row[0] != -1]
    assert [row[:2] for row in kept] == [pytest.approx([0.0, 0.9]), pytest.approx([1.0, 0.9])]


# ---------------------------------------------------------------------------------------------
# Random comparisons against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes,ratios,shape",
    [
        ([0.75, 0.5, 0.25], [1, 2, 0.5], (5, 7)),
        ([0.2, 0.272], [1, 2, 0.5], (8, 8)),
        ([0.3], [1], (1, 1)),
    ],
)
def test_multibox_prior_equals_book(sizes, ratios, shape):
    x = torch.zeros(2, 3, *shape)
    assert torch.equal(multibox_prior(x, sizes, ratios), book_multibox_prior(x, sizes, ratios))


def test_box_iou_equals_book():
    g = torch.Generator().manual_seed(0)
    labels = random_labels(1, 7, g)[0, :, 1:]
    anchors = grid_aligned_anchors()
    torch.testing.assert_close(box_iou(anchors, labels), book_box_iou(anchors, labels))


@pytest.mark.parametrize("quantum", [None, 0.125, 0.25])
@pytest.mark.parametrize("seed", range(4))
def test_assign_anchor_to_bbox_equals_book(seed, quantum):
    g = torch.Generator().manual_seed(seed)
    anchors = grid_aligned_anchors()
    for gt in random_labels(3, 6, g, quantum)[..., 1:]:
        ours = assign_anchor_to_bbox(gt, anchors, "cpu")
        ref = book_assign_anchor_to_bbox(gt, anchors, "cpu")
        assert torch.equal(ours, ref)
        assert set(range(6)) <= set(ours.tolist())


def test_assign_anchor_to_bbox_threshold():
    anchors = grid_aligned_anchors()
    gt = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]])
    for thr in (0.3, 0.5, 0.9):
        ours = assign_anchor_to_bbox(gt, anchors, "cpu", iou_threshold=thr)
        assert torch.equal(ours, book_assign_anchor_to_bbox(gt, anchors, "cpu", iou_threshold=thr))


@pytest.mark.parametrize("quantum", [None, 0.125])
@pytest.mark.parametrize("seed", range(3))
def test_multibox_target_equals_book(seed, quantum):
    g = torch.Generator().manual_seed(100 + seed)
    anchors = grid_aligned_anchors()[None]
    labels = random_labels(4, 5, g, quantum)
    assert_targets_equal(multibox_target(anchors, labels), book_multibox_target(anchors, labels))


def test_multibox_target_tinyssd_scale():
    g = torch.Generator().manual_seed(11)
    anchors = torch.cat(
        [
            multibox_prior(torch.zeros(1, 3, m, m), s, [1, 2, 0.5])
            for m, s in [(32, [0.2, 0.272]), (16, [0.37, 0.447]), (8, [0.54, 0.619])]
        ],
        dim=1,
    )
    labels = random_labels(3, 4, g)
    assert_targets_equal(multibox_target(anchors, labels), book_multibox_target(anchors, labels))


def test_multibox_target_padding_rows_are_ignored():
    g = torch.Generator().manual_seed(5)
    anchors = grid_aligned_anchors()[None]
    real = random_labels(3, 4, g, 0.125)
    counts = [4, 2, 0]
    padded = torch.full((3, 6, 5), -1.0)
    for b, n in enumerate(counts):
        padded[b, :n] = real[b, :n]
    offset, mask, cls = multibox_target(anchors, padded)
    for b, n in enumerate(counts):
        if n:
            ref = book_multibox_target(anchors, real[b : b + 1, :n])
        else:
            a = anchors.shape[1]
            ref = (
                torch.zeros(1, 4 * a),
                torch.zeros(1, 4 * a),
                torch.zeros(1, a, dtype=torch.long),
            )
        assert_targets_equal((offset[b : b + 1], mask[b : b + 1], cls[b : b + 1]), ref)


def test_offset_boxes_and_inverse_equal_book():
    g = torch.Generator().manual_seed(2)
    anchors = grid_aligned_anchors()
    boxes = random_labels(1, anchors.shape[0], g)[0, :, 1:]
    assert torch.equal(offset_boxes(anchors, boxes), book_offset_boxes(anchors, boxes))
    assert torch.equal(offset_boxes(anchors, boxes, 1e-3), book_offset_boxes(anchors, boxes, 1e-3))
    preds = torch.randn(anchors.shape[0], 4, generator=g)
    assert torch.equal(offset_inverse(anchors, preds), book_offset_inverse(anchors, preds))


@pytest.mark.parametrize("tied_scores", [False, True])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_equals_book(threshold, tied_scores):
    g = torch.Generator().manual_seed(int(threshold * 10) + tied_scores)
    xy = torch.rand(120, 2, generator=g) * 0.7
    boxes = torch.cat((xy, xy + 0.1 + 0.2 * torch.rand(120, 2, generator=g)), 1)
    scores = torch.rand(120, generator=g)
    if tied_scores:
        scores = (scores * 4).round() / 4
    ours = nms(boxes, scores, threshold)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, book_nms(boxes, scores, threshold))


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_multibox_detection_equals_book(seed, quantised):
    g = torch.Generator().manual_seed(200 + seed)
    anchors = grid_aligned_anchors()[None]
    num_anchors = anchors.shape[1]
    logits = 2 * torch.randn(3, 4, num_anchors, generator=g)
    cls_probs = torch.softmax(logits, dim=1)
    if quantised:  # ties in confidence and many values below pos_threshold
        cls_probs = (cls_probs * 8).floor() / 8
    offset_preds = 0.3 * torch.randn(3, num_anchors * 4, generator=g)
    for nms_threshold in (0.5, 0.3):
        ours = multibox_detection(cls_probs, offset_preds, anchors, nms_threshold=nms_threshold)
        ref = book_multibox_detection(cls_probs, offset_preds, anchors, nms_threshold=nms_threshold)
        assert ours.shape == (3, num_anchors, 6)
        assert torch.equal(ours, ref)


def test_detection_pos_threshold_marks_background():
    anchors = torch.tensor([[[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
    cls_probs = torch.tensor([[[0.995, 0.2], [0.005, 0.8]]])  # anchor 0 has conf 0.005
    out = multibox_detection(cls_probs, torch.zeros(1, 8), anchors)
    assert out[0, :, 0].tolist() == [0.0, -1.0]  # anchor 1 first (higher conf)
    torch.testing.assert_close(out[0, :, 1], torch.tensor([0.8, 0.995]))
    assert torch.equal(out, book_multibox_detection(cls_probs, torch.zeros(1, 8), anchors))


def test_inputs_are_not_modified():
    anchors = BOOK_ANCHORS[None].clone()
    labels = BOOK_GT[None].clone()
    multibox_target(anchors, labels)
    assert torch.equal(anchors, BOOK_ANCHORS[None]) and torch.equal(labels, BOOK_GT[None])
    cls_probs = torch.softmax(torch.randn(1, 3, 5), dim=1)
    before = cls_probs.clone()
    multibox_detection(cls_probs, torch.zeros(1, 20), anchors)
    assert torch.equal(cls_probs, before)
