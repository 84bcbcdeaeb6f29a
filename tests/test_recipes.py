"""The recipes (``conf/experiment/``) and the ``optimizer`` group (issue 20).

The default recipe trains with AdamW for 8 epochs; the book's recipe stays the book's SGD exactly;
the ``optimizer`` group swaps the whole ``model.optimizer`` node (no stray SGD key reaches AdamW);
``experiment=raccoon`` runs end to end on the real raccoon photos.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.detection.losses import FocalLoss
from src.train import train
from tests.conftest import CONF_DIR, compose_config, shared_data

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _optimizer(cfg) -> torch.optim.Optimizer:  # noqa: ANN001
    """The configured optimiser, built on one parameter as SSDLitModule builds it."""
    return instantiate(cfg.model.optimizer)([torch.nn.Parameter(torch.zeros(2))])


def test_default_recipe_is_adamw_for_eight_epochs() -> None:
    cfg = compose_config("train", [])
    optimizer = _optimizer(cfg)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(3e-3) and group["weight_decay"] == pytest.approx(0.05)
    assert group["betas"] == (0.9, 0.999)
    assert cfg.trainer.max_epochs == 8 and cfg.data.batch_size == 32
    assert cfg.model.scheduler.warmup_steps == 50 and cfg.model.scheduler_interval == "step"
    assert cfg.backbone.name == "tiny" and cfg.backbone.anchor_set == "tiny_small_anchors"


def test_the_books_recipe_is_still_the_books_sgd() -> None:
    """experiment=d2l_banana: SGD lr 0.2 without momentum, wd 5e-4, no schedule, 20 epochs."""
    cfg = compose_config("train", ["experiment=d2l_banana"])
    assert OmegaConf.to_container(cfg.model.optimizer) == {
        "_target_": "torch.optim.SGD",
        "_partial_": True,
        "lr": 0.2,
        "momentum": 0.0,
        "weight_decay": 5.0e-4,
    }
    assert cfg.model.scheduler is None and cfg.trainer.max_epochs == 20
    assert cfg.data.augment == "none" and cfg.backbone.anchor_set == "tiny"


@pytest.mark.parametrize(
    ("choice", "cls", "absent"),
    [("sgd", torch.optim.SGD, "betas"), ("adamw", torch.optim.AdamW, "momentum")],
)
def test_optimizer_group_replaces_the_whole_node(choice: str, cls: type, absent: str) -> None:
    cfg = compose_config("train", [f"optimizer={choice}"])
    assert absent not in cfg.model.optimizer
    assert type(_optimizer(cfg)) is cls
    # the command line still wins over the option's values
    cfg = compose_config("train", [f"optimizer={choice}", "model.optimizer.lr=0.0123"])
    assert _optimizer(cfg).param_groups[0]["lr"] == pytest.approx(0.0123)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_recipe_builds_its_optimizer(name: str) -> None:
    cfg = compose_config("train", [f"experiment={name}"])
    optimizer = _optimizer(cfg)
    assert optimizer.param_groups[0]["lr"] > 0


def test_raccoon_recipe_config() -> None:
    cfg = compose_config("train", ["experiment=raccoon"])
    assert cfg.data._target_ == "src.data.base.DetectionDataModule"
    assert list(cfg.data.train_sets) == ["train_labels.csv"]
    assert list(cfg.data.val_sets) == ["test_labels.csv"]
    assert (cfg.data.batch_size, cfg.data.augment, cfg.data.cache) == (16, "photometric", True)
    assert cfg.trainer.max_epochs == 60 and cfg.backbone.anchor_set == "tiny"
    encoder = instantiate(cfg.model.target_encoder)
    assert encoder.iou_threshold == pytest.approx(0.3) and encoder.rule == "book"
    loss = instantiate(cfg.loss.module)
    assert type(loss.cls_loss) is FocalLoss and loss.mining is None
    assert loss.normalize == "positives" and loss.background_bias(1) == pytest.approx(math.log(99))
    optimizer = _optimizer(cfg)
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == pytest.approx(0.2) and group["lr"] == pytest.approx(3e-3)
    assert cfg.callbacks.detection_grid.every_n_epochs == 10
    assert cfg.callbacks.anchor_panels.every_n_epochs == 10


def test_raccoon_recipe_trains_on_the_real_photos(tmp_path: Path) -> None:
    """Two epochs of three steps of experiment=raccoon on the real raccoon photos."""
    root = shared_data("raccoon")
    cfg = compose_config(
        "train",
        [
            "experiment=raccoon",
            f"data.root={root}",
            f"paths.output_dir={tmp_path}",
            "data.num_workers=0",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "logger=csv",
        ],
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 6
    assert math.isfinite(metrics["train/loss_epoch"]) and 0 <= metrics["val/mAP_50"] <= 1
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()
