"""The SSD paper's matching (``rule="ssd"``) against ssd.pytorch's ``match`` and torchvision.

``ssdpytorch_match`` below is ssd.pytorch's ``layers/box_utils.py::match`` (amdegroot/ssd.pytorch),
kept line for line except that it returns the matched ground-truth index per prior (``-1`` for
background) instead of writing encoded targets into ``loc_t`` / ``conf_t``.
"""

import pytest
import torch
from torchvision.models.detection._utils import SSDMatcher
from torchvision.ops import box_iou

from src.detection.anchors import ssd_default_boxes
from src.detection.matching import (
    match_anchors_ssd,
    match_anchors_ssd_batched,
    pairwise_iou_batched,
)
from src.detection.targets import TargetEncoder, pad_targets


def ssdpytorch_jaccard(box_a, box_b):
    """ssd.pytorch's ``jaccard`` (``intersect`` inlined), truths x priors, both xyxy."""
    A, B = box_a.size(0), box_b.size(0)
    max_xy = torch.min(
        box_a[:, 2:].unsqueeze(1).expand(A, B, 2), box_b[:, 2:].unsqueeze(0).expand(A, B, 2)
    )
    min_xy = torch.max(
        box_a[:, :2].unsqueeze(1).expand(A, B, 2), box_b[:, :2].unsqueeze(0).expand(A, B, 2)
    )
    inter = torch.clamp((max_xy - min_xy), min=0)
    inter = inter[:, :, 0] * inter[:, :, 1]
    area_a = (
        ((box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1])).unsqueeze(1).expand_as(inter)
    )
    area_b = (
        ((box_b[:, 2] - box_b[:, 0]) * (box_b[:, 3] - box_b[:, 1])).unsqueeze(0).expand_as(inter)
    )
    union = area_a + area_b - inter
    return inter / union


def ssdpytorch_match(threshold, overlaps):
    """ssd.pytorch's ``match`` from its ``overlaps = jaccard(truths, priors)`` [G, P]."""
    # (Bipartite Matching)
    # [1,num_objects] best prior for each ground truth
    best_prior_overlap, best_prior_idx = overlaps.max(1, keepdim=True)
    # [1,num_priors] best ground truth for each prior
    best_truth_overlap, best_truth_idx = overlaps.max(0, keepdim=True)
    best_truth_idx.squeeze_(0)
    best_truth_overlap.squeeze_(0)
    best_prior_idx.squeeze_(1)
    best_prior_overlap.squeeze_(1)
    best_truth_overlap.index_fill_(0, best_prior_idx, 2)  # ensure best prior
    # TODO refactor: index  best_prior_idx with long tensor
    # ensure every gt matches with its prior of max overlap
    for j in range(best_prior_idx.size(0)):
        best_truth_idx[best_prior_idx[j]] = j
    conf = best_truth_idx.clone()
    conf[best_truth_overlap < threshold] = -1  # label as background
    return conf


SSD300_ANCHORS = ssd_default_boxes(
    [38, 19, 10, 5, 3, 1],
    300,
    [8, 16, 32, 64, 100, 300],
    [30, 60, 111, 162, 213, 264],
    [60, 111, 162, 213, 264, 315],
    [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
)


def random_boxes(num, generator, crowded=False):
    if crowded:  # many heavily overlapping boxes around one point
        centre = 0.3 + 0.4 * torch.rand(1, 2, generator=generator)
        xy = centre - 0.05 * torch.rand(num, 2, generator=generator)
        wh = 0.05 + 0.15 * torch.rand(num, 2, generator=generator)
    else:
        xy = torch.rand(num, 2, generator=generator) * 0.8
        wh = 0.02 + torch.rand(num, 2, generator=generator) * 0.6
    return torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=1)


def test_hand_case_threshold_then_forced_best_prior():
    iou = torch.tensor(
        [
            [0.6, 0.2, 0.55, 0.0],  # gt 0: best prior 0
            [0.7, 0.1, 0.3, 0.1],  # gt 1: best prior 0 too -> the later gt wins it
        ]
    )
    # threshold: priors 0 (gt 1, 0.7) and 2 (gt 0, 0.55); forced: prior 0 -> gt 1 (later wins)
    assert match_anchors_ssd(iou).tolist() == [1, -1, 0, -1]
    # gt 0 has lost its only forced prior but keeps prior 2 through the threshold
    assert match_anchors_ssd(iou, iou_threshold=0.6).tolist() == [1, -1, -1, -1]


def test_gt_without_overlap_is_forced_onto_the_first_prior():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.9, 0.2]])
    assert match_anchors_ssd(iou).tolist() == [0, 1, -1]
    assert ssdpytorch_match(0.5, iou).tolist() == [0, 1, -1]


def test_ties_lowest_gt_for_a_prior_lowest_prior_for_a_gt():
    iou = torch.tensor([[0.8, 0.8, 0.1], [0.8, 0.3, 0.8]])
    # prior 0: tie between gts -> gt 0 by the threshold, but forced to gt 1 (its best prior
    # is prior 0, the lowest of its two 0.8s; gt 0's best is prior 0 too, gt 1 comes later)
    assert match_anchors_ssd(iou).tolist() == [1, 0, 1]
    assert torch.equal(match_anchors_ssd(iou), ssdpytorch_match(0.5, iou))


@pytest.mark.parametrize("crowded", [False, True], ids=["random", "crowded"])
@pytest.mark.parametrize("seed", range(4))
def test_equals_ssdpytorch_and_torchvision_on_ssd300_priors(seed, crowded):
    g = torch.Generator().manual_seed(seed)
    matcher = SSDMatcher(0.5)
    targets = []
    for _ in range(4):
        num = int(torch.randint(1, 16 if crowded else 8, (1,), generator=g))
        targets.append({"boxes": random_boxes(num, g, crowded), "labels": torch.zeros(num).long()})
    out = TargetEncoder(rule="ssd")(SSD300_ANCHORS, targets)
    for i, t in enumerate(targets):
        overlaps = ssdpytorch_jaccard(t["boxes"], SSD300_ANCHORS)
        reference = ssdpytorch_match(0.5, overlaps.clone())
        assert torch.equal(out.matched_idx[i], reference), (seed, i)
        assert torch.equal(out.matched_idx[i], matcher(box_iou(t["boxes"], SSD300_ANCHORS)))
        # a gt goes unmatched only when a later gt took its best prior (crowded scenes)
        best = overlaps.argmax(dim=1).tolist()
        for j in set(range(len(best))) - set(out.matched_idx[i].tolist()):
            assert best[j] in best[j + 1 :]


@pytest.mark.parametrize("seed", range(6))
def test_quantised_ties_equal_ssdpytorch_and_torchvision(seed):
    # IoU matrices full of exact ties (multiples of 1/levels) and several gts sharing a best prior
    g = torch.Generator().manual_seed(100 + seed)
    levels = int(torch.randint(1, 5, (1,), generator=g))
    iou = torch.randint(0, levels + 1, (5, 6, 40), generator=g) / levels
    valid = torch.rand(5, 6, generator=g) < 0.8
    out = match_anchors_ssd_batched(iou, valid)
    matcher = SSDMatcher(0.5)
    for b in range(5):
        keep = valid[b].nonzero()[:, 0]
        if keep.numel() == 0:
            assert torch.equal(out[b], torch.full((40,), -1))
            continue
        for ref in (ssdpytorch_match(0.5, iou[b, keep].clone()), matcher(iou[b, keep])):
            expected = torch.where(ref >= 0, keep[ref.clamp(min=0)], -1)
            assert torch.equal(out[b], expected), (seed, b)


def test_tie_breaking_difference_with_torchvision_is_only_an_implementation_detail():
    """Two gts with the same best prior: ssd.pytorch's loop gives it to the later one.

    torchvision's ``SSDMatcher`` writes ``matches[best_prior_of_each_gt] = arange(G)``, an index
    assignment with a repeated index, whose winner PyTorch does not specify; on the CPU the last
    write wins, which is ssd.pytorch's result (and ours), so the two agree here. This test pins
    that the CPU behaviour still holds, and that ours does not depend on it.
    """
    iou = torch.tensor([[0.9, 0.2, 0.1], [0.95, 0.1, 0.3], [0.9, 0.1, 0.2]])  # all best: prior 0
    assert ssdpytorch_match(0.5, iou.clone()).tolist() == [2, -1, -1]
    assert SSDMatcher(0.5)(iou).tolist() == [2, -1, -1]
    assert match_anchors_ssd(iou).tolist() == [2, -1, -1]
    # ours is written without a repeated-index assignment: permuting the gts moves the winner
    assert match_anchors_ssd(iou[[2, 1, 0]]).tolist() == [2, -1, -1]


def test_padding_and_empty_images():
    boxes = random_boxes(3, torch.Generator().manual_seed(1))
    targets = [
        {"boxes": boxes, "labels": torch.tensor([0, 1, 2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0).long()},
        {"boxes": boxes[:1], "labels": torch.tensor([4])},
    ]
    out = TargetEncoder(rule="ssd")(SSD300_ANCHORS, targets)
    assert not out.pos_mask[1].any()
    alone = TargetEncoder(rule="ssd")(SSD300_ANCHORS, targets[2:])
    assert torch.equal(out.matched_idx[2], alone.matched_idx[0])
    assert set(out.matched_idx[2].tolist()) == {-1, 0}
    assert out.cls_labels[2][out.pos_mask[2]].unique().tolist() == [5]
    padded = pad_targets(targets)
    iou = pairwise_iou_batched(padded[..., 1:], SSD300_ANCHORS)
    assert torch.equal(match_anchors_ssd_batched(iou, padded[..., 0] >= 0), out.matched_idx)


def test_rule_validation_and_repr():
    with pytest.raises(ValueError, match=r"model.target_encoder.rule.*\['book', 'ssd'\]"):
        TargetEncoder(rule="torchvision")
    assert "rule='ssd'" in repr(TargetEncoder(rule="ssd"))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_anchors_ssd(torch.rand(2, 3), iou_threshold=0.0)


def boxes_with_ties(num, generator, copies):
    """``num`` boxes on a 1/32 grid (exact in float32: many IoUs tie exactly), 1/32 to 1/2 of the
    image wide, the last ``copies`` of them repeating earlier ones."""
    xy = torch.randint(0, 31, (num, 2), generator=generator)
    wh = torch.randint(1, 17, (num, 2), generator=generator)
    boxes = torch.cat((xy, (xy + wh).clamp(max=32)), dim=1) / 32
    boxes[num - copies :] = boxes[torch.randint(0, num - copies, (copies,), generator=generator)]
    return boxes


@pytest.mark.parametrize("seed", range(2))
def test_100_objects_per_image_with_ties_equal_torchvision_and_ssdpytorch(seed):
    """Crowded images (100 boxes each, a fifth repeated): torchvision's matches and classes."""
    g = torch.Generator().manual_seed(400 + seed)
    targets = [
        {"boxes": boxes_with_ties(100, g, copies=20), "labels": torch.randint(0, 20, (100,))}
        for _ in range(3)
    ]
    out = TargetEncoder(rule="ssd")(SSD300_ANCHORS, targets)
    matcher = SSDMatcher(0.5)
    for i, t in enumerate(targets):
        overlaps = box_iou(t["boxes"], SSD300_ANCHORS)
        reference = matcher(overlaps)
        assert torch.equal(out.matched_idx[i], reference), (seed, i)
        assert torch.equal(out.matched_idx[i], ssdpytorch_match(0.5, overlaps.clone()))
        classes = torch.where(reference >= 0, t["labels"][reference.clamp(min=0)] + 1, 0)
        assert torch.equal(out.cls_labels[i], classes)
        # the ties are real: anchors whose best IoU (>= 0.5) several boxes share, and boxes
        # whose best anchor a later copy wins (they keep only their threshold matches)
        top = overlaps.max(dim=0).values
        assert ((overlaps == top).sum(dim=0)[top >= 0.5] > 1).any()
        best = overlaps.argmax(dim=1)
        assert (out.matched_idx[i][best] != torch.arange(100)).any()
