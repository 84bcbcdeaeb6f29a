import pytest
import torch

from src.detection.anchors import grid_anchors, ssd_default_boxes
from src.detection.matching import BoxIoUTable, pairwise_iou_batched
from tests.detection.test_anchors import SSD300, TINY_MAPS, TINY_RATIOS, TINY_SIZES


def tiny_ssd_anchors():
    return grid_anchors([(m, m) for m in TINY_MAPS], TINY_SIZES, TINY_RATIOS)


@pytest.mark.parametrize("which", ["ssd300", "tiny"])
def test_box_iou_table_equals_dense_iou_bitwise(which):
    anchors = ssd_default_boxes(**SSD300) if which == "ssd300" else tiny_ssd_anchors()
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(3, 5, 2, generator=g) * 0.8
    gt = torch.cat((xy, xy + 0.02 + torch.rand(3, 5, 2, generator=g) * 0.5), dim=-1)
    gt[1, 2] = torch.tensor([0.3, 0.3, 0.3, 0.6])  # zero width: IoU 0 everywhere
    valid = torch.tensor([[True] * 5, [True, True, True, False, False], [False] * 5])
    table = BoxIoUTable(gt, valid, anchors)
    dense = pairwise_iou_batched(gt, anchors)
    b, gi = valid.nonzero(as_tuple=True)
    a = torch.arange(anchors.shape[0])
    assert torch.equal(table.row_values(table.row_of[b, gi][:, None], a[None, :]), dense[b, gi])
    # each row knows its image and ground truth; the padding rows read 0
    rows = table.row_of[b, gi]
    assert torch.equal(table.row_image[rows], b) and torch.equal(table.row_gt[rows], gi)
    padding = table.row_of[~valid]
    assert (table.buffer[padding, : anchors.shape[0]] == 0).all()
    # past the last anchor (both anchor sets end inside a chunk) reads as -1
    assert table.width > anchors.shape[0]
    last = torch.tensor([table.width - 1])
    assert table.row_values(table.row_of[b[:1], gi[:1]], last).tolist() == [-1.0]


@pytest.mark.parametrize("seed", range(3))
def test_book_rule_on_ssd300_anchors_equals_the_book(seed):
    """The fast path (IoU table, candidates) against the book's own multibox_target."""
    from benchmarks.d2l_reference import multibox_target as book_multibox_target
    from src.detection.targets import TargetEncoder

    anchors = ssd_default_boxes(**SSD300)
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(3):
        n = int(torch.randint(1, 11, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8
        boxes = torch.cat((xy, (xy + 0.03 + torch.rand(n, 2, generator=g) * 0.6).clamp(max=1)), 1)
        targets.append({"boxes": boxes, "labels": torch.randint(0, 20, (n,), generator=g)})
    out = TargetEncoder()(anchors, targets)
    for i, t in enumerate(targets):
        labels = torch.cat((t["labels"][:, None].float(), t["boxes"]), dim=1)[None]
        offsets, mask, classes = book_multibox_target(anchors[None], labels)
        assert torch.equal(out.cls_labels[i], classes[0])
        assert torch.equal(out.box_offsets[i].reshape(-1), offsets[0])
        assert torch.equal(out.pos_mask[i].repeat_interleave(4).float(), mask[0])


def test_cached_anchor_columns_follow_in_place_changes_and_inference_tensors():
    """The per-anchors cache must never serve stale columns (areas, the NaN guard)."""
    from src.detection.targets import TargetEncoder

    encoder = TargetEncoder()
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6]]), "labels": torch.tensor([0])}]
    anchors = tiny_ssd_anchors().clone()
    first = encoder(anchors, targets)
    assert torch.equal(encoder(anchors, targets).box_offsets, first.box_offsets)  # cache hit
    anchors.mul_(0.5)  # in place: new version counter
    assert torch.equal(
        encoder(anchors, targets).box_offsets, encoder(anchors.clone(), targets).box_offsets
    )
    assert not torch.equal(encoder(anchors, targets).box_offsets, first.box_offsets)
    # a degenerate anchor changes the IoU guard (no NaN reaches the matching)
    anchors[0] = torch.tensor([0.2, 0.2, 0.2, 0.2])
    out = encoder(anchors, targets)
    assert out.matched_idx[0, 0] == -1 and torch.isfinite(out.box_offsets).all()
    # inference tensors have no version counter: computed each time, same result
    with torch.inference_mode():
        frozen = tiny_ssd_anchors()
        inside = [encoder(frozen, targets) for _ in range(2)]
    for got in inside:
        assert torch.equal(got.cls_labels, encoder(tiny_ssd_anchors(), targets).cls_labels)


def test_negative_zero_coordinates_keep_the_books_assignment():
    """-0.0 coordinates must not reorder zero IoUs (the fast selection reads float bits)."""
    from benchmarks.d2l_reference import multibox_target as book_multibox_target
    from src.detection.targets import TargetEncoder

    g = torch.Generator().manual_seed(5)
    xy = torch.rand(60, 2, generator=g) * 0.6
    anchors = torch.cat((xy, xy + 0.05 + torch.rand(60, 2, generator=g) * 0.2), dim=1)
    anchors[:10, 0] = -0.05  # the first anchors cross the left edge
    # Zero-width boxes on the left edge, x1 = +0.0 and x2 = -0.0: the book's IoU is -0.0 at the
    # anchors crossing the edge and +0.0 elsewhere. The three share a best anchor (anchor 0), so
    # the greedy runs on candidates, which are zero-IoU anchors here.
    edge = torch.tensor([0.0, 0.2, -0.0, 0.4])
    boxes = torch.stack((edge, edge, edge, torch.tensor([0.3, 0.3, 0.5, 0.6])))
    table = BoxIoUTable(boxes[None], torch.ones(1, 4, dtype=torch.bool), anchors)
    assert table.nonnegative and not torch.signbit(table.buffer[:4, :60]).any()
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 2, 3])}]
    out = TargetEncoder()(anchors, targets)
    labels = torch.cat((targets[0]["labels"][:, None].float(), boxes), dim=1)[None]
    offsets, mask, classes = book_multibox_target(anchors[None], labels)
    assert torch.equal(out.cls_labels[0], classes[0])
    assert torch.equal(out.box_offsets[0].reshape(-1), offsets[0])
    assert out.cls_labels[0, :3].tolist() == [1, 2, 3]  # the book's picks: anchors 0, 1, 2


def test_encoder_outputs_are_normal_tensors_usable_in_autograd():
    """The matching runs in inference mode; nothing of it may leak into the training graph."""
    import torch.nn.functional as F

    from src.detection.targets import TargetEncoder

    anchors = tiny_ssd_anchors()
    targets = [
        {
            "boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.1, 0.5, 0.6]]),
            "labels": torch.tensor([0, 1]),
        }
    ]
    out = TargetEncoder()(anchors, targets)
    assert not any(t.is_inference() for t in out)
    logits = torch.randn(1, anchors.shape[0], 3, requires_grad=True)
    offsets = torch.randn(1, anchors.shape[0], 4, requires_grad=True)
    picked = offsets.gather(1, out.matched_idx.clamp(min=0)[..., None].expand(-1, -1, 4))
    loss = F.cross_entropy(logits.flatten(0, 1), out.cls_labels.flatten()) + (
        (picked - out.box_offsets)[out.pos_mask].abs().sum()
    )
    loss.backward()  # saves the targets and indices for backward: fails on inference tensors
    assert logits.grad is not None and offsets.grad is not None
    # the anchor columns cached during the encoder's inference-mode matching serve a table
    # built outside inference mode too
    table = BoxIoUTable(targets[0]["boxes"][None], torch.ones(1, 2, dtype=torch.bool), anchors)
    dense = pairwise_iou_batched(targets[0]["boxes"][None], anchors)[0]
    assert torch.equal(table.buffer[:2, : anchors.shape[0]], dense)
