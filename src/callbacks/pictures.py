"""Lightning callbacks that draw to TensorBoard: anchor panels, detections and PR curves.

Every picture is one TensorBoard card, legible at the card's default size: figures 3.4 inches
wide with at most two short title lines (``src/viz/style.py``), detections one image per card.
The images go under ``val_images/`` (a group that sorts after the ``loss``, ``mAP``, ``train`` and
``val`` curves, see :mod:`src.callbacks.hparams`), the PR curves also to the PR Curves tab.
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from src.viz.anchors import (
    analyze_module,
    anchor_panels_figure,
    figure_to_tensor,
    negatives_figure,
)
from src.viz.boxes import detection_picture
from src.viz.pr_curves import devkit_curve, pr_curve_counts, pr_curves_figure, ranked_matches

log = logging.getLogger(__name__)

__all__ = ["AnchorPanelsCallback", "DetectionGridCallback", "PRCurvesCallback"]


def _tensorboards(trainer: Trainer) -> list[TensorBoardLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class AnchorPanelsCallback(Callback):
    """Log, each validation epoch, the per-anchor panels of the first validation images.

    For each of the first ``num_images`` images of the validation set (always the same ones),
    two images go to every :class:`~lightning.pytorch.loggers.TensorBoardLogger` (other loggers
    are skipped; nothing is computed without one, e.g. under ``fast_dev_run``):

    * ``<tag>/anchors/<i>``: one panel per positive anchor (ground truth, anchor, decoded
      prediction, ``J`` and ``L``; see :func:`src.viz.anchors.anchor_panels_figure`);
    * ``<tag>/negatives/<i>``: the negatives hard negative mining keeps.

    The module must have ``net``, ``target_encoder`` and ``loss_fn`` (``SSDLitModule``).

    Args:
        num_images: validation images drawn (0 disables the callback).
        max_panels: positive anchors per image (highest box loss first); 4 fill a 2 x 2 figure.
        show_anchor: draw the anchors in the panels.
        every_n_epochs: draw every n-th validation epoch.
        tag: prefix of the TensorBoard image tags.
        dpi: resolution of the rendered figures (150: a 3.4-inch figure is 510 px wide, about a
            TensorBoard card's width).
    """

    def __init__(
        self,
        num_images: int = 2,
        max_panels: int = 4,
        show_anchor: bool = True,
        every_n_epochs: int = 1,
        tag: str = "val_images",
        dpi: int = 150,
    ) -> None:
        if int(num_images) < 0:
            raise ValueError(f"callbacks.anchor_panels.num_images must be >= 0, got {num_images}")
        if int(max_panels) < 1:
            raise ValueError(f"callbacks.anchor_panels.max_panels must be >= 1, got {max_panels}")
        if int(every_n_epochs) < 1:
            raise ValueError(
                f"callbacks.anchor_panels.every_n_epochs must be >= 1, got {every_n_epochs}"
            )
        self.num_images = int(num_images)
        self.max_panels = int(max_panels)
        self.show_anchor = bool(show_anchor)
        self.every_n_epochs = int(every_n_epochs)
        self.tag = tag
        self.dpi = int(dpi)
        self._examples: list[tuple[Tensor, dict[str, Tensor]]] | None = None

    @staticmethod
    def _val_dataset(trainer: Trainer) -> Any:
        loaders = getattr(trainer, "val_dataloaders", None)
        if isinstance(loaders, list | tuple):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
        if dataset is None and getattr(trainer, "datamodule", None) is not None:
            dataset = trainer.datamodule.val_dataloader().dataset
        return dataset

    def _get_examples(self, trainer: Trainer) -> list[tuple[Tensor, dict[str, Tensor]]]:
        if self._examples is None:
            dataset = self._val_dataset(trainer)
            if dataset is None:
                log.warning("AnchorPanelsCallback: no validation dataset found; nothing drawn")
                self._examples = []
                return self._examples
            count = min(self.num_images, len(dataset))
            examples = []
            for i in range(count):
                image, target = dataset[i]
                examples.append(
                    (
                        image.detach().cpu(),
                        {"boxes": target["boxes"].cpu(), "labels": target["labels"].cpu()},
                    )
                )
            self._examples = examples
        return self._examples

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the fixed images' anchors and log them to TensorBoard."""
        if self.num_images == 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every_n_epochs != 0:
            return
        loggers = _tensorboards(trainer)
        if not loggers:
            return
        for i, (image, target) in enumerate(self._get_examples(trainer)):
            analysis = analyze_module(pl_module, image, target, max_panels=self.max_panels)
            name = f"Image {i}, epoch {trainer.current_epoch}"
            panels = anchor_panels_figure(analysis, show_anchor=self.show_anchor, title=name)
            negatives = negatives_figure(analysis, title=f"{name}: hard negatives")
            for fig in (panels, negatives):
                fig.set_dpi(self.dpi)
            pictures = {
                f"{self.tag}/anchors/{i}": figure_to_tensor(panels),
                f"{self.tag}/negatives/{i}": figure_to_tensor(negatives),
            }
            for logger in loggers:
                for tag, picture in pictures.items():
                    logger.experiment.add_image(tag, picture, trainer.global_step)


class DetectionGridCallback(Callback):
    """Log the first validation images with their detections, one TensorBoard card per image.

    Each of the first ``num_images`` images of the first validation batch goes to every
    TensorBoard logger as ``<tag>/detections/<i>`` (other loggers are skipped, and nothing is
    drawn during the sanity check): the image with its longer side ``size`` pixels, the ground
    truth in green, the ``max_boxes`` highest-scoring detections at or above the score threshold
    in red with their class names and scores, and a legend saying the threshold. The pictures
    are drawn at the end of validation, after the module has computed the F1-optimal threshold
    of that validation (``pl_module.score_threshold``), which is the default threshold.

    Args:
        num_images: images of the first validation batch drawn (0 disables the callback).
        score_threshold: minimum score of a drawn detection; None: the F1-optimal threshold of
            the validation just run, or ``fallback_threshold`` when the module has none (no VOC
            metric, or no detection).
        tag: prefix of the TensorBoard image tags.
        max_boxes: detections drawn per image at most (the highest scores); null: all.
        size: longer side of each drawn image, in pixels.
        fallback_threshold: the threshold when ``score_threshold`` is None and the module has
            no F1-optimal one.
        every_n_epochs: draw every n-th validation epoch (epochs 0, n, 2n, ...).
    """

    def __init__(
        self,
        num_images: int = 4,
        score_threshold: float | None = None,
        tag: str = "val_images",
        max_boxes: int | None = 10,
        size: int = 512,
        fallback_threshold: float = 0.3,
        every_n_epochs: int = 1,
    ) -> None:
        if int(num_images) < 0:
            raise ValueError(f"callbacks.detection_grid.num_images must be >= 0, got {num_images}")
        if int(every_n_epochs) < 1:
            raise ValueError(
                f"callbacks.detection_grid.every_n_epochs must be >= 1, got {every_n_epochs}"
            )
        self.every_n_epochs = int(every_n_epochs)
        for key, value in (
            ("score_threshold", score_threshold),
            ("fallback_threshold", fallback_threshold),
        ):
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"callbacks.detection_grid.{key} must be in [0, 1], got {value}")
        if int(size) < 64:
            raise ValueError(f"callbacks.detection_grid.size must be >= 64 pixels, got {size}")
        self.num_images = int(num_images)
        self.score_threshold = None if score_threshold is None else float(score_threshold)
        self.fallback_threshold = float(fallback_threshold)
        self.tag = tag
        self.max_boxes = None if max_boxes is None else int(max_boxes)
        self.size = int(size)
        self._batch: tuple[Tensor, list[dict[str, Tensor]], list[dict[str, Tensor]]] | None = None

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the first batch's images, targets and detections (``outputs``)."""
        if batch_idx != 0 or self.num_images == 0 or trainer.sanity_checking:
            return
        if trainer.current_epoch % self.every_n_epochs != 0:
            return
        if not trainer.is_global_zero or not isinstance(outputs, list):
            return
        n = self.num_images
        images, targets = batch
        self._batch = (
            images[:n].detach().cpu(),
            [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets[:n]],
            [{k: v.detach().cpu() for k, v in d.items()} for d in outputs[:n]],
        )

    def threshold(self, pl_module: Any) -> tuple[float, str]:
        """The score threshold of the pictures and what it is (for the legend)."""
        if self.score_threshold is not None:
            return self.score_threshold, ""
        best = getattr(pl_module, "score_threshold", None)
        if isinstance(best, dict) and best.get("value") is not None:
            return float(best["value"]), f"F1-optimal (F1 {float(best.get('f1', 0.0)):.2f})"
        return self.fallback_threshold, ""

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the kept images to TensorBoard (after the module's epoch-end threshold)."""
        if self._batch is None:
            return
        images, targets, detections = self._batch
        self._batch = None
        loggers = _tensorboards(trainer)
        if not loggers:
            return
        threshold, note = self.threshold(pl_module)
        names = getattr(pl_module, "class_names", None)
        for i, (image, target, det) in enumerate(zip(images, targets, detections, strict=True)):
            picture = detection_picture(
                image,
                det,
                target,
                class_names=names,
                score_threshold=threshold,
                max_boxes=self.max_boxes,
                size=self.size,
                threshold_note=note,
            )
            for logger in loggers:
                logger.experiment.add_image(
                    f"{self.tag}/detections/{i}", picture, trainer.global_step
                )


class PRCurvesCallback(Callback):
    """Log the VOC metric's per-class precision/recall curves, each validation epoch.

    Reads the module's validation VOC metric (``pl_module.metrics_of("val")["voc"]``) before the
    module computes and resets it, matches its detections class by class
    (:func:`src.viz.pr_curves.ranked_matches`, the devkit's rules at the metric's IoU) and logs
    to every TensorBoard logger:

    * ``<tag>/pr_curves``: one figure, one curve per class (the largest APs first,
      ``max_classes`` of them), in the Images tab;
    * ``<curve_tag>/<class name>``: each class's curve in the PR Curves tab, from exact counts at
      ``num_thresholds`` score thresholds, missed ground truths included
      (:func:`src.viz.pr_curves.pr_curve_counts`).

    Nothing is drawn without a VOC metric, without a TensorBoard logger, during the sanity
    check, or on ranks other than 0 (whose curves would cover only their share of the images).

    Args:
        max_classes: classes drawn in the figure (the others are counted in the title; every
            class goes to the PR Curves tab).
        tag: prefix of the figure's image tag.
        dpi: resolution of the rendered figure.
        curve_tag: prefix of the PR Curves tab's tags.
        num_thresholds: score thresholds of the PR Curves tab (``k / (n - 1)``; at most 127).
    """

    def __init__(
        self,
        max_classes: int = 10,
        tag: str = "val_images",
        dpi: int = 150,
        curve_tag: str = "val",
        num_thresholds: int = 101,
    ) -> None:
        if int(max_classes) < 1:
            raise ValueError(f"callbacks.pr_curves.max_classes must be >= 1, got {max_classes}")
        if not 2 <= int(num_thresholds) <= 127:
            raise ValueError(
                f"callbacks.pr_curves.num_thresholds must be in [2, 127], got {num_thresholds}"
            )
        self.max_classes = int(max_classes)
        self.tag = tag
        self.dpi = int(dpi)
        self.curve_tag = curve_tag
        self.num_thresholds = int(num_thresholds)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the epoch's curves (callbacks run before the module's hook resets the metric)."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if getattr(trainer, "world_size", 1) > 1:
            return
        loggers = _tensorboards(trainer)
        metrics_of = getattr(pl_module, "metrics_of", None)
        if not loggers or metrics_of is None or "voc" not in metrics_of("val"):
            return
        matches = ranked_matches(metrics_of("val")["voc"])
        names = list(getattr(pl_module, "class_names", None) or [])
        names += [str(c) for c in range(len(names), len(matches))]
        fig = pr_curves_figure(
            [None if m is None else devkit_curve(m) for m in matches],
            names,
            max_classes=self.max_classes,
            title=f"VOC precision/recall, epoch {trainer.current_epoch}",
        )
        fig.set_dpi(self.dpi)
        picture = figure_to_tensor(fig)
        counts = {
            f"{self.curve_tag}/{names[c]}": pr_curve_counts(m, self.num_thresholds)
            for c, m in enumerate(matches)
            if m is not None
        }
        for logger in loggers:
            logger.experiment.add_image(f"{self.tag}/pr_curves", picture, trainer.global_step)
            for tag, values in counts.items():
                logger.experiment.add_pr_curve_raw(
                    tag,
                    **{k: v.numpy() for k, v in values.items()},
                    global_step=trainer.global_step,
                    num_thresholds=self.num_thresholds,
                )
