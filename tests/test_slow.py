"""Long checks, deselected by default: run with `make test-full` or `pytest -m slow`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from src.train import train
from tests.conftest import compose_config, shared_data

log = logging.getLogger(__name__)


@pytest.mark.slow
def test_tiny_overfits_voc_mini_at_300(tmp_path: Path) -> None:
    """TinySSD at 300 px memorises the 100 real VOC-mini images (train = val = trainval).

    Prints the train mAP@0.5 reached (VOC area AP and COCO-style map_50); set
    ``VOC_OVERFIT_EPOCHS`` to change the length (default 60).
    """
    root = shared_data("VOCdevkit-mini")
    epochs = int(os.environ.get("VOC_OVERFIT_EPOCHS", "60"))
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "data=voc_mini",
            f"data.root={root}",
            "data.train_sets=[[2012,trainval]]",
            "data.val_sets=[[2012,trainval]]",
            "data.augment=none",
            "data.keep_difficult=true",
            "data.batch_size=16",
            "data.num_workers=0",
            "data.pin_memory=false",
            "backbone=tiny",
            "backbone.image_size=300",
            "loss=smooth_l1",
            "mining=hard_negative",
            "loss.normalize=positives",
            "model.optimizer._target_=torch.optim.AdamW",
            "~model.optimizer.momentum",
            "model.optimizer.lr=3e-3",
            "model.optimizer.weight_decay=1e-4",
            f"trainer.max_epochs={epochs}",
            f"trainer.check_val_every_n_epoch={epochs}",
            "trainer.accelerator=cpu",
            "callbacks.rich_progress_bar=null",
            "callbacks.detection_grid.num_images=0",
            "logger=csv",
        ],
    )
    metrics, _ = train(cfg)
    voc, coco = metrics["val/voc_mAP_50"], metrics["val/mAP_50"]
    message = (
        f"VOC-mini overfit, TinySSD 300 px, {epochs} epochs: train VOC AP@0.5 {voc:.4f}, "
        f"COCO map_50 {coco:.4f}, train class_err {metrics['train/class_err']:.5f}"
    )
    log.warning(message)
    print(message)  # noqa: T201 - the figure this test exists to report
    assert voc > 0.5, message
