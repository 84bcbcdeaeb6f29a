"""EMA of the weights (src/callbacks/ema.py): the update by hand, validation and checkpoints use
the average, test and the entry points read it, and a resumed run ends with the same EMA."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.optim.swa_utils import AveragedModel

from src.callbacks.ema import EMACallback, ema_decay
from src.train import train
from src.utils.checkpoint import load_module
from tests.conftest import compose_config, train_overrides

# decay 0.5 without a ramp: over a dozen steps the EMA is far from the trained weights
EMA = ["callbacks=ema", "callbacks.ema.decay=0.5", "callbacks.ema.warmup_steps=0"]
QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.anchor_panels=null",
    "callbacks.detection_grid=null",
    "callbacks.pr_curves=null",
    "callbacks.model_summary=null",
    "logger=csv",
    "trainer.deterministic=true",
    "trainer.limit_val_batches=1",
]


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class WeightsProbe(Callback):
    """Record the module's weights where they matter (added with ``+callbacks.probe``)."""

    def __init__(self, save_during_validation: str | None = None, stop_after_epoch: int = -1):
        self.save_during_validation = save_during_validation
        self.stop_after_epoch = stop_after_epoch
        self.validated: dict[int, dict[str, torch.Tensor]] = {}
        self.trained: dict[int, dict[str, torch.Tensor]] = {}
        self.tested: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validated[trainer.current_epoch] = _clone(pl_module)
        if self.save_during_validation and trainer.current_epoch == 0:
            trainer.save_checkpoint(self.save_during_validation)  # e.g. a signal mid-validation

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.trained[trainer.current_epoch] = _clone(pl_module)
        if trainer.current_epoch == self.stop_after_epoch:
            trainer.should_stop = True

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.tested = _clone(pl_module)


def test_decay_ramp_by_hand() -> None:
    assert ema_decay(50, 0.99, 50) == pytest.approx(0.99 * (1 - math.exp(-1)))  # 0.6258
    assert ema_decay(200, 0.99, 50) == pytest.approx(0.99 * (1 - math.exp(-4)))  # 0.9719
    assert ema_decay(7, 0.9, 0) == 0.9  # no ramp
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        EMACallback(decay=1.0)


def test_update_by_hand_weights_and_batchnorm_buffers() -> None:
    # decay 0.5 without a ramp: ema <- (ema + weights) / 2; BN statistics alike; counts copied
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    callback = EMACallback(decay=0.5, warmup_steps=0)
    ema = AveragedModel(model, multi_avg_fn=callback._update, use_buffers=True)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].running_mean.fill_(4.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model[0].weight.fill_(6.0)
        model[1].running_mean.fill_(0.0)
        model[1].running_var.fill_(3.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update_parameters(model)
    averaged = ema.module
    assert averaged[0].weight.item() == 4.0  # (2 + 6) / 2
    assert averaged[1].running_mean.item() == 2.0  # (4 + 0) / 2
    assert averaged[1].running_var.item() == 2.0  # (1 + 3) / 2
    assert averaged[1].num_batches_tracked.item() == 7  # copied, not averaged
    assert int(ema.n_averaged) == 2


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path):  # noqa: ANN201
    """3 epochs of 4 steps with the EMA, then test=true on best.ckpt."""
    out = tmp_path_factory.mktemp("ema")
    cfg = compose_config(
        "train",
        train_overrides(
            out,
            banana_data_dir,
            *QUIET,
            *EMA,
            "trainer.max_epochs=3",
            "test=true",
            "+callbacks.probe._target_=tests.test_ema.WeightsProbe",
            f"+callbacks.probe.save_during_validation={out / 'mid_validation.ckpt'}",
        ),
    )
    _, objects = train(cfg)
    (probe,) = (c for c in objects["callbacks"] if isinstance(c, WeightsProbe))
    return out, probe


def test_validation_and_checkpoints_hold_the_ema(ema_run) -> None:
    out, probe = ema_run
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # still plain
    assert last["epoch"] == 2 and int(last["averaging_state"]["n_averaged"]) == 12
    # the validated weights are the EMA, stored as state_dict; the trained ones differ
    assert _equal(probe.validated[2], last["state_dict"])
    assert _equal(probe.trained[2], last["current_model_state"])
    assert not _equal(last["state_dict"], last["current_model_state"])
    # BatchNorm running statistics are averaged too (they differ from the trained model's)
    key = next(k for k in last["state_dict"] if k.endswith("running_mean"))
    assert not torch.equal(last["state_dict"][key], last["current_model_state"][key])
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert _equal(probe.validated[best["epoch"]], best["state_dict"])
    # a checkpoint written during validation (weights swapped) is stored the right way round
    mid = torch.load(out / "mid_validation.ckpt", weights_only=True)
    assert _equal(mid["state_dict"], probe.validated[0])
    assert _equal(mid["current_model_state"], probe.trained[0])


def test_test_stage_and_entry_points_use_the_ema(ema_run) -> None:
    out, probe = ema_run
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True)
    assert probe.tested is not None and _equal(probe.tested, best["state_dict"])
    # src.eval, src.predict and src.export rebuild the module with load_module
    module, _ = load_module(out / "checkpoints" / "best.ckpt")
    assert _equal(_clone(module), best["state_dict"])
    assert not _equal(_clone(module), best["current_model_state"])


def test_resume_restores_the_ema_exactly(ema_run, tmp_path: Path, banana_data_dir: Path) -> None:
    full, _ = ema_run  # 3 epochs without a stop

    def run(out: Path, *extra: str) -> None:
        cfg = compose_config(
            "train",
            train_overrides(out, banana_data_dir, *QUIET, *EMA, "trainer.max_epochs=3", *extra),
        )
        train(cfg)

    stopped = tmp_path / "stopped"
    run(
        stopped,
        "+callbacks.probe._target_=tests.test_ema.WeightsProbe",
        "+callbacks.probe.stop_after_epoch=1",
    )
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    run(tmp_path / "resumed", f"ckpt_path={stopped / 'checkpoints' / 'last.ckpt'}")
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert _equal(a["state_dict"], b["state_dict"])  # the EMA, bit for bit
    assert _equal(a["current_model_state"], b["current_model_state"])
    assert _equal(a["averaging_state"], b["averaging_state"])
