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

from lightning.pytorch import Callback, LightningModule, Trainer

from src.detection.coverage import Coverage, anchor_coverage, dataset_boxes, low_coverage_message
from src.detection.coverage import feature_sizes as backbone_feature_sizes

log = logging.getLogger(__name__)

__all__ = ["AnchorCoverageCheck", "inspect_command"]

# the training overrides that change what src.inspect measures
_INSPECT_KEYS = ("data", "backbone", "experiment", "paths.data_dir", "model.target_encoder")


def inspect_command(overrides: Sequence[str]) -> str:
    """``python -m src.inspect`` with the run's data, backbone and experiment overrides."""
    kept = [
        o
        for o in overrides
        if o.lstrip("+~").split("=", 1)[0].split(".")[0] in ("data", "backbone", "experiment")
        or o.lstrip("+~").startswith(_INSPECT_KEYS[3:])
    ]
    return " ".join(["python -m src.inspect", *(shlex.quote(o) for o in kept)])


class AnchorCoverageCheck(Callback):
    """Warn once at fit start when the anchors cover less than ``minimum`` of the training boxes.

    Args:
        overrides: the run's command-line overrides (repeated in the suggested command).
        minimum: the share of boxes in ``[0, 1]`` below which to warn.

    Attributes:
        coverage: the :class:`~src.detection.coverage.Coverage` measured (``None`` before fit
            start, or when the data cannot be read without decoding images).
        message: the WARNING logged, or ``None``.
        seconds: how long the check took.
    """

    def __init__(self, overrides: Sequence[str] = (), minimum: float = 0.9) -> None:
        if not 0.0 <= float(minimum) <= 1.0:
            raise ValueError(f"anchor coverage minimum must be in [0, 1], got {minimum}")
        self.overrides = list(overrides)
        self.minimum = float(minimum)
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
        size = tuple(int(s) for s in net.image_size)
        anchors = net.anchor_generator(backbone_feature_sizes(net.backbone, size), size)
        classes = max(int(getattr(net, "num_classes", 1)), int(labels.max()) + 1 if len(labels) else 1)
        self.coverage = anchor_coverage(
            boxes, labels, anchors, float(encoder.iou_threshold), size, classes
        )
        self.message = low_coverage_message(
            self.coverage, self.minimum, inspect_command(self.overrides)
        )
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
