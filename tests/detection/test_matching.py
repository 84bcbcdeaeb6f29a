import pytest
import torch

from src.detection.box_ops import box_iou
from src.detection.matching import match_anchors, match_anchors_batched, pairwise_iou_batched


def sequential_reference(iou_ga, threshold=0.5):
    """The book's assignment written as plain Python loops on an [A, G] list of lists."""
    jac = iou_ga.T.tolist()
    num_anchors, num_gt = len(jac), len(jac[0]) if jac else 0
    out = [-1] * num_anchors
    for a in range(num_anchors):
        if num_gt:
            best = max(range(num_gt), key=lambda g: (jac[a][g], -g))
            if jac[a][best] >= threshold:
                out[a] = best
    for _ in range(num_gt):
        best_val, best_a, best_g = None, None, None
        for a in range(num_anchors):  # row-major scan, strict '>' keeps the first maximum
            for g in range(num_gt):
                if best_val is None or jac[a][g] > best_val:
                    best_val, best_a, best_g = jac[a][g], a, g
        out[best_a] = best_g
        for a in range(num_anchors):
            jac[a][best_g] = -1.0
        for g in range(num_gt):
            jac[best_a][g] = -1.0
    return torch.tensor(out, dtype=torch.long)


def test_hand_case_threshold_then_greedy_override():
    iou = torch.tensor([[0.6, 0.2, 0.0, 0.0], [0.7, 0.1, 0.0, 0.55]])
    # anchors 0 and 3 reach 0.5 with gt 1; greedy: (a0, g1) first, then g0 takes a1 (0.2).
    assert match_anchors(iou).tolist() == [1, 0, -1, 1]


def test_gt_overlapping_nothing_still_gets_an_anchor():
    iou = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0]])
    out = match_anchors(iou)
    assert out.tolist() == [1, 0, -1]
    assert set(out.tolist()) >= {0, 1}


def test_ties_lowest_anchor_then_lowest_gt():
    iou = torch.tensor([[0.8, 0.6, 0.0], [0.8, 0.6, 0.0]])
    assert match_anchors(iou).tolist() == [0, 1, -1]
    # equal maxima in different rows and columns: the book takes the lowest anchor first
    iou = torch.tensor([[0.3, 0.9], [0.9, 0.3]])
    assert match_anchors(iou).tolist() == [1, 0]


def test_threshold_is_inclusive_and_configurable():
    iou = torch.tensor([[1.0, 0.5, 0.49, 0.3]])
    assert match_anchors(iou).tolist() == [0, 0, -1, -1]
    assert match_anchors(iou, iou_threshold=0.3).tolist() == [0, 0, 0, 0]


def test_chain_needing_several_rounds():
    iou = torch.tensor(
        [
            [0.9, 0.8, 0.0, 0.0],
            [0.85, 0.7, 0.6, 0.0],
            [0.0, 0.65, 0.62, 0.1],
        ]
    )
    # one mutual pair per round: (a0, g0), then (a1, g1), then (a2, g2); the greedy overrides
    # anchor 1's threshold match (g0, 0.8) with g1.
    out = match_anchors(iou)
    assert out.tolist() == [0, 1, 2, -1]
    assert torch.equal(out, sequential_reference(iou))


def quantised_iou(batch, num_gt, num_anchors, generator, levels=4):
    """IoU-like matrices full of exact ties (multiples of 1/levels, 0.5 included)."""
    return torch.randint(0, levels + 1, (batch, num_gt, num_anchors), generator=generator) / levels


@pytest.mark.parametrize("seed", range(6))
def test_random_with_ties_matches_sequential_reference(seed):
    g = torch.Generator().manual_seed(seed)
    num_gt = int(torch.randint(1, 8, (1,), generator=g))
    num_anchors = int(torch.randint(num_gt, 30, (1,), generator=g))
    iou = quantised_iou(
        4, num_gt, num_anchors, g, levels=int(torch.randint(1, 6, (1,), generator=g))
    )
    batched = match_anchors_batched(iou)
    assert batched.shape == (4, num_anchors) and batched.dtype == torch.long
    for b in range(4):
        expected = sequential_reference(iou[b])
        assert torch.equal(batched[b], expected), (seed, b)
        assert torch.equal(match_anchors(iou[b]), expected)


def test_random_continuous_iou_from_boxes():
    g = torch.Generator().manual_seed(7)
    anchors = torch.rand(200, 2, generator=g)
    anchors = torch.cat((anchors, anchors + 0.05 + 0.3 * torch.rand(200, 2, generator=g)), 1)
    gts = torch.rand(3, 6, 2, generator=g)
    gts = torch.cat((gts, gts + 0.05 + 0.4 * torch.rand(3, 6, 2, generator=g)), 2)
    iou = pairwise_iou_batched(gts, anchors)
    out = match_anchors_batched(iou)
    for b in range(3):
        assert torch.equal(out[b], sequential_reference(iou[b]))
        assert set(range(6)) <= set(out[b].tolist())  # every gt has an anchor


def test_padding_is_ignored():
    g = torch.Generator().manual_seed(3)
    iou = quantised_iou(2, 5, 12, g)
    valid = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    out = match_anchors_batched(iou, valid)
    keep0 = [0, 2]
    ref0 = sequential_reference(iou[0, keep0])
    expected0 = torch.where(ref0 >= 0, torch.tensor(keep0)[ref0.clamp(min=0)], -1)
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], sequential_reference(iou[1, :4]))
    assert not bool(((out[0] == 1) | (out[0] == 3) | (out[0] == 4)).any())
    assert not bool((out[1] == 4).any())


def test_no_objects_is_all_background():
    iou = torch.rand(3, 4, 10)
    valid = torch.zeros(3, 4, dtype=torch.bool)
    valid[1, :2] = True
    out = match_anchors_batched(iou, valid)
    assert torch.equal(out[0], torch.full((10,), -1))
    assert torch.equal(out[2], torch.full((10,), -1))
    assert {0, 1} <= set(out[1].tolist())
    assert torch.equal(match_anchors_batched(torch.zeros(2, 0, 10)), torch.full((2, 10), -1))
    assert torch.equal(match_anchors(torch.zeros(0, 5)), torch.full((5,), -1))


def test_more_gts_than_anchors_assigns_each_anchor_once():
    iou = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.6, 0.65]])
    out = match_anchors(iou)
    assert out.tolist() == [0, 1]


def test_inputs_not_modified_and_nan_treated_as_zero():
    iou = torch.tensor([[float("nan"), 0.7, 0.2], [0.1, 0.2, 0.3]])
    before = iou.clone()
    out = match_anchors(iou)
    assert torch.equal(iou.isnan(), before.isnan())
    assert torch.equal(iou.nan_to_num(), before.nan_to_num())
    assert out.tolist() == [-1, 0, 1]


def test_pairwise_iou_batched_equals_box_iou_bitwise():
    g = torch.Generator().manual_seed(5)
    anchors = torch.rand(50, 2, generator=g)
    anchors = torch.cat((anchors, anchors + torch.rand(50, 2, generator=g)), 1)
    gts = torch.rand(2, 4, 2, generator=g)
    gts = torch.cat((gts, gts + torch.rand(2, 4, 2, generator=g)), 2)
    iou = pairwise_iou_batched(gts, anchors)
    assert iou.shape == (2, 4, 50)
    for b in range(2):
        assert torch.equal(iou[b], box_iou(gts[b], anchors))
        assert torch.equal(iou[b], box_iou(anchors, gts[b]).T)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5, float("nan")])
def test_threshold_validation(threshold):
    with pytest.raises(ValueError, match="iou_threshold"):
        match_anchors(torch.rand(2, 3), iou_threshold=threshold)


def test_shape_validation():
    with pytest.raises(ValueError, match=r"\[G, A\]"):
        match_anchors(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"\[B, G, A\]"):
        match_anchors_batched(torch.rand(2, 3))
    with pytest.raises(ValueError, match="valid"):
        match_anchors_batched(torch.rand(2, 3, 4), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_boxes"):
        pairwise_iou_batched(torch.rand(3, 4), torch.rand(5, 4))


@pytest.mark.parametrize("seed", range(4))
def test_random_padding_and_ties_stress(seed):
    g = torch.Generator().manual_seed(50 + seed)
    iou = quantised_iou(6, 15, 40, g, levels=3)
    valid = torch.rand(6, 15, generator=g) < 0.7
    valid[0] = False  # one image without objects
    out = match_anchors_batched(iou, valid)
    for b in range(6):
        keep = valid[b].nonzero().reshape(-1)
        if keep.numel() == 0:
            assert torch.equal(out[b], torch.full((40,), -1))
            continue
        ref = sequential_reference(iou[b, keep])
        expected = torch.where(ref >= 0, keep[ref.clamp(min=0)], -1)
        assert torch.equal(out[b], expected)
        assert set(keep.tolist()) <= set(out[b].tolist())


def test_batch_mixing_distinct_and_shared_best_anchors_equals_the_sequential_greedy():
    """Images whose ground truths have distinct best anchors take them directly; images where
    two share one go through the greedy rounds; in one batch both equal the book's loops."""
    from src.detection.matching import BoxIoUTable, _greedy_on_candidates

    g = torch.Generator().manual_seed(3)
    anchors = torch.rand(300, 2, generator=g) * 0.7
    anchors = torch.cat((anchors, anchors + 0.05 + torch.rand(300, 2, generator=g) * 0.25), 1)
    far = torch.tensor([[0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.95, 0.95], [0.3, 0.0, 0.5, 0.3]])
    crowded = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4], [0.12, 0.1, 0.4, 0.41]])
    gt = torch.stack((far, crowded, far.flip(0)))  # [3, 3, 4]
    valid = torch.tensor([[True, True, True], [True, True, True], [True, True, False]])
    iou = pairwise_iou_batched(gt, anchors)
    best = iou.argmax(dim=2)
    assert best[0].unique().numel() == 3 and best[1].unique().numel() < 3  # both paths
    ours = match_anchors_batched(iou, valid=valid)
    for b in range(3):
        n = int(valid[b].sum())
        assert torch.equal(ours[b], sequential_reference(iou[b, :n]))
    # the greedy alone, on the table the encoder builds
    taken = _greedy_on_candidates(BoxIoUTable(gt, valid, anchors), valid)
    assert taken[2, 2] == -1 and taken[0].tolist() == best[0].tolist()
    assert len(set(taken[1].tolist())) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_first_max_per_key_ties_take_the_lowest_order(dtype):
    """Both code paths (packed composites; two scatters for float64) pick the same entries."""
    from src.detection.matching import _first_max_per_key

    key = torch.tensor([3, 3, 3, 0, 5, 5, 0])
    value = torch.tensor([0.5, 0.75, 0.75, 0.25, 1.0, 1.0, 0.125], dtype=dtype)
    order = torch.tensor([0, 4, 2, 7, 1, 0, 9])
    win = _first_max_per_key(key, value, order, size=6)
    # key 3: 0.75 twice, order 2 first; key 0: 0.25 beats 0.125; key 5: 1.0 twice, order 0
    assert win.tolist() == [False, False, True, True, False, True, False]


@pytest.mark.parametrize("seed", range(3))
def test_float64_iou_gives_the_float32_assignment_with_ties(seed):
    g = torch.Generator().manual_seed(80 + seed)
    iou = quantised_iou(5, 6, 50, g, levels=4)  # exact in both dtypes
    valid = torch.rand(5, 6, generator=g) < 0.8
    expected = match_anchors_batched(iou, valid)
    assert torch.equal(match_anchors_batched(iou.double(), valid), expected)
    for b in range(5):
        keep = valid[b].nonzero().reshape(-1)
        if keep.numel():
            ref = sequential_reference(iou[b, keep])
            assert torch.equal(expected[b], torch.where(ref >= 0, keep[ref.clamp(min=0)], -1))


def boxes_with_ties(num, generator, copies=0):
    """``num`` boxes on a 1/32 grid (exact in float32, so many IoUs tie exactly), from 1/32 to
    1/2 of the image wide, the last ``copies`` of them repeating earlier ones."""
    xy = torch.randint(0, 31, (num, 2), generator=generator)
    wh = torch.randint(1, 17, (num, 2), generator=generator)
    boxes = torch.cat((xy, (xy + wh).clamp(max=32)), dim=1) / 32
    if copies:
        boxes[num - copies :] = boxes[
            torch.randint(0, num - copies, (copies,), generator=generator)
        ]
    return boxes


def ssd300_anchors():
    from src.detection.anchors import ssd_default_boxes
    from tests.detection.test_anchors import SSD300

    return ssd_default_boxes(**SSD300)


@pytest.mark.parametrize("seed", range(2))
def test_book_rule_at_100_objects_per_image_with_ties_equals_the_book(seed):
    """Crowded SSD300 images (100 boxes each, a fifth of them repeated): the book's targets."""
    from benchmarks.d2l_reference import multibox_target as book_multibox_target
    from src.detection.targets import TargetEncoder

    anchors = ssd300_anchors()
    g = torch.Generator().manual_seed(200 + seed)
    targets = [
        {"boxes": boxes_with_ties(100, g, copies=20), "labels": torch.randint(0, 20, (100,))}
        for _ in range(2)
    ]
    out = TargetEncoder(rule="book")(anchors, targets)
    for i, t in enumerate(targets):
        iou = pairwise_iou_batched(t["boxes"][None], anchors)[0]
        best = iou.argmax(dim=1)
        assert best.unique().numel() < 100  # repeated boxes share a best anchor: greedy rounds
        labels = torch.cat((t["labels"][:, None].float(), t["boxes"]), dim=1)[None]
        offsets, mask, classes = book_multibox_target(anchors[None], labels)
        assert torch.equal(out.cls_labels[i], classes[0])
        assert torch.equal(out.box_offsets[i].reshape(-1), offsets[0])
        assert torch.equal(out.pos_mask[i].repeat_interleave(4).float(), mask[0])
        assert set(out.matched_idx[i].tolist()) == set(range(-1, 100))  # every box has an anchor


def test_book_rule_with_many_copies_of_one_box_equals_the_book():
    """40 copies of one box: each copy's list of ranked anchors is taken by the copies before
    it, so the greedy lengthens the lists several times (1, 4, 16, 64 anchors)."""
    from benchmarks.d2l_reference import multibox_target as book_multibox_target
    from src.detection.targets import TargetEncoder

    anchors = ssd300_anchors()
    boxes = torch.cat(
        (
            torch.tensor([[0.25, 0.25, 0.5, 0.625]]).expand(40, 4),
            boxes_with_ties(5, torch.Generator().manual_seed(9)),
        )
    )
    labels = torch.arange(45) % 20
    out = TargetEncoder(rule="book")(anchors, [{"boxes": boxes, "labels": labels}])
    ref = torch.cat((labels[:, None].float(), boxes), dim=1)[None]
    offsets, mask, classes = book_multibox_target(anchors[None], ref)
    assert torch.equal(out.cls_labels[0], classes[0])
    assert torch.equal(out.box_offsets[0].reshape(-1), offsets[0])
    assert set(out.matched_idx[0].tolist()) == set(range(-1, 45))


def brute_force_first_k(iou, k):
    """Per row of ``iou[R, A]``, the first ``k`` anchors in the order (value desc, index asc)."""
    order = iou.sort(dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lazy_table_keys_bound_the_chunk_maxima_and_first_k_is_exact(dtype):
    """BoxIoUTable computes chunk maxima only where a floor asks: every key bounds its chunk's
    maximum from above and equals it from the floor up; first_k equals a full sort, also for
    rows with fewer than k positive entries (a zero-width box: all zeros, ties everywhere)."""
    from src.detection.matching import BoxIoUTable, first_k

    anchors = ssd300_anchors().to(dtype)
    g = torch.Generator().manual_seed(4)
    gt = boxes_with_ties(24, g, copies=4).to(dtype).view(2, 12, 4)
    gt[0, 3] = torch.tensor([0.5, 0.25, 0.5, 0.75])  # zero width: IoU 0 with every anchor
    gt[1, 5] = torch.tensor([0.97, 0.97, 1.0, 1.0])  # tiny, in a corner
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    dense = pairwise_iou_batched(gt, anchors)[valid]  # [N, A] in row order
    num_anchors = anchors.shape[0]
    table = BoxIoUTable(gt, valid, anchors)
    assert table.nonnegative
    width = table.width
    padded = torch.cat((dense, dense.new_full((dense.shape[0], width - num_anchors), -1.0)), 1)
    true_max = padded.view(dense.shape[0], table.num_chunks, table.chunk).amax(dim=2)
    rows = torch.arange(dense.shape[0])
    keys = table.chunk_keys(rows=rows)
    assert (keys >= true_max).all()
    # nothing computed yet: the zero keys (chunks whose box misses the gt) are exact, the
    # others bounds, most of them above the maximum
    assert torch.equal(table._exact[rows], keys == 0) and (keys > 0).any()
    assert int((keys > true_max).sum()) > 0.5 * int((keys > 0).sum())
    keys = table.chunk_keys(0.5, rows)
    assert torch.equal(keys[keys >= 0.5], true_max[keys >= 0.5])
    assert torch.equal(true_max >= 0.5, keys >= 0.5)
    for k in (1, 3, 40, 300):
        assert torch.equal(first_k(table, k, rows), brute_force_first_k(dense, k)), k
    assert (table.chunk_keys(rows=rows) >= true_max).all()  # still bounds where not exact
    assert torch.equal(table.row_chunk_max()[rows], true_max)


@pytest.mark.parametrize("seed", range(4))
def test_box_table_and_dense_table_agree_crowded_degenerate_and_more_gts_than_anchors(seed):
    """The encoder's computed table (lazy maxima) and a given dense IoU assign alike, also with
    degenerate boxes (NaN IoU, no bounds) and more ground truths than anchors; where the book's
    greedy is defined (every box proper, G <= A) both equal the sequential reference."""
    from src.detection.matching import match_anchors_ssd_batched
    from src.detection.targets import TargetEncoder, pad_targets

    g = torch.Generator().manual_seed(300 + seed)
    xy = torch.randint(0, 28, (40, 2), generator=g)
    anchors = torch.cat((xy, xy + torch.randint(1, 5, (40, 2), generator=g)), dim=1) / 32
    sizes = (12, 60, 25)  # the middle image has more ground truths than anchors
    targets = [
        {"boxes": boxes_with_ties(n, g, copies=n // 3) / 4 + 0.2, "labels": torch.zeros(n).long()}
        for n in sizes
    ]
    if seed % 2:  # a zero-area box with a reversed side: negative IoUs and NaN-free zeros
        targets[2]["boxes"][0] = torch.tensor([0.5, 0.3, 0.4, 0.3])
    padded = pad_targets(targets)
    valid = padded[..., 0] >= 0
    iou = pairwise_iou_batched(padded[..., 1:], anchors)
    for rule, dense_rule in (("book", match_anchors_batched), ("ssd", match_anchors_ssd_batched)):
        out = TargetEncoder(rule=rule)(anchors, targets).matched_idx
        assert torch.equal(out, dense_rule(iou, valid)), rule
    out = TargetEncoder(rule="book")(anchors, targets).matched_idx
    assert set(out[1].tolist()) <= set(range(-1, 60)) and (out[1] >= 0).all()  # 40 anchors
    for b in (0, 2) if seed % 2 == 0 else (0,):
        assert torch.equal(out[b], sequential_reference(iou[b, : sizes[b]]))
