"""Tests of src.detection.mining (hard negative mining) against a per-image reference."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from src.detection.losses import CrossEntropyLoss, FocalLoss, L1Loss, MultiBoxLoss
from src.detection.mining import HardNegativeMiner, hard_negative_mask


class Targets(NamedTuple):
    cls_labels: Tensor
    box_offsets: Tensor
    pos_mask: Tensor
    matched_idx: Tensor


def reference_mask(cls_loss: Tensor, pos_mask: Tensor, ratio: float, min_neg: int) -> Tensor:
    """Straightforward per-image loop: sort the negatives' losses, keep the top k."""
    out = torch.zeros_like(pos_mask)
    for b in range(cls_loss.shape[0]):
        neg_idx = torch.nonzero(~pos_mask[b]).flatten()
        num_pos = int(pos_mask[b].sum())
        k = math.floor(ratio * num_pos) if num_pos > 0 else min_neg
        k = min(k, neg_idx.numel())
        order = torch.argsort(cls_loss[b, neg_idx], descending=True)
        out[b, neg_idx[order[:k]]] = True
    return out


def random_case(batch: int, anchors: int, seed: int, pos_counts: list[int] | None = None):
    g = torch.Generator().manual_seed(seed)
    # Distinct losses (a permutation) so the top-k set is unique.
    cls_loss = torch.stack([torch.randperm(anchors, generator=g) for _ in range(batch)]).float()
    cls_loss = cls_loss / anchors + torch.rand(batch, anchors, generator=g) * 1e-3
    if pos_counts is None:
        pos_counts = torch.randint(0, anchors // 3, (batch,), generator=g).tolist()
    pos = torch.zeros(batch, anchors, dtype=torch.bool)
    for b, p in enumerate(pos_counts):
        pos[b, torch.randperm(anchors, generator=g)[:p]] = True
    return cls_loss, pos


@pytest.mark.parametrize("ratio", [3.0, 1.0, 2.5, 0.5, 0.3, 7.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_image_reference(ratio, seed):
    cls_loss, pos = random_case(batch=6, anchors=50, seed=seed, pos_counts=[0, 1, 3, 7, 12, 40])
    mask = hard_negative_mask(cls_loss, pos, neg_pos_ratio=ratio, min_negatives=4)
    ref = reference_mask(cls_loss, pos, ratio, 4)
    assert mask.dtype == torch.bool and mask.shape == pos.shape
    assert torch.equal(mask, ref)
    # Counts: min(floor(ratio * P), A - P); 4 (min_negatives) for the image without positives.
    num_pos = pos.sum(1)
    expected = [min(math.floor(ratio * p), 50 - p) if p > 0 else 4 for p in num_pos.tolist()]
    assert mask.sum(1).tolist() == expected
    assert not (mask & pos).any()  # positives are not in the mask


def test_kept_negatives_are_the_hardest():
    cls_loss, pos = random_case(batch=8, anchors=100, seed=3)
    mask = hard_negative_mask(cls_loss, pos, 3.0)
    for b in range(8):
        kept = cls_loss[b][mask[b]]
        dropped = cls_loss[b][~mask[b] & ~pos[b]]
        if kept.numel() and dropped.numel():
            assert kept.min() > dropped.max()
    assert torch.equal(mask, reference_mask(cls_loss, pos, 3.0, 0))


def test_exact_counts_hand_example():
    cls_loss = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4],  # 1 positive (anchor 0) -> 3 negatives
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 0.9, 0.8],  # 3 positives -> min(9, 5) = 5
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],  # no positive -> min_negatives = 2
        ]
    )
    pos = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    mask = hard_negative_mask(cls_loss, pos, neg_pos_ratio=3.0, min_negatives=2)
    expected = torch.tensor(
        [
            [0, 0, 1, 0, 1, 0, 1, 0],  # 0.8, 0.7, 0.6 (the 0.9 anchor is a positive)
            [1, 1, 1, 1, 1, 0, 0, 0],  # every negative
            [0, 0, 0, 0, 0, 0, 1, 1],  # 0.7, 0.8
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def test_floor_of_ratio_times_positives():
    cls_loss, pos = random_case(batch=4, anchors=64, seed=9, pos_counts=[1, 2, 3, 5])
    mask = hard_negative_mask(cls_loss, pos, neg_pos_ratio=1.5)
    assert mask.sum(1).tolist() == [1, 3, 4, 7]
    # 0.1 * 30 is 3.0000000000000004 in floating point: floor gives 3, not an off-by-one.
    cls_loss, pos = random_case(batch=1, anchors=64, seed=9, pos_counts=[30])
    assert hard_negative_mask(cls_loss, pos, neg_pos_ratio=0.1).sum().item() == 3


def test_no_positives_gives_min_negatives_clamped():
    cls_loss = torch.rand(3, 10)
    pos = torch.zeros(3, 10, dtype=torch.bool)
    assert hard_negative_mask(cls_loss, pos, 3.0, min_negatives=0).sum().item() == 0
    assert hard_negative_mask(cls_loss, pos, 3.0, min_negatives=4).sum(1).tolist() == [4, 4, 4]
    assert hard_negative_mask(cls_loss, pos, 3.0, min_negatives=100).sum(1).tolist() == [10] * 3
    assert HardNegativeMiner(3.0, 100)(cls_loss, pos).all()


def test_all_positives_gives_no_negatives():
    cls_loss = torch.rand(2, 6)
    pos = torch.ones(2, 6, dtype=torch.bool)
    assert not hard_negative_mask(cls_loss, pos, 3.0, 5).any()


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
def test_no_positive_image_gives_finite_loss(normalize):
    g = torch.Generator().manual_seed(0)
    batch, anchors, classes = 2, 30, 3
    cls_logits = torch.randn(batch, anchors, classes + 1, generator=g, requires_grad=True)
    box_deltas = torch.randn(batch, anchors, 4, generator=g, requires_grad=True)
    pos = torch.zeros(batch, anchors, dtype=torch.bool)
    pos[1, :2] = True  # image 0 has no positives at all
    labels = pos.long()
    offsets = torch.randn(batch, anchors, 4, generator=g) * pos.unsqueeze(-1)
    targets = Targets(labels, offsets, pos, torch.where(pos, 0, -1))
    for cls_loss in (CrossEntropyLoss(), FocalLoss()):
        loss_fn = MultiBoxLoss(
            cls_loss, L1Loss(), normalize=normalize, mining=HardNegativeMiner(3.0, 5)
        )
        out = loss_fn(cls_logits, box_deltas, targets)
        assert torch.isfinite(out.loss)
        assert out.cls_mask.sum(1).tolist() == [5, 2 + 6]
        cls_logits.grad = None
        out.loss.backward()
        assert torch.isfinite(cls_logits.grad).all()
        # Anchors outside the mask receive no classification gradient.
        assert (cls_logits.grad[~out.cls_mask] == 0).all()
        assert (cls_logits.grad[out.cls_mask].abs().sum(-1) > 0).all()
    # Whole batch without positives.
    empty = Targets(
        torch.zeros_like(labels),
        torch.zeros_like(offsets),
        torch.zeros_like(pos),
        torch.full_like(labels, -1),
    )
    out = MultiBoxLoss(normalize=normalize, mining=HardNegativeMiner(3.0, 5))(
        cls_logits, box_deltas, empty
    )
    assert torch.isfinite(out.loss) and out.box_loss == 0
    assert out.cls_mask.sum(1).tolist() == [5, 5]


def test_no_gradient_through_mask_and_inputs_untouched():
    cls_loss = torch.rand(3, 20, requires_grad=True)
    pos = torch.rand(3, 20) < 0.2
    loss_copy, pos_copy = cls_loss.detach().clone(), pos.clone()
    mask = hard_negative_mask(cls_loss, pos, 3.0, 2)
    assert not mask.requires_grad and mask.grad_fn is None
    assert torch.equal(cls_loss.detach(), loss_copy) and torch.equal(pos, pos_copy)
    assert mask.data_ptr() not in (cls_loss.data_ptr(), pos.data_ptr())
    # Using the mask in a loss differentiates only through the loss values.
    (cls_loss * mask).sum().backward()
    assert torch.equal(cls_loss.grad, mask.float())


def test_nan_loss_is_kept_not_hidden():
    cls_loss = torch.tensor([[0.1, float("nan"), 0.3, 0.2, 5.0]])
    pos = torch.tensor([[False, False, False, False, True]])
    mask = hard_negative_mask(cls_loss, pos, 1.0)
    assert mask.tolist() == [[False, True, False, False, False]]


def test_half_precision_and_large_batch():
    cls_loss, pos = random_case(batch=64, anchors=500, seed=11)
    mask = hard_negative_mask(cls_loss.half(), pos, 3.0, 10)
    assert mask.sum(1).tolist() == reference_mask(cls_loss, pos, 3.0, 10).sum(1).tolist()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"neg_pos_ratio": 0}, "mining.neg_pos_ratio"),
        ({"neg_pos_ratio": -3.0}, "mining.neg_pos_ratio"),
        ({"neg_pos_ratio": float("inf")}, "mining.neg_pos_ratio"),
        ({"neg_pos_ratio": None}, "mining.neg_pos_ratio"),
        ({"min_negatives": -1}, "mining.min_negatives"),
        ({"min_negatives": 2.5}, "mining.min_negatives"),
        ({"min_negatives": None}, "mining.min_negatives"),
    ],
)
def test_invalid_hyper_parameters_raise(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        HardNegativeMiner(**kwargs)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        hard_negative_mask(torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.bool), **kwargs)


def test_error_message_and_shape_check():
    with pytest.raises(ValueError) as info:
        HardNegativeMiner(neg_pos_ratio=-1.0)
    assert str(info.value) == "mining.neg_pos_ratio must be > 0 (got -1.0)"
    with pytest.raises(ValueError, match="same shape"):
        hard_negative_mask(torch.rand(2, 5), torch.zeros(2, 4, dtype=torch.bool))
    assert HardNegativeMiner(min_negatives=3.0).min_negatives == 3  # integral float accepted
    assert "neg_pos_ratio=3.0" in repr(HardNegativeMiner())
