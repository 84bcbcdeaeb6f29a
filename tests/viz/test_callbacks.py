from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from src.callbacks.pictures import AnchorPanelsCallback
from src.detection.losses import MultiBoxLoss
from tests.viz.conftest import GT_BOXES, GT_LABELS, FakeModule, make_net


class _Dataset:
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int):
        image = torch.full((3, 64, 64), 0.1 * (i + 1))
        return image, {"boxes": GT_BOXES.clone(), "labels": GT_LABELS.clone(), "image_id": str(i)}


def _trainer(loggers, **kw):
    defaults = dict(
        sanity_checking=False,
        is_global_zero=True,
        current_epoch=0,
        global_step=7,
        loggers=loggers,
        val_dataloaders=torch.utils.data.DataLoader(_Dataset()),
        datamodule=None,
    )
    defaults.update(kw)
    return SimpleNamespace(**defaults)


def _image_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for ev in log_dir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    return tags


def test_logs_fixed_images_to_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    callback = AnchorPanelsCallback(num_images=2, max_panels=4)
    module = FakeModule(make_net(), MultiBoxLoss())
    callback.on_validation_epoch_end(_trainer([logger, CSVLogger(tmp_path)]), module)
    logger.experiment.flush()
    tags = _image_tags(tmp_path)
    assert {f"val_images/{k}/{i}" for k in ("anchors", "negatives") for i in (0, 1)} <= tags
    assert "val_images/anchors/2" not in tags
    first = callback._examples
    callback.on_validation_epoch_end(_trainer([logger], current_epoch=1), module)
    assert callback._examples is first  # the same images every epoch


def test_does_nothing_without_tensorboard_or_when_sanity_checking(tmp_path: Path) -> None:
    callback = AnchorPanelsCallback(num_images=2)
    module = FakeModule(make_net(), MultiBoxLoss())
    callback.on_validation_epoch_end(_trainer([CSVLogger(tmp_path)]), module)
    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    callback.on_validation_epoch_end(_trainer([logger], sanity_checking=True), module)
    assert callback._examples is None


def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_images"):
        AnchorPanelsCallback(num_images=-1)
    with pytest.raises(ValueError, match="max_panels"):
        AnchorPanelsCallback(max_panels=0)
