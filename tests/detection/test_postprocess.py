import pytest
import torch

from src.detection.coder import BoxCoder
from src.detection.postprocess import PostProcess

# a0 and a1 overlap (IoU 0.084 / 0.096 = 0.875); a2 is apart; a3 sticks out of the image.
ANCHORS = torch.tensor(
    [
        [0.1, 0.1, 0.4, 0.4],
        [0.12, 0.1, 0.42, 0.4],
        [0.6, 0.6, 0.9, 0.9],
        [0.8, 0.8, 1.2, 1.2],
    ]
)
# Probabilities (background, class 0, class 1); logits = log(p) so softmax gives them back.
PROBS = torch.tensor(
    [
        [0.1, 0.7, 0.2],
        [0.1, 0.3, 0.6],
        [0.5, 0.45, 0.05],
        [0.995, 0.004, 0.001],
    ]
)


def run(pp, probs=PROBS, deltas=None):
    logits = probs.log()[None]
    if deltas is None:
        deltas = torch.zeros(1, probs.shape[0], 4)
    return pp(logits, deltas, ANCHORS)[0]


def check(det, anchors_idx, labels, scores):
    assert det["boxes"].shape == (len(labels), 4)
    torch.testing.assert_close(det["boxes"], ANCHORS[anchors_idx].clamp(0, 1))
    assert det["labels"].tolist() == labels
    assert det["labels"].dtype == torch.int64
    torch.testing.assert_close(det["scores"], torch.tensor(scores))


def test_per_class_nms():
    # class 0: a0 (0.7) suppresses a1 (0.3), a2 (0.45) kept; class 1: a1 (0.6) suppresses a0,
    # a2 (0.05) kept; a3 is below the 0.01 score threshold.
    det = run(PostProcess())
    check(det, [0, 1, 2, 2], [0, 1, 0, 1], [0.7, 0.6, 0.45, 0.05])


def test_class_agnostic_nms():
    # best class per anchor: a0 c0 0.7, a1 c1 0.6, a2 c0 0.45; a0 suppresses a1 across classes.
    det = run(PostProcess(class_agnostic=True))
    check(det, [0, 2], [0, 0], [0.7, 0.45])


def test_nms_threshold_one_disables_suppression():
    det = run(PostProcess(nms_threshold=1.0))
    check(det, [0, 1, 2, 1, 0, 2], [0, 1, 0, 0, 1, 1], [0.7, 0.6, 0.45, 0.3, 0.2, 0.05])


def test_topk_candidates_per_class_and_detections_cap():
    det = run(PostProcess(topk_candidates=1))
    check(det, [0, 1], [0, 1], [0.7, 0.6])
    det = run(PostProcess(detections_per_image=3))
    check(det, [0, 1, 2], [0, 1, 0], [0.7, 0.6, 0.45])
    det = run(PostProcess(class_agnostic=True, topk_candidates=1))
    check(det, [0], [0], [0.7])


def test_score_threshold_and_empty_output():
    det = run(PostProcess(score_threshold=0.5))
    check(det, [0, 1], [0, 1], [0.7, 0.6])
    empty = run(PostProcess(score_threshold=0.99))
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["scores"].shape == (0,) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == torch.int64


def test_boxes_are_decoded_and_clipped():
    probs = torch.tensor(
        [[0.05, 0.05, 0.9], [0.15, 0.05, 0.8], [0.25, 0.05, 0.7], [0.35, 0.05, 0.6]]
    )
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 2, 0] = 1.0  # shift a2 right by 0.1 * 0.3 = 0.03
    det = run(PostProcess(class_agnostic=True), probs, deltas)
    assert det["labels"].tolist() == [1, 1, 1]  # a1 suppressed by a0
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.7, 0.6]))
    expected = torch.tensor([[0.1, 0.1, 0.4, 0.4], [0.63, 0.6, 0.93, 0.9], [0.8, 0.8, 1.0, 1.0]])
    torch.testing.assert_close(det["boxes"], expected)
    assert det["boxes"].min() >= 0 and det["boxes"].max() <= 1


def test_batch_equals_images_alone():
    g = torch.Generator().manual_seed(0)
    a = 60
    xy = torch.rand(a, 2, generator=g) * 0.8
    anchors = torch.cat((xy, xy + 0.05 + 0.2 * torch.rand(a, 2, generator=g)), 1)
    logits = 3 * torch.randn(3, a, 4, generator=g)
    deltas = 0.5 * torch.randn(3, a, 4, generator=g)
    for agnostic in (False, True):
        pp = PostProcess(topk_candidates=20, detections_per_image=15, class_agnostic=agnostic)
        batched = pp(logits, deltas, anchors)
        assert len(batched) == 3
        for b in range(3):
            alone = pp(logits[b : b + 1], deltas[b : b + 1], anchors[None])[0]
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(batched[b][key], alone[key])
            assert len(alone["scores"]) <= 15
            assert torch.all(alone["scores"][:-1] >= alone["scores"][1:])


def test_does_not_modify_inputs():
    logits = PROBS.log()[None].clone()
    deltas = torch.ones(1, 4, 4)
    before = (logits.clone(), deltas.clone(), ANCHORS.clone())
    PostProcess()(logits, deltas, ANCHORS)
    assert torch.equal(logits, before[0]) and torch.equal(deltas, before[1])
    assert torch.equal(ANCHORS, before[2])


def test_custom_coder_is_used():
    coder = BoxCoder(variances=(1.0, 1.0))
    deltas = torch.zeros(1, 4, 4)
    deltas[0, 0, 0] = 0.1  # shifts a0 by 0.1 * 0.3 with variance 1
    det = run(PostProcess(coder=coder, class_agnostic=True), deltas=deltas)
    torch.testing.assert_close(det["boxes"][0], torch.tensor([0.13, 0.1, 0.43, 0.4]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(nms_threshold=0.0), "postprocess.nms_threshold"),
        (dict(nms_threshold=1.5), "postprocess.nms_threshold"),
        (dict(score_threshold=-0.1), "postprocess.score_threshold"),
        (dict(score_threshold=1.0), "postprocess.score_threshold"),
        (dict(topk_candidates=0), "postprocess.topk_candidates"),
        (dict(topk_candidates=2.5), "postprocess.topk_candidates"),
        (dict(detections_per_image=0), "postprocess.detections_per_image"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostProcess(**kwargs)


def test_shape_validation():
    pp = PostProcess()
    with pytest.raises(ValueError, match="cls_logits"):
        pp(torch.zeros(1, 4, 1), torch.zeros(1, 4, 4), ANCHORS)
    with pytest.raises(ValueError, match="box_deltas"):
        pp(torch.zeros(1, 4, 3), torch.zeros(1, 3, 4), ANCHORS)
    with pytest.raises(ValueError, match="anchors"):
        pp(torch.zeros(1, 4, 3), torch.zeros(1, 4, 4), ANCHORS[:3])
