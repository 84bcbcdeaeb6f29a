"""Lightning callbacks that draw to TensorBoard: per-anchor panels and detection grids."""

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
from src.viz.boxes import detection_grid
from src.viz.pr_curves import pr_curves_figure

log = logging.getLogger(__name__)

__all__ = ["AnchorPanelsCallback", "DetectionGridCallback", "PRCurvesCallback"]


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
        max_panels: positive anchors per image (highest box loss first).
        show_anchor: draw the anchors in the panels.
        every_n_epochs: draw every n-th validation epoch.
        tag: prefix of the TensorBoard image tags.
        dpi: resolution of the rendered figures (150: 9 pt titles are 19 px high, legible in
            TensorBoard without zooming).
    """

    def __init__(
        self,
        num_images: int = 2,
        max_panels: int = 8,
        show_anchor: bool = True,
        every_n_epochs: int = 1,
        tag: str = "val",
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
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        for i, (image, target) in enumerate(self._get_examples(trainer)):
            analysis = analyze_module(pl_module, image, target, max_panels=self.max_panels)
            panels = anchor_panels_figure(
                analysis,
                show_anchor=self.show_anchor,
                title=f"Validation image {i}, epoch {trainer.current_epoch}",
            )
            negatives = negatives_figure(
                analysis,
                title=f"Validation image {i}, epoch {trainer.current_epoch}: hard negatives",
            )
            for fig in (panels, negatives):
                fig.set_dpi(self.dpi)
            pictures = {
                f"{self.tag}/anchors/{i}": figure_to_tensor(panels),
                f"{self.tag}/negatives/{i}": figure_to_tensor(negatives),
            }
            for logger in loggers:
                for name, picture in pictures.items():
                    logger.experiment.add_image(name, picture, trainer.global_step)


class DetectionGridCallback(Callback):
    """Log a grid of the first validation images with their detections, each validation epoch.

    Boxes above ``score_threshold`` are drawn with the module's ``class_names`` next to the
    ground truth, as ``<tag>/detections`` in every TensorBoard logger (other loggers are
    skipped, and nothing is drawn during the sanity check).

    Args:
        num_images: images of the first validation batch drawn (0 disables the callback).
        score_threshold: minimum score of a drawn detection.
        tag: prefix of the TensorBoard image tag.
        max_boxes: detections drawn per image at most (the highest scores); null: all.
    """

    def __init__(
        self,
        num_images: int = 8,
        score_threshold: float = 0.3,
        tag: str = "val",
        max_boxes: int | None = 10,
    ) -> None:
        if int(num_images) < 0:
            raise ValueError(f"callbacks.detection_grid.num_images must be >= 0, got {num_images}")
        if not 0.0 <= float(score_threshold) <= 1.0:
            raise ValueError(
                f"callbacks.detection_grid.score_threshold must be in [0, 1], got {score_threshold}"
            )
        self.num_images = int(num_images)
        self.score_threshold = float(score_threshold)
        self.tag = tag
        self.max_boxes = None if max_boxes is None else int(max_boxes)
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
        if not trainer.is_global_zero or not isinstance(outputs, list):
            return
        n = self.num_images
        images, targets = batch
        self._batch = (
            images[:n].detach().cpu(),
            [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets[:n]],
            [{k: v.detach().cpu() for k, v in d.items()} for d in outputs[:n]],
        )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the kept batch to TensorBoard."""
        if self._batch is None:
            return
        images, targets, detections = self._batch
        self._batch = None
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        grid = detection_grid(
            images,
            detections,
            targets,
            class_names=getattr(pl_module, "class_names", None),
            score_threshold=self.score_threshold,
            max_boxes=self.max_boxes,
        )
        for logger in loggers:
            logger.experiment.add_image(f"{self.tag}/detections", grid, trainer.global_step)


class PRCurvesCallback(Callback):
    """Log the VOC metric's per-class precision/recall curves, each validation epoch.

    Reads the module's validation VOC metric (``pl_module.metrics_of("val")["voc"]``, its
    :meth:`~src.metrics.voc_map.VOCMeanAveragePrecision.pr_curves`) before the module computes
    and resets it, and draws one curve per class (the largest APs first, ``max_classes`` of them)
    to every TensorBoard logger as ``<tag>/pr_curves``. Nothing is drawn without a VOC metric,
    without a TensorBoard logger, during the sanity check, or on ranks other than 0 (whose
    curves would cover only their share of the images).

    Args:
        max_classes: classes drawn (the others are counted in the title).
        tag: prefix of the TensorBoard image tag.
        dpi: resolution of the rendered figure.
    """

    def __init__(self, max_classes: int = 10, tag: str = "val", dpi: int = 150) -> None:
        if int(max_classes) < 1:
            raise ValueError(f"callbacks.pr_curves.max_classes must be >= 1, got {max_classes}")
        self.max_classes = int(max_classes)
        self.tag = tag
        self.dpi = int(dpi)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Draw the epoch's curves (callbacks run before the module's hook resets the metric)."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if getattr(trainer, "world_size", 1) > 1:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        metrics_of = getattr(pl_module, "metrics_of", None)
        if not loggers or metrics_of is None or "voc" not in metrics_of("val"):
            return
        curves = metrics_of("val")["voc"].pr_curves()
        names = list(getattr(pl_module, "class_names", None) or [])
        fig = pr_curves_figure(
            curves,
            names,
            max_classes=self.max_classes,
            title=f"VOC precision/recall, epoch {trainer.current_epoch}",
        )
        fig.set_dpi(self.dpi)
        picture = figure_to_tensor(fig)
        for logger in loggers:
            logger.experiment.add_image(f"{self.tag}/pr_curves", picture, trainer.global_step)
