"""The one DetectionDataModule: factories, loader keys once, hparams, old checkpoint targets."""

from __future__ import annotations

import functools
import inspect
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.data.banana import BananaDataModule, BananaDataset
from src.data.base import DataFormatError, DetectionDataModule, DetectionDataset
from src.data.voc import VOC_CLASSES, VOCDataModule, VOCDataset
from src.utils.config import register_resolvers
from tests.conftest import CONF_DIR, compose_config, shared_data

LOADER_KEYS = ("batch_size", "num_workers", "pin_memory", "augment", "image_size", "cache")


@pytest.fixture(scope="module")
def mini_root() -> Path:
    return shared_data("VOCdevkit-mini", "VOC2012", "Annotations").parents[1]


def banana_factories(data_dir: Path) -> tuple[functools.partial, functools.partial]:
    split = functools.partial(
        BananaDataset, data_dir=data_dir, source="synthetic", download=False, cache=False,
        num_synthetic_train=4, num_synthetic_val=2,
    )  # fmt: skip
    return functools.partial(split, split="train"), functools.partial(split, split="val")


def test_loader_keys_live_once_in_the_shared_yaml() -> None:
    """Every format yaml includes _loader.yaml; none repeats a key it does not change."""

    def raw(name: str) -> dict:
        return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))

    loader = raw("_loader")
    parameters = inspect.signature(DetectionDataModule.__init__).parameters
    assert set(LOADER_KEYS) <= set(loader) and set(loader) <= set(parameters)
    for name in ("banana", "voc", "coco", "yolo"):
        config = raw(name)
        assert config["defaults"] == ["_loader", "_self_"], name
        assert config["_target_"] == "src.data.base.DetectionDataModule"
        assert config["train"]["_partial_"] and config["val"]["_partial_"]
        repeated = [k for k in LOADER_KEYS if k in config and config[k] == loader[k]]
        assert repeated == [], f"{name}.yaml repeats {repeated} with the _loader.yaml value"


@pytest.mark.parametrize(
    ("data", "extra", "batch"),
    [
        ("banana", [], 32),
        ("voc", ["data.root=/nowhere"], 32),
        ("coco", ["data.train_json=a.json", "data.train_images=i", "data.val_json=b.json",
                  "data.val_images=i"], 32),
        ("yolo", ["data.dataset_yaml=d.yaml"], 32),
        ("raccoon", [], 32),
    ],
)  # fmt: skip
def test_every_data_yaml_composes_with_the_loader_keys(
    data: str, extra: list[str], batch: int
) -> None:
    cfg = compose_config("train", [f"data={data}", *extra])
    assert cfg.data.batch_size == batch and cfg.data.image_size == cfg.backbone.image_size
    assert set(LOADER_KEYS) <= set(cfg.data)
    # the users' keys stay where they were
    override = compose_config(
        "train", [f"data={data}", *extra, "data.batch_size=3", "data.augment=none"]
    )
    assert override.data.batch_size == 3 and override.data.augment == "none"


def test_hparams_hold_loader_and_format_keys_for_every_format(tmp_path: Path) -> None:
    train, val = banana_factories(tmp_path)
    dm = DetectionDataModule(train, val, batch_size=3, root="/data/x", train_sets=[["2007", "a"]])
    assert {k: dm.hparams[k] for k in LOADER_KEYS} == {
        "batch_size": 3, "num_workers": 0, "pin_memory": False, "augment": "none",
        "image_size": 300, "cache": False,
    }  # fmt: skip
    assert dm.hparams["root"] == "/data/x" and dm.hparams["train_sets"] == [["2007", "a"]]
    assert "train" not in dm.hparams and "val" not in dm.hparams  # factories are not logged
    assert dm.classes == ["banana"] and dm.category_ids == [1] and dm.format_name == "BananaDataset"
    assert dm.test_is_val()
    dm.setup("fit")
    assert dm.hparams["resolved_source"] == "synthetic"  # found while building: recorded
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (4, 2)
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 300, 300) and len(targets) == 3


def test_arguments_are_checked_with_the_key_named(tmp_path: Path) -> None:
    train, val = banana_factories(tmp_path)
    with pytest.raises(TypeError, match=r"data\.num_classes is not a config key"):
        DetectionDataModule(train, val, num_classes=1)
    with pytest.raises(TypeError, match=r"data\.val must build a DetectionDataset"):
        DetectionDataModule(train, functools.partial(dict, a=1))
    with pytest.raises(ValueError, match=r"data\.batch_size must be >= 1, got 0"):
        DetectionDataModule(train, val, batch_size=0)
    with pytest.raises(ValueError, match=r"data\.source must be one of auto, real, synthetic"):
        DetectionDataModule(functools.partial(train, source="web"), val)


def test_test_split_is_val_unless_its_factory_differs(tmp_path: Path, mini_root: Path) -> None:
    split = functools.partial(VOCDataset, root=mini_root, keep_difficult=True)
    train = functools.partial(split, image_sets=[[2012, "train"]], keep_difficult=False)
    val = functools.partial(split, image_sets=[[2012, "val"]])
    same = DetectionDataModule(train, val, functools.partial(split, image_sets=[[2012, "val"]]))
    assert same.test_is_val()
    same.setup("test")
    assert same.test_dataset is same.val_dataset and len(same.val_dataset) == 20
    other = DetectionDataModule(train, val, functools.partial(split, image_sets=[[2012, "train"]]))
    assert not other.test_is_val()
    other.setup("test")
    assert other.val_dataset is None and len(other.test_dataset) == 80


def test_a_split_with_other_classes_is_an_error(mini_root: Path) -> None:
    split = functools.partial(VOCDataset, root=mini_root, image_sets=[[2012, "val"]])
    dm = DetectionDataModule(
        functools.partial(split, classes=["cat", "dog"], unknown_classes="skip"), split
    )
    assert dm.classes == ["cat", "dog"]
    with pytest.raises(DataFormatError, match=r"the val split has the classes \['aeroplane'"):
        dm.setup("validate")


def test_a_factory_that_cannot_say_its_classes() -> None:
    class Nameless(DetectionDataset):
        pass

    with pytest.raises(TypeError, match="Nameless does not say its classes"):
        DetectionDataModule(Nameless, Nameless)


def test_start_summary_shows_batch_size_for_voc(mini_root: Path) -> None:
    from src.utils.console import data_line

    cfg = compose_config("train", ["data=voc_mini", f"data.root={mini_root}", "data.batch_size=5"])
    dm = instantiate(cfg.data, pin_memory=False)
    dm.setup("validate")
    line = data_line(dm)
    assert line.startswith(f"VOCDataset, root={mini_root}, 20 classes (aeroplane, ")
    assert line.endswith("20 val images, batch 5")


# ------------------------------------------------------------------ old checkpoints' run configs
def test_old_run_configs_still_instantiate(tmp_path: Path, mini_root: Path) -> None:
    """Checkpoints store the run config; the old DataModule targets build the same data."""
    from src.utils.config import data_config

    old_voc = {
        "_target_": "src.data.voc.VOCDataModule", "root": str(mini_root),
        "train_sets": [[2012, "trainval"]], "val_sets": [[2012, "val"]], "test_sets": None,
        "keep_difficult": False, "skip_invalid": False, "augment": "ssd", "image_size": 64,
        "batch_size": 8, "num_workers": 0, "pin_memory": False, "classes": None,
        "unknown_classes": "error", "cache": False,
    }  # fmt: skip
    run_config = OmegaConf.create({"data": old_voc, "paths": {"data_dir": str(tmp_path)}})
    eval_cfg = OmegaConf.create({"data": None, "paths": {"data_dir": str(tmp_path)}})
    voc = instantiate(data_config(eval_cfg, run_config))
    assert isinstance(voc, VOCDataModule) and isinstance(voc, DetectionDataModule)
    assert voc.classes == list(VOC_CLASSES) and voc.hparams["batch_size"] == 8
    voc.setup("test")
    assert len(voc.val_dataset) == 20 and voc.test_dataset is voc.val_dataset
    # the new yaml reads the same images and boxes
    new = instantiate(
        compose_config(
            "train", ["data=voc_mini", f"data.root={mini_root}", "data.image_size=64",
                      "data.pin_memory=false"]
        ).data
    )  # fmt: skip
    new.setup("validate")
    assert [r.image_id for r in new.val_dataset.records] == [
        r.image_id for r in voc.val_dataset.records
    ]
    torch.testing.assert_close(new.val_dataset[3][1]["boxes"], voc.val_dataset[3][1]["boxes"])

    old_banana = {
        "_target_": "src.data.banana.BananaDataModule", "data_dir": str(tmp_path),
        "source": "synthetic", "download": False, "batch_size": 2, "num_workers": 0,
        "pin_memory": False, "augment": "none", "image_size": 32, "num_synthetic_train": 4,
        "num_synthetic_val": 2, "seed": 0, "cache": True,
    }  # fmt: skip
    banana = instantiate(OmegaConf.create(old_banana))
    assert isinstance(banana, BananaDataModule) and banana.classes == ["banana"]
    banana.setup("fit")
    assert banana.dataset_dir == tmp_path / "banana-synthetic"
    assert (len(banana.train_dataset), len(banana.val_dataset)) == (4, 2)
    assert banana.train_dataset.cached  # data.cache=true reaches the one DataModule


# ------------------------------------------------------------------ a new format (docs/data.md)
class CsvBoxesDataset(DetectionDataset):
    """The example format of docs/data.md: ``file,xmin,ymin,xmax,ymax,class`` pixel rows."""

    def __init__(self, csv_path, images_dir, classes, transform=None):  # noqa: ANN001
        import csv

        from src.data.base import read_image_size

        self.classes, self.transform = tuple(classes), transform
        with open(csv_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        files = sorted({r["file"] for r in rows})
        self.paths = [Path(images_dir) / f for f in files]
        self.sizes = [read_image_size(p) for p in self.paths]
        self.owner = torch.tensor([files.index(r["file"]) for r in rows])
        coords = [[float(r[k]) for k in ("xmin", "ymin", "xmax", "ymax")] for r in rows]
        self.boxes = torch.tensor(coords)
        self.labels = torch.tensor([self.classes.index(r["class"]) for r in rows])

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def image_size(self, index: int) -> tuple[int, int]:
        return self.sizes[index]

    def pixel_annotations(self, index: int) -> dict[str, torch.Tensor]:
        mine = self.owner == index
        flags = torch.zeros(int(mine.sum()), dtype=torch.bool)
        return {"boxes": self.boxes[mine], "labels": self.labels[mine], "difficult": flags,
                "iscrowd": flags.clone()}  # fmt: skip


EXAMPLE_YAML = """\
defaults: [_loader, _self_]
_target_: src.data.base.DetectionDataModule
train_csv: ???
val_csv: ???
images: ???
classes: ???
train: &split
  {_target_: tests.data.test_datamodule.CsvBoxesDataset, _partial_: true,
   csv_path: "${..train_csv}", images_dir: "${..images}", classes: "${..classes}"}
val: {<<: *split, csv_path: "${..val_csv}"}
"""


def test_a_new_format_is_one_dataset_class_and_one_yaml(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from torchvision.io import encode_png, write_file

    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        write_file(str(images / name), encode_png(torch.zeros(3, 30, 40, dtype=torch.uint8)))
    header = "file,xmin,ymin,xmax,ymax,class\n"
    (tmp_path / "train.csv").write_text(header + "a.png,4,3,20,15,cat\nb.png,0,0,40,30,dog\n")
    (tmp_path / "val.csv").write_text(header + "b.png,10,6,30,24,cat\n")
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR / "data", conf / "data")
    assert EXAMPLE_YAML.count("\n") == 10  # the docs' "10 lines"
    (conf / "data" / "csv_boxes.yaml").write_text(EXAMPLE_YAML)
    (conf / "main.yaml").write_text(
        "defaults:\n  - data: csv_boxes\n  - _self_\n"
        "backbone:\n  image_size: 32\ntrainer:\n  accelerator: cpu\n"
    )
    overrides = [
        f"data.train_csv={tmp_path / 'train.csv'}", f"data.val_csv={tmp_path / 'val.csv'}",
        f"data.images={images}", "data.classes=[cat,dog]", "data.num_workers=0",
    ]  # fmt: skip
    register_resolvers()  # ${gpu_only:} in _loader.yaml (the entry points register it)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="main", overrides=overrides)
    dm = instantiate(cfg.data)
    assert dm.classes == ["cat", "dog"] and dm.hparams["batch_size"] == 32
    assert dm.hparams["pin_memory"] is False  # gpu_only:true on a CPU trainer
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and dm.train_dataset[1][1]["labels"].tolist() == [1]
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 32, 32) and targets[0]["labels"].tolist() == [0]
    torch.testing.assert_close(targets[0]["boxes"], torch.tensor([[0.25, 0.2, 0.75, 0.8]]))


def test_old_null_test_keys_say_what_to_type(mini_root: Path, tmp_path: Path) -> None:
    """data.test_sets / data.test_json were null for 'the val split'; now they default to it."""
    cfg = compose_config(
        "train", ["data=voc_mini", f"data.root={mini_root}", "data.test_sets=null"]
    )
    dm = instantiate(cfg.data, pin_memory=False)
    with pytest.raises(ValueError, match=r"leave data\.test_sets unset, it defaults to data\.val"):
        dm.setup("test")
    from src.data.coco import CocoDataset

    with pytest.raises(ValueError, match=r"leave data\.test_json and data\.test_images unset"):
        CocoDataset(None, None)
