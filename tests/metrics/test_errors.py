"""TIDE error analysis: equal to tidecv on real and random detections; hand-built error types."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from benchmarks.voc_mini_map import load_voc_mini
from src.data.voc import VOC_CLASSES
from src.metrics.errors import DET_TYPES, ERROR_TYPES, GT_TYPES, tide_errors
from tests.conftest import shared_data


def _tidecv():  # noqa: ANN202
    """The reference package (the dev extra installs tidecv-light); skip off CI, fail in CI."""
    try:
        return importlib.import_module("tidecv")
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("tidecv is missing in CI: `make install` must install the dev extra")
        pytest.skip("tidecv is not installed (pip install -e '.[dev]' installs tidecv-light)")


def _is_light() -> bool:
    """tidecv-light (xyxy boxes, no ignore regions) rather than tidecv (xywh boxes).

    Both install the module ``tidecv``; only the original ships the dataset loaders
    ``tidecv.datasets`` (which need OpenCV).
    """
    return not hasattr(_tidecv(), "datasets")


def run_tidecv(preds: list[dict], targets: list[dict], max_dets: int = 100):  # noqa: ANN201
    """tidecv on the same detections, built in memory: (run, main errors, special errors)."""
    tidecv = _tidecv()
    light = _is_light()

    def box(b: torch.Tensor) -> list[float]:
        x1, y1, x2, y2 = (float(v) for v in b)
        return [x1, y1, x2, y2] if light else [x1, y1, x2 - x1, y2 - y1]

    gt, dt = tidecv.Data("gt", max_dets=max_dets), tidecv.Data("dt", max_dets=max_dets)
    for i, (t, p) in enumerate(zip(targets, preds, strict=True)):
        gt.add_image(i, str(i))
        flags = t.get("difficult", torch.zeros(len(t["labels"]), dtype=torch.bool))
        for b, label, flag in zip(t["boxes"], t["labels"].tolist(), flags.tolist(), strict=True):
            if flag:
                gt.add_ignore_region(i, label, box(b))
            else:
                gt.add_ground_truth(i, label, box(b))
        for b, s, label in zip(p["boxes"], p["scores"].tolist(), p["labels"].tolist(), strict=True):
            dt.add_detection(i, label, s, box(b))
    tide = tidecv.TIDE()
    run = tide.evaluate(gt, dt, mode=tidecv.TIDE.BOX)
    return run, tide.get_main_errors()["dt"], tide.get_special_errors()["dt"]


def _assert_equal_to_tidecv(preds: list[dict], targets: list[dict], max_dets: int = 100) -> None:
    run, main, special = run_tidecv(preds, targets, max_dets)
    ours = tide_errors(preds, targets, max_dets=max_dets)
    # tidecv prints percentages: compare ours * 100 with its figures
    assert ours.map_50 * 100 == pytest.approx(run.ap, abs=1e-3)
    for name in ERROR_TYPES:
        assert ours.dap[name] * 100 == pytest.approx(main[name], abs=1e-3), name
    for name in ("FalsePos", "FalseNeg"):
        assert ours.dap_special[name] * 100 == pytest.approx(special[name], abs=1e-3), name
    assert ours.counts == {type_.short_name: len(v) for type_, v in run.error_dict.items()}
    # every detection's type: tidecv's errors name the false positives, the rest are TPs
    ids = torch.cumsum(torch.tensor([0] + [len(p["scores"]) for p in preds]), 0).tolist()
    expected = {e.pred["_id"]: e.short_name for e in run.errors if hasattr(e, "pred")}
    missed = {e.gt["_id"] for e in run.errors if e.short_name == "Miss"}
    gt_id = 0
    for i, (types, gts) in enumerate(zip(ours.det_types, ours.gt_types, strict=True)):
        for j, code in enumerate(types.tolist()):
            if code >= 0:
                assert DET_TYPES[code] == expected.get(ids[i] + j, "TP"), (i, j)
        for code in gts.tolist():
            assert (code == GT_TYPES.index("Miss")) == (gt_id in missed)
            gt_id += 1


def test_equals_tidecv_on_voc_mini() -> None:
    shared_data("voc-mini-detections")
    targets, preds = load_voc_mini(shared_data())
    # tidecv-light cannot evaluate ignore regions: compare with difficult objects as plain ones
    plain = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    _assert_equal_to_tidecv(preds, plain)
    if not _is_light():  # the original tidecv: difficult objects as ignore regions too
        _assert_equal_to_tidecv(preds, targets)
    ours = tide_errors(preds, plain, VOC_CLASSES)
    assert ours.map_50 > 0.5  # real detections, not a degenerate case
    assert sum(ours.counts.values()) > 200
    assert all(ours.dap[k] > 0 for k in ERROR_TYPES)  # every type occurs and costs AP


def _random_boxes(n: int, near: torch.Tensor | None = None) -> torch.Tensor:
    """Integer xyxy boxes, or jittered copies of ``near`` (so that IoUs cover [0, 1])."""
    if near is not None and len(near):
        boxes = near[torch.randint(len(near), (n,))] + torch.randint(-12, 13, (n, 4))
    else:
        xy = torch.randint(0, 80, (n, 2))
        boxes = torch.cat([xy, xy + torch.randint(4, 40, (n, 2))], 1)
    boxes = boxes.double()
    x1 = torch.minimum(boxes[:, 0], boxes[:, 2] - 1)
    y1 = torch.minimum(boxes[:, 1], boxes[:, 3] - 1)
    return torch.stack([x1, y1, boxes[:, 2], boxes[:, 3]], 1)


@pytest.mark.parametrize("seed", range(4))
def test_equals_tidecv_on_random_sets(seed: int) -> None:
    """Ties in scores, duplicates, wrong classes, empty images, max_dets cuts: all as tidecv."""
    _tidecv()
    torch.manual_seed(seed)
    for _ in range(10):
        num_classes, max_dets = int(torch.randint(1, 5, ())), int(torch.randint(2, 12, ()))
        preds, targets = [], []
        for _ in range(int(torch.randint(1, 10, ()))):
            m = int(torch.randint(0, 6, ()))
            gt_boxes, gt_labels = _random_boxes(m), torch.randint(0, num_classes, (m,))
            # tidecv-light skips max_dets in images without ground truth: stay below it there
            n = int(torch.randint(0, 15 if m else max_dets + 1, ()))
            near = int(torch.randint(0, n + 1, ()))
            boxes = torch.cat([_random_boxes(near, gt_boxes), _random_boxes(n - near)])
            labels = torch.randint(0, num_classes, (n,))
            if m:
                copy = torch.rand(n) < 0.7
                labels[copy] = gt_labels[torch.randint(m, (int(copy.sum()),))]
            scores = torch.randint(0, 6, (n,)).double() / 5  # many ties
            preds.append({"boxes": boxes, "scores": scores, "labels": labels})
            targets.append({"boxes": gt_boxes, "labels": gt_labels})
        if sum(len(t["labels"]) for t in targets) < 2:
            continue  # tidecv divides by zero when a fix leaves no class with data
        _assert_equal_to_tidecv(preds, targets, max_dets)


def _image(boxes: list, labels: list, scores: list | None = None, **flags: list) -> dict:
    item = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if scores is not None:
        item["scores"] = torch.tensor(scores, dtype=torch.float32)
    item.update({k: torch.tensor(v, dtype=torch.bool) for k, v in flags.items()})
    return item


CAT, DOG = 0, 1


def test_hand_built_error_types() -> None:
    # ground truths: 0 cat A, 1 dog B, 2 cat C (nobody near it), 3 cat D
    target = _image(
        [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [40, 40, 50, 50]],
        [CAT, DOG, CAT, CAT],
    )
    # detections given out of score order: the types come back in this input order
    pred = _image(
        [
            [70, 70, 80, 80],  # cat far from everything: background
            [0, 0, 10, 10],  # cat on A: true positive
            [40, 40, 44, 50],  # cat on D with IoU 0.4: localisation
            [0, 0, 10, 9],  # cat on A again (IoU 0.9), A already taken: duplicate
            [20, 0, 30, 10],  # cat on the dog B: classification
            [40, 40, 44, 50],  # dog on the cat D (IoU 0.4): both wrong
        ],
        [CAT, CAT, CAT, CAT, CAT, DOG],
        [0.5, 0.9, 0.6, 0.8, 0.7, 0.4],
    )
    result = tide_errors([pred], [target], ["cat", "dog"])
    names = [DET_TYPES[c] for c in result.det_types[0].tolist()]
    assert names == ["Bkg", "TP", "Loc", "Dupe", "Cls", "Both"]
    assert result.det_gt[0].tolist() == [-1, 0, 3, 0, 1, -1]
    assert [GT_TYPES[c] for c in result.gt_types[0].tolist()] == [
        "TP",
        "Fixable",
        "Miss",
        "Fixable",
    ]
    assert result.counts == dict.fromkeys(ERROR_TYPES, 1)
    assert result.image_counts.tolist() == [[1, 1, 1, 1, 1, 1]]
    assert not result.det_ignored[0].any()


def test_hand_computed_dap() -> None:
    """One class, two objects; a background box outranks the one true positive."""
    target = _image([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0])
    pred = _image([[80, 80, 90, 90], [0, 0, 10, 10]], [0, 0], [0.9, 0.8])
    result = tide_errors([pred], [target], ["thing"])
    # PR points (recall, precision): (0, 0), (0.5, 0.5); envelope 0.5 up to recall 0.5, so 51 of
    # the 101 recall samples (0, 0.01, ..., 0.5) read 0.5
    assert result.map_50 == pytest.approx(25.5 / 101, abs=1e-12)
    # without the background box: precision 1 up to recall 0.5
    assert result.dap["Bkg"] == pytest.approx(25.5 / 101, abs=1e-12)
    # without the missed object: recall reaches 1 at precision 0.5
    assert result.dap["Miss"] == pytest.approx(25 / 101, abs=1e-12)
    assert all(result.dap[k] == 0 for k in ("Cls", "Loc", "Both", "Dupe"))
    assert result.dap_special["FalsePos"] == pytest.approx(25.5 / 101, abs=1e-12)
    assert result.dap_special["FalseNeg"] == pytest.approx(25 / 101, abs=1e-12)


def test_ignore_regions_and_max_dets() -> None:
    target = _image([[0, 0, 10, 10], [50, 50, 60, 60]], [0, 0], difficult=[True, False])
    pred = _image(
        [[0, 0, 5, 5], [50, 50, 60, 60], [20, 20, 30, 30]],
        [0, 0, 0],
        [0.9, 0.8, 0.1],
    )
    result = tide_errors([pred], [target], ["thing"], max_dets=2)
    # the first box lies inside the difficult one (crowd IoU 1): ignored, yet typed (Bkg: its
    # IoU with the one real object is 0); the third is ranked beyond max_dets: not evaluated
    assert result.det_ignored[0].tolist() == [True, False, False]
    assert result.det_types[0].tolist() == [DET_TYPES.index("Bkg"), DET_TYPES.index("TP"), -1]
    assert result.gt_types[0].tolist() == [-1, GT_TYPES.index("TP")]
    assert result.map_50 == 1.0  # the ignored box is no false positive
    plain = tide_errors([pred], [{"boxes": target["boxes"], "labels": target["labels"]}])
    # as a plain object the box is a Loc error (IoU 0.25) ranked first, and recall stops at 1/2
    assert plain.det_types[0].tolist() == [DET_TYPES.index("Loc"), DET_TYPES.index("TP"), 5]
    assert plain.map_50 == pytest.approx(25.5 / 101, abs=1e-12)


def test_worst_images_and_summary() -> None:
    empty = _image([], [])
    targets = [_image([[0, 0, 10, 10]], [0]), _image([[0, 0, 10, 10]], [0]), empty]
    preds = [
        _image([[0, 0, 10, 10]], [0], [0.9]),  # perfect
        _image([[50, 50, 60, 60], [70, 70, 80, 80]], [0, 0], [0.9, 0.8]),  # 2 Bkg + 1 Miss
        _image([[0, 0, 5, 5]], [0], [0.5]),  # 1 Bkg (no ground truth)
    ]
    result = tide_errors(preds, targets)
    assert result.image_counts.sum(dim=1).tolist() == [0, 3, 1]
    assert result.worst_images(5).tolist() == [1, 2]
    assert result.worst_images(1).tolist() == [1]
    summary = result.summary("eval/tide/")
    assert summary["eval/tide/errors/Bkg"] == 3.0
    assert set(summary) == {
        "eval/tide/mAP_50",
        *(f"eval/tide/dAP/{k}" for k in (*ERROR_TYPES, "FalsePos", "FalseNeg")),
        *(f"eval/tide/errors/{k}" for k in ERROR_TYPES),
    }


def test_input_errors_name_the_entry() -> None:
    target = _image([[0, 0, 10, 10]], [0])
    pred = _image([[0, 0, 10, 10]], [3], [0.9])
    with pytest.raises(ValueError, match=r"preds\[0\]\['labels'\].*\[0, 2\)"):
        tide_errors([pred], [target], ["a", "b"])
    with pytest.raises(ValueError, match="one entry per image"):
        tide_errors([pred], [target, target])
    with pytest.raises(ValueError, match="bg_threshold"):
        tide_errors([pred], [target], bg_threshold=0.6)


def test_no_ground_truth_at_all() -> None:
    """Only background boxes: mAP 0 (the class has data, AP 0), nothing to gain, no crash."""
    preds = [_image([[0, 0, 5, 5]], [0], [0.5]), _image([], [], [])]
    result = tide_errors(preds, [_image([], []), _image([], [])], ["thing"])
    assert result.map_50 == 0.0
    assert result.dap == dict.fromkeys(ERROR_TYPES, 0.0)
    assert result.counts["Bkg"] == 1
    assert result.gt_types[0].numel() == 0
