"""``SSDLitModule``: training, validation and test steps for any SSD net, loss and post-processing.

Everything that varies (the net, the loss, the post-processing, the optimiser and scheduler)
arrives built from the Hydra config; this module only wires the steps, metrics and logging.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.detection import MeanAveragePrecision

from src.detection.box_ops import scale_boxes
from src.detection.targets import MultiboxTargets, TargetEncoder
from src.metrics.book import BBoxMAE, ClassError
from src.models.convert import load_ssd_pytorch_state_dict
from src.viz.boxes import detection_grid

log = logging.getLogger(__name__)

Batch = tuple[Tensor, list[dict[str, Any]]]

# Every epoch-level value is a torchmetrics result computed in a module hook, where all ranks
# run the same collectives in the same order, so it is already reduced over ranks. Logging it
# with sync_dist=True would add reductions that Lightning runs lazily, first from rank 0's
# progress bar and elsewhere on other ranks: a deadlock under DDP. Hence no sync_dist here, and
# Lightning's generic advice to use it is silenced for this module's keys.
warnings.filterwarnings(
    "ignore", message=r"It is recommended to use `self\.log\('(train|val|test)/.*sync_dist=True"
)


def to_pixels(
    items: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Any]]
) -> list[dict[str, Tensor]]:
    """Copy detections or targets with boxes scaled from normalised xyxy to original-image pixels.

    Args:
        items: dicts with ``boxes: Tensor[N, 4]`` normalised xyxy and other per-box keys.
        targets: the batch's targets; ``orig_size`` ``(H, W)`` gives the pixel scale.

    Returns:
        New dicts (the inputs are not modified) with pixel boxes.
    """
    out = []
    for item, target in zip(items, targets, strict=True):
        h, w = (int(v) for v in target["orig_size"])
        converted = {k: v for k, v in item.items() if isinstance(v, Tensor)}
        converted["boxes"] = scale_boxes(item["boxes"].float(), w, h)
        out.append(converted)
    return out


def load_initial_weights(net: nn.Module, path: str) -> None:
    """Load ``path`` into ``net``: an ``src.train`` checkpoint or an ``ssd.pytorch`` state dict.

    Args:
        net: the SSD network (modified in place: it is the module's own parameters).
        path: a ``.ckpt`` written by ``src.train`` or a ``.pth`` state dict of ``ssd.pytorch``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the keys fit neither layout (the message lists what is missing).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"model.init_from={file} does not exist; give a .ckpt of src.train or an ssd.pytorch "
            ".pth state dict"
        )
    blob = torch.load(file, map_location="cpu", weights_only=False)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if any(k.startswith("net.") for k in state):
        own = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
        net.load_state_dict(own)
        log.info("Initialised the net from the src.train checkpoint %s", file)
        return
    if any(
        k.split(".", 1)[-1].startswith(("vgg.", "L2Norm.")) or k.startswith("vgg.") for k in state
    ):
        load_ssd_pytorch_state_dict(net, state)
        log.info("Initialised the net from the ssd.pytorch weights %s", file)
        return
    raise ValueError(
        f"model.init_from={file}: keys fit neither an src.train checkpoint ('net.*') nor "
        f"ssd.pytorch ('vgg.*', 'L2Norm.weight', ...); first keys: {list(state)[:5]}"
    )


class SSDLitModule(LightningModule):
    """Lightning wrapper of an SSD net.

    Args:
        net: the SSD network; ``forward(images) -> SSDOutput(cls_logits, box_deltas, anchors)``.
        loss: a ``MultiBoxLoss``; ``loss(cls_logits, box_deltas, targets) -> LossOutput``.
        postprocess: a ``PostProcess``; decodes and suppresses into per-image detections.
        optimizer: a partially applied optimiser (Hydra ``_partial_: true``), called with params.
        scheduler: a partially applied LR scheduler, or None.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric monitored by schedulers such as ``ReduceLROnPlateau``.
        target_encoder: matches anchors to ground truth; defaults to the book's (IoU 0.5).
        class_names: names of the object classes, for pictures.
        num_log_images: validation images drawn to TensorBoard each validation epoch (0: off).
        log_score_threshold: minimum score of a drawn prediction.
        compile: ``torch.compile`` the net at fit start.
        voc_metric: a ``VOCMeanAveragePrecision`` (or any metric with the same ``update`` and a
            ``compute`` giving ``map_50`` and ``ap_per_class``) evaluated next to COCO mAP on the
            validation and test sets, with ``difficult`` objects ignored as the devkit does; None
            to skip it.
        channels_last: run the net in ``torch.channels_last`` memory format (faster
            convolutions on CPU and on GPU tensor cores; the weights and checkpoints are the same).
        init_from: initial weights for the net: a checkpoint of ``src.train`` (``.ckpt``), or an
            ``ssd.pytorch`` SSD300 state dict (keys ``vgg.*``, ``L2Norm.weight``, ``extras.*``,
            ``loc.*``, ``conf.*``), mapped onto this net by ``src.models.convert``.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        postprocess: Callable[..., list[dict[str, Tensor]]],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        target_encoder: TargetEncoder | None = None,
        class_names: Sequence[str] | None = None,
        num_log_images: int = 8,
        log_score_threshold: float = 0.3,
        compile: bool = False,
        voc_metric: Metric | None = None,
        init_from: str | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"model.scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        # Built objects are not hyper-parameters; the full config is logged by src.train.
        self.save_hyperparameters(
            logger=False, ignore=["net", "loss", "postprocess", "target_encoder", "voc_metric"]
        )
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.loss_fn = loss
        self.postprocess = postprocess
        self.target_encoder = target_encoder if target_encoder is not None else TargetEncoder()
        self.class_names = list(class_names) if class_names is not None else None
        if init_from:
            load_initial_weights(net, init_from)
        bias = loss.background_bias(net.num_classes) if hasattr(loss, "background_bias") else None
        if bias is not None and not init_from:
            net.head.init_background_bias(bias)
            log.info("Initialised the background bias to %.4f from the focal prior", bias)

        self.train_metrics = MetricCollection(
            {"class_err": ClassError(), "bbox_mae": BBoxMAE()}, prefix="train/"
        )
        self.val_metrics = self.train_metrics.clone(prefix="val/")
        self.test_metrics = self.train_metrics.clone(prefix="test/")
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.val_voc = voc_metric
        self.test_voc = voc_metric.clone() if voc_metric is not None else None
        #: the last VOC ``compute()`` result per stage, for per-class tables (``src.eval``).
        self.voc_results: dict[str, dict[str, Tensor]] = {}
        self.train_losses = nn.ModuleDict(
            {"loss": MeanMetric(), "cls_loss": MeanMetric(), "box_loss": MeanMetric()}
        )
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self._log_batch: tuple[Tensor, list[dict[str, Any]], list[dict[str, Tensor]]] | None = None
        #: resolved Hydra config of the run, stored in checkpoints (set by ``src.train``).
        self.run_config: dict[str, Any] | None = None

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor):  # noqa: ANN201
        """Run the net: ``Tensor[B, 3, H, W]`` in [0, 1] -> ``SSDOutput``."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def model_step(self, batch: Batch):  # noqa: ANN201
        """Forward, encode targets against the net's anchors, and compute the loss."""
        images, targets = batch
        out = self(images)
        with torch.no_grad():
            encoded: MultiboxTargets = self.target_encoder(out.anchors, targets)
        losses = self.loss_fn(out.cls_logits, out.box_deltas, encoded)
        return out, encoded, losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One optimisation step; logs ``train/loss`` and the book's metrics."""
        out, encoded, losses = self.model_step(batch)
        bsz = out.cls_logits.shape[0]
        self.train_metrics["class_err"].update(out.cls_logits, encoded.cls_labels)
        self.train_metrics["bbox_mae"].update(out.box_deltas, encoded.box_offsets, encoded.pos_mask)
        # per-step value only: epoch means come from the MeanMetrics in on_train_epoch_end
        self.log("train/loss_step", losses.loss, prog_bar=True, batch_size=bsz)
        for name, metric in self.train_losses.items():
            metric.update(getattr(losses, name).detach(), bsz)
        return losses.loss

    def on_train_epoch_end(self) -> None:
        """Log the epoch's class error and bbox MAE."""
        values = dict(self.train_metrics.compute())
        for name, metric in self.train_losses.items():
            values[f"train/{name}_epoch" if name == "loss" else f"train/{name}"] = metric.compute()
            metric.reset()
        self.log_dict(values, prog_bar=True)
        self.train_metrics.reset()

    def _eval_step(self, batch: Batch, stage: str) -> list[dict[str, Tensor]]:
        images, targets = batch
        out, encoded, losses = self.model_step(batch)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics["class_err"].update(out.cls_logits, encoded.cls_labels)
        metrics["bbox_mae"].update(out.box_deltas, encoded.box_offsets, encoded.pos_mask)
        (self.val_loss if stage == "val" else self.test_loss).update(losses.loss, images.shape[0])
        detections = self.postprocess(out.cls_logits, out.box_deltas, out.anchors)
        pixel_dets = to_pixels(detections, targets)
        pixel_gts = to_pixels(
            [
                {
                    "boxes": t["boxes"],
                    "labels": t["labels"],
                    "difficult": t.get(
                        "difficult", torch.zeros_like(t["labels"], dtype=torch.bool)
                    ),
                }
                for t in targets
            ],
            targets,
        )
        # COCO mAP takes boxes and labels only (difficult objects count there)
        (self.val_map if stage == "val" else self.test_map).update(
            pixel_dets, [{"boxes": g["boxes"], "labels": g["labels"]} for g in pixel_gts]
        )
        voc = self.val_voc if stage == "val" else self.test_voc
        if voc is not None:
            voc.update(pixel_dets, pixel_gts)
        return detections

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss, book metrics and mAP on one validation batch."""
        detections = self._eval_step(batch, "val")
        if batch_idx == 0 and self.hparams.num_log_images > 0:
            n = self.hparams.num_log_images
            images, targets = batch
            self._log_batch = (
                images[:n].detach().cpu(),
                [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets[:n]],
                [{k: v.detach().cpu() for k, v in d.items()} for d in detections[:n]],
            )

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        """Loss, book metrics and mAP on one test batch."""
        self._eval_step(batch, "test")

    def _log_epoch_end(self, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        loss = self.val_loss if stage == "val" else self.test_loss
        mean_ap = self.val_map if stage == "val" else self.test_map
        values = dict(metrics.compute())
        values[f"{stage}/loss"] = loss.compute()
        maps = mean_ap.compute()
        values[f"{stage}/mAP"] = maps["map"]
        values[f"{stage}/mAP_50"] = maps["map_50"]
        values[f"{stage}/mAP_75"] = maps["map_75"]
        self.log_dict(values, prog_bar=True)
        voc = self.val_voc if stage == "val" else self.test_voc
        if voc is not None:
            results = voc.compute()
            self.voc_results[stage] = results
            self.log(f"{stage}/voc_mAP_50", results["map_50"].float())
            per_class = (
                voc.ap_dict(results, prefix=f"{stage}/AP50/") if hasattr(voc, "ap_dict") else {}
            )
            if per_class:
                self.log_dict(per_class)
            voc.reset()
        metrics.reset()
        loss.reset()
        mean_ap.reset()

    def on_validation_epoch_end(self) -> None:
        """Log loss, class error, bbox MAE, COCO mAP and mAP@0.5, and a grid of pictures."""
        self._log_epoch_end("val")
        self._log_images()

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_epoch_end("test")

    def _log_images(self) -> None:
        if self._log_batch is None or self.trainer.sanity_checking:
            return
        images, targets, detections = self._log_batch
        self._log_batch = None
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                grid = detection_grid(
                    images,
                    detections,
                    targets,
                    class_names=self.class_names,
                    score_threshold=self.hparams.log_score_threshold,
                )
                logger.experiment.add_image("val/detections", grid, self.global_step)

    # ------------------------------------------------------------- optimiser
    def setup(self, stage: str) -> None:
        """Optionally compile the net."""
        if self.hparams.compile and stage == "fit":
            self.net.compile()

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the optimiser (and scheduler) from the injected partials."""
        optimizer = self.hparams.optimizer(params=self.trainer.model.parameters())
        if self.hparams.scheduler is None:
            return {"optimizer": optimizer}
        scheduler = self.hparams.scheduler(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "frequency": 1,
                "monitor": self.hparams.scheduler_monitor,
            },
        }

    # ------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the run's config so ``src.eval`` and ``src.predict`` can rebuild the net."""
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the run's config."""
        self.run_config = checkpoint.get("run_config", self.run_config)
