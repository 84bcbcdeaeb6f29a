"""``SSDLitModule``: training, validation and test steps for any SSD net, loss and post-processing.

Everything that varies (the net, the loss, the post-processing, the optimiser and scheduler)
arrives built from the Hydra config; this module only wires the steps, metrics and logging.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, MetricCollection

from src.detection.box_ops import to_pixels
from src.detection.coder import BoxCoder
from src.detection.losses import compute_loss
from src.detection.targets import MultiboxTargets, TargetEncoder
from src.metrics import BBoxMAE, ClassError, DetectionMeanAveragePrecision
from src.metrics.curves import f1_optimal_threshold
from src.models.convert import load_initial_weights
from src.utils.checkpoint import plain_checkpoint
from src.utils.faults import (
    check_finite_grads,
    check_finite_loss,
    check_finite_state,
    check_finite_values,
)

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
        compile: ``torch.compile`` the net at fit start.
        voc_metric: a ``VOCMeanAveragePrecision`` (or any metric with the same ``update`` and a
            ``compute`` giving ``map_50`` and ``ap_per_class``) evaluated next to COCO mAP on the
            validation and test sets, with ``difficult`` objects ignored as the devkit does; None
            to skip it.
        channels_last: run the net in ``torch.channels_last`` memory format (the weights and
            checkpoints are the same). The configs let the backbone choose: faster for TinySSD
            everywhere and for VGG16 on GPUs, AVX512 CPUs and at 16-bit precision, slower for
            VGG16 in float32 on AVX2-only CPUs (``src.utils.config.auto_channels_last``).
        init_from: initial weights for the net: a checkpoint of ``src.train`` (``.ckpt``), or an
            ``ssd.pytorch`` SSD300 state dict (keys ``vgg.*``, ``L2Norm.weight``, ``extras.*``,
            ``loc.*``, ``conf.*``), mapped onto this net by ``src.models.convert``.
        box_coder: the one :class:`~src.detection.coder.BoxCoder` (variances, size clip) that
            encodes the targets, decodes the predictions and draws the pictures; it replaces
            the coders of ``target_encoder`` and ``postprocess``. Default: theirs.
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
        compile: bool = False,
        voc_metric: Metric | None = None,
        init_from: str | None = None,
        channels_last: bool = True,
        box_coder: BoxCoder | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"model.scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        # Built objects are not hyper-parameters (the full config is logged by src.train), and
        # checkpoints hold plain values only: the optimiser and scheduler partials stay out.
        self.save_hyperparameters(
            logger=False,
            ignore=[
                "box_coder",
                "net", "loss", "postprocess", "target_encoder", "voc_metric", "optimizer",
                "scheduler", "class_names",
            ],
        )  # fmt: skip
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.loss_fn = loss
        self.postprocess = postprocess
        self.target_encoder = target_encoder if target_encoder is not None else TargetEncoder()
        #: one coder, configured once (``model.box_coder``), shared by the target encoder, the
        #: post-processing and the pictures
        self.box_coder = box_coder if box_coder is not None else self.target_encoder.coder
        self.target_encoder.coder = self.box_coder
        if hasattr(self.postprocess, "coder"):
            self.postprocess.coder = self.box_coder
        self.class_names = [str(n) for n in class_names] if class_names is not None else None
        if init_from:
            load_initial_weights(net, init_from)
        bias = loss.background_bias(net.num_classes) if hasattr(loss, "background_bias") else None
        if bias is not None and not init_from:
            net.head.init_background_bias(bias)
            log.info("Initialised the background bias to %.4f from the focal prior", bias)

        book = MetricCollection({"class_err": ClassError(), "bbox_mae": BBoxMAE()})
        #: ``<stage>_metrics``: ``book`` (class error, bbox MAE), ``loss``, ``map`` (COCO), ``voc``
        self.stage_metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": nn.ModuleDict(
                    {
                        "book": book.clone(prefix=f"{stage}/"),
                        "loss": MeanMetric(),
                        **(
                            {
                                "map": DetectionMeanAveragePrecision(
                                    box_format="xyxy", iou_type="bbox"
                                )
                            }
                            if stage != "train"
                            else {}
                        ),
                        **(
                            {"voc": voc_metric.clone()}
                            if stage != "train" and voc_metric is not None
                            else {}
                        ),
                    }
                )
                for stage in ("train", "val", "test")
            }
        )
        #: the last VOC ``compute()`` result per stage, for per-class tables (``src.eval``).
        self.voc_results: dict[str, dict[str, Tensor]] = {}
        self.train_terms = nn.ModuleDict({"cls_loss": MeanMetric(), "box_loss": MeanMetric()})
        #: resolved Hydra config of the run, stored in checkpoints (set by ``src.train``).
        self.run_config: dict[str, Any] | None = None
        #: the F1-optimal score threshold of the last validation (micro F1 over all classes at
        #: the VOC metric's IoU, 0.5): ``value``, ``f1``, ``precision``, ``recall``, ``epoch``,
        #: ``global_step``, ``iou_threshold`` (``value`` None, with a ``reason``, when that
        #: validation had no detection or no ground truth); None before the first validation or
        #: without a VOC metric. Stored in checkpoints as ``score_threshold`` (``src.predict``
        #: uses it).
        self.score_threshold: dict[str, Any] | None = None

    def metrics_of(self, stage: str) -> nn.ModuleDict:
        """The metrics of ``stage`` (train, val, test): ``book``, ``loss``, ``map``, ``voc``."""
        return self.stage_metrics[f"{stage}_metrics"]

    # ------------------------------------------------------------------ steps
    def forward(self, images: Tensor):  # noqa: ANN201
        """Run the net: ``Tensor[B, 3, H, W]`` in [0, 1] -> ``SSDOutput``."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def model_step(self, batch: Batch):  # noqa: ANN201
        """Forward, encode targets against the net's anchors, and compute the loss.

        Under mixed precision (``trainer.precision=bf16-mixed``) only the network runs in
        bfloat16: its outputs are cast to float32, and the target encoding and the loss run
        in float32 outside autocast.
        """
        images, targets = batch
        out = self(images)
        out = out._replace(
            cls_logits=out.cls_logits.float(),
            box_deltas=out.box_deltas.float(),
            anchors=out.anchors.float(),
        )
        with torch.autocast(images.device.type, enabled=False):
            encoded: MultiboxTargets
            encoded, losses = compute_loss(
                self.loss_fn,
                self.target_encoder,
                out.cls_logits,
                out.box_deltas,
                out.anchors,
                targets,
            )
        return out, encoded, losses

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        """One optimisation step; logs ``train/loss`` and the book's metrics.

        Raises:
            DivergedError: the loss is not finite (raised before the optimiser step, so the
                weights and every checkpoint stay finite).
        """
        out, encoded, losses = self.model_step(batch)
        check_finite_loss(
            {"loss": losses.loss, "cls_loss": losses.cls_loss, "box_loss": losses.box_loss},
            self.global_step,
        )
        bsz = out.cls_logits.shape[0]
        metrics = self.metrics_of("train")
        metrics["book"]["class_err"].update(out.cls_logits, encoded.cls_labels)
        metrics["book"]["bbox_mae"].update(out.box_deltas, encoded.box_offsets, encoded.pos_mask)
        # per-step value only: epoch means come from the MeanMetrics in on_train_epoch_end
        self.log("train/loss_step", losses.loss, prog_bar=True, batch_size=bsz)
        metrics["loss"].update(losses.loss.detach(), bsz)
        for name, metric in self.train_terms.items():
            metric.update(getattr(losses, name).detach(), bsz)
        return losses.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before a non-finite gradient reaches the weights.

        Skipped under float16 mixed precision, whose gradient scaler skips such steps itself.
        """
        if "16-mixed" in str(self.trainer.precision) and "bf16" not in str(self.trainer.precision):
            return
        grads = {n: p.grad for n, p in self.named_parameters() if p.grad is not None}
        check_finite_grads(grads, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Stop as soon as a buffer (BatchNorm running statistics) becomes non-finite."""
        check_finite_state(dict(self.named_buffers()), self.global_step)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's loss terms, class error and bbox MAE."""
        metrics = self.metrics_of("train")
        values = dict(metrics["book"].compute())
        values["train/loss_epoch"] = metrics["loss"].compute()
        for name, metric in self.train_terms.items():
            values[f"train/{name}"] = metric.compute()
            metric.reset()
        self.log_dict(values, prog_bar=False)
        metrics["book"].reset()
        metrics["loss"].reset()

    def _validation_where(self, what: str) -> tuple[str, str]:
        """``(where, seen_in)`` of a validation's values, for :class:`DivergedError`."""
        if getattr(self._trainer, "sanity_checking", False):
            return f"the sanity-check validation before training ({what})", "sanity check"
        return f"the validation of epoch {self.current_epoch} ({what})", "validation"

    def _eval_step(self, batch: Batch, stage: str, batch_idx: int = 0) -> list[dict[str, Tensor]]:
        images, targets = batch
        out, encoded, losses = self.model_step(batch)
        with torch.autocast(images.device.type, enabled=False):  # float32 decoding and NMS
            detections = self.postprocess(out.cls_logits, out.box_deltas, out.anchors)
        if stage == "val":  # before any metric, picture or checkpoint sees them
            where, seen_in = self._validation_where(f"batch {batch_idx}")
            check_finite_values(
                {
                    "loss": losses.loss,
                    "cls_loss": losses.cls_loss,
                    "box_loss": losses.box_loss,
                    "cls_logits": out.cls_logits,
                    "box_deltas": out.box_deltas,
                    "boxes": torch.cat([d["boxes"].reshape(-1, 4) for d in detections]),
                    "scores": torch.cat([d["scores"].reshape(-1) for d in detections]),
                },
                self.global_step,
                where,
                seen_in,
            )
        metrics = self.metrics_of(stage)
        metrics["book"]["class_err"].update(out.cls_logits, encoded.cls_labels)
        metrics["book"]["bbox_mae"].update(out.box_deltas, encoded.box_offsets, encoded.pos_mask)
        metrics["loss"].update(losses.loss, images.shape[0])
        pixel_dets = to_pixels(detections, targets)
        pixel_gts = to_pixels(
            [
                {
                    "boxes": t["boxes"],
                    "labels": t["labels"],
                    "difficult": t.get(
                        "difficult", torch.zeros_like(t["labels"], dtype=torch.bool)
                    ),
                    "iscrowd": t.get("iscrowd", torch.zeros_like(t["labels"], dtype=torch.bool)),
                }
                for t in targets
            ],
            targets,
        )
        # COCO mAP: crowd regions are ignored as COCO does; VOC difficult objects count there
        metrics["map"].update(
            pixel_dets,
            [
                {"boxes": g["boxes"], "labels": g["labels"], "iscrowd": g["iscrowd"].long()}
                for g in pixel_gts
            ],
        )
        if "voc" in metrics:
            metrics["voc"].update(pixel_dets, pixel_gts)
        return detections

    def validation_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Loss, book metrics and mAP on one validation batch; returns the detections.

        Raises:
            DivergedError: a loss, the net's outputs (``cls_logits``, ``box_deltas``) or the
                decoded detections (``boxes``, ``scores``) are not finite, in a validation or
                the sanity check before training (before any callback draws them or a
                checkpoint is written).
        """
        return self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Tensor]]:
        """Loss, book metrics and mAP on one test batch; returns the detections."""
        return self._eval_step(batch, "test")

    def _log_epoch_end(self, stage: str) -> None:
        metrics = self.metrics_of(stage)
        values = dict(metrics["book"].compute())
        values[f"{stage}/loss"] = metrics["loss"].compute()
        maps = metrics["map"].compute()
        values[f"{stage}/mAP"] = maps["map"]
        values[f"{stage}/mAP_50"] = maps["map_50"]
        values[f"{stage}/mAP_75"] = maps["map_75"]
        if stage == "val":  # COCO mAP is -1, not nan, without ground truth
            check_finite_values(values, self.global_step, *self._validation_where("its metrics"))
        self.log_dict(values, prog_bar=False)
        if "voc" in metrics:
            voc = metrics["voc"]
            results = voc.compute()
            self.voc_results[stage] = results
            self.log(f"{stage}/voc_mAP_50", results["map_50"].float())
            per_class = (
                voc.ap_dict(results, prefix=f"{stage}/AP50/") if hasattr(voc, "ap_dict") else {}
            )
            if per_class:
                self.log_dict(per_class)
            self._log_f1_threshold(stage, voc)
        for metric in metrics.values():
            metric.reset()

    def _log_f1_threshold(self, stage: str, voc: Metric) -> None:
        """Log ``<stage>/F1`` and ``<stage>/f1_threshold``: the micro-F1-optimal score threshold.

        The detections of all classes matched at the VOC metric's IoU (0.5) under one common
        threshold (:func:`src.metrics.curves.f1_optimal_threshold`). On validation the result is
        kept in :attr:`score_threshold`, so the checkpoint written after this validation stores
        the threshold of this validation. Nothing is logged when no detection or ground truth
        gives a threshold (no NaN in the logs); the kept record then has ``value`` None.
        """
        best = f1_optimal_threshold(voc)
        found = best.threshold == best.threshold  # nan: no detection or no ground truth
        if found:
            self.log(f"{stage}/F1", float(best.f1))
            self.log(f"{stage}/f1_threshold", float(best.threshold))
        if stage != "val" or self.trainer.sanity_checking:
            return
        record: dict[str, Any] = {
            "value": float(best.threshold) if found else None,
            "f1": float(best.f1),
            "precision": float(best.precision) if found else None,
            "recall": float(best.recall),
            "iou_threshold": float(getattr(voc, "iou_threshold", 0.5)),
            "epoch": int(self.current_epoch),
            "global_step": int(self.global_step),
        }
        if not found:
            record["reason"] = "the validation had no detection or no ground truth"
        self.score_threshold = record

    def on_validation_epoch_end(self) -> None:
        """Log loss, class error, bbox MAE, COCO mAP and mAP@0.5 (and the VOC AP).

        Raises:
            DivergedError: one of these values (the VOC AP aside: nan when the data have no
                ground truth) is not finite; nothing is logged then.
        """
        self._log_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        """Log the test metrics."""
        self._log_epoch_end("test")

    # ------------------------------------------------------------- optimiser
    def setup(self, stage: str) -> None:
        """Optionally compile the net."""
        if self.hparams.compile and stage == "fit":
            self.net.compile()

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the optimiser (and scheduler) from the injected partials."""
        optimizer = self.optimizer_factory(params=self.trainer.model.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        kwargs: dict[str, Any] = {"optimizer": optimizer}
        bound = getattr(self.scheduler_factory, "keywords", {}) or {}
        takes = inspect.signature(self.scheduler_factory).parameters
        if "total_steps" in takes and "total_steps" not in bound:
            # schedules over the whole run (warmup_cosine, OneCycleLR) get its length
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(**kwargs)
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
        """Store the run's config; keep the checkpoint plain and its weights finite.

        The run config lets ``src.eval`` and ``src.predict`` rebuild the net, and
        ``score_threshold`` (:attr:`score_threshold`: the F1-optimal score threshold of the
        validation just run, so ``best.ckpt`` holds the one of its best epoch) is the default
        threshold of ``src.predict``. Every value is made a tensor or a plain Python value, so
        ``torch.load(weights_only=True)`` reads the file.

        Raises:
            DivergedError: a weight is not finite (the file is then not written).
        """
        check_finite_state(checkpoint["state_dict"], checkpoint.get("global_step"), saving=True)
        if self.run_config is not None:
            checkpoint["run_config"] = self.run_config
        if self.score_threshold is not None:  # the F1-optimal threshold of the last validation
            checkpoint["score_threshold"] = dict(self.score_threshold)
        clean = plain_checkpoint(checkpoint)
        checkpoint.clear()
        checkpoint.update(clean)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the run's config and the F1-optimal score threshold of its validation."""
        self.run_config = checkpoint.get("run_config", self.run_config)
        self.score_threshold = checkpoint.get("score_threshold", self.score_threshold)
