"""Figures at paper quality: legible at half a page, crops, labels, legends, PR curves, PDFs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks.pictures import PRCurvesCallback
from src.detection.losses import MultiBoxLoss
from src.detection.targets import TargetEncoder
from src.viz.anchors import analyze_anchors, anchor_panels_figure, crop_windows, negatives_figure
from src.viz.boxes import PRED_COLOR, TRUE_COLOR, detection_grid, draw_detections, font_size_for
from src.viz.loss_curves import focal_figure, smooth_l1_figure, write_loss_figures
from src.viz.pr_curves import pr_curves_figure
from src.viz.style import MIN_FONT_PT, smallest_font_at
from tests.viz.conftest import make_net


def test_crop_windows_by_hand() -> None:
    boxes = torch.tensor(
        [
            [[0.40, 0.40, 0.60, 0.50], [0.45, 0.35, 0.55, 0.55]],  # covers 0.4..0.6 x 0.35..0.55
            [[0.00, 0.00, 0.10, 0.10], [0.00, 0.00, 0.05, 0.05]],  # small, at the corner
            [[0.00, 0.00, 1.00, 1.00], [0.2, 0.2, 0.3, 0.3]],  # the whole image
        ]
    )
    windows = crop_windows(boxes, margin=0.25, min_size=0.3)
    # row 0: side 0.2 * 1.5 = 0.3 around the centre (0.5, 0.45)
    assert windows[0].tolist() == pytest.approx([0.35, 0.30, 0.65, 0.60])
    # row 1: side max(0.1 * 1.5, 0.3) = 0.3, shifted inside the image
    assert windows[1].tolist() == pytest.approx([0.0, 0.0, 0.3, 0.3])
    assert windows[2].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])


def test_anchor_figures_are_legible_and_zoomed(image, target) -> None:
    a = analyze_anchors(make_net(), TargetEncoder(), MultiBoxLoss(), image, target, max_panels=6)
    fig = anchor_panels_figure(a)
    assert smallest_font_at(fig) >= MIN_FONT_PT
    assert fig.get_figwidth() == pytest.approx(3.4)
    first = fig.axes[0]
    width = first.get_xlim()[1] - first.get_xlim()[0]
    assert 0 < width < 64  # zoomed in on its boxes (the image is 64 px wide)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "ground truth",
        "anchor",
        "predicted",
    ]
    assert smallest_font_at(negatives_figure(a)) >= MIN_FONT_PT
    whole = anchor_panels_figure(a, crop=False).axes[0]
    assert whole.get_xlim() == (0.0, 64.0)


def test_loss_figures_are_legible_and_written_as_pdf(tmp_path: Path) -> None:
    for fig in (smooth_l1_figure(), focal_figure()):
        assert smallest_font_at(fig) >= MIN_FONT_PT
        assert fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel() == "loss"
    files = write_loss_figures(tmp_path)
    for path in files.values():
        assert path.with_suffix(".pdf").read_bytes()[:4] == b"%PDF"


def test_labels_sit_in_filled_boxes_scaled_to_the_image() -> None:
    image = torch.full((3, 256, 256), 0.5)
    before = image.clone()
    pred = {
        "boxes": torch.tensor([[0.25, 0.5, 0.75, 0.9]]),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([0]),
    }
    target = {"boxes": torch.tensor([[0.625, 0.125, 0.875, 0.3125]]), "labels": torch.tensor([0])}
    out = draw_detections(image, pred, target, class_names=["banana"])
    assert torch.equal(image, before) and out.shape == (3, 256, 256) and out.dtype == torch.uint8
    assert font_size_for(256, 256) == 14 and font_size_for(64, 64) == 11
    # the prediction's label box: filled red right above the box's top-left corner (y 128)
    label = out[:, 128 - 14 : 128, 64:80]
    red = torch.tensor(PRED_COLOR, dtype=torch.uint8).view(3, 1, 1)
    assert (label == red).all(0).float().mean() > 0.5
    # the ground truth's label: filled green right under its box (x 160, y 80)
    green = torch.tensor(TRUE_COLOR, dtype=torch.uint8).view(3, 1, 1)
    assert (out[:, 80:94, 160:176] == green).all(0).float().mean() > 0.5


def test_grid_has_a_legend_strip() -> None:
    images = torch.zeros(2, 3, 256, 256)
    preds = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}] * 2
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    grid = detection_grid(images, preds, targets, nrow=2)
    assert grid.shape[1] == 260 + round(14 * 1.8)  # 256 + 2 * padding, then the legend
    strip = grid[:, 260:]
    for color in (TRUE_COLOR, PRED_COLOR):
        swatch = torch.tensor(color, dtype=torch.uint8).view(3, 1, 1)
        assert (strip == swatch).all(0).any()


def test_pr_curves_figure_by_hand() -> None:
    # class 0: detections TP, FP, TP with 2 ground truths; class 1: no ground truth
    recall = torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64)
    precision = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
    fig = pr_curves_figure([(recall, precision), None], ["cat", "dog"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # area under the envelope: 0.5 * 1 + 0.5 * 2/3 = 0.8333
    assert legend == ["cat 0.833"]
    # the legend sits under the axes, never over a curve
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    assert box.y1 <= fig.axes[0].get_window_extent(renderer).y0
    assert fig.axes[0].get_xlabel() == "recall" and fig.axes[0].get_ylabel() == "precision"
    assert smallest_font_at(fig) >= MIN_FONT_PT


def test_pr_curves_callback_logs_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from src.metrics.voc_map import VOCMeanAveragePrecision

    voc = VOCMeanAveragePrecision(class_names=["banana"])
    voc.update(
        [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "scores": torch.tensor([0.9]),
          "labels": torch.tensor([0])}],
        [{"boxes": torch.tensor([[10.0, 10, 50, 50]]), "labels": torch.tensor([0])}],
    )  # fmt: skip
    module = SimpleNamespace(metrics_of=lambda stage: {"voc": voc}, class_names=["banana"])
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, world_size=1, loggers=[logger],
        current_epoch=0, global_step=3,
    )  # fmt: skip
    PRCurvesCallback().on_validation_epoch_end(trainer, module)
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["images"] == ["val_images/pr_curves"]
    assert acc.Images("val_images/pr_curves")[0].step == 3
    # the PR Curves tab: one curve per class, rows TP, FP, TN, FN, precision, recall
    assert acc.Tags()["tensors"] == ["val/banana"]
    curve = acc.Tensors("val/banana")[0]
    assert curve.step == 3
    values = torch.tensor(curve.tensor_proto.float_val).view(6, 101)
    assert values[0, 0] == 1 and values[5, 0] == 1  # one TP at threshold 0: recall 1
    assert values[0, -1] == 0 and values[3, -1] == 1  # score 0.9 < threshold 1: missed
    trainer.sanity_checking = True
    with pytest.raises(ValueError, match="max_classes"):
        PRCurvesCallback(max_classes=0)


def test_at_most_max_boxes_predictions_are_drawn() -> None:
    image = torch.zeros(3, 100, 100)
    boxes = torch.tensor([[0.05, 0.3, 0.25, 0.6], [0.35, 0.3, 0.55, 0.6], [0.7, 0.3, 0.9, 0.6]])
    pred = {"boxes": boxes, "scores": torch.tensor([0.5, 0.9, 0.7]), "labels": torch.zeros(3)}
    out = draw_detections(image, pred, score_threshold=0.3, max_boxes=2, width=1)
    red = (out == torch.tensor(PRED_COLOR, dtype=torch.uint8).view(3, 1, 1)).all(0)
    # the box scoring 0.5 (x 5..25) is left out; the two others are drawn
    assert not red[:, :30].any() and red[:, 30:60].any() and red[:, 65:95].any()
