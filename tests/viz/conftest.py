"""A fake SSD net with known anchors and predictions, for the visualisation tests."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from src.detection.anchors import multibox_prior
from src.detection.targets import TargetEncoder
from src.models.ssd import SSDOutput

GT_BOXES = torch.tensor([[0.10, 0.10, 0.45, 0.50], [0.50, 0.55, 0.90, 0.95]])
GT_LABELS = torch.tensor([0, 0])


class FakeNet(nn.Module):
    """Returns fixed logits and offsets for its anchors, whatever the image."""

    def __init__(self, anchors: Tensor, deltas: Tensor, logits: Tensor) -> None:
        super().__init__()
        self.register_buffer("anchors", anchors)
        self.deltas = nn.Parameter(deltas.clone())
        self.logits = nn.Parameter(logits.clone())
        self.num_classes = logits.shape[-1] - 1
        self.image_size = (64, 64)

    def forward(self, images: Tensor) -> SSDOutput:
        b = images.shape[0]
        return SSDOutput(self.logits.expand(b, -1, -1), self.deltas.expand(b, -1, -1), self.anchors)


class FakeModule(nn.Module):
    """The parts of an SSDLitModule that the anchor views use."""

    def __init__(self, net: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self.target_encoder = TargetEncoder()


def make_anchors() -> Tensor:
    data = torch.zeros(1, 3, 8, 8)
    return multibox_prior(data, sizes=[0.3, 0.5], ratios=[1.0, 2.0, 0.5])[0]  # [256, 4]


def make_net(noise: float = 0.3, seed: int = 0) -> FakeNet:
    """Predictions = true offsets + ``noise`` * N(0, 1) at the positives."""
    gen = torch.Generator().manual_seed(seed)
    anchors = make_anchors()
    enc = TargetEncoder()(anchors, [{"boxes": GT_BOXES, "labels": GT_LABELS}])
    num = anchors.shape[0]
    deltas = enc.box_offsets + noise * torch.randn(1, num, 4, generator=gen)
    logits = torch.randn(1, num, 2, generator=gen)
    return FakeNet(anchors, deltas, logits)


@pytest.fixture
def image() -> Tensor:
    return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def target() -> dict[str, Tensor]:
    return {"boxes": GT_BOXES.clone(), "labels": GT_LABELS.clone()}
