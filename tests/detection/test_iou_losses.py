"""GIoU, DIoU and CIoU box losses (``IoUBoxLoss``, ``conf/loss/{giou,diou,ciou}.yaml``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from src.detection.coder import BoxCoder
from src.detection.losses import (
    CrossEntropyLoss,
    FocalLoss,
    IoUBoxLoss,
    MultiBoxLoss,
    build_box_loss,
    compute_loss,
)
from src.detection.mining import HardNegativeMiner
from src.detection.targets import TargetEncoder
from src.utils.config import check_group_keys
from tests.conftest import compose_config, train_overrides

KINDS = ("giou", "diou", "ciou")
TORCHVISION = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}

# 6 anchors (normalised xyxy), 3 images: two objects, one object, none.
ANCHORS = torch.tensor(
    [
        [0.0, 0.0, 0.5, 0.5],
        [0.5, 0.5, 1.0, 1.0],
        [0.3, 0.3, 0.7, 0.7],
        [0.4, 0.0, 1.0, 0.4],
        [0.05, 0.05, 0.45, 0.6],
        [0.0, 0.5, 0.5, 1.0],
    ]
)
TARGETS = [
    {
        "boxes": torch.tensor([[0.05, 0.0, 0.5, 0.55], [0.5, 0.45, 0.95, 1.0]]),
        "labels": torch.tensor([0, 1]),
    },
    {"boxes": torch.tensor([[0.35, 0.25, 0.75, 0.7]]), "labels": torch.tensor([1])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
]


def batch(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    targets = TargetEncoder()(ANCHORS, TARGETS)
    cls_logits = torch.randn(3, 6, 3, generator=g)
    box_deltas = scale * torch.randn(3, 6, 4, generator=g)
    return cls_logits, box_deltas, targets


# ---------------------------------------------------------------- IoUBoxLoss


def test_hand_values_of_a_square_pair():
    # [0, 0, 2, 2] vs [1, 1, 3, 3]: IoU 1/7, enclosing box 3 x 3 (area 9, diagonal^2 18),
    # centres (1, 1) and (2, 2): distance^2 2; equal aspect ratios, so CIoU = DIoU.
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    giou = 1 - 1 / 7 + (9 - 7) / 9
    diou = 1 - 1 / 7 + 2 / 18
    torch.testing.assert_close(IoUBoxLoss("giou")(a, b), torch.tensor([giou]).double())
    torch.testing.assert_close(IoUBoxLoss("diou")(a, b), torch.tensor([diou]).double())
    torch.testing.assert_close(IoUBoxLoss("ciou")(a, b), torch.tensor([diou]).double())


def test_hand_value_of_ciou_aspect_term():
    # [0, 0, 2, 1] (w/h 2) vs [0, 0, 1, 1]: IoU 1/2, enclosing = the first box (GIoU penalty 0),
    # centres (1, .5) and (.5, .5): d^2 / c^2 = .25 / 5; v = 4/pi^2 (atan 1 - atan 2)^2.
    a = torch.tensor([[0.0, 0.0, 2.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    alpha = v / (1 - 0.5 + v)
    expected = {"giou": 0.5, "diou": 0.55, "ciou": 0.55 + alpha * v}
    for kind, value in expected.items():
        torch.testing.assert_close(
            IoUBoxLoss(kind)(a, b), torch.tensor([value]).double(), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("kind", KINDS)
def test_equals_torchvision_and_is_scale_invariant(kind):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(50, 2, generator=g, dtype=torch.float64)
    boxes1 = torch.cat((xy, xy + 0.05 + torch.rand(50, 2, generator=g, dtype=torch.float64)), 1)
    boxes2 = boxes1 + 0.2 * torch.randn(50, 4, generator=g, dtype=torch.float64)
    boxes2 = torch.cat((boxes2[:, :2], torch.maximum(boxes2[:, 2:], boxes2[:, :2] + 0.01)), 1)
    out = IoUBoxLoss(kind)(boxes1, boxes2)
    assert torch.equal(out, TORCHVISION[kind](boxes1, boxes2, reduction="none", eps=1e-7))
    assert out.shape == (50,) and (out >= 0).all()
    # scale-invariant up to torchvision's eps (1e-7 added to areas ~1e-2 here)
    torch.testing.assert_close(IoUBoxLoss(kind)(300 * boxes1, 300 * boxes2), out, atol=1e-5, rtol=0)
    same = IoUBoxLoss(kind)(boxes1, boxes1)
    torch.testing.assert_close(same, torch.zeros_like(out), atol=1e-5, rtol=0)  # eps / area
    assert IoUBoxLoss(kind)(boxes1[:0], boxes2[:0]).shape == (0,)


def test_invalid_kind_and_eps_name_the_key():
    with pytest.raises(ValueError, match=r"loss\.module\.box_loss\.kind must be one of \['giou'"):
        IoUBoxLoss("iou")
    with pytest.raises(ValueError, match=r"loss\.module\.box_loss\.eps must be > 0 \(got 0\)"):
        IoUBoxLoss("giou", eps=0)
    assert repr(IoUBoxLoss("ciou")) == "IoUBoxLoss(kind='ciou', eps=1e-07)"
    with pytest.raises(ValueError, match="loss=giou"):
        build_box_loss("giou")  # focal.yaml's knob: the message says how to combine instead


# ---------------------------------------------------------------- MultiBoxLoss in box space


def torchvision_box_term(kind: str, box_deltas: Tensor, targets, normalize: str, coder=None):
    """The box term by hand: torchvision on decoded positives vs matched ground truths."""
    coder = coder or BoxCoder()
    pos = targets.pos_mask
    anchors = ANCHORS.expand(pos.shape[0], -1, -1)
    pred = coder.decode(box_deltas[pos], anchors[pos])  # [P, 4], batch-major order
    gt = torch.cat([TARGETS[b]["boxes"][targets.matched_idx[b][pos[b]]] for b in range(len(pos))])
    per_pos = TORCHVISION[kind](pred, gt, reduction="none")  # [P]
    if normalize == "positives":
        return per_pos.sum() / max(int(pos.sum()), 1)
    counts = pos.sum(1).tolist()
    per_image = torch.stack([chunk.sum() for chunk in per_pos.split(counts)])
    return (per_image / pos.shape[1]).mean()


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
@pytest.mark.parametrize("kind", KINDS)
def test_box_term_equals_torchvision_on_matched_pairs(kind, normalize):
    cls_logits, box_deltas, t = batch()
    # by hand: image 0 has anchors 0, 1, 4 positive (two on gt 0), image 1 anchor 2, image 2 none
    assert t.pos_mask.sum(1).tolist() == [3, 1, 0]
    assert t.matched_idx[0].tolist() == [0, 1, -1, -1, 0, -1]
    loss = MultiBoxLoss(CrossEntropyLoss(), IoUBoxLoss(kind), 1.0, 2.5, normalize)
    out = loss(cls_logits, box_deltas, t, anchors=ANCHORS, coder=BoxCoder())
    expected = torchvision_box_term(kind, box_deltas, t, normalize)
    torch.testing.assert_close(out.box_loss, 2.5 * expected)
    torch.testing.assert_close(out.loss, out.cls_loss + out.box_loss)
    plain_cls = MultiBoxLoss(CrossEntropyLoss(), normalize=normalize)(cls_logits, box_deltas, t)
    torch.testing.assert_close(out.cls_loss, plain_cls.cls_loss)  # the box loss alone changed
    assert (out.per_anchor_box[~t.pos_mask] == 0).all() and (
        out.per_anchor_box[t.pos_mask] > 0
    ).all()


@pytest.mark.parametrize("kind", KINDS)
def test_box_term_uses_the_given_coder(kind):
    cls_logits, box_deltas, t = batch()
    coder = BoxCoder(variances=(0.2, 0.4))
    out = MultiBoxLoss(box_loss=IoUBoxLoss(kind))(
        cls_logits, box_deltas, t, anchors=ANCHORS, coder=coder
    )
    torch.testing.assert_close(
        out.box_loss, torchvision_box_term(kind, box_deltas, t, "anchors", coder)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_perfect_predictions_give_zero_box_loss(kind):
    cls_logits, _, t = batch()
    out = MultiBoxLoss(box_loss=IoUBoxLoss(kind), normalize="positives")(
        cls_logits, t.box_offsets, t, anchors=ANCHORS
    )
    assert out.box_loss.abs() < 1e-5


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
@pytest.mark.parametrize("kind", KINDS)
def test_mining_and_focal_combine_with_every_kind(kind, normalize):
    cls_logits, box_deltas, t = batch(seed=3)
    miner = HardNegativeMiner(neg_pos_ratio=1.0, min_negatives=2)
    for cls_loss in (CrossEntropyLoss(), FocalLoss(gamma=2.0)):
        plain = MultiBoxLoss(cls_loss, IoUBoxLoss(kind), normalize=normalize)
        mined = MultiBoxLoss(cls_loss, IoUBoxLoss(kind), normalize=normalize, mining=miner)
        a = plain(cls_logits, box_deltas, t, anchors=ANCHORS)
        b = mined(cls_logits, box_deltas, t, anchors=ANCHORS)
        assert torch.equal(a.box_loss, b.box_loss)  # mining changes the classification term only
        assert a.cls_mask.all() and not b.cls_mask.all() and b.cls_mask[t.pos_mask].all()
        assert b.cls_loss < a.cls_loss
        torch.testing.assert_close(a.per_anchor_cls, cls_loss(cls_logits, t.cls_labels))


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
@pytest.mark.parametrize("kind", KINDS)
def test_no_positives_is_finite(kind, normalize):
    cls_logits, box_deltas, _ = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 3
    box_deltas.requires_grad_(True)
    cls_logits.requires_grad_(True)
    loss = MultiBoxLoss(box_loss=IoUBoxLoss(kind), normalize=normalize, mining=HardNegativeMiner())
    encoded, out = compute_loss(loss, TargetEncoder(), cls_logits, box_deltas, ANCHORS, empty)
    assert not encoded.pos_mask.any() and (encoded.matched_boxes == 0).all()
    assert torch.isfinite(out.loss) and out.box_loss == 0 and out.cls_loss > 0
    out.loss.backward()
    assert torch.isfinite(cls_logits.grad).all()
    assert box_deltas.grad is None or (box_deltas.grad == 0).all()


@pytest.mark.parametrize("kind", KINDS)
def test_huge_offsets_keep_finite_gradients(kind):
    cls_logits, box_deltas, t = batch(scale=1e4)
    box_deltas.requires_grad_(True)
    out = MultiBoxLoss(box_loss=IoUBoxLoss(kind))(cls_logits, box_deltas, t, anchors=ANCHORS)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(box_deltas.grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_anchor_pictures_show_the_trained_loss(kind):
    """``analyze_anchors`` goes through ``compute_loss``: its L is the IoU loss of its boxes."""
    from src.viz.anchors import analyze_anchors
    from tests.viz.conftest import GT_BOXES, GT_LABELS, make_net

    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    target = {"boxes": GT_BOXES.clone(), "labels": GT_LABELS.clone()}
    loss = MultiBoxLoss(box_loss=IoUBoxLoss(kind))
    a = analyze_anchors(make_net(), TargetEncoder(), loss, image, target, max_panels=None)
    assert a.num_panels > 0 and torch.all(a.box_loss[:-1] >= a.box_loss[1:])
    expected = TORCHVISION[kind](a.pred_boxes, a.matched_boxes, reduction="none")
    torch.testing.assert_close(a.box_loss, expected)
    assert a.box_loss_name == f"IoUBoxLoss(kind='{kind}', eps=1e-07)"


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "loss.cls_loss._target_=src.detection.losses.FocalLoss",
            "+loss.cls_loss.gamma=1.5",
            "+loss.cls_loss.prior_pi=0.01",
        ],
        ["++loss.cls_loss={_target_:src.detection.losses.FocalLoss,gamma:1.5,prior_pi:0.01}"],
    ],
)
def test_config_focal_classification(overrides, tmp_path: Path):
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "loss=diou",
            "loss.normalize=positives",
            "loss.box_weight=8",
            "mining=hard_negative",
            *overrides,
        ],
    )
    check_group_keys(cfg)
    loss = instantiate(cfg.loss.module)
    assert isinstance(loss.cls_loss, FocalLoss) and loss.cls_loss.gamma == 1.5
    assert loss.background_bias(1) == pytest.approx(math.log(0.99 / 0.01))
    assert loss.box_loss.kind == "diou" and loss.box_weight == 8.0
    assert loss.normalize == "positives" and isinstance(loss.mining, HardNegativeMiner)


def test_config_invalid_values_name_the_key(tmp_path: Path):
    cfg = compose_config(
        "train", [f"paths.output_dir={tmp_path}", "loss=ciou", "loss.box_weight=-1"]
    )
    with pytest.raises(Exception, match=r"loss\.box_weight must be >= 0"):
        instantiate(cfg.loss.module)
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", "loss=giou", "+loss.sigma=2"])
    with pytest.raises(ValueError, match=r"loss\.sigma=2 is ignored by loss=giou"):
        check_group_keys(cfg)


@pytest.mark.parametrize("mining", ["none", "hard_negative"])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_dev_run_trains_one_step(kind, mining, tmp_path: Path, banana_data_dir: Path):
    from src.train import train

    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path,
            banana_data_dir,
            "debug=fdr",
            f"loss={kind}",
            f"mining={mining}",
            "data.batch_size=2",
            "callbacks.detection_grid=null",
        ),
    )
    check_group_keys(cfg)
    metrics, objects = train(cfg)
    loss = objects["model"].loss_fn
    assert isinstance(loss, MultiBoxLoss) and isinstance(loss.cls_loss, CrossEntropyLoss)
    assert isinstance(loss.box_loss, IoUBoxLoss) and loss.box_loss.kind == kind
    assert loss.box_weight == 2.0 and loss.cls_weight == 1.0
    assert loss.normalize == "positives"  # set by experiment=banana, the default recipe
    assert isinstance(loss.mining, HardNegativeMiner) == (mining == "hard_negative")
    for key in ("train/loss_epoch", "train/box_loss", "val/loss"):
        assert math.isfinite(float(metrics[key])), key
    assert float(metrics["train/box_loss"]) > 0  # banana images always have a positive anchor


def test_experiment_yaml_combines_iou_with_focal(tmp_path: Path):
    """The recipe of docs/losses.md: an experiment picking loss=giou with focal classification."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "giou_focal.yaml").write_text(
        "# @package _global_\n"
        "defaults:\n"
        "  - override /loss: giou\n"
        "  - override /mining: hard_negative\n"
        "loss:\n"
        "  normalize: positives\n"
        "  cls_loss:\n"
        "    _target_: src.detection.losses.FocalLoss\n"
        "    gamma: 2.0\n"
        "    prior_pi: 0.01\n"
    )
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            f"hydra.searchpath=[file://{tmp_path}]",
            "experiment=giou_focal",
        ],
    )
    check_group_keys(cfg)
    loss = instantiate(cfg.loss.module)
    assert isinstance(loss.cls_loss, FocalLoss) and loss.cls_loss.gamma == 2.0
    assert loss.box_loss.kind == "giou" and loss.box_weight == 2.0
    assert loss.normalize == "positives" and isinstance(loss.mining, HardNegativeMiner)
