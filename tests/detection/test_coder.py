import math

import pytest
import torch

from src.detection.coder import BoxCoder


def random_boxes(n, generator, dtype=torch.float64):
    xy = torch.rand(n, 2, generator=generator, dtype=dtype) * 0.8
    wh = torch.rand(n, 2, generator=generator, dtype=dtype) * 0.5 + 0.01
    return torch.cat((xy, xy + wh), dim=1)


def test_encode_hand_values():
    coder = BoxCoder()
    anchors = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.2, 0.2, 0.4, 0.6]])
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.25, 0.3, 0.45, 0.7]])
    # anchor 0: c=(0.5, 0.5), wh=(1, 1); box 0: c=(0.3, 0.4), wh=(0.4, 0.4)
    # anchor 1: c=(0.3, 0.4), wh=(0.2, 0.4); box 1: c=(0.35, 0.5), wh=(0.2, 0.4)
    expected = torch.tensor(
        [
            [10 * -0.2, 10 * -0.1, 5 * math.log(1e-6 + 0.4), 5 * math.log(1e-6 + 0.4)],
            [10 * 0.05 / 0.2, 10 * 0.1 / 0.4, 5 * math.log(1 + 1e-6), 5 * math.log(1 + 1e-6)],
        ]
    )
    torch.testing.assert_close(coder.encode(boxes, anchors), expected, atol=1e-5, rtol=1e-5)


def test_decode_hand_values():
    coder = BoxCoder()
    anchors = torch.tensor([[0.2, 0.2, 0.4, 0.6]])  # c=(0.3, 0.4), wh=(0.2, 0.4)
    assert torch.allclose(coder.decode(torch.zeros(1, 4), anchors), anchors)
    # l_x = 1 moves cx by 0.1 * w_a = 0.02; l_h = 5*log(2) doubles h (v1 = 0.2)
    offsets = torch.tensor([[1.0, 0.0, 0.0, 5 * math.log(2.0)]])
    expected = torch.tensor([[0.22, 0.0, 0.42, 0.8]])
    torch.testing.assert_close(coder.decode(offsets, anchors), expected)


def test_custom_variances():
    coder = BoxCoder(variances=(1.0, 1.0), eps=0.0)
    anchors = torch.tensor([[0.0, 0.0, 0.5, 0.5]])
    boxes = torch.tensor([[0.25, 0.0, 0.5, 1.0]])  # c=(0.375, 0.5), wh=(0.25, 1)
    expected = torch.tensor([[0.25, 0.5, math.log(0.5), math.log(2.0)]])
    torch.testing.assert_close(coder.encode(boxes, anchors), expected)
    torch.testing.assert_close(coder.decode(expected, anchors), boxes)


def test_round_trip_random():
    g = torch.Generator().manual_seed(0)
    anchors, boxes = random_boxes(500, g), random_boxes(500, g)
    coder = BoxCoder()
    # eps adds eps * w_a to the decoded size: error <= 1e-6
    torch.testing.assert_close(
        coder.decode(coder.encode(boxes, anchors), anchors), boxes, atol=2e-6, rtol=0
    )
    exact = BoxCoder(eps=0.0)
    torch.testing.assert_close(exact.decode(exact.encode(boxes, anchors), anchors), boxes)


def test_broadcasting_over_leading_dims():
    g = torch.Generator().manual_seed(1)
    anchors = random_boxes(7, g, torch.float32)
    boxes = random_boxes(21, g, torch.float32).reshape(3, 7, 4)
    coder = BoxCoder()
    enc = coder.encode(boxes, anchors)
    assert enc.shape == (3, 7, 4)
    assert torch.equal(enc[1], coder.encode(boxes[1], anchors))
    dec = coder.decode(enc, anchors[None])
    assert dec.shape == (3, 7, 4)
    assert torch.equal(dec[2], coder.decode(enc[2], anchors))


def test_integer_offsets_and_no_mutation():
    coder = BoxCoder()
    anchors = torch.tensor([[0.1, 0.1, 0.3, 0.5]])
    offsets = torch.zeros(1, 4, dtype=torch.int64)
    before = anchors.clone()
    out = coder.decode(offsets, anchors)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, anchors)
    coder.encode(anchors, anchors)
    assert torch.equal(anchors, before)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variances=(0.1,)), "two numbers"),
        (dict(variances=(0.0, 0.2)), r"variances\[0\]"),
        (dict(variances=(0.1, -1.0)), r"variances\[1\]"),
        (dict(variances=(0.1, float("nan"))), r"variances\[1\]"),
        (dict(eps=-1e-3), "eps"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BoxCoder(**kwargs)


def test_decode_clamps_the_size_exponent_like_torchvision() -> None:
    import math

    from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

    from src.detection.coder import BoxCoder

    anchors = torch.tensor([[0.4, 0.4, 0.6, 0.6], [0.1, 0.2, 0.3, 0.5]])
    offsets = torch.tensor([[0.0, 0.0, 1e6, 1e6], [1.0, -2.0, 3.0, -1e9]])
    boxes = BoxCoder().decode(offsets, anchors)
    assert torch.isfinite(boxes).all()
    width = boxes[0, 2] - boxes[0, 0]
    assert width == pytest.approx(0.2 * 1000 / 16, rel=1e-5)  # exp(log(1000/16)) x anchor
    # torchvision's decode (weights 10, 10, 5, 5 = 1 / variances) gives the same boxes
    tv = TVBoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000.0 / 16))
    expected = tv.decode_single(offsets, anchors)
    assert torch.allclose(boxes, expected, atol=1e-6)
