"""Optional loggers: MLflow read back with the real client; the W&B config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from src.train import train
from tests.conftest import compose_config, train_overrides


def test_mlflow_store_holds_params_epoch_metrics_and_best_checkpoint(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path / "run",
            banana_data_dir,
            "logger=mlflow",
            f"logger.mlflow.tracking_uri={uri}",
            f"logger.mlflow.artifact_location={tmp_path / 'mlruns' / 'artifacts'}",
            "loss=smooth_l1",
            "loss.sigma=0.5",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.anchor_panels=null",
        ),
    )
    _, objects = train(cfg)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.task_name)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["loss.name"] == "smooth_l1" and float(params["loss.sigma"]) == 0.5
    history = client.get_metric_history(run.info.run_id, "val/mAP_50")
    assert len(history) == 2  # one value per validation epoch
    assert all(0.0 <= m.value <= 1.0 for m in history)
    assert history[0].step < history[1].step

    def files(path: str | None = None) -> list[str]:
        found = []
        for info in client.list_artifacts(run.info.run_id, path):
            found += files(info.path) if info.is_dir else [info.path]
        return found

    best = objects["trainer"].checkpoint_callback.best_model_path
    assert best, "no best checkpoint was saved"
    logged = files()
    assert any(Path(p).name == Path(best).name for p in logged), logged
    local = client.download_artifacts(
        run.info.run_id, next(p for p in logged if Path(p).name == Path(best).name), str(tmp_path)
    )
    assert Path(local).read_bytes() == Path(best).read_bytes()


def test_wandb_logger_config_is_offline(tmp_path: Path) -> None:
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", "logger=wandb"])
    conf = cfg.logger.wandb
    assert conf._target_ == "lightning.pytorch.loggers.WandbLogger"
    assert conf.offline is True and conf.save_dir == str(tmp_path)
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    logger = instantiate(conf)
    logger.log_metrics({"val/mAP_50": 0.5}, step=0)
    logger.experiment.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
