"""Every backbone trains under the default recipe (issue 20, item 4).

A backbone's yaml may carry ``optim_defaults`` (``lr``, ``warmup_steps``,
``gradient_clip_val``) that the default recipe (``conf/experiment/banana.yaml``, AdamW from
``conf/optimizer/adamw.yaml``) takes instead of its own 3e-3, 50 and no clipping; the command
line wins over both. Then a few real training
steps of every ``conf/backbone/*.yaml`` on VOC-mini, under that recipe at its default precision,
must leave the loss and the weights finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from src.train import train
from tests.conftest import CONF_DIR, compose_config, shared_data

BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))
#: the default recipe's own values (conf/experiment/banana.yaml), for backbones without
#: optim_defaults
RECIPE = {"lr": 0.003, "warmup_steps": 50, "gradient_clip_val": None}
#: the plain VGG16s, whose gradient norm spikes from scratch: they clip it (docs/backbones.md)
NEEDS_CLIPPING = ("vgg16", "vgg16_512")


def _applied(cfg) -> dict[str, object]:  # noqa: ANN001
    """The three settings as the run will use them (resolved)."""
    return {
        "lr": cfg.model.optimizer.lr,
        "warmup_steps": cfg.model.scheduler.warmup_steps,
        "gradient_clip_val": cfg.trainer.gradient_clip_val,
    }


@pytest.mark.parametrize("name", BACKBONES)
def test_recipe_takes_the_backbones_optim_defaults(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", f"backbone={name}"])
    own = OmegaConf.to_container(cfg.backbone.get("optim_defaults") or OmegaConf.create({}))
    assert set(own) <= set(RECIPE), f"backbone={name}: unknown optim_defaults keys {set(own)}"
    assert _applied(cfg) == {**RECIPE, **own}
    if name in NEEDS_CLIPPING:  # the plain VGG16 from scratch (no BatchNorm, L2Norm on conv4_3)
        assert own["gradient_clip_val"] > 0


def test_command_line_wins_over_the_backbones_defaults(tmp_path: Path) -> None:
    base = [f"paths.output_dir={tmp_path}", "backbone=vgg16"]
    cfg = compose_config(
        "train",
        [
            *base,
            "model.optimizer.lr=0.01",
            "model.scheduler.warmup_steps=7",
            "trainer.gradient_clip_val=null",
        ],
    )
    assert _applied(cfg) == {"lr": 0.01, "warmup_steps": 7, "gradient_clip_val": None}
    # the backbone's values can be changed or added on the command line too
    cfg = compose_config(
        "train",
        [*base, "backbone.optim_defaults.gradient_clip_val=2", "+backbone.optim_defaults.lr=0.003"],
    )
    assert _applied(cfg) == {**RECIPE, "lr": 0.003, "gradient_clip_val": 2}
    # a recipe that sets its own values keeps them (the SSD paper's lr 1e-3 for ImageNet VGG16)
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", "experiment=voc_ssd300"])
    assert cfg.model.optimizer.lr == pytest.approx(1e-3)
    assert cfg.trainer.gradient_clip_val is None


@pytest.mark.parametrize("name", BACKBONES)
def test_default_recipe_steps_stay_finite_on_voc_mini(name: str, tmp_path: Path) -> None:
    """Five steps of the default recipe; the warm-up of so short a run ends at its last step.

    ``warmup_cosine`` warms up over all but the last step of a short run, so the five steps run
    at 1%, 26%, 50%, 75% and 100% of the backbone's peak learning rate.
    """
    root = shared_data("VOCdevkit-mini")
    steps = 5
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "data=voc_mini",
            f"data.root={root}",
            # SSD512 at 512 px: one image a step keeps it to a few seconds
            f"data.batch_size={1 if name == 'vgg16_512' else 2}",
            "data.num_workers=0",
            f"backbone={name}",
            "trainer.accelerator=cpu",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=1",
            f"trainer.limit_train_batches={steps}",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            "trainer.log_every_n_steps=1",
            "callbacks=none",
            "logger=csv",
        ],
    )
    expected = _applied(cfg)
    torch.manual_seed(0)
    metrics, objects = train(cfg)  # raises DivergedError on a non-finite loss or gradient
    model, trainer = objects["model"], objects["trainer"]
    assert trainer.global_step == steps
    assert trainer.gradient_clip_val == expected["gradient_clip_val"]
    # the schedule's peak is the backbone's rate (or the recipe's), reached at the last step
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs[0] == pytest.approx(expected["lr"])
    assert scheduler.lr_lambdas[0](steps - 1) == pytest.approx(1.0)
    assert math.isfinite(metrics["train/loss_epoch"]) and metrics["train/loss_epoch"] > 0
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"backbone={name}: non-finite weights after {steps} steps: {bad[:3]}"
