import math

import pytest
import torch

from src.detection.coder import BoxCoder
from src.detection.targets import MultiboxTargets, TargetEncoder, pad_targets

# Four non-overlapping quadrant anchors plus one centred anchor.
ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 0.5, 0.5],
        [0.5, 0.0, 1.0, 0.5],
        [0.0, 0.5, 0.5, 1.0],
        [0.5, 0.5, 1.0, 1.0],
        [0.25, 0.25, 0.75, 0.75],
    ]
)


def target(boxes, labels, image_id="img"):
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": image_id,
    }


def test_pad_targets_layout():
    targets = [
        target([[0.1, 0.2, 0.3, 0.4]], [3]),
        target([], []),
        target([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.6, 0.7]], [0, 1]),
    ]
    padded = pad_targets(targets)
    assert padded.shape == (3, 2, 5) and padded.dtype == torch.float32
    expected = torch.tensor(
        [
            [[3, 0.1, 0.2, 0.3, 0.4], [-1, -1, -1, -1, -1]],
            [[-1, -1, -1, -1, -1], [-1, -1, -1, -1, -1]],
            [[0, 0.0, 0.0, 1.0, 1.0], [1, 0.5, 0.5, 0.6, 0.7]],
        ]
    )
    assert torch.equal(padded, expected)


def test_pad_targets_all_empty_and_dtype():
    padded = pad_targets([target([], []), target([], [])])
    assert padded.shape == (2, 0, 5)
    assert pad_targets([target([[0, 0, 1, 1]], [0])], dtype=torch.float64).dtype == torch.float64


def test_pad_targets_errors_name_the_image():
    with pytest.raises(ValueError, match="'boxes' and 'labels'"):
        pad_targets([{"boxes": torch.zeros(0, 4), "image_id": "000005"}])
    with pytest.raises(ValueError, match="000007.*labels"):
        pad_targets([target([[0, 0, 1, 1]], [0, 1], image_id="000007")])
    with pytest.raises(ValueError, match=r"target 0.*\[G, 4\]"):
        pad_targets([{"boxes": torch.zeros(2, 3), "labels": torch.zeros(2)}])


def test_hand_case_labels_offsets_and_masks():
    # gt 0 (class 2) == anchor 0; gt 1 (class 0) covers anchors 3 (IoU 0.64) and 4 (IoU 0.2).
    targets = [target([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.9, 0.9]], [2, 0])]
    out = TargetEncoder()(ANCHORS, targets)
    assert isinstance(out, MultiboxTargets)
    assert out.matched_idx.tolist() == [[0, -1, -1, 1, -1]]
    assert out.cls_labels.tolist() == [[3, 0, 0, 1, 0]]
    assert out.pos_mask.tolist() == [[True, False, False, True, False]]
    assert out.cls_labels.dtype == torch.int64 and out.pos_mask.dtype == torch.bool
    # anchor 3: c=(0.75, 0.75) wh=(0.5, 0.5); gt 1: c=(0.7, 0.7) wh=(0.4, 0.4)
    l_wh = 5 * math.log(1e-6 + 0.8)
    expected = torch.zeros(1, 5, 4)
    expected[0, 0, 2:] = 5 * math.log(1e-6 + 1.0)
    expected[0, 3] = torch.tensor([10 * -0.05 / 0.5, 10 * -0.05 / 0.5, l_wh, l_wh])
    torch.testing.assert_close(out.box_offsets, expected)


def test_every_gt_gets_an_anchor_even_without_overlap():
    # a tiny box inside anchor 1 only (IoU < 0.5 with everything)
    targets = [target([[0.6, 0.1, 0.65, 0.15]], [4])]
    out = TargetEncoder()(ANCHORS, targets)
    assert out.matched_idx.tolist() == [[-1, 0, -1, -1, -1]]
    assert out.cls_labels.tolist() == [[0, 5, 0, 0, 0]]


def test_batch_with_empty_images_and_padding():
    targets = [
        target([], []),
        target([[0.0, 0.5, 0.5, 1.0]], [1]),
        target([[0.5, 0.0, 1.0, 0.5], [0.26, 0.26, 0.74, 0.74], [0.0, 0.0, 0.1, 0.1]], [0, 0, 7]),
    ]
    out = TargetEncoder()(ANCHORS, targets)
    assert out.cls_labels.shape == (3, 5) and out.box_offsets.shape == (3, 5, 4)
    assert torch.equal(out.cls_labels[0], torch.zeros(5, dtype=torch.long))
    assert torch.equal(out.matched_idx[0], torch.full((5,), -1))
    assert torch.equal(out.box_offsets[0], torch.zeros(5, 4))
    # padding rows of image 1 (gts 1, 2) are never matched
    assert out.matched_idx[1].tolist() == [-1, -1, 0, -1, -1]
    assert out.matched_idx[2].tolist() == [2, 0, -1, -1, 1]
    assert out.cls_labels[2].tolist() == [8, 1, 0, 0, 1]
    assert torch.equal(out.box_offsets[~out.pos_mask], torch.zeros(int((~out.pos_mask).sum()), 4))
    # each image encoded alone gives the same result (batching via padding is transparent)
    for b, t in enumerate(targets):
        alone = TargetEncoder()(ANCHORS, [t])
        assert torch.equal(alone.cls_labels[0], out.cls_labels[b])
        assert torch.equal(alone.matched_idx[0], out.matched_idx[b])
        assert torch.equal(alone.box_offsets[0], out.box_offsets[b])


def test_all_images_empty():
    out = TargetEncoder()(ANCHORS[None], [target([], []), target([], [])])
    assert out.cls_labels.shape == (2, 5) and not out.pos_mask.any()
    assert out.box_offsets.shape == (2, 5, 4) and out.box_offsets.dtype == torch.float32
    assert torch.equal(out.matched_idx, torch.full((2, 5), -1))


def test_encode_padded_ignores_negative_classes():
    labels = torch.tensor([[[0, 0.0, 0.0, 0.5, 0.5], [-1, 0.5, 0.5, 1.0, 1.0]]])
    out = TargetEncoder().encode_padded(ANCHORS, labels)
    assert out.matched_idx.tolist() == [[0, -1, -1, -1, -1]]


def test_custom_coder_and_threshold():
    coder = BoxCoder(variances=(1.0, 1.0), eps=0.0)
    # IoU with anchors 1, 2: 0.06/0.44 = 0.136; anchor 3: 0.09/0.41 = 0.22; anchor 4: 0.68
    targets = [target([[0.3, 0.3, 0.8, 0.8]], [0])]
    out = TargetEncoder(coder, iou_threshold=0.2)(ANCHORS, targets)
    assert out.matched_idx.tolist() == [[-1, -1, -1, 0, 0]]
    torch.testing.assert_close(out.box_offsets[0, 4], torch.tensor([0.1, 0.1, 0.0, 0.0]))
    assert TargetEncoder(coder).coder is coder


def test_inputs_not_modified():
    anchors = ANCHORS.clone()
    t = target([[0.0, 0.0, 0.5, 0.5]], [2])
    boxes_before = t["boxes"].clone()
    TargetEncoder()(anchors, [t])
    assert torch.equal(anchors, ANCHORS) and torch.equal(t["boxes"], boxes_before)


@pytest.mark.parametrize("threshold", [0.0, 1.2, float("nan")])
def test_threshold_validation(threshold):
    with pytest.raises(
        ValueError, match=r"model\.target_encoder\.iou_threshold must be in \(0, 1\]"
    ):
        TargetEncoder(iou_threshold=threshold)


def test_shape_validation():
    with pytest.raises(ValueError, match="anchors"):
        TargetEncoder().encode_padded(torch.rand(2, 5, 4), torch.zeros(1, 1, 5))
    with pytest.raises(ValueError, match="labels"):
        TargetEncoder().encode_padded(ANCHORS, torch.zeros(1, 4))
