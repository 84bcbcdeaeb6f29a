import pytest
import torch

from src.detection.box_ops import (
    box_center_to_corner,
    box_corner_to_center,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    scale_boxes,
)


def test_xyxy_to_cxcywh_hand_values():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 0.5]])
    expected = torch.tensor([[0.3, 0.4, 0.4, 0.4], [0.5, 0.25, 1.0, 0.5]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), expected)
    torch.testing.assert_close(box_cxcywh_to_xyxy(expected), boxes)


def test_conversion_keeps_leading_dims_and_round_trips():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 3, 2, generator=g)
    boxes = torch.cat((xy, xy + torch.rand(2, 3, 2, generator=g)), dim=-1).double()
    centre = box_xyxy_to_cxcywh(boxes)
    assert centre.shape == (2, 3, 4)
    assert centre.dtype == torch.float64
    torch.testing.assert_close(box_cxcywh_to_xyxy(centre), boxes)


def test_book_aliases():
    assert box_corner_to_center is box_xyxy_to_cxcywh
    assert box_center_to_corner is box_cxcywh_to_xyxy


def test_box_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    expected = torch.tensor([[1 / 7, 0.0, 1.0], [0.0, 0.0, 0.25]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    torch.testing.assert_close(iou, expected)


def test_box_iou_degenerate_is_zero_not_nan():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    iou = box_iou(point, point)
    assert torch.equal(iou, torch.zeros(1, 1))


def test_box_iou_empty_shapes():
    assert box_iou(torch.zeros(0, 4), torch.rand(3, 4)).shape == (0, 3)


def test_scale_boxes_values_and_no_mutation():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 1.0]])
    before = boxes.clone()
    px = scale_boxes(boxes, 200, 100)
    torch.testing.assert_close(px, torch.tensor([[20.0, 20.0, 100.0, 100.0]]))
    torch.testing.assert_close(scale_boxes(px, 1 / 200, 1 / 100), boxes)
    assert torch.equal(boxes, before)


@pytest.mark.parametrize("fn", [box_xyxy_to_cxcywh, box_cxcywh_to_xyxy])
def test_conversion_does_not_modify_input(fn):
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    before = boxes.clone()
    fn(boxes)
    assert torch.equal(boxes, before)
