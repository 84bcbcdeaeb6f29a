"""``src.inspect`` on bananas, its figures, and the anchor-coverage WARNING of ``src.train``."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchvision.io import decode_image

from src.callbacks.anchor_coverage import AnchorCoverageCheck, inspect_command
from src.detection.anchors import GridAnchorGenerator
from src.detection.coverage import anchor_coverage, format_overrides, search_anchors
from src.detection.targets import TargetEncoder
from src.inspect import inspect
from src.train import train
from src.viz.data import (
    anchor_search_figure,
    box_shapes_figure,
    box_sizes_figure,
    classes_figure,
    coverage_figure,
    objects_per_image_figure,
    samples_figure,
)
from src.viz.style import HALF_PAGE_WIDTH_IN, MIN_FONT_PT, smallest_font_at
from tests.conftest import compose_config, train_overrides

FIGURES = (
    "classes",
    "objects_per_image",
    "box_sizes",
    "box_shapes",
    "coverage",
    "anchor_search",
    "samples",
)


def test_inspect_writes_every_file_on_bananas(tmp_path: Path, banana_data_dir: Path) -> None:
    overrides = [
        f"paths.output_dir={tmp_path}",
        f"paths.data_dir={banana_data_dir}",
        "data.source=synthetic",
        "data.download=false",
        "data.num_synthetic_train=16",
        "data.num_synthetic_val=8",
        "inspect.scales=[0.8,1.25]",
        "inspect.num_samples=4",
        "inspect.augmented_images=6",
    ]
    result = inspect(compose_config("inspect", overrides))
    written = sorted(p.name for p in tmp_path.iterdir())
    expected = [f"{n}.{ext}" for n in FIGURES for ext in ("pdf", "png")]
    assert written == sorted([*expected, "summary.json", "summary.md"])
    for name in FIGURES:
        image = decode_image(str(tmp_path / f"{name}.png"))
        assert image.shape[0] in (3, 4) and min(image.shape[1:]) > 100
        assert (tmp_path / f"{name}.pdf").read_bytes().startswith(b"%PDF")
    summary = (tmp_path / "summary.md").read_text()
    for name in FIGURES:
        assert f"({name}.png)" in summary and f"({name}.pdf)" in summary
    info = json.loads((tmp_path / "summary.json").read_text())
    # the synthetic set: 16 training images, one banana each, at the 256 x 256 TinySSD input
    assert (info["images"], info["boxes"], info["classes"]) == (16, 16, ["banana"])
    assert info["class_boxes"] == [16] and info["class_images"] == [16]
    assert info["objects_per_image"] == {"mean": 1.0, "median": 1.0, "max": 1, "empty": 0}
    assert (info["input"], info["anchors"], info["iou_threshold"]) == ("256x256", 5444, 0.5)
    assert sum(v["boxes"] for v in info["size_coverage"].values()) == 16
    # 6 images through the training transform (the recipe's flips keep every banana)
    assert (info["augmented"]["images"], info["augmented"]["boxes"], info["samples"]) == (6, 6, 4)
    assert sum(info["augmented"]["size_boxes"]) == 6
    # the coverage is the share of the 16 boxes reaching IoU 0.5
    cov = result["coverage"]
    assert info["current_coverage"] == pytest.approx(cov.num_covered / 16)
    assert len(result["candidates"]) == 3 * 3  # scales 0.8, 1, 1.25 x ratio sets
    assert info["suggestions"][0]["coverage"] >= info["current_coverage"]
    assert "python -m src.inspect" in summary and "## Suggested anchors" in summary
    # the printed overrides of a suggestion build a network with the anchors it was scored on
    other = next(c for c in result["candidates"] if c.num_anchors != 5444)
    cfg = compose_config("train", shlex.split(format_overrides(other.overrides)))
    with torch.no_grad():
        net = instantiate(cfg.model.net, num_classes=1).eval()
        assert net(torch.zeros(1, 3, 256, 256)).anchors.shape == (other.num_anchors, 4)


def _legible(fig) -> None:  # noqa: ANN001
    assert fig.get_figwidth() == pytest.approx(HALF_PAGE_WIDTH_IN)
    assert smallest_font_at(fig) >= MIN_FONT_PT


def test_data_figures_are_half_a_page_wide_and_legible() -> None:
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=gen) * 0.5
    boxes = torch.cat((xy, xy + torch.rand(40, 2, generator=gen) * 0.4 + 0.05), dim=1)
    labels = torch.randint(0, 3, (40,), generator=gen)
    anchor_gen = GridAnchorGenerator([[0.2, 0.3], [0.5, 0.6]], [[1, 2, 0.5], [1, 2, 0.5]])
    feats = [(4, 4), (2, 2)]
    anchors = anchor_gen(feats, (64, 64))
    cov = anchor_coverage(boxes, labels, anchors, 0.5, (64, 64), 3)
    cfg = {"sizes": anchor_gen.sizes, "ratios": anchor_gen.ratios}

    def build(o: dict) -> Tensor:
        return GridAnchorGenerator(**{**cfg, **o})(feats, (64, 64))

    candidates = search_anchors(boxes, cfg, build, 0.5, (64, 64), scales=[0.8])
    wh = (boxes[:, 2:] - boxes[:, :2]) * 64
    shapes = torch.tensor([[12.8, 12.8], [18.1, 9.1]])
    images = [torch.rand(3, 64, 64, generator=gen) for _ in range(4)]
    targets = [{"boxes": boxes[i : i + 2], "labels": labels[i : i + 2]} for i in range(4)]
    for fig in (
        classes_figure(["cat", "dog", "pottedplant"], cov),
        objects_per_image_figure(torch.tensor([0, 1, 1, 2, 5])),
        box_sizes_figure(wh, shapes, (64, 64)),
        box_shapes_figure(wh, shapes, (64, 64), cov.covered),
        coverage_figure(cov),
        anchor_search_figure(candidates),
        samples_figure(images, targets, ["cat", "dog", "pottedplant"], "4 samples"),
    ):
        _legible(fig)


class _OneCell(nn.Module):
    """A backbone with one 1 x 1 feature map."""

    def forward(self, x: Tensor) -> list[Tensor]:
        return [nn.functional.adaptive_avg_pool2d(x, 1)]


class _Boxes:
    """100 x 100 images with the given pixel boxes, one image per box."""

    def __init__(self, boxes: list[list[float]]) -> None:
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.boxes)

    def image_size(self, index: int) -> tuple[int, int]:
        return (100, 100)

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        return {"boxes": torch.tensor([self.boxes[index]]), "labels": torch.tensor([0])}


def _fit_start(
    boxes: list[list[float]], caplog: pytest.LogCaptureFixture, max_boxes: int = 20000
) -> AnchorCoverageCheck:
    # one anchor, the centred square of half the image: [0.25, 0.25, 0.75, 0.75]
    net = SimpleNamespace(
        backbone=_OneCell(),
        anchor_generator=GridAnchorGenerator([[0.5]], [[1.0]]),
        image_size=(32, 32),
        num_classes=1,
    )
    trainer = SimpleNamespace(
        is_global_zero=True, datamodule=SimpleNamespace(train_dataset=_Boxes(boxes))
    )
    module = SimpleNamespace(net=net, target_encoder=TargetEncoder(iou_threshold=0.5))
    overrides = ["backbone=tiny", "trainer.max_epochs=3", "data.root=/my data"]
    check = AnchorCoverageCheck(overrides, max_boxes=max_boxes)
    with caplog.at_level(logging.WARNING, logger="src.callbacks.anchor_coverage"):
        check.on_fit_start(trainer, module)
    return check


def test_coverage_warning_fires_below_90_percent(caplog: pytest.LogCaptureFixture) -> None:
    # the anchor itself (IoU 1) and a 10 x 10 corner box (IoU 0): 50% covered
    check = _fit_start([[25, 25, 75, 75], [0, 0, 10, 10]], caplog)
    assert check.coverage is not None and check.coverage.overall == pytest.approx(0.5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0] == check.message
    assert "anchor coverage 50.0% is below 90%: 1 of 2 training boxes" in warnings[0]
    assert warnings[0].endswith("python -m src.inspect backbone=tiny 'data.root=/my data'")


def test_coverage_warning_silent_at_or_above_90_percent(caplog: pytest.LogCaptureFixture) -> None:
    # nine boxes on the anchor (IoU 1 and 0.64) and one in the corner: exactly 90% covered
    boxes = [[25, 25, 75, 75]] * 5 + [[30, 30, 70, 70]] * 4 + [[0, 0, 10, 10]]
    check = _fit_start(boxes, caplog)
    assert check.coverage is not None and check.coverage.overall == pytest.approx(0.9)
    assert check.message is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_coverage_check_samples_large_training_sets(caplog: pytest.LogCaptureFixture) -> None:
    check = _fit_start([[0, 0, 10, 10]] * 10, caplog, max_boxes=4)
    assert check.coverage is not None and check.coverage.total == 4
    assert check.message is not None and check.message.startswith("anchor coverage 0.0%")
    assert check.message.endswith("(measured on 4 boxes drawn at random of 10)")


def test_inspect_command_keeps_the_data_and_anchor_overrides() -> None:
    overrides = ["experiment=voc_ssd300", "data.root=/d", "trainer.max_epochs=2", "seed=1"]
    assert inspect_command(overrides) == "python -m src.inspect experiment=voc_ssd300 data.root=/d"


def test_train_warns_when_the_anchors_miss_the_boxes(
    tmp_path: Path, banana_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # anchors of 0.95 of the image: no banana (0.1 .. 0.45 of the image) reaches IoU 0.5
    huge = "backbone.anchors.sizes=[[0.95,0.96],[0.95,0.96],[0.95,0.96],[0.95,0.96],[0.95,0.96]]"
    cfg = compose_config("train", train_overrides(tmp_path, banana_data_dir, "debug=fdr", huge))
    with caplog.at_level(logging.WARNING, logger="src.callbacks.anchor_coverage"):
        _, objects = train(cfg)
    check = next(c for c in objects["callbacks"] if isinstance(c, AnchorCoverageCheck))
    assert check.coverage is not None and check.coverage.total == 16
    assert check.coverage.overall < 0.9
    warnings = [r.getMessage() for r in caplog.records if r.name == "src.callbacks.anchor_coverage"]
    assert warnings == [check.message]
    assert "is below 90%" in warnings[0] and "python -m src.inspect" in warnings[0]


@pytest.mark.parametrize(
    ("data", "backbone", "images", "boxes", "covered"),
    [
        # 100 VOC2012 images against SSD300's 8732 default boxes
        ("voc_mini", "vgg16", 100, 235, 226),
        # the publisher's 160 training photos against the default recipe's TinySSD anchors
        ("raccoon", "tiny_small_anchors", 160, 173, 173),
    ],
)
def test_coverage_of_the_real_test_data(
    tmp_path: Path, data: str, backbone: str, images: int, boxes: int, covered: int
) -> None:
    from src.detection.coverage import dataset_boxes, feature_sizes
    from tests.conftest import shared_data

    root = shared_data("VOCdevkit-mini" if data == "voc_mini" else "raccoon")
    cfg = compose_config(
        "inspect",
        [
            f"paths.output_dir={tmp_path}",
            f"data={data}",
            f"data.root={root}",
            f"backbone={backbone}",
        ],
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    dataset = datamodule.build_dataset("train")
    found, labels, index = dataset_boxes(dataset)
    assert (len(dataset), found.shape[0], int(index.max()) + 1) == (images, boxes, images)
    size = (int(cfg.backbone.image_size), int(cfg.backbone.image_size))
    net = instantiate(cfg.backbone.net, **({"pretrained": None} if backbone == "vgg16" else {}))
    anchors = instantiate(cfg.backbone.anchors)(feature_sizes(net, size), size)
    cov = anchor_coverage(found, labels, anchors, 0.5, size, datamodule.num_classes)
    assert cov.num_covered == covered
