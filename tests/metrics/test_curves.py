"""Precision / recall / F1 against the score threshold and the F1-optimal thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.voc_mini_map import load_voc_mini
from src.data.voc import VOC_CLASSES
from src.metrics.curves import ScoreCurve, f1_optimal_threshold, score_curves
from src.metrics.voc_map import VOCMeanAveragePrecision
from tests.conftest import shared_data

F64 = torch.float64


def _hand_case() -> tuple[list[dict], list[dict]]:
    """Two images, classes 0 and 1 with objects, class 2 without (see the expected values)."""
    targets = [
        {  # image 0: G1, G2 of class 0
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10]]),
            "labels": torch.tensor([0, 0]),
            "difficult": torch.tensor([False, False]),
        },
        {  # image 1: G3 of class 0, H1 of class 1, a difficult class-0 object
            "boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 40], [60, 0, 70, 10]]),
            "labels": torch.tensor([0, 1, 0]),
            "difficult": torch.tensor([False, False, True]),
        },
    ]
    preds = [
        {
            "boxes": torch.tensor(
                [
                    [0.0, 0, 10, 10],  # a: class 0 on G1, 0.9, TP
                    [20, 0, 30, 10],  # c: class 0 on G2, 0.8, TP
                    [0, 0, 10, 10],  # d: class 0 on G1 again, 0.6, FP (duplicate)
                    [80, 80, 90, 90],  # g: class 1 on nothing, 0.95, FP
                    [80, 80, 90, 90],  # h: class 2 (no object of that class), 0.1, FP
                ]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.6, 0.95, 0.1]),
            "labels": torch.tensor([0, 0, 0, 1, 2]),
        },
        {
            "boxes": torch.tensor(
                [
                    [50.0, 50, 60, 60],  # b: class 0 on nothing, 0.8 (tie with c), FP
                    [0, 0, 10, 10],  # e: class 0 on G3, 0.3, TP
                    [60, 0, 70, 10],  # i: class 0 on the difficult object, 0.5, ignored
                    [20, 20, 40, 40],  # f: class 1 on H1, 0.7, TP
                ]
            ),
            "scores": torch.tensor([0.8, 0.3, 0.5, 0.7]),
            "labels": torch.tensor([0, 0, 0, 1]),
        },
    ]
    return preds, targets


def test_hand_computed_curves() -> None:
    preds, targets = _hand_case()
    curves = score_curves(preds, targets, ["a", "b", "c"])
    c0, c1, c2 = curves.per_class
    assert c2 is None  # no object of class 2
    # class 0, npos 3: (t, TP, FP) = (.9, 1, 0), (.8, 2, 1), (.6, 2, 2), (.5, 2, 2), (.3, 3, 2)
    torch.testing.assert_close(c0.thresholds, torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3]).to(F64))
    torch.testing.assert_close(c0.precision, torch.tensor([1, 2 / 3, 0.5, 0.5, 0.6], dtype=F64))
    torch.testing.assert_close(c0.recall, torch.tensor([1, 2, 2, 2, 3], dtype=F64) / 3)
    torch.testing.assert_close(c0.f1, torch.tensor([0.5, 2 / 3, 4 / 7, 4 / 7, 0.75], dtype=F64))
    # class 1, npos 1: (.95, 0, 1), (.7, 1, 1)
    torch.testing.assert_close(c1.precision, torch.tensor([0.0, 0.5], dtype=F64))
    torch.testing.assert_close(c1.f1, torch.tensor([0.0, 2 / 3], dtype=F64))
    # micro, npos 4: (.95, 0, 1), (.9, 1, 1), (.8, 2, 2), (.7, 3, 2), (.6, 3, 3), (.5, 3, 3),
    # (.3, 4, 3), (.1, 4, 4)
    micro = curves.overall
    assert micro.num_pos == 4
    torch.testing.assert_close(
        micro.f1, torch.tensor([0, 1 / 3, 0.5, 2 / 3, 0.6, 0.6, 8 / 11, 2 / 3], dtype=F64)
    )
    best = curves.f1_optimum()
    assert best.threshold == pytest.approx(0.3) and best.f1 == pytest.approx(8 / 11)
    assert best.precision == pytest.approx(4 / 7) and best.recall == 1.0
    assert best.per_class_threshold[:2].tolist() == pytest.approx([0.3, 0.7])
    assert best.per_class_f1[:2].tolist() == pytest.approx([0.75, 2 / 3])
    assert math.isnan(best.per_class_threshold[2]) and math.isnan(best.per_class_f1[2])


def test_from_the_validation_metric() -> None:
    """``f1_optimal_threshold(metric)`` on the metric's states equals the lists' computation."""
    preds, targets = _hand_case()
    metric = VOCMeanAveragePrecision(class_names=["a", "b", "c"])
    metric.update(preds[:1], targets[:1])
    metric.update(preds[1:], targets[1:])
    best = f1_optimal_threshold(metric)
    ref = score_curves(preds, targets, ["a", "b", "c"]).f1_optimum()
    assert (best.threshold, best.f1, best.precision, best.recall) == (
        ref.threshold,
        ref.f1,
        ref.precision,
        ref.recall,
    )
    assert best.f1 == pytest.approx(8 / 11)
    torch.testing.assert_close(
        best.per_class_f1, torch.tensor([0.75, 2 / 3, math.nan], dtype=F64), equal_nan=True
    )
    assert float(metric.compute()["map"]) > 0  # the metric still computes afterwards


def test_ties_and_edge_cases() -> None:
    # tied scores enter together; a prefix of ignored detections has no precision
    curve = ScoreCurve.from_ranked(
        torch.tensor([0.9, 0.5, 0.5, 0.2]),
        torch.tensor([False, True, False, True]),
        torch.tensor([False, False, True, False]),
        num_pos=2,
    )
    assert curve.thresholds.tolist() == pytest.approx([0.9, 0.5, 0.2])
    assert math.isnan(curve.precision[0]) and curve.f1[0] == 0.0
    torch.testing.assert_close(curve.precision[1:], torch.tensor([0.5, 2 / 3], dtype=F64))
    assert curve.best() == (pytest.approx(0.2), pytest.approx(0.8))
    no_box = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}
    no_box["labels"] = no_box["labels"].long()
    one_object = {"boxes": torch.tensor([[0.0, 0, 5, 5]]), "labels": torch.tensor([0])}
    empty = score_curves([no_box], [one_object])
    assert math.isnan(empty.f1_optimum().threshold) and empty.f1_optimum().f1 == 0.0


def test_voc_mini_curves_match_the_devkit_pr() -> None:
    """On real detections, the curves at each tie end are the devkit's ranked recall/precision."""
    shared_data("voc-mini-detections")
    targets, preds = load_voc_mini(shared_data())
    metric = VOCMeanAveragePrecision(class_names=VOC_CLASSES)
    metric.update(preds, targets)
    pr = metric.pr_curves()
    curves = score_curves(preds, targets, VOC_CLASSES)
    for c, (curve, ref) in enumerate(zip(curves.per_class, pr, strict=True)):
        assert (curve is None) == (ref is None), c
        if curve is None:
            continue
        recall, precision = ref
        assert curve.recall[-1].item() == pytest.approx(recall[-1].item(), abs=1e-12)
        # the devkit's precision after the last detection of the lowest tie group
        assert curve.precision[-1].item() == pytest.approx(precision[-1].item(), abs=1e-12)
        assert bool((curve.f1 <= 1).all()) and curve.thresholds.is_floating_point()
    best = f1_optimal_threshold(metric)
    assert 0.0 < best.f1 <= 1.0
    assert best.threshold in set(torch.cat([p["scores"] for p in preds]).double().tolist())
