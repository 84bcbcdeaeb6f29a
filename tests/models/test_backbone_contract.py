"""The contract every backbone option keeps, checked for every ``conf/backbone/*.yaml``.

A new backbone is tested by adding its yaml: the train config is composed with
``backbone=<name>`` and the net it builds must return one feature map per anchor level, with
the channels it announces, anchors centred on the cells of those maps, the documented output
shapes, and a loss whose backward reaches the backbone.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from src.models.ssd import SSD
from src.utils.config import register_resolvers
from tests.conftest import CONF_DIR, compose_config

register_resolvers()  # ${auto_channels_last:...} in conf/backbone/vgg16*.yaml

BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
HEADS = sorted(p.stem for p in (CONF_DIR / "head").glob("*.yaml"))
NUM_CLASSES = 3


def compose_net_config(backbone: str, *overrides: str):  # noqa: ANN201
    return compose_config(
        "train",
        [f"backbone={backbone}", f"model.net.num_classes={NUM_CLASSES}", *overrides],
    )


def batch_size(net: torch.nn.Module) -> int:
    """Two images for nets with BatchNorm (training on a 1x1 map needs two values), else one."""
    return (
        2 if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules()) else 1
    )


def model_step_with_features(module, batch):  # noqa: ANN001, ANN201
    """``module.model_step(batch)`` and the feature maps its backbone returned."""
    seen: list[torch.Tensor] = []
    handle = module.net.backbone.register_forward_hook(lambda m, i, o: seen.extend(o))
    try:
        out, _, losses = module.model_step(batch)
    finally:
        handle.remove()
    return seen, out, losses


def test_every_backbone_and_head_is_found() -> None:
    assert {"mobilenet_v3", "tiny", "tiny_small_anchors", "vgg16", "vgg16_512"} <= set(BACKBONES)
    assert {"ssd", "ssdlite"} <= set(HEADS)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_contract(backbone: str) -> None:
    torch.manual_seed(0)
    cfg = compose_net_config(backbone)
    module = instantiate(cfg.model)
    module.train()
    net: SSD = module.net
    size = int(cfg.backbone.image_size)
    assert net.image_size == (size, size)
    assert net.name == cfg.backbone.name

    # one feature map per anchor level, with the announced channels
    k = net.anchor_generator.num_anchors_per_location()
    assert len(net.backbone.out_channels) == len(k) == len(net.head.num_anchors_per_location)
    assert net.head.num_anchors_per_location == k

    b = batch_size(net)
    images = torch.rand(b, 3, size, size)
    targets = [
        {"boxes": torch.tensor([[0.1, 0.2, 0.6, 0.7]]), "labels": torch.tensor([i % NUM_CLASSES])}
        for i in range(b)
    ]
    # one forward pass with the configured loss (backward below)
    features, out, losses = model_step_with_features(module, (images, targets))
    assert len(features) == len(k)
    assert [f.shape[1] for f in features] == net.backbone.out_channels
    assert all(f.shape[0] == b for f in features)

    # output shapes: A = sum_l H_l * W_l * k_l
    hw = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
    num_anchors = sum(h * w * kl for (h, w), kl in zip(hw, k, strict=True))
    assert out.cls_logits.shape == (b, num_anchors, NUM_CLASSES + 1)
    assert out.box_deltas.shape == (b, num_anchors, 4)
    assert out.anchors.shape == (num_anchors, 4)

    # the anchors fit the feature maps: normalised xyxy with positive sizes; the shapes of a
    # cell share one centre, and anchor (level, row, column, shape) is centred within one cell
    # of the centre of cell (row, column) of its level's map (SSD300's steps 32 and 64 put the
    # centres of its 10x10 and 5x5 maps up to 0.63 cells off, as in the paper's code)
    anchors = out.anchors.detach()
    assert bool(((anchors[:, 2:] - anchors[:, :2]) > 0).all())
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert bool(((centres >= 0) & (centres <= 1)).all())
    first = 0
    for (h, w), kl in zip(hw, k, strict=True):
        level = centres[first : first + h * w * kl].reshape(h, w, kl, 2)
        first += h * w * kl
        torch.testing.assert_close(level, level[:, :, :1].expand_as(level))
        cx, cy = level[:, :, 0].unbind(-1)
        cell_x = (torch.arange(w, dtype=cx.dtype).view(1, w) + 0.5) / w
        cell_y = (torch.arange(h, dtype=cy.dtype).view(h, 1) + 0.5) / h
        assert bool(((cx - cell_x).abs() <= 1 / w).all()), (h, w)
        assert bool(((cy - cell_y).abs() <= 1 / h).all()), (h, w)
    assert first == num_anchors

    # the loss is finite and its backward reaches every trainable backbone weight
    assert torch.isfinite(losses.loss)
    losses.loss.backward()
    grads = [p.grad for p in net.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("head", HEADS)
# vgg16_512 is vgg16's network with one more extra block: vgg16 covers its heads, at a third of
# the cost
@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "vgg16_512"])
def test_every_head_fits_every_backbone(backbone: str, head: str) -> None:
    cfg = compose_net_config(backbone, f"head={head}")
    assert cfg.head.name == head
    net = instantiate(cfg.model.net).eval()
    assert getattr(net.head, "name", None) == head
    size = int(cfg.backbone.image_size)
    with torch.no_grad():
        out = net(torch.rand(1, 3, size, size))
    num_anchors = out.anchors.shape[0]
    assert out.cls_logits.shape == (1, num_anchors, NUM_CLASSES + 1)
    assert out.box_deltas.shape == (1, num_anchors, 4)
    assert bool(torch.isfinite(out.cls_logits).all() & torch.isfinite(out.box_deltas).all())
