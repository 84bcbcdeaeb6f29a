"""Plain (year-less) VOC folders on a copy of the real raccoon data: splits, names, errors."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from src.data.voc import VOCAnnotationError, VOCDataset, hold_out, read_image_list
from tests.conftest import compose_config, shared_data

# the publisher's split (train_labels.csv / test_labels.csv): images and box rows
TRAIN_IMAGES, TRAIN_BOXES, VAL_IMAGES, VAL_BOXES = 160, 173, 40, 44


@pytest.fixture(scope="module")
def raccoon() -> Path:
    return shared_data("raccoon", "annotations").parent


def csv_stems(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return list(dict.fromkeys(Path(row["filename"]).stem for row in csv.DictReader(fh)))


@pytest.fixture(scope="module")
def plain_copy(raccoon: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain VOC folder copy: XMLs copied, images linked, ImageSets made from the CSVs."""
    root = tmp_path_factory.mktemp("raccoon_plain")
    shutil.copytree(raccoon / "annotations", root / "Annotations")
    (root / "JPEGImages").mkdir()
    for image in (raccoon / "images").iterdir():
        (root / "JPEGImages" / image.name).symlink_to(image)
    main = root / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for split, name in (("train", "train_labels.csv"), ("val", "test_labels.csv")):
        (main / f"{split}.txt").write_text("\n".join(csv_stems(raccoon / name)) + "\n")
    return root


def test_plain_folder_with_image_sets(plain_copy: Path, raccoon: Path) -> None:
    train = VOCDataset(plain_copy, ["train"], classes=["raccoon"])
    val = VOCDataset(plain_copy, ["val"], classes=["raccoon"], keep_difficult=True)
    assert (len(train), train.num_objects) == (TRAIN_IMAGES, TRAIN_BOXES)
    assert (len(val), val.num_objects) == (VAL_IMAGES, VAL_BOXES)
    assert not {r.image_id for r in train.records} & {r.image_id for r in val.records}
    assert train.plain and train.classes == ("raccoon",)
    # raccoon-1.xml by hand: 650x417, box (81, 88, 522, 408) in devkit pixels (1-based)
    index = [r.image_id for r in train.records].index("raccoon-1")
    image, target = train[index]
    assert image.shape == (3, 417, 650) and target["image_id"] == "raccoon-1"
    expected = torch.tensor([[80 / 650, 87 / 417, 521 / 650, 407 / 417]])
    torch.testing.assert_close(target["boxes"], expected)
    assert train.image_path(index) == plain_copy / "JPEGImages" / "raccoon-1.jpg"
    assert train.file_name(index) == "JPEGImages/raccoon-1.jpg"


def test_plain_folder_through_the_config(plain_copy: Path) -> None:
    cfg = compose_config(
        "train",
        ["data=voc", f"data.root={plain_copy}", "data.train_sets=[train]", "data.val_sets=[val]",
         "data.classes=[raccoon]", "data.pin_memory=false"],
    )  # fmt: skip
    dm = instantiate(cfg.data)
    assert dm.classes == ["raccoon"] and dm.num_classes == 1
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (TRAIN_IMAGES, VAL_IMAGES)


def test_val_fraction_splits_every_annotation(plain_copy: Path) -> None:
    common = [
        "data=voc", f"data.root={plain_copy}", "data.train_sets=null", "data.val_fraction=0.2",
        "data.classes=[raccoon]", "data.pin_memory=false",
    ]  # fmt: skip
    dm = instantiate(compose_config("train", common).data)
    dm.setup("test")
    dm.setup("fit")
    train = [r.image_id for r in dm.train_dataset.records]
    val = [r.image_id for r in dm.val_dataset.records]
    assert (len(train), len(val)) == (160, 40)  # round(0.2 * 200) held out
    assert not set(train) & set(val) and len(set(train) | set(val)) == 200
    assert dm.test_dataset is dm.val_dataset  # the test split is the held-out part too
    assert dm.train_dataset.num_objects + dm.val_dataset.num_objects == 217
    again = instantiate(compose_config("train", common).data)
    again.setup("validate")
    assert [r.image_id for r in again.val_dataset.records] == val  # fixed seed: same split
    other = instantiate(compose_config("train", [*common, "data.split_seed=1"]).data)
    other.setup("validate")
    assert [r.image_id for r in other.val_dataset.records] != val


def test_hold_out_by_hand() -> None:
    ids = [f"{i}" for i in range(10)]
    val = hold_out(ids, 0.3, seed=0, part="val")
    train = hold_out(ids, 0.3, seed=0, part="train")
    assert len(val) == 3 and sorted(val + train, key=int) == ids
    assert val == sorted(val, key=int)  # the pool's order is kept
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:3]
    assert val == [str(i) for i in sorted(perm.tolist())]
    assert hold_out(ids, 0.01, 0, "val") and len(hold_out(ids, 0.99, 0, "train")) == 1
    with pytest.raises(ValueError, match=r"data\.val_fraction must lie in \(0, 1\), got 1"):
        hold_out(ids, 1, 0, "val")


def test_raccoon_yaml_loads_the_publishers_split(raccoon: Path) -> None:
    cfg = compose_config("train", ["data=raccoon", f"data.root={raccoon}", "data.pin_memory=false"])
    assert cfg.data.train_sets == ["train_labels.csv"] and cfg.data.images_dir == "images"
    dm = instantiate(cfg.data)
    assert dm.classes == ["raccoon"]
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset)) == (TRAIN_IMAGES, VAL_IMAGES)
    assert (dm.train_dataset.num_objects, dm.val_dataset.num_objects) == (TRAIN_BOXES, VAL_BOXES)
    assert [r.image_id for r in dm.train_dataset.records] == csv_stems(raccoon / "train_labels.csv")
    assert dm.hparams["root"] == str(raccoon) and dm.hparams["batch_size"] == 32


def test_list_files(tmp_path: Path, raccoon: Path) -> None:
    (tmp_path / "few.txt").write_text(
        "# three images\nraccoon-2\nraccoon-1.jpg extra\n\nraccoon-2\n"
    )
    assert read_image_list(tmp_path / "few.txt") == ["raccoon-2", "raccoon-1"]
    ds = VOCDataset(
        raccoon, [str(tmp_path / "few.txt")], images_dir="images", annotations_dir="annotations",
        classes=["raccoon"],
    )  # fmt: skip
    assert [r.image_id for r in ds.records] == ["raccoon-2", "raccoon-1"]
    (tmp_path / "bad.csv").write_text("file,xmin\nraccoon-1.jpg,3\n")
    with pytest.raises(VOCAnnotationError, match=r"bad\.csv: no 'filename' column"):
        read_image_list(tmp_path / "bad.csv")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(VOCAnnotationError, match=r"empty\.txt: lists no images"):
        read_image_list(tmp_path / "empty.txt")


def test_layout_errors_name_the_fix(tmp_path: Path, raccoon: Path, plain_copy: Path) -> None:
    names = {"images_dir": "images", "annotations_dir": "annotations", "classes": ["raccoon"]}
    with pytest.raises(ValueError, match=r"\[2007, trainval\] is a VOCdevkit \[year, set\] pair"):
        VOCDataset(raccoon, [[2007, "trainval"]], **names)
    with pytest.raises(FileNotFoundError, match=r"ImageSets/Main/train\.txt does not exist"):
        VOCDataset(raccoon, ["train"], **names)
    with pytest.raises(FileNotFoundError, match=r"image list nope\.csv does not exist"):
        VOCDataset(raccoon, ["nope.csv"], **names)
    with pytest.raises(FileNotFoundError, match=r"image folder .*pictures does not exist"):
        VOCDataset(raccoon, None, **{**names, "images_dir": "pictures"})
    # the folder names matter: raccoon's annotations/ is not Annotations/
    with pytest.raises(FileNotFoundError, match=r"VOC\* directories"):
        VOCDataset(raccoon, [[2007, "trainval"]])
    devkit = tmp_path / "VOCdevkit"
    (devkit / "VOC2007").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'train' has no year, but data\.root=.* is a VOCdevkit"):
        VOCDataset(devkit, ["train"])
    with pytest.raises(ValueError, match=r"image_sets=null \(every annotation\) needs a plain"):
        VOCDataset(devkit, None)
    # an annotation whose image is missing names both
    broken = tmp_path / "broken"
    shutil.copytree(plain_copy / "Annotations", broken / "Annotations")
    (broken / "JPEGImages").mkdir()
    with pytest.raises(VOCAnnotationError, match=r"raccoon-1\.jpg: image file missing .*few\.txt"):
        (tmp_path / "few.txt").write_text("raccoon-1\n")
        VOCDataset(broken, [str(tmp_path / "few.txt")], classes=["raccoon"])
