"""SSDHead: predictor layout, flattening order, background-bias initialisation."""

from __future__ import annotations

import pytest
import torch

from src.models.heads import SSDHead, flatten_predictions, init_convs
from src.models.tiny_ssd import concat_preds


def test_predictor_shapes() -> None:
    head = SSDHead([8, 16], [4, 6], num_classes=3)
    assert [tuple(c.weight.shape) for c in head.cls_predictors] == [(16, 8, 3, 3), (24, 16, 3, 3)]
    assert [tuple(c.weight.shape) for c in head.box_predictors] == [(16, 8, 3, 3), (24, 16, 3, 3)]
    assert all(c.padding == (1, 1) for c in [*head.cls_predictors, *head.box_predictors])
    cls, box = head([torch.zeros(2, 8, 5, 5), torch.zeros(2, 16, 3, 2)])
    assert cls.shape == (2, 5 * 5 * 4 + 3 * 2 * 6, 4)
    assert box.shape == (2, 5 * 5 * 4 + 3 * 2 * 6, 4)


def test_flatten_order_is_level_row_column_anchor() -> None:
    # encode (level, y, x, anchor, d) into the values, then check the flattened order
    b, d = 2, 3
    sizes, ks = [(3, 4), (2, 2)], [2, 3]
    preds, expected = [], []
    for level, ((h, w), k) in enumerate(zip(sizes, ks, strict=True)):
        y, x, j, c = torch.meshgrid(
            torch.arange(h), torch.arange(w), torch.arange(k), torch.arange(d), indexing="ij"
        )
        code = level * 10000 + y * 1000 + x * 100 + j * 10 + c  # [H, W, k, D]
        expected.append(code.reshape(-1, d))
        # channel j * D + c at (y, x), as a conv predictor lays it out
        pred = code.reshape(h, w, k * d).permute(2, 0, 1)
        preds.append(pred.unsqueeze(0).expand(b, -1, -1, -1).float())
    flat = flatten_predictions(preds, d)
    assert flat.shape == (b, sum(h * w * k for (h, w), k in zip(sizes, ks, strict=True)), d)
    assert torch.equal(flat[1], torch.cat(expected).float())
    # same as the book's concat_preds + reshape
    assert torch.equal(flat, concat_preds(preds).reshape(b, -1, d))


def test_init_background_bias() -> None:
    head = SSDHead([8, 16, 4], [4, 6, 2], num_classes=3)
    weights = [c.weight.clone() for c in head.cls_predictors]
    head.init_background_bias(4.5)
    for conv, k, w in zip(head.cls_predictors, [4, 6, 2], weights, strict=True):
        bias = conv.bias.detach().reshape(k, 4)
        assert torch.equal(bias[:, 0], torch.full((k,), 4.5))
        assert torch.equal(bias[:, 1:], torch.zeros(k, 3))
        assert torch.equal(conv.weight, w)
    # every anchor's background logit carries the bias
    feats = [torch.zeros(1, 8, 2, 2), torch.zeros(1, 16, 1, 1), torch.zeros(1, 4, 3, 3)]
    for conv in head.cls_predictors:
        torch.nn.init.zeros_(conv.weight)
    cls, _ = head(feats)
    assert torch.equal(cls[..., 0], torch.full_like(cls[..., 0], 4.5))
    assert torch.equal(cls[..., 1:], torch.zeros_like(cls[..., 1:]))
    head.init_background_bias(None)  # no-op
    assert torch.equal(head.cls_predictors[0].bias.reshape(4, 4)[:, 0], torch.full((4,), 4.5))


def test_xavier_init_zero_bias() -> None:
    head = SSDHead([8], [4], num_classes=1, init="xavier")
    assert torch.equal(head.cls_predictors[0].bias, torch.zeros(8))
    assert torch.equal(head.box_predictors[0].bias, torch.zeros(16))


def test_head_validation() -> None:
    with pytest.raises(ValueError, match="one per level"):
        SSDHead([8, 16], [4], num_classes=1)
    with pytest.raises(ValueError, match="num_classes"):
        SSDHead([8], [4], num_classes=0)
    with pytest.raises(ValueError, match="init"):
        SSDHead([8], [4], num_classes=1, init="kaiming")
    with pytest.raises(ValueError, match="2 levels"):
        SSDHead([8, 8], [4, 4], num_classes=1)([torch.zeros(1, 8, 2, 2)])


def test_normal_init_zero_bias() -> None:
    # torchvision's SSDLite initialisation: N(0, 0.03) weights, zero biases
    torch.manual_seed(0)
    head = SSDHead([64], [6], num_classes=20, init="normal")
    weight = head.cls_predictors[0].weight.detach()  # 126 * 64 * 9 = 72,576 draws
    assert abs(float(weight.mean())) < 1e-3
    assert abs(float(weight.std()) - 0.03) < 1e-3
    assert torch.equal(head.cls_predictors[0].bias, torch.zeros(126))
    assert torch.equal(head.box_predictors[0].bias, torch.zeros(24))


def test_init_convs_reaches_nested_convs_and_checks_the_name() -> None:
    module = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3)), torch.nn.ReLU())
    init_convs(module, "xavier")
    assert torch.equal(module[0][0].bias, torch.zeros(4))
    init_convs(module, "default")  # PyTorch's reset_parameters: non-zero biases again
    assert bool(module[0][0].bias.abs().sum() > 0)
    with pytest.raises(ValueError, match="head init"):
        init_convs(module, "uniform")
