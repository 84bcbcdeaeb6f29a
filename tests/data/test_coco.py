"""COCO-format data: loader, categories, crowd, background images, every bad input, results."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision
from torchvision.io import encode_png, write_file

from src.data.coco import CocoDataModule, CocoDataset, CocoFormatError, load_coco_json
from src.data.coco_results import (
    COCO_IOU_THRESHOLDS,
    COCO_REC_THRESHOLDS,
    coco_evaluate,
    coco_results,
    write_coco_results,
)
from src.data.convert import main as convert_main
from src.data.convert import voc_to_coco
from src.data.voc import VOC_CLASSES, VOCDataset
from tests.conftest import shared_data

W, H = 40, 30


def write_image(path: Path, width: int = W, height: int = H, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = torch.full((3, height, width), value, dtype=torch.uint8)
    write_file(str(path), encode_png(image))


def small_coco() -> dict:
    """Three 40x30 images; categories with non-contiguous ids listed out of order."""
    return {
        "images": [
            {"id": 10, "file_name": "a.png", "width": W, "height": H},
            {"id": 11, "file_name": "sub/b.png", "width": W, "height": H},
            {"id": 12, "file_name": "empty.png", "width": W, "height": H},
        ],
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [4, 3, 10, 12], "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 0, 20, 30], "iscrowd": 0},
            {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 8, 6], "iscrowd": 1},
            {"id": 4, "image_id": 11, "category_id": 7, "bbox": [-0.5, 2, 40.8, 10]},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }


def write_coco(tmp_path: Path, data: dict, name: str = "train.json") -> tuple[Path, Path]:
    images = tmp_path / "images"
    for entry in data.get("images", []):
        if (
            isinstance(entry, dict)
            and "file_name" in entry
            and not (images / entry["file_name"]).exists()
        ):
            write_image(images / entry["file_name"])
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path, images


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------
def test_categories_sorted_by_id_map_to_contiguous_labels(tmp_path: Path) -> None:
    json_path, images = write_coco(tmp_path, small_coco())
    ds = CocoDataset(json_path, images)
    assert ds.classes == ("dog", "cat") and ds.category_ids == [3, 7]
    assert len(ds) == 3 and ds.image_ids == [10, 11, 12]
    image, target = ds[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    # [x, y, w, h] pixels -> (x / W, y / H, (x + w) / W, (y + h) / H), JSON order kept
    expected = torch.tensor([[4 / W, 3 / H, 14 / W, 15 / H], [20 / W, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [1, 0]  # cat (id 7) -> 1, dog (id 3) -> 0
    assert target["image_id"] == 10 and target["coco_image_id"] == 10
    assert target["orig_size"].tolist() == [H, W]
    assert target["iscrowd"].tolist() == [False, False]
    assert ds.annotation_ids == [1, 2, 3, 4]


def test_crowd_kept_for_eval_left_out_of_training_and_box_clamped(tmp_path: Path) -> None:
    json_path, images = write_coco(tmp_path, small_coco())
    evaluation = CocoDataset(json_path, images, keep_crowd=True)
    raw = evaluation.raw_target(1)
    assert raw["iscrowd"].tolist() == [True, False] and raw["difficult"].tolist() == [True, False]
    # annotation 4 sticks out by 0.5 px left and 0.3 px right: within 1 px, clamped to the image
    assert raw["boxes"].tolist()[1] == [0.0, 2.0, 40.0, 12.0]
    training = CocoDataset(json_path, images, keep_crowd=False)
    raw = training.raw_target(1)
    assert raw["labels"].tolist() == [1] and raw["iscrowd"].tolist() == [False]
    assert training.num_crowd_left_out == 1 and training.num_objects == 3
    # background image: kept, no boxes
    image, target = training[2]
    assert image.shape == (3, H, W) and target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_ground_truth_export_round_trips(tmp_path: Path) -> None:
    data = small_coco()
    json_path, images = write_coco(tmp_path, data)
    ds = CocoDataset(json_path, images)
    exported = ds.coco_ground_truth(ds.category_ids)
    assert [i["id"] for i in exported["images"]] == [10, 11, 12]
    assert exported["categories"][0] == {"id": 3, "name": "dog", "supercategory": "none"}
    by_box = {tuple(a["bbox"]): a for a in exported["annotations"]}
    ann = by_box[(4.0, 3.0, 10.0, 12.0)]
    assert (ann["image_id"], ann["category_id"], ann["iscrowd"], ann["area"]) == (10, 7, 0, 120.0)
    assert by_box[(0.0, 0.0, 8.0, 6.0)]["iscrowd"] == 1


def test_datamodule_classes_before_setup_and_loaders(tmp_path: Path) -> None:
    json_path, images = write_coco(tmp_path, small_coco())
    dm = CocoDataModule(
        json_path,
        images,
        json_path,
        images,
        image_size=32,
        batch_size=3,
        num_workers=0,
        pin_memory=False,
    )
    assert dm.classes == ["dog", "cat"] and dm.num_classes == 2 and dm.category_ids == [3, 7]
    dm.setup("fit")
    assert dm.train_dataset.num_objects == 3 and dm.val_dataset.num_objects == 4
    images_batch, targets = next(iter(dm.val_dataloader()))
    assert images_batch.shape == (3, 3, 32, 32)
    assert [t["coco_image_id"] for t in targets] == [10, 11, 12]
    torch.manual_seed(0)
    images_batch, targets = next(iter(dm.train_dataloader()))
    assert images_batch.shape == (3, 3, 32, 32)
    assert not any(bool(t["iscrowd"].any()) for t in targets)
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # no test_json: the validation split


def test_datamodule_config_errors(tmp_path: Path) -> None:
    json_path, images = write_coco(tmp_path, small_coco())
    with pytest.raises(FileNotFoundError, match=r"data\.train_json=.*nope\.json: no such file"):
        CocoDataModule(tmp_path / "nope.json", images, json_path, images)
    with pytest.raises(ValueError, match=r"data\.test_json and data\.test_images go together"):
        CocoDataModule(json_path, images, json_path, images, test_json=json_path)
    renamed = small_coco()
    renamed["categories"][1]["name"] = "puppy"
    val_path, _ = write_coco(tmp_path, renamed, "val.json")
    dm = CocoDataModule(json_path, images, val_path, images, num_workers=0)
    with pytest.raises(
        CocoFormatError, match=r"val\.json: category id 3 is named 'puppy' but 'dog'"
    ):
        dm.setup("validate")
    with pytest.raises(TypeError, match="num_classes"):
        CocoDataModule(json_path, images, json_path, images, num_classes=2)


# --------------------------------------------------------------------------------------------
# bad input: each names the file and the image / annotation id; skip_invalid warns and goes on
# --------------------------------------------------------------------------------------------
def _set_ann(index: int, **fields):
    def edit(data: dict) -> None:
        data["annotations"][index].update(fields)

    return edit


def _duplicate_image(data: dict) -> None:
    data["images"].append({"id": 11, "file_name": "c.png", "width": W, "height": H})


def _missing_file(data: dict) -> None:
    data["images"][1]["file_name"] = "gone.png"


BAD_INPUT = {
    "unknown image_id": (
        _set_ann(0, image_id=99),
        r"annotation id 1 \(image id 99\): unknown image_id 99",
        1,
        0,
    ),
    "unknown category_id": (
        _set_ann(1, category_id=5),
        r"annotation id 2 \(image id 10\): unknown category_id 5; known ids \[3, 7\]",
        1,
        0,
    ),
    "zero width": (
        _set_ann(0, bbox=[4, 3, 0, 12]),
        r"annotation id 1 .*zero or negative width",
        1,
        0,
    ),
    "negative height": (
        _set_ann(1, bbox=[4, 3, 5, -2]),
        r"annotation id 2 .*zero or negative width or height",
        1,
        0,
    ),
    "outside by more than 1 px": (
        _set_ann(0, bbox=[30, 3, 11.5, 12]),
        r"annotation id 1 \(image id 10\): bbox .* outside the 40x30 image by more than 1 pixel",
        1,
        0,
    ),
    "duplicate image id": (_duplicate_image, r"duplicate image id 11", 0, 1),
    "missing image file": (
        _missing_file,
        r"image id 11: image file .*gone\.png is missing",
        2,  # its two annotations go with it
        1,
    ),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUT))
def test_bad_input_raises_or_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, problem: str
) -> None:
    edit, message, skipped_objects, skipped_images = BAD_INPUT[problem]
    data = small_coco()
    json_path, images = write_coco(tmp_path, data)  # images of the good file
    edit(data)
    json_path.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=message) as info:
        CocoDataset(json_path, images)
    assert str(json_path) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="src.data.coco"):
        ds = CocoDataset(json_path, images, skip_invalid=True)
    assert ds.num_skipped_objects == skipped_objects and ds.num_skipped_images == skipped_images
    assert len(ds) == (2 if problem == "missing image file" else 3)
    assert ds.num_objects == 4 - skipped_objects
    assert (
        f"skipped {skipped_objects} invalid object(s) and {skipped_images} image(s)" in caplog.text
    )
    assert str(json_path) in caplog.text


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_json_that_is_not_coco(tmp_path: Path, key: str) -> None:
    data = small_coco()
    del data[key]
    json_path, images = write_coco(tmp_path, data)
    with pytest.raises(
        CocoFormatError, match=rf"train\.json: not a COCO detection file: missing '{key}'"
    ):
        CocoDataset(json_path, images)
    json_path.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]))
    with pytest.raises(CocoFormatError, match="top level is a list"):
        load_coco_json(json_path)
    json_path.write_text("{not json")
    with pytest.raises(CocoFormatError, match=r"train\.json: not valid JSON"):
        load_coco_json(json_path)


def test_undecodable_image_and_size_mismatch_name_the_file(tmp_path: Path) -> None:
    data = small_coco()
    data["images"][0]["width"] = 41
    json_path, images = write_coco(tmp_path, data)
    (images / "sub" / "b.png").write_bytes(b"\x89PNG broken")
    ds = CocoDataset(json_path, images)
    with pytest.raises(
        CocoFormatError, match=r"a\.png: image is 40x30 \(WxH\) but its annotation says 41x30"
    ):
        ds[0]
    with pytest.raises(CocoFormatError, match=r"b\.png: cannot decode image"):
        ds[1]


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def test_coco_results_by_hand_and_category_ids_round_trip(tmp_path: Path) -> None:
    detections = [
        {
            "boxes": torch.tensor([[4.0, 3.0, 14.0, 15.0], [20.0, 0.0, 40.0, 30.0]]),
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([1, 0]),
        },
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
        },
        {
            "boxes": torch.tensor([[1.0, 2.0, 3.0, 6.0]]),
            "scores": torch.tensor([0.5]),
            "labels": torch.tensor([1]),
        },
    ]
    results = coco_results(detections, [10, 11, 12], [3, 7])
    assert results == [
        {
            "image_id": 10,
            "category_id": 7,
            "bbox": [4.0, 3.0, 10.0, 12.0],
            "score": pytest.approx(0.9),
        },
        {
            "image_id": 10,
            "category_id": 3,
            "bbox": [20.0, 0.0, 20.0, 30.0],
            "score": pytest.approx(0.25),
        },
        {
            "image_id": 12,
            "category_id": 7,
            "bbox": [1.0, 2.0, 2.0, 4.0],
            "score": pytest.approx(0.5),
        },
    ]
    path = write_coco_results(tmp_path / "out" / "detections.json", results)
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    # the ground truth's own boxes as detections: every category id found again, AP = 1
    json_path, images = write_coco(tmp_path, small_coco())
    ds = CocoDataset(json_path, images)
    perfect = []
    for i in range(len(ds)):
        ann = ds.pixel_annotations(i)
        keep = ~ann["iscrowd"]
        perfect.append(
            {
                "boxes": ann["boxes"][keep],
                "labels": ann["labels"][keep],
                "scores": torch.ones(int(keep.sum())),
            }
        )
    results = coco_results(perfect, ds.image_ids, ds.category_ids)
    gt = load_coco_json(json_path)
    assert sorted((r["image_id"], r["category_id"]) for r in results) == sorted(
        (a["image_id"], a["category_id"]) for a in gt["annotations"] if not a.get("iscrowd")
    )
    stats = coco_evaluate(json_path, results)
    assert stats["map"] == pytest.approx(1.0) and stats["map_50"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        coco_results(
            [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([2])}],
            [1],
            [3, 7],
        )
    with pytest.raises(ValueError, match="2 detection dicts but 1 image ids"):
        coco_results(detections[:2], [1], [3, 7])


def test_coco_evaluate_without_detections(tmp_path: Path) -> None:
    json_path, _ = write_coco(tmp_path, small_coco())
    stats = coco_evaluate(json_path, [])
    assert stats["map"] == 0.0 and stats["map_50"] == 0.0


# --------------------------------------------------------------------------------------------
# real VOC-mini converted to COCO
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def voc_mini_coco(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = shared_data("VOCdevkit-mini", "VOC2012").parent
    out = tmp_path_factory.mktemp("coco") / "trainval.json"
    assert (
        convert_main(["voc2coco", "--root", str(root), "--split", "trainval", "--out", str(out)])
        == 0
    )
    return out, root


def test_voc_mini_as_coco_equals_the_voc_loader(
    voc_mini_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    json_path, root = voc_mini_coco
    data = load_coco_json(json_path)
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in data["categories"]] == list(range(1, 21))
    assert len(data["images"]) == 100 and len(data["annotations"]) == 273
    assert sum(a["iscrowd"] for a in data["annotations"]) == 38  # the difficult objects
    coco = CocoDataset(json_path, root)
    voc = VOCDataset(root, [[2012, "trainval"]], keep_difficult=True)
    assert coco.classes == VOC_CLASSES and len(coco) == len(voc) == 100
    for i in range(len(coco)):
        a, b = coco.raw_target(i), voc.raw_target(i)
        torch.testing.assert_close(
            a["boxes"].as_subclass(torch.Tensor),
            b["boxes"].as_subclass(torch.Tensor),
            atol=1e-4,
            rtol=0,
        )
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["iscrowd"], b["difficult"])
        assert a["orig_size"].tolist() == b["orig_size"].tolist()
    training = CocoDataset(json_path, root, keep_crowd=False)
    assert training.num_objects == 273 - 38
    # an image whose annotations are removed stays, as a background image
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 1]
    empty_json = tmp_path / "empty.json"
    empty_json.write_text(json.dumps(data))
    ds = CocoDataset(empty_json, root)
    assert len(ds) == 100 and ds.raw_target(0)["boxes"].shape == (0, 4)


def _voc_detections(path: Path) -> dict[str, torch.Tensor]:
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return {
        # devkit pixels (1-based) to the project's 0-based frame, as the ground truth
        "boxes": torch.tensor([[float(v) - 1 for v in r[2:6]] for r in rows]).reshape(-1, 4),
        "scores": torch.tensor([float(r[1]) for r in rows]),
        "labels": torch.tensor([VOC_CLASSES.index(r[0]) for r in rows], dtype=torch.int64),
    }


def test_cocoeval_of_written_results_equals_torchmetrics(
    voc_mini_coco: tuple[Path, Path], tmp_path: Path
) -> None:
    """pycocotools on detections.json == torchmetrics on the project's pixel boxes (crowd too)."""
    json_path, root = voc_mini_coco
    detections_dir = shared_data("voc-mini-detections")
    dataset = CocoDataset(json_path, root)
    voc_ids = {i["id"]: i["voc_id"] for i in load_coco_json(json_path)["images"]}
    preds, targets, ids = [], [], []
    for i in range(len(dataset)):
        raw = dataset.raw_target(i)
        h, w = raw["orig_size"].tolist()
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        # ground truth as the module sees it: normalised xyxy back to pixels with orig_size
        norm = raw["boxes"].as_subclass(torch.Tensor) / scale
        targets.append(
            {"boxes": norm * scale, "labels": raw["labels"], "iscrowd": raw["iscrowd"].long()}
        )
        preds.append(_voc_detections(detections_dir / f"{voc_ids[raw['coco_image_id']]}.txt"))
        ids.append(raw["coco_image_id"])
    assert sum(len(p["labels"]) for p in preds) > 100
    assert sum(int(t["iscrowd"].sum()) for t in targets) == 38
    path = write_coco_results(
        tmp_path / "detections.json", coco_results(preds, ids, dataset.category_ids)
    )
    stats = coco_evaluate(json_path, path)
    # with pycocotools' float64 thresholds torchmetrics gives COCOeval's figures
    metric = MeanAveragePrecision(
        box_format="xyxy", iou_thresholds=COCO_IOU_THRESHOLDS, rec_thresholds=COCO_REC_THRESHOLDS
    )
    metric.update(copy.deepcopy(preds), targets)
    expected = metric.compute()
    assert abs(stats["map"] - float(expected["map"])) < 1e-4
    assert abs(stats["map_50"] - float(expected["map_50"])) < 1e-4
    # torchmetrics' default (float32) thresholds: map_50 agrees (0.5 is exact in float32)
    default = MeanAveragePrecision(box_format="xyxy")
    default.update(copy.deepcopy(preds), targets)
    assert abs(stats["map_50"] - float(default.compute()["map_50"])) < 1e-4
    assert 0.3 < stats["map_50"] < 0.9  # real detections: a meaningful, non-trivial figure


def test_voc2coco_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code = convert_main(
            [
                "voc2coco",
                "--root",
                str(tmp_path / "none"),
                "--split",
                "val",
                "--out",
                str(tmp_path / "x.json"),
            ]
        )
    assert code == 2 and "none does not exist" in caplog.text
    (tmp_path / "VOC2012").mkdir()
    with pytest.raises(
        FileNotFoundError, match=r"no VOC\{year\}/ImageSets/Main/val\.txt .*\['VOC2012'\]"
    ):
        voc_to_coco(tmp_path, "val")
    with pytest.raises(ValueError, match="--difficult must be one of crowd, keep, drop"):
        voc_to_coco(tmp_path, "val", difficult="ignore")
