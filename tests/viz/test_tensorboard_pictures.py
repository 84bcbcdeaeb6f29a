"""What goes to TensorBoard's cards: PR-curve counts by hand, one detection picture per card."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from src.callbacks.hparams import tensorboard_tag
from src.callbacks.pictures import DetectionGridCallback
from src.metrics.voc_map import VOCMeanAveragePrecision
from src.viz.boxes import PRED_COLOR, TRUE_COLOR, detection_picture, legend_strip
from src.viz.pr_curves import RankedMatches, devkit_curve, pr_curve_counts, ranked_matches


def _det(boxes: list[list[float]], scores: list[float], labels: list[int]) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def _gt(boxes: list[list[float]], labels: list[int], difficult: list[bool] | None = None) -> dict:
    out = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult)
    return out


def test_ranked_matches_by_hand_and_the_devkit_curve() -> None:
    voc = VOCMeanAveragePrecision(class_names=["cat", "dog"])
    # image 1: cat gt A and a difficult cat gt B; detections: 0.9 on A (TP), 0.8 on A again
    # (duplicate: FP), 0.3 on B (ignored). image 2: cat gt C missed; a 0.6 cat far away (FP).
    # dog: no ground truth at all.
    voc.update(
        [
            _det([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8, 0.3], [0, 0, 0]),
            _det([[80, 80, 90, 90], [0, 0, 5, 5]], [0.6, 0.7], [0, 1]),
        ],
        [
            _gt([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], [False, True]),
            _gt([[20, 20, 30, 30]], [0]),
        ],
    )
    matches = ranked_matches(voc)
    assert matches[1] is None  # dog: no ground truth
    cat = matches[0]
    assert cat.num_pos == 2  # A and C (B is difficult)
    assert cat.scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.3])
    assert cat.tp.tolist() == [True, False, False, False]
    assert cat.fp.tolist() == [False, True, True, False]  # 0.3 ignored: neither
    # the devkit's curve, the one the metric itself computes
    recall, precision = devkit_curve(cat)
    ref_recall, ref_precision = voc.pr_curves()[0]
    torch.testing.assert_close(recall, ref_recall)
    torch.testing.assert_close(precision, ref_precision)
    assert recall.tolist() == [0.5, 0.5, 0.5, 0.5]
    assert precision.tolist() == pytest.approx([1.0, 0.5, 1 / 3, 1 / 3])


def test_pr_curve_counts_by_hand_keep_missed_objects_missed() -> None:
    matches = RankedMatches(
        scores=torch.tensor([0.9, 0.8, 0.6, 0.6, 0.3], dtype=torch.float64),
        tp=torch.tensor([True, False, True, False, False]),
        fp=torch.tensor([False, True, False, True, False]),  # the 0.3 one is ignored
        num_pos=3,
    )
    counts = pr_curve_counts(matches, num_thresholds=11)  # thresholds 0, 0.1, ..., 1
    # a score equal to a threshold is kept (0.6 and 0.8 at t = 0.6 and 0.8)
    assert counts["true_positive_counts"].tolist() == [2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 0]
    assert counts["false_positive_counts"].tolist() == [2, 2, 2, 2, 2, 2, 2, 1, 1, 0, 0]
    assert counts["false_negative_counts"].tolist() == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3]
    assert counts["true_negative_counts"].tolist() == [0] * 11
    # at threshold 0 every detection is kept, yet the third object was never found: recall 2/3
    # (add_pr_curve with the missed object as a positive scored 0 would say 1 there)
    assert counts["recall"][0] == pytest.approx(2 / 3)
    assert counts["precision"].tolist() == pytest.approx(
        [0.5] * 7 + [0.5, 0.5, 1.0, 0.0]  # 0 where nothing is kept, TensorBoard's convention
    )
    with pytest.raises(ValueError, match="num_thresholds"):
        pr_curve_counts(matches, num_thresholds=1)


def test_tensorboard_tags_put_the_headline_curves_first() -> None:
    assert tensorboard_tag("train/loss_epoch") == "loss/train/loss_epoch"
    assert tensorboard_tag("val/loss") == "loss/val/loss"
    assert tensorboard_tag("val/mAP_50") == "mAP/val/mAP_50"
    assert tensorboard_tag("lr-SGD") == "train/lr-SGD"
    for key in ("train/loss_step", "val/F1", "val/AP50/banana", "eval/mAP_50", "test/mAP_50"):
        assert tensorboard_tag(key) == key
    groups = sorted({tensorboard_tag(k).split("/")[0] for k in ("val/mAP", "train/loss_epoch")})
    others = {"train", "val", "val_images", "test"}
    # TensorBoard sorts groups by name and opens the first two
    assert sorted(others | set(groups))[:2] == ["loss", "mAP"]


def test_legend_strip_wraps_to_the_width() -> None:
    items = [("ground truth", TRUE_COLOR), ("prediction (score >= 0.41, F1-optimal)", PRED_COLOR)]
    one_row = legend_strip(1000, items, 20)
    two_rows = legend_strip(300, items, 20)
    assert one_row.shape == (3, 36, 1000)
    assert two_rows.shape == (3, 72, 300)
    green = torch.tensor(TRUE_COLOR, dtype=torch.uint8).view(3, 1, 1)
    red = torch.tensor(PRED_COLOR, dtype=torch.uint8).view(3, 1, 1)
    assert (two_rows[:, :36] == green).all(0).any() and (two_rows[:, 36:] == red).all(0).any()


def test_detection_picture_is_large_with_its_own_legend() -> None:
    image = torch.full((3, 128, 256), 0.5)
    pred = _det([[0.1, 0.3, 0.4, 0.9], [0.6, 0.3, 0.9, 0.9]], [0.6, 0.4], [0, 0])
    picture = detection_picture(image, pred, None, ["banana"], score_threshold=0.5, size=512)
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 512
    drawn, legend = picture[:, :256], picture[:, 256:]
    red = (drawn == torch.tensor(PRED_COLOR, dtype=torch.uint8).view(3, 1, 1)).all(0)
    # the 0.6 box (x 51..205 at 512 px) is drawn, the 0.4 one (x 307..461) is not
    assert red[:, 40:220].any() and not red[:, 300:470].any()
    assert legend.shape[1] > 0 and (legend != 255).any()


def test_detection_pictures_one_card_per_image_at_the_f1_threshold(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = SimpleNamespace(
        sanity_checking=False, is_global_zero=True, loggers=[logger], global_step=5, current_epoch=0
    )
    module = SimpleNamespace(class_names=["banana"], score_threshold={"value": 0.55, "f1": 0.8})
    callback = DetectionGridCallback(num_images=2)
    assert callback.threshold(module) == (0.55, "F1-optimal (F1 0.80)")
    assert DetectionGridCallback(score_threshold=0.2).threshold(module) == (0.2, "")
    assert callback.threshold(SimpleNamespace()) == (0.3, "")
    images = torch.rand(3, 3, 64, 64)
    targets = [_gt([[0.1, 0.1, 0.5, 0.5]], [0])] * 3
    outputs = [_det([[0.1, 0.1, 0.5, 0.5]], [0.9], [0])] * 3
    callback.on_validation_batch_end(trainer, module, outputs, (images, targets), 0)
    callback.on_validation_end(trainer, module)
    logger.experiment.flush()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Tags()["images"] == ["val_images/detections/0", "val_images/detections/1"]
    event = acc.Images("val_images/detections/0")[0]
    assert event.step == 5 and event.width == 512 and event.height > 512
    with pytest.raises(ValueError, match="score_threshold"):
        DetectionGridCallback(score_threshold=1.5)
    with pytest.raises(ValueError, match="callbacks.detection_grid.every_n_epochs must be >= 1"):
        DetectionGridCallback(every_n_epochs=0)


def test_detection_pictures_every_n_epochs() -> None:
    """every_n_epochs=3 keeps the first batch at epochs 0 and 3 only (long runs draw less)."""
    callback = DetectionGridCallback(num_images=1, every_n_epochs=3)
    images = torch.rand(1, 3, 64, 64)
    batch = (images, [_gt([[0.1, 0.1, 0.5, 0.5]], [0])])
    outputs = [_det([[0.1, 0.1, 0.5, 0.5]], [0.9], [0])]
    kept = []
    for epoch in range(5):
        trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, current_epoch=epoch)
        callback.on_validation_batch_end(trainer, SimpleNamespace(), outputs, batch, 0)
        kept.append(callback._batch is not None)
        callback._batch = None
    assert kept == [True, False, False, True, False]


def test_pr_curve_counts_on_real_voc_detections() -> None:
    """Real VOC-mini detections: the PR Curves tab ends at the devkit's recall, not at 1."""
    from benchmarks.voc_mini_map import load_voc_mini
    from src.data.voc import VOC_CLASSES
    from tests.conftest import shared_data

    shared_data("voc-mini-detections")
    targets, preds = load_voc_mini(shared_data())
    voc = VOCMeanAveragePrecision(class_names=VOC_CLASSES)
    voc.update(preds, targets)
    matches = ranked_matches(voc)
    devkit = voc.pr_curves()
    assert [m is None for m in matches] == [c is None for c in devkit]
    missed = 0
    for m, curve in zip(matches, devkit, strict=True):
        if m is None:
            continue
        counts = pr_curve_counts(m)
        recall, precision = curve
        # threshold 0 keeps every detection: the devkit's last point
        assert counts["recall"][0].item() == pytest.approx(recall[-1].item())
        assert counts["true_positive_counts"][0] == int(m.tp.sum())
        assert counts["false_positive_counts"][0] == int(m.fp.sum())
        assert counts["false_negative_counts"][0] == m.num_pos - int(m.tp.sum())
        assert bool((counts["recall"][:-1] >= counts["recall"][1:]).all())  # falls with t
        missed += int(counts["recall"][0] < 1)
    assert missed > 0  # some objects are never found: their recall never reaches 1
