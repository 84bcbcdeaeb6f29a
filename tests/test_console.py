"""The quiet console: start lines, the two-metric progress bar and the end-of-run summary."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from src.callbacks.console import MetricsProgressBar, StartSummaryCallback
from src.train import train
from src.utils.console import task_overrides
from tests.conftest import ROOT, compose_config, train_overrides

USER_OVERRIDES = ["loss=smooth_l1", "loss.sigma=0.5"]


@pytest.fixture(scope="module")
def console_run(
    tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path
) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("console_run")
    # what Hydra writes before the job starts; src.train reads the overrides from it
    (out / ".hydra").mkdir()
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(USER_OVERRIDES))
    cfg = compose_config(
        "train",
        train_overrides(
            out,
            banana_data_dir,
            *USER_OVERRIDES,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
        ),
    )
    metrics, objects = train(cfg)
    return out, metrics, objects


def test_end_summary_names_existing_files(console_run: tuple[Path, dict, dict]) -> None:
    out, metrics, objects = console_run
    lines = objects["summary"].splitlines()
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    assert Path(fields["Run folder"]) == out
    best = re.fullmatch(r"(\S+) \(epoch (\d+), val/mAP_50 ([0-9.]+)\)", fields["Best checkpoint"])
    assert best is not None, fields["Best checkpoint"]
    assert Path(best.group(1)) == out / "checkpoints" / "best.ckpt"
    assert Path(best.group(1)).is_file()
    assert int(best.group(2)) == 0
    assert float(best.group(3)) == pytest.approx(metrics["val/mAP_50"], abs=5e-5)
    assert Path(fields["Last checkpoint"]) == out / "checkpoints" / "last.ckpt"
    assert Path(fields["Last checkpoint"]).is_file()
    assert f"val/mAP_50 {metrics['val/mAP_50']:.4f}" in fields["Final metrics"]
    evaluate = fields["Evaluate"].split()
    assert evaluate[:3] == ["python", "-m", "src.eval"]
    assert Path(evaluate[3].removeprefix("ckpt_path=")).is_file()
    predict = fields["Predict"].split()
    assert predict[:3] == ["python", "-m", "src.predict"]
    assert Path(predict[3].removeprefix("ckpt_path=")).is_file()
    assert fields["Dashboard"] == f"make tensorboard LOGDIR={out}"


def test_start_lines_overrides_folder_data_and_model(console_run: tuple[Path, dict, dict]) -> None:
    out, _, objects = console_run
    start = next(c for c in objects["callbacks"] if isinstance(c, StartSummaryCallback))
    overrides, folder, data, model = start.lines
    assert overrides == "Overrides: loss=smooth_l1 loss.sigma=0.5"
    assert folder == f"Run folder: {out} (full config: {out / 'config.yaml'})"
    assert data.startswith("Data: BananaDataset, source=synthetic, 1 class (banana)")
    assert "16 train / 8 val images, batch 4" in data
    # TinySSD with one class (the book's count, README)
    assert model == "Model: SSD (TinyBackbone), 1 class, 1,010,376 parameters, 4.0 MB"


def test_full_config_is_written_resolved(console_run: tuple[Path, dict, dict]) -> None:
    out, _, objects = console_run
    text = (out / "config.yaml").read_text()
    assert "${" not in text
    saved = yaml.safe_load(text)
    assert saved["loss"]["sigma"] == 0.5
    assert saved["model"]["net"]["num_classes"] == 1
    assert saved["paths"]["output_dir"] == str(out)


def test_progress_bar_shows_loss_and_map_only(console_run: tuple[Path, dict, dict]) -> None:
    _, metrics, objects = console_run
    trainer = objects["trainer"]
    bar = next(c for c in objects["callbacks"] if isinstance(c, MetricsProgressBar))
    shown = bar.get_metrics(trainer, objects["model"])
    assert list(shown) == ["loss", "val/mAP_50"]
    assert shown["val/mAP_50"] == f"{metrics['val/mAP_50']:.4f}"
    # every metric still reached the trainer (and the loggers)
    assert {"val/loss", "val/class_err", "train/loss_epoch"} <= set(trainer.callback_metrics)


def test_task_overrides_without_hydra(tmp_path: Path) -> None:
    assert task_overrides(tmp_path) == []
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["loss=focal", "hydra.verbose=true", "+mining=hard_negative"])
    )
    assert task_overrides(tmp_path) == ["loss=focal", "+mining=hard_negative"]


def test_library_warnings_go_to_the_log_file_only(caplog: pytest.LogCaptureFixture) -> None:
    """report_errors routes warnings to ``py.warnings``, which Hydra sends to the file only."""
    import warnings

    from src.utils.errors import warnings_to_log

    with caplog.at_level(logging.WARNING, logger="py.warnings"), warnings_to_log():
        warnings.warn("a library's advice", UserWarning, stacklevel=1)
    assert [r.name for r in caplog.records] == ["py.warnings"]
    assert "a library's advice" in caplog.records[0].getMessage()
    hydra_logging = yaml.safe_load((ROOT / "conf/hydra/default.yaml").read_text())["job_logging"]
    assert hydra_logging["loggers"]["py.warnings"] == {
        "level": "WARNING",
        "handlers": ["file"],
        "propagate": False,
    }
