"""Ultralytics YOLO format: reader against the VOC reader, every bad input, config, conversions."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from torchvision.io import encode_png, write_file

from src.data.base import DetectionDataModule
from src.data.coco import CocoDataset, load_coco_json
from src.data.convert import coco_to_yolo, yolo_to_coco
from src.data.convert import main as convert_main
from src.data.voc import VOC_CLASSES, VOCDataset
from src.data.yolo import (
    OUTSIDE_TOLERANCE,
    YoloDataset,
    YoloFormatError,
    label_path,
    load_dataset_yaml,
)
from tests.conftest import compose_config, shared_data

W, H = 40, 30


def write_png(path: Path, width: int = W, height: int = H) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(str(path), encode_png(torch.full((3, height, width), 99, dtype=torch.uint8)))


def make_yolo(
    root: Path,
    labels: dict[str, str | None],
    names: list[str] | dict[int, str] | None = None,
    split: str = "train",
    extra: dict | None = None,
) -> Path:
    """``root/images/<split>/<stem>.png`` with ``labels`` (None: no label file), and data.yaml."""
    for stem, text in labels.items():
        write_png(root / "images" / split / f"{stem}.png")
        if text is not None:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{stem}.txt").write_text(text)
    spec = {"path": str(root), "train": f"images/{split}", "val": f"images/{split}"}
    spec["names"] = names if names is not None else ["cat", "dog"]
    spec.update(extra or {})
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------- reading
def test_boxes_labels_and_background_images_by_hand(tmp_path: Path) -> None:
    data = make_yolo(
        tmp_path,
        {
            "a": "0 0.5 0.5 0.5 0.2\n\n1 0.25 0.75 0.1 0.5\n",  # a blank line is ignored
            "b": None,  # no label file: a background image
            "c": "",  # an empty label file: a background image too
        },
        names={0: "cat", 1: "dog"},
    )
    ds = YoloDataset(data, "train")
    assert ds.classes == ("cat", "dog") and len(ds) == 3 and ds.num_objects == 2
    image, target = ds[0]
    assert image.shape == (3, H, W) and target["image_id"] == "images/train/a"
    expected = torch.tensor([[0.25, 0.4, 0.75, 0.6], [0.2, 0.5, 0.3, 1.0]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [0, 1] and target["orig_size"].tolist() == [H, W]
    pixels = ds.pixel_annotations(0)["boxes"]
    torch.testing.assert_close(pixels, expected * torch.tensor([W, H, W, H]))
    for i in (1, 2):
        assert ds[i][1]["boxes"].shape == (0, 4) and ds[i][1]["labels"].shape == (0,)
    assert ds.file_name(0) == "images/train/a.png" and ds.class_counts().tolist() == [1, 1]


def test_label_path_follows_ultralytics() -> None:
    assert label_path("d/images/train/a.jpg") == Path("d/labels/train/a.txt")
    assert label_path("x/images/y/images/z.png") == Path("x/images/y/labels/z.txt")
    assert label_path("flat/a.b.jpeg") == Path("flat/a.b.txt")  # no images/: beside the image
    assert label_path("d/myimages/a.jpg") == Path("d/myimages/a.txt")  # whole components only


def test_list_files_nested_folders_and_test_falls_back_to_val(tmp_path: Path) -> None:
    make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n"})
    write_png(tmp_path / "images" / "train" / "deep" / "c.png")
    (tmp_path / "labels" / "train" / "deep").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "deep" / "c.txt").write_text("1 0.5 0.5 0.4 0.4\n")
    (tmp_path / "val.txt").write_text("./images/train/b.png\n# comment\nimages/train/a.png\n")
    data = tmp_path / "data.yaml"
    data.write_text(
        yaml.safe_dump({"path": ".", "train": ["images/train"], "val": "val.txt",
                        "names": ["cat", "dog"], "nc": 2})
    )  # fmt: skip
    train = YoloDataset(data, "train")
    assert [train.file_name(i) for i in range(3)] == [
        "images/train/a.png", "images/train/b.png", "images/train/deep/c.png",
    ]  # fmt: skip
    test = YoloDataset(data, "test")  # no test key: the val split
    assert test.split == "val" and [test.file_name(i) for i in range(2)] == [
        "images/train/b.png",
        "images/train/a.png",
    ]
    assert [test[i][1]["labels"].tolist() for i in range(2)] == [[1], [0]]


def test_box_within_the_tolerance_is_clamped(tmp_path: Path) -> None:
    tiny = OUTSIDE_TOLERANCE / 2
    data = make_yolo(tmp_path, {"a": f"0 {0.1 - tiny} 0.5 0.2 0.2\n"})
    boxes = YoloDataset(data)[0][1]["boxes"]
    assert boxes[0, 0] == 0.0 and abs(float(boxes[0, 2]) - (0.2 - tiny)) < 1e-6


# --------------------------------------------------------------------------- every bad input
BAD_LINES = [
    ("0 0.5 0.5 0.2\n", r"a\.txt: line 1: 4 columns, expected 5 \(class cx cy w h\)"),
    ("0 0.5 0.5 0.2 0.2 0.3 0.3\n", r"a\.txt: line 1: 7 columns, expected 5.*polygons"),
    ("0 0.5 0.5 0.2 0.2\n0 0.5 abc 0.2 0.2\n", r"a\.txt: line 2: not a number in '0 0\.5 abc"),
    ("0 0.5 nan 0.2 0.2\n", r"a\.txt: line 1: not a number"),
    ("2 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: class id 2 is not an integer in \[0, 2\)"),
    ("-1 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: class id -1 is not an integer in \[0, 2\)"),
    ("0.5 0.5 0.5 0.2 0.2\n", r"a\.txt: line 1: class id 0\.5 is not an integer"),
    ("0 0.95 0.5 0.2 0.2\n", r"line 1: box \(0\.85, 0\.4, 1\.05, 0\.6\) \(xyxy\) lies outside"),
    ("0 0.5 0.5 0 0.2\n", r"a\.txt: line 1: zero-size box \(w=0, h=0\.2\)"),
    ("0 0.5 0.5 0.2 -0.1\n", r"a\.txt: line 1: zero-size box"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), BAD_LINES, ids=[m[:22] for _, m in BAD_LINES])
def test_bad_label_lines_name_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, message: str
) -> None:
    data = make_yolo(tmp_path, {"a": text, "b": "1 0.5 0.5 0.2 0.2\n"})
    with pytest.raises(YoloFormatError, match=message):
        YoloDataset(data)
    with caplog.at_level(logging.WARNING, logger="src.data.yolo"):
        ds = YoloDataset(data, skip_invalid=True)
    bad = 1
    assert ds.num_objects == text.count("\n") - bad + 1 and len(ds) == 2
    assert "skip_invalid=True skipped 1 invalid object(s)" in caplog.text


def write_yaml(tmp_path: Path, spec: object) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return path


BAD_YAMLS = [
    ("train: [unclosed", r"data\.yaml: not valid YAML"),
    ("- a\n- b\n", r"data\.yaml: a dataset yaml is a mapping"),
    ({"val": "images", "names": ["a"]}, r"data\.yaml: missing 'train'"),
    ({"train": "images", "names": ["a"]}, r"data\.yaml: missing 'val'"),
    ({"train": "images", "val": "images"}, r"data\.yaml: missing 'names'"),
    ({"train": "i", "val": "i", "names": {0: "a", 2: "b"}}, r"'names' ids must be 0\.\.1 with"),
    ({"train": "i", "val": "i", "names": {"a": 0}}, r"'names' keys must be the class ids"),
    ({"train": "i", "val": "i", "names": ["a", "a"]}, r"class 'a' is named twice"),
    ({"train": "i", "val": "i", "names": ["a", ""]}, r"class 1 has an empty name"),
    ({"train": "i", "val": "i", "names": "a"}, r"'names' must be a non-empty list"),
    ({"train": "i", "val": "i", "names": ["a"], "nc": 2}, r"nc is 2 but 'names' lists 1 class"),
    ({"train": "i", "val": "i", "names": ["a"], "category_ids": [1, 2]}, r"category_ids must"),
    ({"train": 3, "val": "i", "names": ["a"]}, r"'train' must be a folder, a \.txt list"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "message"), BAD_YAMLS, ids=[m[:24] for _, m in BAD_YAMLS])
def test_bad_dataset_yaml(tmp_path: Path, spec: object, message: str) -> None:
    with pytest.raises(YoloFormatError, match=message):
        load_dataset_yaml(write_yaml(tmp_path, spec))


def test_missing_files_and_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data\.dataset_yaml=.*nope\.yaml: no such file"):
        YoloDataset(tmp_path / "nope.yaml")
    data = make_yolo(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    spec = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**spec, "val": "images/nope"}))
    with pytest.raises(YoloFormatError, match=r"data\.yaml: val: images/nope: .*does not exist"):
        YoloDataset(data, "val")
    (tmp_path / "images" / "empty").mkdir()
    data.write_text(yaml.safe_dump({**spec, "val": "images/empty"}))
    with pytest.raises(YoloFormatError, match=r"the folder .*empty holds no images"):
        YoloDataset(data, "val")
    (tmp_path / "list.txt").write_text("images/train/a.png\nimages/train/gone.png\n")
    data.write_text(yaml.safe_dump({**spec, "val": "list.txt"}))
    with pytest.raises(YoloFormatError, match=r"list\.txt: lists 1 image\(s\) that do not exist"):
        YoloDataset(data, "val")
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        YoloDataset(data, "valid")


# --------------------------------------------------------------------------- the DataModule
def test_data_yolo_config_and_datamodule(tmp_path: Path) -> None:
    data = make_yolo(
        tmp_path,
        {"a": "1 0.5 0.5 0.5 0.5\n", "b": "0 0.3 0.3 0.2 0.2\n", "c": None},
        extra={"category_ids": [17, 18]},
    )
    cfg = compose_config(
        "train", ["data=yolo", f"data.dataset_yaml={data}", "data.batch_size=2",
                  "data.num_workers=0", "data.pin_memory=false", "data.image_size=32"]
    )  # fmt: skip
    dm = instantiate(cfg.data)
    assert isinstance(dm, DetectionDataModule) and dm.format_name == "YoloDataset"
    assert dm.classes == ["cat", "dog"] and dm.category_ids == [17, 18]
    assert dm.hparams["dataset_yaml"] == str(data) and dm.hparams["batch_size"] == 2
    dm.setup("fit")
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 32) and [t["labels"].tolist() for t in targets] == [[1], [0]]
    assert len(dm.train_dataset) == 3


# --------------------------------------------------------------------------- VOC-mini as YOLO
@pytest.fixture(scope="module")
def voc_mini_yolo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """VOC-mini trainval converted voc -> coco -> yolo (difficult objects kept as objects)."""
    root = shared_data("VOCdevkit-mini", "VOC2012", "Annotations").parents[1]
    out = tmp_path_factory.mktemp("voc_yolo")
    coco = out / "trainval.json"
    argv = ["voc2coco", "--root", str(root), "--split", "trainval", "--difficult", "keep"]
    assert convert_main([*argv, "--out", str(coco)]) == 0
    argv = ["coco2yolo", "--json", str(coco), "--images", str(root), "--out", str(out / "yolo")]
    assert convert_main([*argv, "--split", "train"]) == 0
    assert convert_main([*argv, "--split", "val"]) == 0
    return out / "yolo" / "data.yaml", root


def test_yolo_reader_equals_the_voc_reader_on_voc_mini(voc_mini_yolo: tuple[Path, Path]) -> None:
    data, root = voc_mini_yolo
    yolo = YoloDataset(data, "train")
    voc = VOCDataset(root, [[2012, "trainval"]], keep_difficult=True)
    assert yolo.classes == VOC_CLASSES and len(yolo) == len(voc) == 100
    assert yolo.num_objects == voc.num_objects == 273
    voc_index = {r.image_id: i for i, r in enumerate(voc.records)}
    for i in range(len(yolo)):
        image, target = yolo[i]
        j = voc_index[Path(yolo.image_path(i)).stem]
        voc_image, voc_target = voc[j]
        torch.testing.assert_close(target["boxes"], voc_target["boxes"], atol=1e-6, rtol=0)
        assert torch.equal(target["labels"], voc_target["labels"])
        assert torch.equal(image, voc_image)
    assert load_dataset_yaml(data).splits == {"train": ["images/train"], "val": ["images/val"]}


# --------------------------------------------------------------------------- round trips
def test_coco_to_yolo_to_coco_is_exact(tmp_path: Path) -> None:
    sizes = [(40, 30), (64, 48), (25, 50)]
    images = []
    for i, (w, h) in enumerate(sizes):
        write_png(tmp_path / "src" / "sub" / f"im{i}.png", w, h)
        images.append({"id": 10 + i, "file_name": f"sub/im{i}.png", "width": w, "height": h})
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 9, "bbox": [1.25, 2.5, 10.125, 7.0]},
        {"id": 2, "image_id": 10, "category_id": 4, "bbox": [0, 0, 40, 30]},
        {"id": 3, "image_id": 11, "category_id": 4, "bbox": [13.333333, 1 / 3, 20.1, 9.7]},
        {"id": 4, "image_id": 11, "category_id": 9, "bbox": [5, 5, 3, 3], "iscrowd": 1},
    ]  # image 12 has no objects: a background image both ways
    categories = [{"id": 9, "name": "bar"}, {"id": 4, "name": "square"}]
    original = tmp_path / "train.json"
    original.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": categories}))  # fmt: skip
    data = coco_to_yolo(original, tmp_path / "src", tmp_path / "yolo", "train")
    spec = yaml.safe_load(data.read_text())
    assert spec["names"] == {0: "square", 1: "bar"} and spec["category_ids"] == [4, 9]
    assert spec["train"] == "images/train" and Path(spec["path"]) == tmp_path / "yolo"
    labels = tmp_path / "yolo" / "labels" / "train" / "sub"
    assert labels.joinpath("im0.txt").read_text().splitlines()[1] == "0 0.5 0.5 1 1"
    assert labels.joinpath("im2.txt").read_text() == ""
    assert (tmp_path / "yolo" / "images" / "train" / "sub" / "im0.png").is_symlink()
    # val from the same JSON, so that the yaml is complete
    coco_to_yolo(original, tmp_path / "src", tmp_path / "yolo", "val")
    back = yolo_to_coco(data, "train")
    assert back["categories"] == [
        {"id": 4, "name": "square", "supercategory": "none"},
        {"id": 9, "name": "bar", "supercategory": "none"},
    ]
    by_name = {im["file_name"]: im for im in back["images"]}
    assert sorted(by_name) == [f"images/train/sub/im{i}.png" for i in range(3)]
    for image in images:
        mine = by_name[f"images/train/{image['file_name']}"]
        assert (mine["width"], mine["height"]) == (image["width"], image["height"])
        want = [a for a in annotations if a["image_id"] == image["id"] and not a.get("iscrowd")]
        got = [a for a in back["annotations"] if a["image_id"] == mine["id"]]
        assert [a["category_id"] for a in got] == [a["category_id"] for a in want]
        scale = torch.tensor([image["width"], image["height"]] * 2, dtype=torch.float64)
        for a, b in zip(got, want, strict=True):
            error = (torch.tensor(a["bbox"]) - torch.tensor(b["bbox"])).abs() / scale
            assert float(error.max()) < 1e-6
    # the COCO loader reads the converted JSON with the same category ids
    path = tmp_path / "back.json"
    path.write_text(json.dumps(back))
    assert CocoDataset(path, tmp_path / "yolo").category_ids == [4, 9]


def test_yolo_to_coco_to_yolo_gives_the_same_lines(tmp_path: Path) -> None:
    lines = {
        "a": "0 0.5 0.5 0.25 0.125\n1 0.1234567 0.3 0.2 0.05\n",
        "b": "1 0.2 0.8 0.4 0.1\n",
        "c": "",
    }
    data = make_yolo(tmp_path / "yolo", lines, names=["cat", "dog"])
    coco = tmp_path / "train.json"
    argv = ["yolo2coco", "--data", str(data), "--split", "train", "--out", str(coco)]
    assert convert_main(argv) == 0
    assert len(load_coco_json(coco)["annotations"]) == 3
    out = tmp_path / "again"
    argv = ["coco2yolo", "--json", str(coco), "--images", str(tmp_path / "yolo"), "--out", str(out)]
    assert convert_main(argv) == 0
    for stem, text in lines.items():
        # file_name images/train/a.png: images/train/images/train/a.png, labels by the rule
        path = label_path(out / "images" / "train" / "images" / "train" / f"{stem}.png")
        assert path == out / "images" / "train" / "labels" / "train" / f"{stem}.txt"
        assert path.read_text() == text, stem
    # a bad label line stops the conversion with the file and line named
    (tmp_path / "yolo" / "labels" / "train" / "b.txt").write_text("1 0.2 0.8 0.4\n")
    with pytest.raises(YoloFormatError, match=r"b\.txt: line 1: 4 columns"):
        yolo_to_coco(data, "train")
