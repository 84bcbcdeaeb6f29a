"""describe_model: one description of a network, from a run config or from a built net."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from src.detection.anchors import GridAnchorGenerator
from src.models.backbones.tiny import TinyBackbone
from src.models.convert import net_run_config
from src.models.ssd import SSD
from src.utils.checkpoint import describe_model
from tests.conftest import compose_config


@pytest.mark.parametrize(
    ("backbone", "expected"),
    [
        ("tiny", "backbone=tiny, 1 class, input 256, head=ssd, anchors 0.2-0.961"),
        ("tiny_small_anchors", "backbone=tiny, 1 class, input 256, head=ssd, anchors 0.1-0.79"),
        # SSD300: min_sizes 30 .. max_sizes 315 pixels of 300
        ("vgg16", "backbone=vgg16, 1 class, input 300, head=ssd, anchors 0.1-1.05"),
    ],
)
def test_config_and_built_net_read_alike(backbone: str, expected: str) -> None:
    cfg = compose_config("train", [f"backbone={backbone}", "model.net.num_classes=1"])
    assert describe_model(cfg) == expected
    net = instantiate(cfg.model.net)
    assert describe_model(net_run_config(net)) == expected


def test_class_names_and_missing_keys() -> None:
    run_config = {
        "backbone": {"name": "vgg16", "image_size": 300},
        "model": {"net": {"num_classes": 2}, "class_names": ["cat", "dog"]},
    }
    assert describe_model(run_config) == "backbone=vgg16, 2 classes (cat, dog), input 300"
    assert describe_model({}) == "backbone=?, None classes"


def test_net_built_by_hand_names_its_backbone_class() -> None:
    net = SSD(TinyBackbone(), GridAnchorGenerator([[0.5]] * 5, [[1.0]] * 5), 3, 256)
    assert describe_model(net_run_config(net)) == (
        "backbone=TinyBackbone, 3 classes, input 256, head=ssd, anchors 0.5-0.5"
    )
