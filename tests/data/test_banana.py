"""Tests for BananaDataset / BananaDataModule (src.data.banana), offline and fast."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import Logger
from PIL import Image
from torchvision import tv_tensors

import src.data.banana as banana
import src.data.base as data_base
from src.data.banana import BananaDataModule, BananaDataset
from src.data.download import DownloadError

IMG_H, IMG_W = 48, 64
HEADER = "img_name,label,xmin,ymin,xmax,ymax"


def write_split(
    split_dir: Path, rows: list[str], n_images: int = 3, size: tuple[int, int] = (IMG_H, IMG_W)
) -> None:
    """Write ``label.csv`` (header + ``rows``) and ``n_images`` PNGs ``0.png`` ... of ``size``."""
    (split_dir / "images").mkdir(parents=True)
    for i in range(n_images):
        arr = np.full((*size, 3), 10 * i, dtype=np.uint8)
        arr[..., 1] = 255 - i
        Image.fromarray(arr).save(split_dir / "images" / f"{i}.png")
    (split_dir / "label.csv").write_text("\n".join([HEADER, *rows]) + "\n")


def write_real(data_dir: Path) -> Path:
    """A tiny 'real' copy in the book's layout under ``data_dir/banana-detection``."""
    root = data_dir / "banana-detection"
    write_split(root / "bananas_train", [f"{i}.png,0,{4 + i},6,40,30" for i in range(3)], 3)
    write_split(root / "bananas_val", ["0.png,0,1,2,63,47", "1.png,0,0,0,64,48"], 2)
    return root


MISSING_URL = "file:///nonexistent/banana-detection.zip"


def make_dm(data_dir: Path, **kwargs: Any) -> BananaDataModule:
    args = {
        "data_dir": data_dir,
        "url": MISSING_URL,
        "image_size": 32,
        "batch_size": 2,
        "num_synthetic_train": 4,
        "num_synthetic_val": 2,
        **kwargs,
    }
    return BananaDataModule(**args)


# --------------------------------------------------------------------------- dataset
def test_item_shapes_dtypes_and_normalisation(tmp_path: Path) -> None:
    root = write_real(tmp_path)
    ds = BananaDataset(root, "train")
    assert len(ds) == 3 and ds.classes == ("banana",)
    image, target = ds[1]
    assert image.shape == (3, IMG_H, IMG_W) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    # pixel (R, G, B) = (10, 254, 10) of 1.png
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([10, 254, 10]) / 255.0)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (1, 4)
    torch.testing.assert_close(
        target["boxes"], torch.tensor([[5 / IMG_W, 6 / IMG_H, 40 / IMG_W, 30 / IMG_H]])
    )
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [0]
    assert target["orig_size"].dtype == torch.int64
    assert target["orig_size"].tolist() == [IMG_H, IMG_W]
    assert target["image_id"] == "1"


def test_split_forms_and_positional_transform(tmp_path: Path) -> None:
    root = write_real(tmp_path)
    seen: list[tuple] = []

    def transform(image, target):
        seen.append((type(image), image.dtype, type(target["boxes"]), target["boxes"].canvas_size))
        return image, target

    a = BananaDataset(root / "bananas_val", transform)  # BananaDataset(split_dir, transform)
    b = BananaDataset(root, "bananas_val", transform=transform, cache=False)
    image, target = a[0]
    b[0]
    assert seen[0] == (tv_tensors.Image, torch.uint8, tv_tensors.BoundingBoxes, (IMG_H, IMG_W))
    assert seen[1] == seen[0]
    assert target["boxes"].tolist() == [[1.0, 2.0, 63.0, 47.0]]  # pixels before the transform
    with pytest.raises(ValueError, match="split must be one of train, val; got 'test'"):
        BananaDataset(root, "test")


def test_cache_decodes_once_and_is_not_aliased(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_real(tmp_path)
    calls: list[Path] = []
    real_read = data_base.read_image  # the one image reader of every dataset

    def counting(path: Path):
        calls.append(path)
        return real_read(path)

    monkeypatch.setattr(data_base, "read_image", counting)
    ds = BananaDataset(root, "train")
    assert len(calls) == 3
    cached = ds._cache.images
    assert cached.shape == (3, 3, IMG_H, IMG_W) and cached.dtype == torch.uint8
    for _ in range(2):
        for i in range(len(ds)):
            image, target = ds[i]
            image.zero_()  # callers may write into what they get ...
            target["labels"].add_(5)
            target["boxes"].zero_()
    assert len(calls) == 3  # ... decoded once
    image, target = ds[1]
    assert float(image.max()) > 0 and target["labels"].tolist() == [0]  # ... cache intact
    assert float(target["boxes"].sum()) > 0

    uncached = BananaDataset(root, "train", cache=False)
    assert uncached._cache is None and len(calls) == 3
    uncached[0]
    uncached[0]
    assert len(calls) == 5
    torch.testing.assert_close(uncached[2][0], ds[2][0])


def test_mixed_sizes_and_multiple_boxes(tmp_path: Path) -> None:
    split = tmp_path / "s"
    write_split(split, ["0.png,0,1,1,10,10", "1.png,0,2,2,20,20", "0.png,0,30,5,60,40"], 2)
    Image.new("RGB", (30, 20), (1, 2, 3)).save(split / "images" / "1.png")  # W=30, H=20
    ds = BananaDataset(split)
    assert isinstance(ds._cache.images, list)
    assert ds._cache.sizes.tolist() == [[IMG_H, IMG_W], [20, 30]]
    image0, t0 = ds[0]
    image1, t1 = ds[1]
    assert image0.shape == (3, IMG_H, IMG_W) and image1.shape == (3, 20, 30)
    assert t0["boxes"].shape == (2, 4) and t0["labels"].tolist() == [0, 0]
    torch.testing.assert_close(t1["boxes"], torch.tensor([[2 / 30, 2 / 20, 20 / 30, 1.0]]))
    assert ds.image_ids == ["0", "1"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["0.png,0,1,2,abc,30"], r"line 2: column 'xmax' has non-numeric value 'abc'"),
        (["0.png,0,1,2,30,30", "1.png,0,1,2,,30"], r"line 3: column 'xmax'.* ''"),
        (["0.png,0,1,2,3,nan"], r"line 2: column 'ymax' has non-numeric value 'nan'"),
        (["0.png,0,1,2,30,30", "1.png,0,40,2,30,30"], r"line 3: degenerate box .*40\.0, 2\.0"),
        (["0.png,0,1,30,30,30"], r"line 2: degenerate box.*need xmin < xmax and ymin < ymax"),
        (["0.png,0,-1,2,30,30"], r"line 2: box \(-1\.0, .*negative coordinate"),
        (
            ["0.png,0,1,2,30,30", "1.png,0,1,2,65,30"],
            r"line 3: box \(1\.0, 2\.0, 65\.0, 30\.0\) for 1\.png lies outside the image "
            r"\(width 64, height 48\)",
        ),
        (["0.png,0,1,2,30,49"], r"line 2: box .*49\.0\) for 0\.png lies outside"),
        (["0.png,-1,1,2,30,30"], r"line 2: label must be a non-negative integer, got '-1'"),
        (["0.png,0.5,1,2,30,30"], r"line 2: label must be a non-negative integer"),
        (["0.png,0,1,2,30,30", "1.png,1,1,2,30,30"], r"line 3: label 1 but .* 1 class \(banana\)"),
        ([], r"no annotation rows"),
    ],
)
@pytest.mark.parametrize("cache", [True, False])
def test_bad_rows_name_file_line_and_value(
    tmp_path: Path, rows: list[str], match: str, cache: bool
) -> None:
    split = tmp_path / "bananas_train"
    write_split(split, rows, 2)
    with pytest.raises(ValueError, match=match) as info:
        BananaDataset(split, cache=cache)
    assert str(split / "label.csv") in str(info.value)


def test_missing_columns(tmp_path: Path) -> None:
    split = tmp_path / "bananas_train"
    write_split(split, [], 1)
    (split / "label.csv").write_text("img_name,label,xmin,ymin\n0.png,0,1,2\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) xmax, ymax") as info:
        BananaDataset(split)
    assert str(split / "label.csv") in str(info.value)
    (split / "label.csv").write_text("")
    with pytest.raises(ValueError, match=r"missing column\(s\) img_name, label"):
        BananaDataset(split)


@pytest.mark.parametrize("cache", [True, False])
def test_corrupt_image_is_named(tmp_path: Path, cache: bool) -> None:
    split = tmp_path / "bananas_train"
    write_split(split, ["0.png,0,1,2,30,30", "1.png,0,1,2,30,30"], 2)
    (split / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="cannot read image") as info:
        BananaDataset(split, cache=cache)
    assert str(split / "images" / "1.png") in str(info.value)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    split = tmp_path / "bananas_train"
    write_split(split, ["0.png,0,1,2,30,30"], 1)
    path = split / "images" / "0.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=f"cannot read image {path}"):
        BananaDataset(split)


def test_missing_image_and_dirs_are_named(tmp_path: Path) -> None:
    split = tmp_path / "bananas_train"
    write_split(split, ["0.png,0,1,2,30,30", "7.png,0,1,2,30,30"], 1)
    with pytest.raises(FileNotFoundError, match=r"7\.png.*line 3, img_name '7\.png'") as info:
        BananaDataset(split)
    assert str(split / "images" / "7.png") in str(info.value)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
        BananaDataset(tmp_path / "nope")
    (split / "label.csv").unlink()
    with pytest.raises(FileNotFoundError, match=f"label file {split / 'label.csv'}"):
        BananaDataset(split)


# --------------------------------------------------------------------------- datamodule
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "foo"}, r"data\.source must be one of auto, real, synthetic; got 'foo'"),
        (
            {"augment": "bar"},
            r"data\.augment must be one of none, flip, photometric, ssd; got 'bar'",
        ),
        ({"batch_size": 0}, r"data\.batch_size must be >= 1"),
        ({"image_size": -3}, r"data\.image_size must be positive, got -3"),
        ({"download_timeout": 0}, r"data\.download_timeout must be > 0"),
        ({"num_synthetic_val": 0}, r"data\.num_synthetic_train and data\.num_synthetic_val"),
    ],
)
def test_datamodule_validates_config(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_dm(tmp_path, **kwargs)


def test_classes_come_from_the_data(tmp_path: Path) -> None:
    dm = make_dm(tmp_path)
    assert dm.classes == ["banana"] and dm.num_classes == 1 and dm.category_ids == [1]
    with pytest.raises(TypeError, match="num_classes"):  # no longer a config key
        make_dm(tmp_path, num_classes=1)


def test_real_missing_without_download(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, source="real", download=False)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert str(tmp_path / "banana-detection") in msg
    assert "data.source=synthetic" in msg and "data.download=true" in msg
    with pytest.raises(FileNotFoundError):
        dm.setup("fit")
    assert os.listdir(tmp_path) == []


def test_real_local_copy(tmp_path: Path) -> None:
    write_real(tmp_path)
    dm = make_dm(tmp_path, source="real", download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (
        dm.hparams["resolved_source"] == "real" and dm.dataset_dir == tmp_path / "banana-detection"
    )


def test_auto_prefers_local_real_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_real(tmp_path)

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("must not download when a local copy exists")

    monkeypatch.setattr(banana, "download_and_extract", no_download)
    dm = make_dm(tmp_path, source="auto", download=True)
    dm.prepare_data()
    assert dm.resolved_source == "real"
    assert dm.hparams["resolved_source"] == "real"
    assert dm.hparams_initial["resolved_source"] == "real"  # what the Trainer logs
    dm.setup("fit")
    assert len(dm.train_dataset) == 3 and len(dm.val_dataset) == 2
    assert not (tmp_path / "banana-synthetic").exists()


def test_auto_download_failure_falls_back_to_synthetic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dm = make_dm(tmp_path, source="auto", download=True)
    with caplog.at_level(logging.WARNING):
        dm.prepare_data()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].name == "src.data.banana"
    msg = warnings[0].getMessage()
    assert "SYNTHETIC" in msg and "download failed" in msg and MISSING_URL in msg
    assert str(tmp_path / "banana-synthetic") in msg
    assert dm.hparams["resolved_source"] == "synthetic"
    assert dm.hparams_initial["resolved_source"] == "synthetic"
    assert sorted(os.listdir(tmp_path)) == ["banana-synthetic"]
    dm.setup("fit")
    assert len(dm.train_dataset) == 4 and len(dm.val_dataset) == 2


def test_auto_without_download_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = make_dm(tmp_path, source="auto", download=False)
    with caplog.at_level(logging.WARNING, logger="src.data.banana"):
        dm.setup("fit")  # setup alone (no Trainer, no prepare_data) resolves too
    assert "data.download=false" in caplog.text and "SYNTHETIC" in caplog.text
    assert dm.hparams["resolved_source"] == "synthetic"


def test_incomplete_real_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_real(tmp_path)
    (tmp_path / "banana-detection" / "bananas_val" / "label.csv").unlink()
    with pytest.raises(DownloadError, match="incomplete.*restore the missing files"):
        make_dm(tmp_path, source="real").prepare_data()
    dm = make_dm(tmp_path, source="auto")
    with caplog.at_level(logging.WARNING, logger="src.data.banana"):
        dm.prepare_data()
    assert dm.resolved_source == "synthetic" and "incomplete" in caplog.text


def test_synthetic_source_ignores_real_copy(tmp_path: Path) -> None:
    write_real(tmp_path)
    dm = make_dm(tmp_path, source="synthetic")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.hparams["resolved_source"] == "synthetic"
    assert dm.train_dataset.split_dir == tmp_path / "banana-synthetic" / "bananas_train"


def test_setup_on_other_rank_uses_what_rank_zero_prepared(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 fell back to synthetic; another rank's setup must not try to download."""
    make_dm(tmp_path, source="auto").prepare_data()

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("setup on a non-zero rank must not download")

    monkeypatch.setattr(banana, "download_and_extract", no_download)
    other = make_dm(tmp_path, source="auto")
    other.trainer = object()  # attached to a Trainer: prepare_data ran on rank 0
    other.setup("validate")
    assert other.hparams["resolved_source"] == "synthetic"
    assert other.train_dataset is None and len(other.val_dataset) == 2


@pytest.mark.parametrize("augment", ["none", "ssd"])
def test_dataloaders(tmp_path: Path, augment: str) -> None:
    dm = make_dm(tmp_path, source="synthetic", augment=augment, batch_size=3)
    with pytest.raises(RuntimeError, match="call setup"):
        dm.train_dataloader()
    dm.prepare_data()
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert len(targets) == 3
    for t in targets:
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape[1] == 4
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
        assert t["labels"].dtype == torch.int64 and len(t["labels"]) == len(t["boxes"])
        assert t["orig_size"].tolist() == [256, 256]
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert val_images.shape == (2, 3, 32, 32) and len(val_targets) == 2
    assert [t["image_id"] for t in val_targets] == ["0", "1"]
    test_images, _ = next(iter(dm.test_dataloader()))
    torch.testing.assert_close(test_images, val_images)


def test_worker_dataloader(tmp_path: Path) -> None:
    dm = make_dm(tmp_path, source="synthetic", num_workers=1)
    dm.setup("validate")
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 32) and len(targets) == 2


class _CaptureLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.hparams: list[dict] = []

    @property
    def name(self) -> str:
        return "capture"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self.hparams.append(dict(params))

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        pass


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        return (self.w * images.mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.filterwarnings("ignore:.*validation_step.*", "ignore:.*LeafSpec.*")
def test_trainer_logs_resolved_source(tmp_path: Path) -> None:
    """Lightning logs ``hparams_initial`` after prepare_data/setup: the resolved value is in it."""
    dm = make_dm(tmp_path / "data", source="auto", download=False)
    capture = _CaptureLogger()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_steps=1,
        limit_val_batches=0,
        log_every_n_steps=1,
        logger=capture,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_TinyModule(), datamodule=dm)
    assert capture.hparams, "Lightning did not log the datamodule hyper-parameters"
    assert capture.hparams[0]["resolved_source"] == "synthetic"
    assert capture.hparams[0]["source"] == "auto"
