"""A WARNING at the start of training when the anchors cover too few training boxes.

:class:`AnchorCoverageCheck` computes, once at fit start (after the data are set up), the share
of training boxes whose best anchor reaches the target encoder's IoU threshold
(:func:`src.detection.coverage.anchor_coverage`) and logs a WARNING below ``minimum`` (90%)
naming the share and the ``python -m src.inspect`` command that shows the box sizes against the
anchors and suggests better anchor sizes. It reads annotations only (no image is decoded) and
runs the backbone once on a zero image: milliseconds for TinySSD on bananas.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from src.detection.coverage import Coverage, anchor_coverage, dataset_boxes, low_coverage_message
from src.detection.coverage import feature_sizes as backbone_feature_sizes

log = logging.getLogger(__name__)

__all__ = ["AnchorCoverageCheck", "inspect_command"]

# the training overrides that change what src.inspect measures (it accepts every one of them)
_GROUPS = ("data", "backbone", "experiment")
_KEYS = ("paths.data_dir", "model.target_encoder")


def inspect_command(overrides: Sequence[str]) -> str:
    """``python -m src.inspect`` with the run's data, backbone and experiment overrides."""

    def key(override: str) -> str:
        return override.lstrip("+~").split("=", 1)[0]

    kept = [o for o in overrides if key(o).split(".")[0] in _GROUPS or key(o).startswith(_KEYS)]
    return " ".join(["python -m src.inspect", *(shlex.quote(o) for o in kept)])


class AnchorCoverageCheck(Callback):
    """Warn once at fit start when the anchors cover less than ``minimum`` of the training boxes.

    Args:
        overrides: the run's command-line overrides (repeated in the suggested command).
        minimum: the share of boxes in ``[0, 1]`` below which to warn.
        max_boxes: measure on at most this many boxes, drawn at random (seed 0) from larger
            training sets (COCO's 860k boxes against 8732 anchors would take minutes).

    Attributes:
        coverage: the :class:`~src.detection.coverage.Coverage` measured (``None`` before fit
            start, or when the data cannot be read without decoding images).
        message: the WARNING logged, or ``None``.
        seconds: how long the check took.
    """

    def __init__(
        self, overrides: Sequence[str] = (), minimum: float = 0.9, max_boxes: int = 20000
    ) -> None:
        if not 0.0 <= float(minimum) <= 1.0:
            raise ValueError(f"anchor coverage minimum must be in [0, 1], got {minimum}")
        if int(max_boxes) < 1:
            raise ValueError(f"anchor coverage max_boxes must be >= 1, got {max_boxes}")
        self.overrides = list(overrides)
        self.minimum = float(minimum)
        self.max_boxes = int(max_boxes)
        self.coverage: Coverage | None = None
        self.message: str | None = None
        self.seconds = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Measure the coverage of the training set (rank 0) and warn below ``minimum``."""
        if not trainer.is_global_zero:
            return
        start = time.perf_counter()
        dataset = getattr(trainer.datamodule, "train_dataset", None)
        net = getattr(pl_module, "net", None)
        encoder = getattr(pl_module, "target_encoder", None)
        needed = (
            hasattr(dataset, "pixel_annotations"),
            hasattr(net, "backbone") and hasattr(net, "anchor_generator"),
            hasattr(encoder, "iou_threshold"),
        )
        if not all(needed):
            log.debug("anchor coverage not checked: no annotated train dataset or SSD net")
            return
        boxes, labels, _ = dataset_boxes(dataset)
        total = int(boxes.shape[0])
        if total == 0:  # data.allow_empty=true: no box to cover
            log.debug("anchor coverage not checked: the training set holds no box")
            return
        if total > self.max_boxes:
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(total, generator=generator)[: self.max_boxes]
            boxes, labels = boxes[keep], labels[keep]
        size = tuple(int(s) for s in net.image_size)
        anchors = net.anchor_generator(backbone_feature_sizes(net.backbone, size), size)
        classes = int(getattr(net, "num_classes", 0))
        if labels.numel():
            classes = max(classes, int(labels.max()) + 1)
        self.coverage = anchor_coverage(
            boxes, labels, anchors, float(encoder.iou_threshold), size, classes
        )
        self.message = low_coverage_message(
            self.coverage, self.minimum, inspect_command(self.overrides)
        )
        if self.message is not None and total > self.max_boxes:
            self.message += f" (measured on {self.max_boxes} boxes drawn at random of {total})"
        self.seconds = time.perf_counter() - start
        if self.message is not None:
            log.warning("%s", self.message)
        else:
            log.debug(
                "anchor coverage %.1f%% of %d training boxes (%.2f s)",
                100 * self.coverage.overall,
                self.coverage.total,
                self.seconds,
            )
