"""``src.eval``'s failure report: files, TensorBoard tags, numbers equal to the metrics, figures."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from src.eval import evaluate, per_class_ap, pr_curve_raw
from src.metrics.coco_map import DetectionMeanAveragePrecision
from src.metrics.confusion import confusion_matrix
from src.metrics.curves import ScoreCurve, score_curves
from src.metrics.errors import ERROR_TYPES, tide_errors
from src.metrics.sizes import size_breakdown
from src.train import train
from src.viz.evaluation import (
    FULL_PAGE_WIDTH_IN,
    confusion_figure,
    error_image_figure,
    figure_link,
    markdown_table,
    operating_point_errors,
    score_curves_figure,
    tide_figure,
)
from src.viz.style import HALF_PAGE_WIDTH_IN, MIN_FONT_PT, smallest_font_at
from tests.conftest import compose_config, train_overrides


@pytest.fixture(scope="module")
def report_run(
    tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path
) -> tuple[Path, dict, str]:
    """A 2-step banana checkpoint evaluated with the report (one run for every test below)."""
    train_dir = tmp_path_factory.mktemp("train")
    cfg = compose_config(
        "train",
        train_overrides(
            train_dir,
            banana_data_dir,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "callbacks.rich_progress_bar=null",
            "callbacks.detection_grid.num_images=0",
        ),
    )
    train(cfg)
    out = tmp_path_factory.mktemp("eval")
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={train_dir / 'checkpoints' / 'last.ckpt'}",
            f"paths.output_dir={out}",
            "trainer.accelerator=cpu",
            "top_errors=2",
        ],
    )
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("src.eval")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        _, objects = evaluate(eval_cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out, objects, "\n".join(records)


def _table_rows(markdown: str, first_header: str) -> dict[str, list[str]]:
    """The rows of the Markdown table whose header starts with ``| first_header |``, by 1st cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_report_links_every_figure_as_png_and_pdf(report_run) -> None:
    out, objects, console = report_run
    report = out / "report.md"
    assert objects["report"]["path"] == report
    text = report.read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    assert links, "report.md links nothing"
    for link in links:
        assert not link.startswith("/"), f"absolute link {link}"
        assert (out / link).is_file(), f"report.md links {link}, which does not exist"
    figures = {Path(link).with_suffix("").as_posix() for link in links if link.endswith(".png")}
    pdfs = {Path(link).with_suffix("").as_posix() for link in links if link.endswith(".pdf")}
    assert figures == pdfs  # every figure in both formats
    for name in (
        "figures/confusion_counts",
        "figures/confusion_normalised",
        "figures/tide_errors",
        "figures/curves/all_classes",
        "figures/curves/00_banana",
    ):
        assert name in figures
    drawn = sorted(f for f in figures if f.startswith("figures/errors/"))
    worst = objects["report"]["analysis"].image_errors.worst(2)
    assert len(drawn) == len(worst) == 2  # top_errors=2, and the 2-step net errs everywhere
    assert "Failure report: " + str(report) in console


def test_tensorboard_gets_eval_tags(report_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = report_run
    tags: dict[str, set[str]] = {"scalars": set(), "images": set(), "tensors": set()}
    for d in {p.parent for p in out.rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(d), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] |= set(acc.Tags().get(kind, []))
    for tag in (
        "eval/AP50/banana",
        "eval/AP/banana",
        "eval/size/AR_all",
        "eval/tide/dAP/Cls",
        "eval/tide/errors/Bkg",
        "eval/F1_best",
        "eval/score_threshold",
        "eval/mAP_50",
    ):
        assert tag in tags["scalars"], f"{tag} not in {sorted(tags['scalars'])}"
    for tag in (
        "eval/figures/confusion_counts",
        "eval/figures/confusion_normalised",
        "eval/figures/tide",
        "eval/figures/curves/banana",
    ):
        assert tag in tags["images"], f"{tag} not in {sorted(tags['images'])}"
    assert sum(t.startswith("eval/figures/errors/") for t in tags["images"]) == 2
    for tag in ("eval/report/text_summary", "eval/pr/banana", "eval/pr/all_classes"):
        assert tag in tags["tensors"], f"{tag} not in {sorted(tags['tensors'])}"


def test_report_numbers_equal_the_metric_functions(report_run) -> None:
    out, objects, _ = report_run
    text = (out / "report.md").read_text()
    preds, targets = objects["preds"], objects["targets"]
    assert len(preds) == len(targets) == 8  # the 8 synthetic validation images
    names = ["banana"]

    tide = tide_errors(preds, targets, names)
    rows = _table_rows(text, "type")
    for k in ERROR_TYPES:
        assert rows[k][1] == str(tide.counts[k])
        assert rows[k][2] == f"{tide.dap[k]:.4f}"
    assert rows["FalsePos"][2] == f"{tide.dap_special['FalsePos']:.4f}"

    sizes = size_breakdown(preds, targets, names)
    rows = _table_rows(text, "size")
    for k in ("all", "small", "medium", "large"):
        assert rows[k][0] == str(sizes.num_gt[k])
        for cell, value in zip(rows[k][1:], (sizes.ap[k], sizes.ar[k]), strict=True):
            assert cell == ("n/a" if math.isnan(value) else f"{value:.3f}")

    # per-class AP@0.5 from an independent COCO evaluation at IoU 0.5 (one class: map = AP)
    ap50 = DetectionMeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5])
    ap50.update(
        [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
        [
            {
                "boxes": t["boxes"],
                "labels": t["labels"],
                "iscrowd": (t["difficult"] | t["iscrowd"]).long(),
            }
            for t in targets
        ],
    )
    curves = score_curves(preds, targets, names)
    best_t, best_f1 = curves.per_class[0].best()
    row = _table_rows(text, "class")["banana"]
    assert row[0] == str(sizes.num_gt["all"])
    assert row[1] == f"{float(ap50.compute()['map']):.3f}"
    assert row[2] == f"{sizes.ap['all']:.3f}"  # one class: AP@[.5:.95] = the size table's all
    assert row[3] == f"{best_t:.3f}" and row[4] == f"{best_f1:.3f}"
    optimum = curves.f1_optimum()
    assert f"F1-optimal score threshold (all classes): **{optimum.threshold:.3f}**" in text

    analysis = objects["report"]["analysis"]
    matrix = confusion_matrix(
        preds, targets, names, 0.5, math.nextafter(optimum.threshold, -math.inf)
    )
    assert torch.equal(analysis.confusion.counts, matrix.counts)
    # the matrix counts every object once: matched (its row) or missed (background column)
    assert int(matrix.counts[0].sum()) == sizes.num_gt["all"]


def test_per_class_ap_by_hand() -> None:
    # class 0: one object found exactly (AP 1); class 1: its object missed (AP 0); class 2 none
    preds = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]]),
            "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 0]),
        }
    ]
    targets = [
        {
            "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]]),
            "labels": torch.tensor([0, 1]),
            "difficult": torch.tensor([False, False]),
        }
    ]
    ap50, ap = per_class_ap(preds, targets, 3)
    assert ap50[:2].tolist() == [1.0, 0.0] and math.isnan(float(ap50[2]))
    assert ap[:2].tolist() == [1.0, 0.0]


def test_operating_point_errors_by_hand() -> None:
    # two cats; detections: exact (0.9), a loose box on cat 2 (0.8, IoU 0.25: Loc), exact on
    # cat 2 at 0.2 (TP, below the threshold 0.5)
    target = {
        "boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]]),
        "labels": torch.tensor([0, 0]),
    }
    pred = {
        "boxes": torch.tensor(
            [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 40.0, 20.0], [20.0, 0.0, 30.0, 10.0]]
        ),
        "scores": torch.tensor([0.9, 0.8, 0.2]),
        "labels": torch.tensor([0, 0, 0]),
    }
    tide = tide_errors([pred], [target], ["cat"])
    assert tide.det_types[0].tolist() == [0, 2, 0]  # TP, Loc, TP
    at = operating_point_errors(tide, [pred], 0.5)
    assert at.shown[0].tolist() == [True, True, False]
    assert at.missed[0].tolist() == [False, True]  # its true positive scores below 0.5
    assert at.counts[0].tolist() == [1, 0, 1, 0, 0, 0, 1]  # TP, Cls, Loc, Both, Dupe, Bkg, Miss
    assert at.errors.tolist() == [2] and at.worst(5) == [0]
    low = operating_point_errors(tide, [pred], 0.1)
    assert low.missed[0].tolist() == [False, False] and low.counts[0, 0] == 2


def test_pr_curve_raw_samples_tensorboard_thresholds() -> None:
    curve = ScoreCurve(
        thresholds=torch.tensor([0.9, 0.5], dtype=torch.float64),
        precision=torch.tensor([1.0, 0.5], dtype=torch.float64),
        recall=torch.tensor([0.5, 0.5], dtype=torch.float64),
        f1=torch.tensor([2 / 3, 0.5], dtype=torch.float64),
        num_pos=2,
    )
    raw = pr_curve_raw(curve, num_thresholds=11)  # thresholds 0, 0.1, ..., 1
    assert raw["true_positive_counts"].tolist() == [1.0] * 10 + [0.0]
    assert raw["false_positive_counts"].tolist() == [1.0] * 6 + [0.0] * 5
    assert raw["precision"].tolist() == [0.5] * 6 + [1.0] * 5
    assert raw["recall"].tolist() == [0.5] * 10 + [0.0]
    assert raw["false_negative_counts"].tolist() == [1.0] * 10 + [2.0]


def test_figures_are_legible(report_run) -> None:
    from src.metrics.confusion import DetectionConfusion

    names = [f"class{c:02d}" for c in range(20)]
    counts = torch.arange(21 * 21).reshape(21, 21) % 7
    counts[-1, -1] = 0
    confusion = DetectionConfusion(counts, names, 0.5, 0.3)
    for normalise in (False, True):
        fig = confusion_figure(confusion, normalise=normalise)
        assert fig.get_figwidth() <= FULL_PAGE_WIDTH_IN
        assert smallest_font_at(fig, FULL_PAGE_WIDTH_IN) >= MIN_FONT_PT
        texts = {t.get_text() for t in fig.axes[0].texts}
        assert ("6" if not normalise else "10") in texts  # cells are written
    _, objects, _ = report_run
    analysis = objects["report"]["analysis"]
    fig = tide_figure(analysis.tide)
    assert fig.get_figwidth() == pytest.approx(HALF_PAGE_WIDTH_IN)
    assert smallest_font_at(fig) >= MIN_FONT_PT
    assert fig.axes[0].get_xlim()[0] == 0.0
    fig = score_curves_figure(analysis.curves.per_class[0], "banana", ap=0.5)
    assert smallest_font_at(fig) >= MIN_FONT_PT
    assert [ax.get_ylim() for ax in fig.axes] == [(0, 1.02), (0, 1.02)]


def test_error_image_labels_do_not_overlap() -> None:
    image = torch.full((3, 120, 160), 128, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 30.0, 60.0, 80.0]] * 4 + [[100.0, 20.0, 150.0, 110.0]])
    pred = {
        "boxes": boxes,
        "scores": torch.linspace(0.9, 0.5, 5),
        "labels": torch.tensor([0, 1, 0, 0, 1]),
    }
    target = {
        "boxes": torch.tensor([[12.0, 30.0, 60.0, 80.0], [0.0, 90.0, 30.0, 119.0]]),
        "labels": torch.tensor([0, 1]),
    }
    fig = error_image_figure(
        image,
        pred,
        target,
        det_types=torch.tensor([0, 1, 4, 2, 5]),  # TP, Cls, Dupe, Loc, Bkg
        det_gt=torch.tensor([0, 0, 0, 0, -1]),
        shown=torch.ones(5, dtype=torch.bool),
        missed=torch.tensor([False, True]),
        class_names=["cat", "dog"],
        title="test image",
    )
    assert fig.get_figwidth() <= FULL_PAGE_WIDTH_IN
    assert smallest_font_at(fig, FULL_PAGE_WIDTH_IN) >= MIN_FONT_PT
    ax = fig.axes[0]
    labels = [t for t in ax.texts]
    assert sorted(t.get_text() for t in labels) == sorted(
        [
            "cat 0.90",
            "Cls: dog (is cat) 0.80",
            "Dupe: cat 0.70",
            "Loc: cat 0.60",
            "Bkg: dog 0.50",
            "missed: dog",
        ]
    )
    renderer = fig.canvas.get_renderer()
    extents = [t.get_bbox_patch().get_window_extent(renderer) for t in labels]
    for i, a in enumerate(extents):
        for b in extents[i + 1 :]:
            assert not a.overlaps(b), "two box labels overlap"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == [
        "true positive (class, score)",
        "false positive (TIDE type: class, score)",
        "missed object",
    ]


def test_markdown_helpers(tmp_path: Path) -> None:
    assert markdown_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | ---: |\n| 1 | x |"
    paths = {"png": tmp_path / "figures" / "f.png", "pdf": tmp_path / "figures" / "f.pdf"}
    assert figure_link(paths, tmp_path, "F") == (
        "![F](figures/f.png)\n\n[PNG](figures/f.png) · [PDF](figures/f.pdf)"
    )


def test_report_on_real_voc_mini_detections(tmp_path: Path) -> None:
    """The report's tables equal the metric functions on real detections of 12 VOC images."""
    from benchmarks.voc_mini_map import load_voc_mini
    from src.data.voc import VOCDataset
    from src.eval import failure_report
    from tests.conftest import shared_data

    shared_data("voc-mini-detections")
    data = shared_data()
    targets, preds = load_voc_mini(data)
    dataset = VOCDataset(
        data / "VOCdevkit-mini", image_sets=[[2012, "trainval"]], keep_difficult=True
    )
    num = 12
    targets = [{**t, "coco_image_id": dataset.coco_image_id(i)} for i, t in enumerate(targets)]
    preds, targets = preds[:num], targets[:num]
    names = list(dataset.classes)
    cfg = compose_config(
        "eval", ["ckpt_path=real_detections", f"paths.output_dir={tmp_path}", "top_errors=1"]
    )
    result = failure_report(
        cfg,
        preds,
        targets,
        SimpleNamespace(val_dataset=dataset),
        SimpleNamespace(class_names=names),
        [],
        0,
        tmp_path,
        {},
    )
    text = result["path"].read_text()

    rows = _table_rows(text, "class")
    crowd = [
        {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()}
        for t in targets
    ]
    checked = 0
    for c, name in enumerate(names):  # each class on its own: AP = the one-class mAP
        keep_p = [p["labels"] == c for p in preds]
        keep_t = [t["labels"] == c for t in targets]
        if not sum(int((k & ~t["difficult"]).sum()) for k, t in zip(keep_t, targets, strict=True)):
            assert rows[name][1] == "n/a"
            continue
        metric = DetectionMeanAveragePrecision(box_format="xyxy", iou_thresholds=[0.5])
        metric.update(
            [
                {k: p[k][m] for k in ("boxes", "scores", "labels")}
                for p, m in zip(preds, keep_p, strict=True)
            ],
            [{k: t[k][m] for k in t} for t, m in zip(crowd, keep_t, strict=True)],
        )
        assert rows[name][1] == f"{float(metric.compute()['map']):.3f}", name
        checked += 1
    assert checked >= 5
    assert any(
        float(r[1]) > 0.3
        for r in rows.values()
        if r[1] not in ("n/a", "**n/a**") and not r[1].startswith("**")
    )  # real detections: not degenerate

    tide = tide_errors(preds, targets, names)
    rows = _table_rows(text, "type")
    for k in ERROR_TYPES:
        assert rows[k][1] == str(tide.counts[k]) and rows[k][2] == f"{tide.dap[k]:.4f}"
    sizes = size_breakdown(preds, targets, names)
    rows = _table_rows(text, "size")
    assert [rows[k][0] for k in ("all", "small", "medium", "large")] == [
        str(sizes.num_gt[k]) for k in ("all", "small", "medium", "large")
    ]
    assert rows["all"][1] == f"{sizes.ap['all']:.3f}"
    optimum = score_curves(preds, targets, names).f1_optimum()
    assert f"F1-optimal score threshold (all classes): **{optimum.threshold:.3f}**" in text
    assert f"F1 {optimum.f1:.3f}, precision {optimum.precision:.3f}" in text
    assert len(list((tmp_path / "figures" / "errors").glob("*.png"))) == 1


@pytest.mark.parametrize("classes", [1, 3])
def test_small_confusion_figure_has_no_overlapping_text(classes: int) -> None:
    """A one-class matrix once drew its axis titles over the title and each other."""
    from src.metrics.confusion import DetectionConfusion

    names = [f"class {c}" for c in range(classes)]
    counts = torch.arange((classes + 1) ** 2).reshape(classes + 1, classes + 1)
    fig = confusion_figure(DetectionConfusion(counts, names, 0.5, 0.3))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [ax.title, ax.xaxis.label, ax.yaxis.label]
    texts += [t for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    frame = fig.bbox
    for i, box in enumerate(boxes):
        assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, texts[i].get_text()
        assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, texts[i].get_text()
        for j in range(i + 1, len(boxes)):
            assert not box.overlaps(boxes[j]), (texts[i].get_text(), texts[j].get_text())
    assert len(ax.title.get_text().splitlines()) <= 2
