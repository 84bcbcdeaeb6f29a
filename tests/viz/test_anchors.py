from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from src.detection.box_ops import box_iou
from src.detection.coder import BoxCoder
from src.detection.losses import L1Loss, MultiBoxLoss, SmoothL1Loss
from src.detection.mining import HardNegativeMiner
from src.detection.targets import TargetEncoder
from src.viz.anchors import (
    analyze_anchors,
    analyze_module,
    anchor_panels_figure,
    figure_to_tensor,
    negatives_figure,
    panels_summary,
)
from tests.viz.conftest import GT_BOXES, FakeModule, make_anchors, make_net


def _expected(net, loss_fn, target):
    anchors = make_anchors()
    enc = TargetEncoder()(anchors, [target])
    pos = enc.pos_mask[0]
    deltas = net.deltas.detach()[0]
    per_box = loss_fn.box_loss(deltas, enc.box_offsets[0]).sum(-1)
    return anchors, enc, pos, deltas, per_box


@pytest.mark.parametrize("box_loss", [L1Loss(), SmoothL1Loss(sigma=2.0)])
def test_panels_match_library_values(image, target, box_loss) -> None:
    net = make_net()
    loss_fn = MultiBoxLoss(box_loss=box_loss)
    a = analyze_anchors(net, TargetEncoder(), loss_fn, image, target, max_panels=None)
    anchors, enc, pos, deltas, per_box = _expected(net, loss_fn, target)

    assert a.num_positives == int(pos.sum()) > 0
    assert a.num_panels == a.num_positives
    assert pos[a.anchor_index].all()
    assert set(a.anchor_index.tolist()) == set(pos.nonzero().squeeze(1).tolist())
    # sorted by decreasing L
    assert torch.all(a.box_loss[:-1] >= a.box_loss[1:])
    # L: the configured box loss summed over the 4 offsets
    torch.testing.assert_close(a.box_loss, per_box[a.anchor_index])
    # J: IoU of the box decoded from the anchor with its matched ground truth
    pred = BoxCoder().decode(deltas[a.anchor_index], anchors[a.anchor_index])
    torch.testing.assert_close(a.pred_boxes, pred)
    gt = GT_BOXES[enc.matched_idx[0, a.anchor_index]]
    torch.testing.assert_close(a.matched_boxes, gt)
    torch.testing.assert_close(a.iou, box_iou(pred, gt).diagonal())
    assert a.cls_loss.shape == a.score.shape == (a.num_panels,)


def test_perfect_predictions_have_j_one_and_l_zero(image, target) -> None:
    net = make_net(noise=0.0)
    a = analyze_anchors(net, TargetEncoder(), MultiBoxLoss(), image, target)
    assert a.num_panels > 0
    torch.testing.assert_close(a.iou, torch.ones_like(a.iou), atol=1e-4, rtol=0)
    torch.testing.assert_close(a.box_loss, torch.zeros_like(a.box_loss), atol=1e-4, rtol=0)


def test_cap_keeps_the_highest_losses(image, target) -> None:
    net = make_net()
    loss_fn = MultiBoxLoss(box_loss=SmoothL1Loss(sigma=1.0))
    full = analyze_anchors(net, TargetEncoder(), loss_fn, image, target, max_panels=None)
    capped = analyze_anchors(net, TargetEncoder(), loss_fn, image, target, max_panels=3)
    assert full.num_positives > 3
    assert capped.num_panels == 3 and capped.num_positives == full.num_positives
    torch.testing.assert_close(capped.box_loss, full.box_loss[:3])
    assert torch.equal(capped.anchor_index, full.anchor_index[:3])
    with pytest.raises(ValueError, match="max_panels"):
        analyze_anchors(net, TargetEncoder(), loss_fn, image, target, max_panels=0)


def test_negatives_without_mining_use_a_3_to_1_miner(image, target) -> None:
    net = make_net()
    loss_fn = MultiBoxLoss()
    a = analyze_anchors(net, TargetEncoder(), loss_fn, image, target)
    assert "mining=none" in a.mining_note and "HardNegativeMiner" in a.mining_note
    assert a.negative_index.numel() == 3 * a.num_positives
    assert a.num_negatives == make_anchors().shape[0] - a.num_positives
    # the kept negatives are the hardest ones, in decreasing order of classification loss
    assert torch.all(a.negative_cls_loss[:-1] >= a.negative_cls_loss[1:])
    anchors, enc, pos, _, _ = _expected(net, loss_fn, target)
    per_cls = loss_fn.cls_loss(net.logits.detach(), enc.cls_labels)[0]
    threshold = per_cls[a.negative_index].min()
    others = torch.ones_like(pos)
    others[a.negative_index] = False
    assert (per_cls[others & ~pos] <= threshold).all()


def test_negatives_with_mining_are_the_loss_mask(image, target) -> None:
    net = make_net()
    loss_fn = MultiBoxLoss(mining=HardNegativeMiner(neg_pos_ratio=2.0))
    a = analyze_anchors(net, TargetEncoder(), loss_fn, image, target)
    assert "kept by hard negative mining" in a.mining_note
    assert a.negative_index.numel() == 2 * a.num_positives
    anchors, enc, pos, deltas, _ = _expected(net, loss_fn, target)
    out = loss_fn(net.logits.detach(), deltas[None], enc)
    expected = (out.cls_mask[0] & ~pos).nonzero().squeeze(1)
    assert set(a.negative_index.tolist()) == set(expected.tolist())


def test_image_without_objects(image) -> None:
    net = make_net()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    a = analyze_anchors(net, TargetEncoder(), MultiBoxLoss(), image, empty)
    assert a.num_panels == 0 and a.num_positives == 0
    assert a.negative_index.numel() == 100  # HardNegativeMiner's min_negatives
    fig = anchor_panels_figure(a)
    assert isinstance(fig, Figure)
    assert figure_to_tensor(fig).dtype == torch.uint8
    assert panels_summary(a) == []


def test_inputs_unchanged_and_module_mode_restored(image, target) -> None:
    module = FakeModule(make_net(), MultiBoxLoss())
    module.train()
    image0, boxes0 = image.clone(), target["boxes"].clone()
    a = analyze_module(module, image, target, max_panels=4)
    assert module.training
    assert torch.equal(image, image0) and torch.equal(target["boxes"], boxes0)
    records = panels_summary(a)
    assert [r["J"] for r in records] == a.iou.tolist()
    assert [r["L"] for r in records] == a.box_loss.tolist()


def test_figures_render(image, target) -> None:
    a = analyze_anchors(make_net(), TargetEncoder(), MultiBoxLoss(), image, target, max_panels=5)
    fig = anchor_panels_figure(a, show_anchor=True, ncols=3)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 5
    assert "J=" in visible[0].get_title() and "L=" in visible[0].get_title()
    picture = figure_to_tensor(fig)
    assert picture.dim() == 3 and picture.shape[0] == 3 and picture.dtype == torch.uint8
    neg = negatives_figure(a)
    assert "would keep" in neg.get_suptitle()
    assert figure_to_tensor(neg).shape[0] == 3


def _texts_inside(fig: Figure) -> list[str]:
    """The visible texts of a drawn figure that stick out of it (cut off in the picture)."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for t in fig.findobj(Text):
        if not (t.get_visible() and t.get_text().strip()):
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        e = t.get_window_extent(renderer)
        if e.x0 < box.x0 - 1 or e.y0 < box.y0 - 1 or e.x1 > box.x1 + 1 or e.y1 > box.y1 + 1:
            out.append(t.get_text())
    return out


@pytest.mark.parametrize("panels", [1, 4])
def test_tensorboard_figures_have_short_titles_and_nothing_cut_off(image, target, panels) -> None:
    loss_fn = MultiBoxLoss(mining=HardNegativeMiner(neg_pos_ratio=3.0))
    a = analyze_anchors(make_net(), TargetEncoder(), loss_fn, image, target, max_panels=panels)
    fig = anchor_panels_figure(a, title="Image 1, epoch 2")
    neg = negatives_figure(a, title="Image 1, epoch 2: hard negatives")
    for figure in (fig, neg):
        # half a page wide whatever the number of panels (one panel used to give 1.7 inches
        # and a title cut to "alidation image 1, epoch 2")
        assert figure.get_figwidth() == pytest.approx(3.4)
        title = figure.get_suptitle().splitlines()
        assert len(title) == 2 and all(len(line) <= 52 for line in title), title
        assert title[0].startswith("Image 1, epoch 2")
        assert "(" not in figure.get_suptitle() or "=" not in figure.get_suptitle()  # no repr
        assert _texts_inside(figure) == []
        legend = [t.get_text() for t in figure.legends[0].get_texts()]
        assert "ground truth" in legend
    assert (
        fig.get_suptitle()
        .splitlines()[0]
        .endswith(f"{panels} of {a.num_positives} positive anchors")
    )
    assert neg.get_suptitle().splitlines()[1] == (
        f"{a.negative_index.numel()} of {a.num_negatives} negatives kept by 3:1 mining"
    )
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == panels and all(t.count("\n") == 0 and "J=" in t for t in titles)
