"""Evaluation entry point: ``python -m src.eval ckpt_path=PATH [split=val|test]``.

Writes, in the run folder, ``detections.json`` (every detection in the COCO results format:
original image and category ids, ``[x, y, w, h]`` pixels), ``per_class_ap_<split>.md`` (VOC data)
and ``report.md``: why the detector fails, with its figures (PNG and PDF) under ``figures/``:

* per-class AP@0.5 and AP@[.5:.95], COCO AP and AR by object size with the ground-truth counts;
* precision-recall and F1-against-score curves per class, the F1-optimal threshold marked;
* the detection confusion matrix at IoU 0.5 and the F1-optimal threshold (counts and
  row-normalised), classes plus background;
* the TIDE error breakdown (mAP@0.5 gained by fixing each error type), figure and table;
* the ``top_errors`` images with the most errors at that threshold, one figure each.

The detections are collected once (:class:`~src.callbacks.results.CocoResultsCallback`, pixels
of the original images) and every metric of :mod:`src.metrics` reads the same lists. The loggers
get the metrics as ``eval/<name>`` (``eval/mAP_50``, ...) at the checkpoint's global step, so they
line up with the training curves; TensorBoard also gets the report's scalars, figures
(``eval/figures/...``), tables and PR curves (``eval/pr/<class>``) under ``eval/``.

The network is rebuilt from the config stored in the checkpoint, so no training overrides need to
be repeated; the data come from the checkpoint too unless a ``data`` group is selected.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: see src/utils/malloc.py
    from src.utils.malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

from src.callbacks.results import CocoResultsCallback
from src.metrics.coco_map import DetectionMeanAveragePrecision
from src.metrics.confusion import DetectionConfusion, confusion_matrix
from src.metrics.curves import F1Optimum, ScoreCurve, ScoreCurves, score_curves
from src.metrics.errors import DET_TYPES, ERROR_TYPES, TideErrors, tide_errors
from src.metrics.sizes import SizeBreakdown, size_breakdown
from src.utils.checkpoint import (
    CheckpointMismatchError,
    describe_model,
    load_module,
    load_run_config,
)
from src.utils.config import data_config, set_project_root
from src.utils.errors import report_errors
from src.utils.hparams import per_class_table
from src.utils.instantiate import instantiate_loggers
from src.viz.evaluation import (
    ERROR_NAMES,
    ImageErrors,
    confusion_figure,
    error_image_figure,
    figure_link,
    markdown_table,
    operating_point_errors,
    score_curves_figure,
    tide_figure,
    write_report,
)
from src.viz.style import save_figure

log = logging.getLogger(__name__)

set_project_root()


def check_backbone(cfg: DictConfig, run_config: DictConfig) -> None:
    """Accept ``backbone=`` only when it names the checkpoint's backbone.

    Raises:
        CheckpointMismatchError: ``backbone=X`` differs from the checkpoint's.
    """
    chosen = OmegaConf.select(cfg, "backbone.name", default=None)
    theirs = OmegaConf.select(run_config, "backbone.name", default=None)
    if chosen is not None and chosen != theirs:
        raise CheckpointMismatchError(
            f"backbone={chosen} does not match ckpt_path={cfg.ckpt_path} (checkpoint: "
            f"{describe_model(run_config)}): src.eval rebuilds the checkpoint's network, so drop "
            "the backbone override"
        )


def check_classes(cfg: DictConfig, run_config: DictConfig, datamodule: Any) -> None:
    """Fail with one sentence when the data have other classes than the checkpoint's model.

    Raises:
        CheckpointMismatchError: naming both class lists.
    """
    names = list(getattr(datamodule, "classes", []) or [])
    theirs = list(OmegaConf.select(run_config, "model.class_names", default=None) or [])
    count = OmegaConf.select(run_config, "model.net.num_classes", default=None)
    if not names or (theirs == names) or (not theirs and count == len(names)):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:6]) + (", ..." if len(items) > 6 else "")

    raise CheckpointMismatchError(
        f"cannot evaluate ckpt_path={cfg.ckpt_path} on these data: checkpoint: "
        f"{describe_model(run_config)} [{show(theirs)}]; data: {len(names)} "
        f"class{'' if len(names) == 1 else 'es'} [{show(names)}]. The model predicts only its "
        "own classes: evaluate on data with the same class list (for VOC-format data, "
        f"data.classes=[{','.join(theirs)}]), or train a model on these data"
    )


def evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate a checkpoint on the validation (or test) split.

    Args:
        cfg: the composed ``conf/eval.yaml``.

    Returns:
        ``(metrics, objects)``: the logged metrics as floats, and the built objects.
    """
    if cfg.split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {cfg.split!r}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    run_config, checkpoint = load_run_config(cfg.ckpt_path)
    check_backbone(cfg, run_config)
    datamodule = instantiate(data_config(cfg, run_config))
    check_classes(cfg, run_config, datamodule)
    model, run_config = load_module(cfg.ckpt_path, checkpoint=checkpoint)
    loggers = instantiate_loggers(cfg.get("logger"))
    out_dir = Path(cfg.paths.output_dir)
    writer = CocoResultsCallback(out_dir / "detections.json")
    # the loggers get eval/<name> at the checkpoint's step (below), not the module's val/* at 0
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[writer])
    run = trainer.validate if cfg.split == "val" else trainer.test
    # verbose=False: Lightning's metric table would repeat the lines logged below
    results = run(model=model, datamodule=datamodule, verbose=False)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    for name, value in sorted(metrics.items()):
        log.info("%-20s %.6f", name, value)
    step = int(checkpoint.get("global_step") or 0)
    log_eval_metrics(loggers, metrics, step, cfg, checkpoint)
    objects: dict[str, Any] = {
        "model": model,
        "datamodule": datamodule,
        "trainer": trainer,
        "detections_json": writer.written,
        # per image, pixels of the original image: what every metric of the report reads
        "preds": writer.preds,
        "targets": writer.targets,
    }
    voc = model.voc_results.get(cfg.split)
    if voc is not None:
        ap = model.metrics_of(cfg.split)["voc"].per_class_ap(voc)
        names = list(model.class_names or [str(c) for c in range(ap.numel())])
        table = per_class_table(names, ap.tolist(), float(voc["map_50"]))
        table_path = out_dir / f"per_class_ap_{cfg.split}.md"
        table_path.write_text(table + "\n")
        log.info("Per-class VOC AP@0.5 (%s, also in %s):\n%s", cfg.split, table_path, table)
        objects["per_class_table_path"] = table_path
        for logger in loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("eval/per_class_AP50", table, step)
                logger.experiment.flush()
        objects["per_class_table"] = table
    if not writer.preds:
        log.warning("no image was evaluated: no report.md")
    elif cfg.get("report", True) and trainer.is_global_zero:
        objects["report"] = failure_report(
            cfg, writer.preds, writer.targets, datamodule, model, loggers, step, out_dir, metrics
        )
    return metrics, objects


def log_eval_metrics(
    loggers: list[Any],
    metrics: dict[str, float],
    step: int,
    cfg: DictConfig,
    checkpoint: dict[str, Any],
) -> dict[str, float]:
    """Log ``<split>/<name>`` metrics as ``eval/<name>`` at the checkpoint's global ``step``.

    Non-finite values are left out. TensorBoard also gets a note (``eval/run``) naming the
    checkpoint, its epoch and step, and the split.

    Returns:
        The logged ``{eval/<name>: value}``.
    """
    prefix = f"{cfg.split}/"
    logged = {
        "eval/" + k[len(prefix) :]: v
        for k, v in metrics.items()
        if k.startswith(prefix) and math.isfinite(v)
    }
    note = (
        f"ckpt_path=`{cfg.ckpt_path}` (epoch {checkpoint.get('epoch')}, global step {step}), "
        f"split={cfg.split}"
    )
    for logger in loggers:
        if logged:
            logger.log_metrics(logged, step=step)
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("eval/run", note, step)
        logger.save()
    return logged


@dataclass(frozen=True)
class Analysis:
    """Every metric of the failure report, computed once on the same detections.

    Attributes:
        class_names: the C class names.
        num_images: images evaluated.
        ap50: Tensor[C] float64 COCO AP@0.5 per class (101-point; nan: no ground truth).
        ap: Tensor[C] float64 COCO AP@[.5:.95] per class.
        sizes: COCO AP / AR by object size with the ground-truth counts.
        curves: precision / recall / F1 against the score threshold, per class and overall.
        optimum: the F1-optimal thresholds (``optimum.threshold``: the common one).
        threshold: the operating threshold of the confusion matrix and the error images
            (``optimum.threshold``, or 0 when there is no detection).
        confusion: the confusion matrix at IoU 0.5 and ``score >= threshold``.
        tide: the TIDE error breakdown (mAP@0.5).
        image_errors: per image, the TIDE verdicts of the detections scoring ``>= threshold``.
    """

    class_names: list[str]
    num_images: int
    ap50: Tensor
    ap: Tensor
    sizes: SizeBreakdown
    curves: ScoreCurves
    optimum: F1Optimum
    threshold: float
    confusion: DetectionConfusion
    tide: TideErrors
    image_errors: ImageErrors


def per_class_ap(
    preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], num_classes: int
) -> tuple[Tensor, Tensor]:
    """COCO AP@0.5 and AP@[.5:.95] of each class (torchmetrics, the project's COCO evaluator).

    Ground truths flagged ``difficult`` or ``iscrowd`` are crowd regions (not counted,
    detections on them ignored), as in :func:`src.metrics.sizes.size_breakdown`.

    Args:
        preds: per image ``boxes`` Tensor[N, 4] xyxy pixels, ``scores`` Tensor[N], ``labels``
            Tensor[N] int64 0-based.
        targets: per image ``boxes`` Tensor[M, 4] xyxy pixels, ``labels`` Tensor[M] int64,
            optional ``difficult`` / ``iscrowd`` Tensor[M] bool.
        num_classes: C.

    Returns:
        ``(ap50, ap)``: Tensor[C] float64 each, nan for a class without ground truth.
    """
    dets = [{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds]
    gts = []
    for t in targets:
        crowd = torch.zeros_like(t["labels"], dtype=torch.bool)
        for key in ("difficult", "iscrowd"):
            if key in t:
                crowd = crowd | t[key].bool()
        gts.append({"boxes": t["boxes"], "labels": t["labels"], "iscrowd": crowd.long()})
    out = []
    for iou in ([0.5], None):
        metric = DetectionMeanAveragePrecision(
            box_format="xyxy", class_metrics=True, **({"iou_thresholds": iou} if iou else {})
        )
        metric.update(dets, gts)
        result = metric.compute()
        values = result["map_per_class"].double().reshape(-1)
        ap = torch.full((num_classes,), math.nan, dtype=torch.float64)
        ap[result["classes"].long().reshape(-1)] = torch.where(values < 0, math.nan, values)
        out.append(ap)
    return out[0], out[1]


def analyse(
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Tensor]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
) -> Analysis:
    """Run every metric of the report on one list of detections (pixels of the original images).

    Args:
        preds: per image ``boxes`` Tensor[N, 4] xyxy pixels, ``scores`` Tensor[N], ``labels``
            Tensor[N] int64 0-based.
        targets: per image ``boxes`` Tensor[M, 4] xyxy pixels, ``labels`` Tensor[M] int64,
            ``difficult`` / ``iscrowd`` Tensor[M] bool.
        class_names: the C class names.
        iou_threshold: IoU of a match for the curves, the confusion matrix and TIDE.

    Returns:
        An :class:`Analysis`.
    """
    names = list(class_names)
    ap50, ap = per_class_ap(preds, targets, len(names))
    curves = score_curves(preds, targets, names, iou_threshold=iou_threshold)
    optimum = curves.f1_optimum()
    threshold = optimum.threshold if math.isfinite(optimum.threshold) else 0.0
    # the matrix keeps score > its threshold; the curves keep score >= theirs
    confusion = confusion_matrix(
        preds, targets, names, iou_threshold, math.nextafter(threshold, -math.inf)
    )
    tide = tide_errors(preds, targets, names, pos_threshold=iou_threshold)
    return Analysis(
        class_names=names,
        num_images=len(preds),
        ap50=ap50,
        ap=ap,
        sizes=size_breakdown(preds, targets, names),
        curves=curves,
        optimum=optimum,
        threshold=threshold,
        confusion=confusion,
        tide=tide,
        image_errors=operating_point_errors(tide, preds, threshold),
    )


def _safe(name: str) -> str:
    """A class or image name usable in file names and TensorBoard tags."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or "_"


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _at(curve: ScoreCurve | None, threshold: float) -> tuple[float, float, float]:
    """``(precision, recall, F1)`` of a curve keeping the detections with ``score >= threshold``."""
    if curve is None or not math.isfinite(threshold):
        return math.nan, math.nan, math.nan
    kept = curve.thresholds >= threshold
    if not bool(kept.any()):
        return math.nan, 0.0, 0.0
    i = int(kept.nonzero()[-1])
    return float(curve.precision[i]), float(curve.recall[i]), float(curve.f1[i])


def scalars(analysis: Analysis) -> dict[str, float]:
    """The report's numbers as ``eval/...`` scalars (non-finite values left out)."""
    out: dict[str, float] = {}
    for c, name in enumerate(analysis.class_names):
        out[f"eval/AP50/{_safe(name)}"] = float(analysis.ap50[c])
        out[f"eval/AP/{_safe(name)}"] = float(analysis.ap[c])
    for size, num, ap, ar in analysis.sizes.rows():
        out[f"eval/size/AP_{size}"] = ap
        out[f"eval/size/AR_{size}"] = ar
        out[f"eval/size/num_gt_{size}"] = float(num)
    out.update(analysis.tide.summary(prefix="eval/tide/"))
    opt = analysis.optimum
    out.update(
        {
            "eval/F1_best": opt.f1,
            "eval/score_threshold": opt.threshold,
            "eval/precision_at_threshold": opt.precision,
            "eval/recall_at_threshold": opt.recall,
        }
    )
    return {k: float(v) for k, v in out.items() if math.isfinite(float(v))}


def pr_curve_raw(curve: ScoreCurve, num_thresholds: int = 127) -> dict[str, Tensor]:
    """A curve sampled at TensorBoard's thresholds ``i / (num_thresholds - 1)``.

    For ``SummaryWriter.add_pr_curve_raw`` (TensorBoard's PR curves tab).

    True positives are ``recall * objects``; false positives ``TP / precision - TP`` where a
    true positive is kept, else the counted detections are unknown from the curve and recorded
    as 0 (TensorBoard draws precision against recall; the counts only show in its tooltip).
    A threshold above every score keeps nothing: precision 1, recall 0 (TensorBoard's start).

    Returns:
        ``true_positive_counts``, ``false_positive_counts``, ``true_negative_counts`` (0),
        ``false_negative_counts``, ``precision``, ``recall``: Tensor[num_thresholds] float64.
    """
    grid = torch.linspace(0.0, 1.0, num_thresholds, dtype=torch.float64)
    ascending = curve.thresholds.flip(0).contiguous()
    # number of curve points (thresholds descending) at or above each grid value
    idx = curve.thresholds.numel() - torch.searchsorted(ascending, grid, side="left")
    kept = idx > 0
    j = (idx - 1).clamp(min=0)
    if curve.thresholds.numel() == 0:
        precision = torch.ones_like(grid)
        recall = torch.zeros_like(grid)
    else:
        precision = torch.where(kept, curve.precision[j].nan_to_num(0.0), 1.0)
        recall = torch.where(kept, curve.recall[j], 0.0)
    tp = (recall * curve.num_pos).round()
    fp = torch.where(tp > 0, (tp / precision.clamp(min=1e-12) - tp).round(), 0.0)
    return {
        "true_positive_counts": tp,
        "false_positive_counts": fp,
        "true_negative_counts": torch.zeros_like(grid),
        "false_negative_counts": curve.num_pos - tp,
        "precision": precision,
        "recall": recall,
    }


def _dataset(datamodule: Any, split: str) -> Any:
    """The split's dataset (original images through ``load_image``), or None."""
    dataset = getattr(datamodule, f"{split}_dataset", None)
    return dataset if dataset is not None else getattr(datamodule, "val_dataset", None)


def failure_report(
    cfg: DictConfig,
    preds: Sequence[dict[str, Tensor]],
    targets: Sequence[dict[str, Any]],
    datamodule: Any,
    model: Any,
    loggers: list[Any],
    step: int,
    out_dir: Path,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """Analyse the collected detections, write ``report.md`` and its figures, log ``eval/...``.

    Args:
        cfg: the composed ``conf/eval.yaml`` (``split``, ``top_errors``, ``ckpt_path``).
        preds: per image, pixel detections (``boxes`` xyxy, ``scores``, ``labels``).
        targets: per image, pixel targets (``boxes``, ``labels``, ``difficult``, ``iscrowd``,
            ``coco_image_id``).
        datamodule: the evaluated datamodule (its dataset draws the original images).
        model: the evaluated module (``class_names``).
        loggers: the eval loggers (TensorBoard gets figures, text and PR curves).
        step: the checkpoint's global step.
        out_dir: the run folder.
        metrics: the evaluation loop's metrics (listed in the report).

    Returns:
        ``{"path": report.md, "analysis": Analysis, "figures": {name: {"png", "pdf"}},
        "scalars": {...}}``.
    """
    names = list(
        getattr(model, "class_names", None)
        or getattr(datamodule, "classes", None)
        or [str(c) for c in range(model.net.num_classes)]
    )
    analysis = analyse(preds, targets, names)
    fig_dir = out_dir / "figures"
    figures: dict[str, dict[str, Path]] = {}
    images: dict[str, Tensor] = {}

    def keep(key: str, fig: Figure, path: Path) -> None:
        figures[key] = save_figure(fig, path, dpi=150)
        images[key] = decode_image(str(figures[key]["png"]), mode=ImageReadMode.RGB)

    kept = f"score >= {_f(analysis.threshold)}"  # the matrix's rule: > the next float below
    for key, normalise in (("confusion_counts", False), ("confusion_normalised", True)):
        fig = confusion_figure(analysis.confusion, normalise=normalise, score_label=kept)
        keep(key, fig, fig_dir / key)
    keep("tide", tide_figure(analysis.tide), fig_dir / "tide_errors")
    if analysis.curves.overall is not None:
        keep(
            "curves/all_classes",
            score_curves_figure(analysis.curves.overall, "all classes", analysis.optimum.threshold),
            fig_dir / "curves" / "all_classes",
        )
    for c, curve in enumerate(analysis.curves.per_class):  # loop over classes only
        if curve is not None:
            keep(
                f"curves/{_safe(names[c])}",
                score_curves_figure(curve, names[c], ap=float(analysis.ap50[c])),
                fig_dir / "curves" / f"{c:02d}_{_safe(names[c])}",
            )
    worst = analysis.image_errors.worst(int(cfg.get("top_errors", 8)))
    dataset = _dataset(datamodule, cfg.split)
    index_of = {int(dataset.coco_image_id(i)): i for i in range(len(dataset))} if dataset else {}
    error_images = []
    for rank, i in enumerate(worst, start=1):  # the few images drawn
        index = index_of.get(int(targets[i]["coco_image_id"]))
        if index is None:
            log.warning("image %s not found in the dataset: not drawn", targets[i]["coco_image_id"])
            continue
        key = str(dataset.image_key(index))
        row = analysis.image_errors.counts[i].tolist()
        fp = dict(zip(DET_TYPES[1:], row[1:-1], strict=True))
        fp_text = ", ".join(f"{v} {k}" for k, v in fp.items() if v)
        num_fp = sum(fp.values())
        caption = (
            f"{key}: {row[0]} true positive{'' if row[0] == 1 else 's'}, {num_fp} false "
            f"positive{'' if num_fp == 1 else 's'}{f' ({fp_text})' if fp_text else ''}, "
            f"{row[-1]} missed; detections with score >= {analysis.threshold:.3f}"
        )
        fig = error_image_figure(
            dataset.load_image(index).as_subclass(Tensor),
            preds[i],
            targets[i],
            analysis.tide.det_types[i],
            analysis.tide.det_gt[i],
            analysis.image_errors.shown[i],
            analysis.image_errors.missed[i],
            det_ignored=analysis.tide.det_ignored[i],
            class_names=names,
            title=caption,
        )
        name = f"errors/{rank:02d}_{_safe(key)}"
        keep(name, fig, fig_dir / "errors" / f"{rank:02d}_{_safe(key)}")
        error_images.append((name, caption, analysis.image_errors.errors[i].item()))

    path = write_report(
        out_dir / "report.md",
        f"Why the detector fails: {cfg.split} split",
        report_sections(cfg, analysis, metrics, figures, error_images, out_dir, step),
    )
    values = scalars(analysis)
    for logger in loggers:
        logger.log_metrics(values, step=step)
        if isinstance(logger, TensorBoardLogger):
            tb = logger.experiment
            for key, picture in images.items():
                tb.add_image(f"eval/figures/{key}", picture, step)
            curves = [("all_classes", analysis.curves.overall)] + [
                (_safe(n), c) for n, c in zip(names, analysis.curves.per_class, strict=True)
            ]
            for tag, curve in curves:
                if curve is not None:
                    tb.add_pr_curve_raw(f"eval/pr/{tag}", global_step=step, **pr_curve_raw(curve))
            tb.add_text("eval/report", path.read_text(), step)
            tb.flush()
        logger.save()
    summary = console_summary(analysis, path)
    log.info("%s", summary)
    return {"path": path, "analysis": analysis, "figures": figures, "scalars": values}


def console_summary(analysis: Analysis, path: Path) -> str:
    """A few lines for the console: the headline numbers and where the report is."""
    tide = analysis.tide
    worst = max(ERROR_TYPES, key=lambda k: tide.dap[k])
    opt = analysis.optimum
    return "\n".join(
        [
            f"Failure report: {path}",
            f"  {analysis.num_images} images, mAP@0.5 {_f(_mean(analysis.ap50))}, "
            f"AP@[.5:.95] {_f(analysis.sizes.ap['all'])}",
            f"  F1-optimal score threshold {_f(opt.threshold)}: F1 {_f(opt.f1)}, precision "
            f"{_f(opt.precision)}, recall {_f(opt.recall)}",
            f"  largest TIDE error: {worst}, {ERROR_NAMES[worst]}: fixing it gains "
            f"{tide.dap[worst]:.3f} mAP@0.5",
        ]
    )


def _mean(values: Tensor) -> float:
    """Mean of the finite entries (nan when none)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan


def report_sections(
    cfg: DictConfig,
    analysis: Analysis,
    metrics: dict[str, float],
    figures: dict[str, dict[str, Path]],
    error_images: list[tuple[str, str, int]],
    out_dir: Path,
    step: int,
) -> list[tuple[str, str]]:
    """The Markdown sections of ``report.md`` (see :func:`failure_report`)."""
    names = analysis.class_names
    opt = analysis.optimum
    tide = analysis.tide
    sizes = analysis.sizes
    link = lambda key, alt: figure_link(figures[key], out_dir, alt)  # noqa: E731
    worst = max(ERROR_TYPES, key=lambda k: tide.dap[k])
    overview = "\n".join(
        [
            f"- checkpoint: `{cfg.ckpt_path}` (global step {step}), split `{cfg.split}`, "
            f"{analysis.num_images} images, {sizes.num_gt['all']} objects "
            "(difficult / crowd objects not counted)",
            f"- mAP@0.5 {_f(_mean(analysis.ap50))}, AP@[.5:.95] {_f(sizes.ap['all'])} "
            "(COCO, 101-point, mean over the classes with objects)",
            f"- F1-optimal score threshold (all classes): **{_f(opt.threshold)}**: F1 "
            f"{_f(opt.f1)}, precision {_f(opt.precision)}, recall {_f(opt.recall)}",
            f"- largest TIDE error: **{worst}**, {ERROR_NAMES[worst]}: fixing it adds "
            f"{tide.dap[worst]:.3f} mAP@0.5",
        ]
    )
    logged = (
        "Below, COCO figures ignore difficult objects as crowd regions; the loop's `eval/mAP*` "
        "count them as objects, `eval/voc_mAP_50` ignores them (VOC devkit).\n\n"
    ) + markdown_table(
        ["metric", "value"],
        [
            [f"`eval/{k.split('/', 1)[1]}`", _f(v, 4)]
            for k, v in sorted(metrics.items())
            if k.startswith(f"{cfg.split}/") and k.count("/") == 1  # per-class AP: below
        ],
    )
    rows = []
    for c, name in enumerate(names):  # loop over classes only
        curve = analysis.curves.per_class[c]
        if curve is not None:
            t, f1 = curve.best()
            p, r, _ = _at(curve, t)
            if f1 == 0:  # no true positive at any threshold: no optimum to speak of
                t, p, r = math.nan, math.nan, math.nan
            key = f"curves/{_safe(name)}"
            curve_link = f"[PNG]({_rel(figures[key]['png'], out_dir)})" if key in figures else ""
        else:
            t, f1, p, r, curve_link = math.nan, math.nan, math.nan, math.nan, ""
        rows.append(
            [
                name,
                curve.num_pos if curve is not None else 0,
                _f(float(analysis.ap50[c])),
                _f(float(analysis.ap[c])),
                _f(t),
                _f(f1),
                _f(p),
                _f(r),
                curve_link,
            ]
        )
    rows.append(
        [
            "**mean**",
            sizes.num_gt["all"],
            f"**{_f(_mean(analysis.ap50))}**",
            f"**{_f(_mean(analysis.ap))}**",
            "",
            "",
            "",
            "",
            "",
        ]
    )
    per_class = (
        "COCO AP (101-point, 100 detections per image) at IoU 0.5 and averaged over IoU "
        "0.50:0.05:0.95. *F1-optimal* is each class's own best threshold (score >= it) with "
        "precision, recall and F1 there (VOC matching at IoU 0.5).\n\n"
        + markdown_table(
            [
                "class",
                "objects",
                "AP@0.5",
                "AP@[.5:.95]",
                "F1-optimal score",
                "F1",
                "precision",
                "recall",
                "curves",
            ],
            rows,
            "lrrrrrrrl",
        )
    )
    size_table = (
        "COCOeval's area ranges, square pixels of the original image, both ends inclusive: "
        "small 0..32², medium 32²..96², large 96² and up (AR: at most 100 detections per "
        "image).\n\n"
        + markdown_table(
            ["size", "objects", "AP@[.5:.95]", "AR@100"],
            [[k, n, _f(ap), _f(ar)] for k, n, ap, ar in sizes.rows()],
        )
    )
    curves = "Precision against recall (top) and against the score threshold (bottom)."
    if "curves/all_classes" in figures:
        curves += (
            f" The dot and the dotted line mark the F1-optimal threshold, {_f(opt.threshold)}."
            "\n\n" + link("curves/all_classes", "precision, recall and F1, all classes")
        )
    per_class_links = [
        f"[{name}]({_rel(figures[f'curves/{_safe(name)}']['png'], out_dir)}) "
        f"([PDF]({_rel(figures[f'curves/{_safe(name)}']['pdf'], out_dir)}))"
        for name in names
        if f"curves/{_safe(name)}" in figures
    ]
    if per_class_links:
        curves += "\n\nPer class: " + ", ".join(per_class_links)
    confusion = (
        f"A ground truth and a detection match at IoU > {analysis.confusion.iou_threshold:g} "
        f"whatever their classes, keeping the detections with score >= {_f(analysis.threshold)} "
        "(the F1-optimal threshold). Rows: the true class, columns: the predicted class; the "
        "background column counts the missed objects, the background row the detections that "
        "match no object.\n\n"
        + link("confusion_counts", "confusion matrix, counts")
        + "\n\n"
        + link("confusion_normalised", "confusion matrix, row-normalised")
    )
    tide_rows = [[k, ERROR_NAMES[k], tide.counts[k], f"{tide.dap[k]:.4f}"] for k in ERROR_TYPES] + [
        ["FalsePos", "all false positives removed", "", f"{tide.dap_special['FalsePos']:.4f}"],
        ["FalseNeg", "all missed objects found", "", f"{tide.dap_special['FalseNeg']:.4f}"],
    ]
    tide_text = (
        "TIDE (Bolya et al. 2020, equal to `tidecv`) on all detections (up to 100 per image), "
        f"with its own mAP@0.5, {tide.map_50:.4f} (101-point, averaged over every class with a "
        "detection or an object, so a class with only false positives counts as 0); each row "
        "is the mAP@0.5 gained by fixing every error of that type.\n\n"
        + markdown_table(["type", "error", "count", "mAP@0.5 gained"], tide_rows, "llrr")
        + "\n\n"
        + link("tide", "TIDE error breakdown")
    )
    if error_images:
        errors = (
            f"The {len(error_images)} images with the most errors (false positives plus missed "
            f"objects) among the detections with score >= {_f(analysis.threshold)}; each false "
            "positive is labelled with its TIDE type.\n\n"
            + "\n\n".join(
                f"### {rank}. {caption}\n\n{link(key, caption)}"
                for rank, (key, caption, _) in enumerate(error_images, start=1)
            )
        )
    else:
        errors = f"No image has an error at score >= {_f(analysis.threshold)}."
    files = [f"- detections: [detections.json]({_rel(out_dir / 'detections.json', out_dir)})"]
    table_path = out_dir / f"per_class_ap_{cfg.split}.md"
    if table_path.exists():
        files.append(f"- VOC AP@0.5 per class (devkit): [{table_path.name}]({table_path.name})")
    files.append("- TensorBoard: `tensorboard --logdir " + str(out_dir) + "` (tags under `eval/`)")
    return [
        ("", overview),
        ("Metrics of the evaluation loop", logged),
        ("Per class", per_class),
        ("By object size", size_table),
        ("Precision, recall and F1 against the score threshold", curves),
        ("Confusion matrix", confusion),
        ("Error breakdown (TIDE)", tide_text),
        ("Images with the most errors", errors),
        ("Files", "\n".join(files)),
    ]


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
