"""Shared fixtures: configs composed with ``hydra.compose`` and a small synthetic banana set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
SHARED = ROOT.parent / "shared"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))

# registers the project's resolvers (${run_name:}, ${cpu_workers:}, ...) for configs composed and
# resolved here without importing src.train or src.eval
from src.utils.config import register_resolvers  # noqa: E402

register_resolvers()


def shared_data(*parts: str) -> Path:
    """Path under ``../shared/data`` (the real VOC-mini test data beside the repository).

    A fresh clone has no ``../shared``: the test is then skipped with a reason saying where to
    put the data. Under ``CI=true`` (CI always has the data) it fails instead.
    """
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        message = (
            f"real test data missing: {path.resolve()}. Put the VOC-mini test data in "
            f"{(SHARED / 'data').resolve()} (VOCdevkit-mini/VOC2012 and voc-mini-detections) "
            "to run this test"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: CI must have them)")
        pytest.skip(message)
    return path


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with overrides, as the Hydra CLI would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture(scope="session")
def banana_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding a small synthetic banana set (16 train / 8 val), generated once."""
    from src.data.synthetic import generate_banana_dataset

    data_dir = tmp_path_factory.mktemp("data")
    generate_banana_dataset(data_dir / "banana-synthetic", num_train=16, num_val=8, seed=0)
    return data_dir


def train_overrides(output_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a fast CPU run on the small synthetic set."""
    return [
        f"paths.output_dir={output_dir}",
        f"paths.data_dir={data_dir}",
        "data.source=synthetic",
        "data.download=false",
        "data.num_synthetic_train=16",
        "data.num_synthetic_val=8",
        "data.batch_size=4",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        # 4 batches an epoch: log every step (the default 10 makes Lightning warn)
        "trainer.log_every_n_steps=1",
        "callbacks.detection_grid.num_images=2",
        *extra,
    ]
