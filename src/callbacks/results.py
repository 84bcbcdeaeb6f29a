"""Lightning callback that writes the detections of an evaluation as a COCO results file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from src.data.coco_results import coco_results, write_coco_results
from src.detection.box_ops import to_pixels

log = logging.getLogger(__name__)

__all__ = ["CocoResultsCallback"]


def _finite_detections(pred: dict[str, Any]) -> dict[str, Any]:
    """``pred`` without the detections whose box or score is NaN or infinite (logged).

    JSON has no NaN: such a detection (a diverged net's) would make ``detections.json``
    unreadable by ``json`` and ``pycocotools``.

    Args:
        pred: ``boxes: Tensor[N, 4]`` pixel xyxy, ``scores: Tensor[N]``, ``labels: Tensor[N]``
            (other per-detection tensors of length ``N`` are filtered alike).

    Returns:
        ``pred`` itself when every detection is finite, else a new dict of the finite ones.
    """
    keep = torch.isfinite(pred["boxes"].reshape(-1, 4)).all(dim=1) & torch.isfinite(pred["scores"])
    if bool(keep.all()):
        return pred
    log.warning(
        "Left %d detections with a non-finite box or score out of the results file",
        int((~keep).sum()),
    )
    n = keep.numel()
    return {
        k: v[keep] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
        for k, v in pred.items()
    }


class CocoResultsCallback(Callback):
    """Collect every validation / test detection and write ``detections.json`` (COCO results).

    Each entry is ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` in pixels of
    the original image, with the dataset's own image ids (``target["coco_image_id"]``) and
    category ids (``datamodule.category_ids``: a COCO JSON's original ids, ``1..C`` for other
    formats), ready for ``pycocotools`` ``COCO.loadRes`` or an evaluation server. Under DDP the
    ranks' entries are gathered and rank 0 writes the file.

    Args:
        path: the JSON file to write at the end of the evaluation epoch.
        category_ids: label -> category id; default ``datamodule.category_ids`` (else ``1..C``).
    """

    def __init__(self, path: str | Path, category_ids: list[int] | None = None) -> None:
        self.path = Path(path)
        self.category_ids = category_ids
        self.results: list[dict[str, Any]] = []
        #: per image, in pixels of the original image: the detections (``boxes`` xyxy,
        #: ``scores``, ``labels``) and targets (``boxes``, ``labels``, ``difficult``,
        #: ``iscrowd``, ``coco_image_id``), on the CPU, for ``src.eval``'s error analysis.
        self.preds: list[dict[str, Any]] = []
        self.targets: list[dict[str, Any]] = []
        #: the file written by the last evaluation (``None`` before).
        self.written: Path | None = None

    def _lookup(self, trainer: Trainer, pl_module: LightningModule) -> list[int]:
        if self.category_ids is not None:
            return list(self.category_ids)
        ids = getattr(trainer.datamodule, "category_ids", None) if trainer.datamodule else None
        return list(ids) if ids else list(range(1, pl_module.net.num_classes + 1))

    def _collect(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any
    ) -> None:
        _, targets = batch
        if not isinstance(outputs, list):
            return
        ids = [int(t.get("coco_image_id", t.get("image_id", 0))) for t in targets]
        preds = [{k: v.detach().cpu() for k, v in p.items()} for p in to_pixels(outputs, targets)]
        preds = [_finite_detections(p) for p in preds]
        self.results += coco_results(preds, ids, self._lookup(trainer, pl_module))
        self.preds += preds
        keys = ("boxes", "labels", "difficult", "iscrowd")
        self.targets += [
            {**{k: t[k].detach().cpu() for k in keys if k in t}, "coco_image_id": i}
            for t, i in zip(to_pixels(targets, targets), ids, strict=True)
        ]

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start new lists."""
        self.results, self.preds, self.targets = [], [], []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_batch_end(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if not trainer.sanity_checking:
            self._collect(trainer, pl_module, outputs, batch)

    def on_test_batch_end(  # noqa: D102
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        self._collect(trainer, pl_module, outputs, batch)

    def _write(self, trainer: Trainer) -> None:
        results = self.results
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, results)
            results = [r for part in gathered for r in part]
            for name in ("preds", "targets"):
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, getattr(self, name))
                setattr(self, name, [r for part in gathered for r in part])
        if trainer.is_global_zero:
            # write_coco_results logs the count and the path
            self.written = write_coco_results(self.path, results)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the file (not during the sanity check)."""
        if not trainer.sanity_checking:
            self._write(trainer)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the file."""
        self._write(trainer)
