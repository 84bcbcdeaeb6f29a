"""Tests of the VOC dataset / DataModule on the real VOC-mini and on small synthetic trees."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.io import encode_jpeg, write_file
from torchvision.transforms import v2

from src.data.base import DetectionDataModule
from src.data.transforms import build_transforms
from src.data.voc import (
    VOC_CLASSES,
    VOCAnnotationError,
    VOCDataModule,
    VOCDataset,
    parse_voc_annotation,
)
from src.utils.config import cpu_workers
from tests.conftest import shared_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mini_root() -> Path:
    return shared_data("VOCdevkit-mini", "VOC2012", "Annotations").parents[1]


# --------------------------------------------------------------------------------------------
# synthetic VOCdevkit trees
# --------------------------------------------------------------------------------------------
def obj_xml(name="dog", box=(2, 3, 20, 30), difficult=0, bndbox=True) -> str:
    coords = "".join(
        f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True)
    )
    name_xml = f"<name>{name}</name>" if name is not None else ""
    box_xml = f"<bndbox>{coords}</bndbox>" if bndbox else ""
    return f"<object>{name_xml}<difficult>{difficult}</difficult>{box_xml}</object>"


def ann_xml(objects=(), width=40, height=32, size=True) -> str:
    size_xml = f"<size><width>{width}</width><height>{height}</height><depth>3</depth></size>"
    return f"<annotation>{size_xml if size else ''}{''.join(objects)}</annotation>"


def write_jpeg(path: Path, width=40, height=32, image: torch.Tensor | None = None) -> None:
    if image is None:
        image = torch.full((3, height, width), 90, dtype=torch.uint8)
    write_file(str(path), encode_jpeg(image, quality=95))


def make_voc(
    root: Path,
    annotations: dict[str, str | None],
    year: int = 2007,
    set_name: str = "trainval",
    images: dict[str, torch.Tensor] | None = None,
    missing_images: tuple[str, ...] = (),
) -> Path:
    """Write ``root/VOC{year}`` with the given XML strings (None: no XML file) and JPEGs."""
    base = root / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for image_id, xml in annotations.items():
        if xml is not None:
            (base / "Annotations" / f"{image_id}.xml").write_text(xml)
        if image_id not in missing_images:
            image = (images or {}).get(image_id)
            if image is not None:
                write_jpeg(base / "JPEGImages" / f"{image_id}.jpg", image=image)
            else:
                write_jpeg(base / "JPEGImages" / f"{image_id}.jpg")
    (base / "ImageSets" / "Main" / f"{set_name}.txt").write_text("\n".join(annotations) + "\n")
    return root


# --------------------------------------------------------------------------------------------
# real VOC-mini
# --------------------------------------------------------------------------------------------
def test_real_mini_counts(mini_root, caplog):
    with caplog.at_level(logging.WARNING):
        ds = VOCDataset(mini_root, [[2012, "trainval"]], keep_difficult=True)
    assert not caplog.records
    assert len(ds) == 100
    assert ds.num_objects == 273
    counts = ds.class_counts()
    assert counts.shape == (20,) and bool((counts > 0).all())  # all 20 classes present
    assert counts[VOC_CLASSES.index("person")] == 91
    difficult = [r for r in ds.records if r.difficult.any()]
    assert len(difficult) == 23 and sum(int(r.difficult.sum()) for r in ds.records) == 38

    train = VOCDataset(mini_root, [[2012, "trainval"]], keep_difficult=False)
    assert len(train) == 100 and train.num_objects == 273 - 38
    assert not any(r.difficult.any() for r in train.records)
    assert len(VOCDataset(mini_root, [[2012, "train"]])) == 80
    assert len(VOCDataset(mini_root, [["2012", "val"]])) == 20
    assert VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"


def test_real_mini_item_without_transform(mini_root):
    ds = VOCDataset(mini_root, [[2012, "trainval"]], keep_difficult=True)
    image, target = ds[0]
    assert target["image_id"] == "2007_000027"
    assert image.dtype == torch.float32 and image.shape == (3, 500, 486)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert target["orig_size"].tolist() == [500, 486]
    # XML: person, xmin 174, ymin 101, xmax 349, ymax 351 in a 486x500 image -> (x - 1) / W
    expected = torch.tensor([[173 / 486, 100 / 500, 348 / 486, 350 / 500]])
    torch.testing.assert_close(target["boxes"], expected)
    assert target["labels"].tolist() == [VOC_CLASSES.index("person")]
    assert target["difficult"].tolist() == [False]
    assert target["labels"].dtype == torch.int64 and target["difficult"].dtype == torch.bool
    # what transforms receive: pixel XYXY BoundingBoxes on the original canvas
    raw = ds.raw_target(0)
    assert isinstance(raw["boxes"], tv_tensors.BoundingBoxes)
    assert raw["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(raw["boxes"].canvas_size) == (500, 486)
    assert raw["boxes"].tolist() == [[173.0, 100.0, 348.0, 350.0]]
    # all boxes of the set normalised in [0, 1] and non-degenerate (annotations only)
    for i in range(len(ds)):
        raw = ds.raw_target(i)
        h, w = raw["orig_size"].tolist()
        norm = raw["boxes"].as_subclass(torch.Tensor) / torch.tensor([w, h, w, h])
        assert bool((norm >= 0).all() and (norm <= 1).all())
        assert bool((norm[:, 2:] > norm[:, :2]).all())
        # back to devkit pixels: norm * size + 1
        torch.testing.assert_close(
            norm * torch.tensor([w, h, w, h]) + 1, ds.pixel_target(i)["boxes"]
        )


def test_real_mini_eval_resize_and_flip_boxes_by_hand(mini_root):
    # An image with several objects, incl. a difficult one.
    ds = VOCDataset(mini_root, [[2012, "trainval"]], keep_difficult=True)
    index = next(i for i, r in enumerate(ds.records) if r.difficult.any() and len(r.labels) > 2)
    record = ds.records[index]
    w, h = record.width, record.height
    raw = record.boxes  # devkit pixels
    expected = (raw - 1) / torch.tensor([w, h, w, h])

    ds.transform = build_transforms(train=False, image_size=96)
    image, target = ds[index]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32
    # resize only: normalised boxes are unchanged
    torch.testing.assert_close(target["boxes"], expected, atol=1e-5, rtol=0)
    assert torch.equal(target["difficult"], record.difficult)

    eval_tf = build_transforms(train=False, image_size=96)
    flip = v2.RandomHorizontalFlip(p=1.0)
    ds.transform = lambda img, tgt: eval_tf(*flip(img, tgt))
    flipped, target = ds[index]
    # continuous flip of 0-based pixel boxes: x' = W - x -> normalised 1 - x, corners swapped
    by_hand = torch.stack(
        [1 - expected[:, 2], expected[:, 1], 1 - expected[:, 0], expected[:, 3]], dim=1
    )
    torch.testing.assert_close(target["boxes"], by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped, image.flip(-1), atol=2 / 255, rtol=0)
    assert torch.equal(target["labels"], record.labels)


def test_real_mini_ssd_pipeline_invariants_and_seed(mini_root):
    tf = build_transforms(train=True, image_size=96, augment="ssd")
    ds = VOCDataset(mini_root, [[2012, "val"]], transform=tf, keep_difficult=True)
    for index in range(4):
        record = ds.records[index]
        torch.manual_seed(index)
        image, target = ds[index]
        torch.manual_seed(index)
        again, target2 = ds[index]
        assert torch.equal(image, again) and torch.equal(target["boxes"], target2["boxes"])
        assert image.shape == (3, 96, 96) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        boxes = target["boxes"]
        g = boxes.shape[0]
        assert target["labels"].shape == (g,) and target["difficult"].shape == (g,)
        assert bool(((boxes >= 0) & (boxes <= 1)).all())
        assert bool((boxes[:, 2:] > boxes[:, :2]).all())
        # every kept (label, difficult) pair exists in the annotation
        original = set(zip(record.labels.tolist(), record.difficult.tolist(), strict=True))
        kept = set(zip(target["labels"].tolist(), target["difficult"].tolist(), strict=True))
        assert kept <= original
        assert target["orig_size"].tolist() == [record.height, record.width]


def test_ssd_pipeline_keeps_boxes_on_their_objects(tmp_path):
    """Independent check of box/image consistency under the full SSD augmentation.

    Black image with a white object (class dog) and a mid-grey difficult object (class cat):
    photometric distortion (brightness, contrast, saturation, hue, channel permutation) keeps
    white > grey > black, so after any zoom-out / crop / flip / resize each output box must
    cover a region whose brightness identifies its own label and difficult flag.
    """
    width, height = 112, 80  # not square: a (W, H) mix-up would show
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    white, grey = (16, 12, 48, 40), (66, 30, 100, 70)  # 0-based inclusive pixel boxes
    image[:, white[1] : white[3] + 1, white[0] : white[2] + 1] = 255
    image[:, grey[1] : grey[3] + 1, grey[0] : grey[2] + 1] = 128
    objs = [
        obj_xml("dog", tuple(v + 1 for v in white)),
        obj_xml("cat", tuple(v + 1 for v in grey), difficult=1),
    ]
    root = make_voc(tmp_path, {"000001": ann_xml(objs, width, height)}, images={"000001": image})
    tf = build_transforms(train=True, image_size=64, augment="ssd")
    ds = VOCDataset(root, [[2007, "trainval"]], transform=tf, keep_difficult=True)
    dog, cat = VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")

    def inner_and_ring(gray: torch.Tensor, box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels 2 px inside the box (edges blur) and a 1-px ring 2 px outside it, in-canvas."""
        x0, y0, x1, y1 = (int(round(v)) for v in (box * 64).tolist())
        inner = gray[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2].flatten()
        ring = []
        if y0 - 3 >= 0:
            ring.append(gray[y0 - 3, x0 + 2 : x1 - 2])
        if y1 + 2 < 64:
            ring.append(gray[y1 + 2, x0 + 2 : x1 - 2])
        if x0 - 3 >= 0:
            ring.append(gray[y0 + 2 : y1 - 2, x0 - 3])
        if x1 + 2 < 64:
            ring.append(gray[y0 + 2 : y1 - 2, x1 + 2])
        return inner, torch.cat(ring) if ring else gray.new_zeros(0)

    seen = 0
    for seed in range(25):
        torch.manual_seed(seed)
        out, target = ds[0]
        gray = out.mean(0)
        means = {}
        for box, label, difficult in zip(
            target["boxes"], target["labels"], target["difficult"], strict=True
        ):
            assert int(label) in (dog, cat)
            assert bool(difficult) == (int(label) == cat)
            inner, ring = inner_and_ring(gray, box)
            if inner.numel() < 4:
                continue
            seen += 1
            # the box covers one uniform object region
            assert float(inner.std()) < 0.06, (seed, box)
            means[int(label)] = float(inner.mean())
            # nothing is brighter than the white object: the ring around its box is darker
            if int(label) == dog and ring.numel():
                assert float(ring.mean()) < means[dog] - 0.05, (seed, box)
        if len(means) == 2:  # both visible: the dog (white) is the brighter one
            assert means[dog] > means[cat] + 0.05, seed
    assert seen >= 25


# --------------------------------------------------------------------------------------------
# DataModule and config
# --------------------------------------------------------------------------------------------
def test_datamodule_on_real_mini(mini_root):
    dm = VOCDataModule(
        mini_root,
        train_sets=[[2012, "train"]],
        val_sets=[[2012, "val"]],
        image_size=64,
        batch_size=4,
        num_workers=0,
        pin_memory=False,
    )
    assert dm.classes == list(VOC_CLASSES) and dm.num_classes == 20
    dm.setup("fit")
    assert len(dm.train_dataset) == 80 and len(dm.val_dataset) == 20
    assert not any(r.difficult.any() for r in dm.train_dataset.records)
    assert sum(int(r.difficult.sum()) for r in dm.val_dataset.records) > 0  # eval keeps them
    assert dm.train_dataset.transform.train and dm.train_dataset.transform.augment == "ssd"
    assert not dm.val_dataset.transform.train
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 64, 64) and len(targets) == 4
    assert {"boxes", "labels", "difficult", "orig_size", "image_id"} <= set(targets[0])
    torch.manual_seed(0)
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64)
    dm.setup("test")
    assert dm.test_dataset is dm.val_dataset  # test_sets=None -> val_sets
    assert len(dm.test_dataloader().dataset) == 20


def test_datamodule_validation(mini_root):
    with pytest.raises(TypeError, match="num_classes"):  # the count comes from the classes
        VOCDataModule(mini_root, num_classes=21)
    with pytest.raises(ValueError, match="data.unknown_classes must be one of error, skip"):
        VOCDataModule(mini_root, classes=["cat"], unknown_classes="ignore")
    with pytest.raises(ValueError, match="class 'cat' is given twice"):
        VOCDataModule(mini_root, classes=["cat", "dog", "cat"])
    with pytest.raises(FileNotFoundError, match=r"data\.classes=nope\.txt: no such file"):
        VOCDataModule(mini_root, classes="nope.txt")
    with pytest.raises(ValueError, match="data.augment"):
        VOCDataModule(mini_root, augment="mosaic")
    with pytest.raises(ValueError, match="data.train_sets"):
        VOCDataModule(mini_root, train_sets=[2007, "trainval"])
    with pytest.raises(ValueError, match="data.batch_size"):
        VOCDataModule(mini_root, batch_size=0)
    dm = VOCDataModule(mini_root, test_sets=[[2012, "train"]], num_workers=0)
    with pytest.raises(RuntimeError, match="before setup"):
        dm.train_dataloader()
    dm.setup("test")
    assert dm.val_dataset is None and len(dm.test_dataset) == 80


def test_configs_compose_and_instantiate(mini_root, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "data", conf / "data")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "VOCdevkit-mini").symlink_to(mini_root.resolve(), target_is_directory=True)
    (conf / "main.yaml").write_text(
        "defaults:\n  - data: voc\n  - _self_\n"
        f"paths:\n  data_dir: {data_dir}\nbackbone:\n  image_size: 64\n"
    )
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="main")
        assert cfg.data._target_ == "src.data.base.DetectionDataModule"
        assert cfg.data.train._target_ == "src.data.voc.VOCDataset"
        assert cfg.data.root == f"{data_dir}/VOCdevkit"
        assert OmegaConf.to_container(cfg.data.train_sets) == [
            [2007, "trainval"],
            [2012, "trainval"],
        ]
        assert OmegaConf.to_container(cfg.data.val_sets) == [[2007, "test"]]
        assert cfg.data.image_size == 64 and "num_classes" not in cfg.data
        assert cfg.data.classes is None and cfg.data.unknown_classes == "error"
        # 4 workers, at most the usable cores (${cpu_workers:4})
        workers = cpu_workers(4)
        assert (cfg.data.batch_size, cfg.data.num_workers, cfg.data.augment) == (32, workers, "ssd")
        assert cfg.data.keep_difficult is False and cfg.data.skip_invalid is False

        mini = compose(config_name="main", overrides=["data=voc_mini"])
        assert mini.data.root == f"{data_dir}/VOCdevkit-mini"
        assert (mini.data.batch_size, mini.data.num_workers) == (8, 0)
        dm = instantiate(mini.data, pin_memory=False)
    assert isinstance(dm, DetectionDataModule) and dm.classes == list(VOC_CLASSES)
    assert dm.hparams["train_sets"] == [[2012, "trainval"]]
    assert dm.hparams["val_sets"] == [[2012, "val"]] and dm.hparams["batch_size"] == 8
    assert dm.test_is_val()  # test_sets defaults to val_sets: one dataset serves both
    dm.setup("test")
    assert len(dm.val_dataset) == 20 and dm.test_dataset is dm.val_dataset
    assert dm.train_dataset is None


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
GOOD = ann_xml([obj_xml("dog"), obj_xml("cat", (5, 5, 10, 9))])

OBJECT_PROBLEMS = {
    "unknown class": (obj_xml("dragon"), r"object 1 \('dragon'\): unknown class name 'dragon'"),
    "missing name": (obj_xml(None), r"object 1 \(None\): missing <name>"),
    "missing bndbox": (obj_xml("dog", bndbox=False), r"object 1 \('dog'\): missing <bndbox>"),
    "missing coordinate": (
        "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox>"
        "</object>",
        r"object 1 \('dog'\): missing <bndbox>/<ymax>",
    ),
    "non-numeric": (obj_xml("dog", (1, 1, "ten", 9)), r"<bndbox>/<xmax> is not a number: 'ten'"),
    "outside": (obj_xml("dog", (1, 1, 41, 9)), r"object 1 \('dog'\): box .* outside the 40x32"),
    "degenerate": (obj_xml("dog", (10, 1, 10, 9)), r"object 1 \('dog'\): degenerate box"),
    "bad difficult": (obj_xml("dog", difficult="yes"), r"<difficult> must be 0 or 1"),
}


@pytest.mark.parametrize("problem", sorted(OBJECT_PROBLEMS))
def test_invalid_object_raises_or_is_skipped(tmp_path, caplog, problem):
    bad_obj, message = OBJECT_PROBLEMS[problem]
    xml = ann_xml([obj_xml("dog"), bad_obj, obj_xml("cat", (5, 5, 10, 9))])
    root = make_voc(tmp_path, {"000001": GOOD, "000002": xml})
    with pytest.raises(VOCAnnotationError, match=message) as info:
        VOCDataset(root, [[2007, "trainval"]])
    assert "000002.xml" in str(info.value)

    with caplog.at_level(logging.WARNING, logger="src.data.voc"):
        ds = VOCDataset(root, [[2007, "trainval"]], skip_invalid=True)
    assert len(ds) == 2 and ds.num_skipped_objects == 1 and ds.num_skipped_images == 0
    assert ds.records[1].labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    warning = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 invalid object(s) and 0 image(s)" in warning and "000002.xml" in warning


FILE_PROBLEMS = {
    "parse error": ("<annotation><size>", None, r"000002\.xml: malformed annotation XML"),
    "missing size": (ann_xml([obj_xml()], size=False), None, r"000002\.xml: missing <size>"),
    "missing width": (
        "<annotation><size><height>5</height></size></annotation>",
        None,
        r"missing <size>/<width>",
    ),
    "non-numeric size": (ann_xml(width="big"), None, r"<size>/<width> is not a number: 'big'"),
    "missing annotation": (None, None, r"000002\.xml: annotation file missing .*trainval\.txt"),
    "missing image": (GOOD, "000002", r"000002\.jpg: image file missing"),
}


@pytest.mark.parametrize("problem", sorted(FILE_PROBLEMS))
def test_invalid_file_raises_or_skips_image(tmp_path, caplog, problem):
    xml, missing_image, message = FILE_PROBLEMS[problem]
    missing = (missing_image,) if missing_image else ()
    root = make_voc(tmp_path, {"000001": GOOD, "000002": xml}, missing_images=missing)
    with pytest.raises(VOCAnnotationError, match=message):
        VOCDataset(root, [[2007, "trainval"]])
    with caplog.at_level(logging.WARNING, logger="src.data.voc"):
        ds = VOCDataset(root, [[2007, "trainval"]], skip_invalid=True)
    assert [r.image_id for r in ds.records] == ["000001"]
    assert ds.num_skipped_images == 1
    assert "skipped 0 invalid object(s) and 1 image(s)" in caplog.text


def test_missing_root_set_file_and_year(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does-not-exist.*set data\.root"):
        VOCDataset(tmp_path / "does-not-exist")
    root = make_voc(tmp_path / "VOCdevkit", {"000001": GOOD})
    with pytest.raises(
        FileNotFoundError,
        match=r"ImageSets/Main/test\.txt does not exist.*"
        r"data\.train_sets.*available sets for VOC2007: \['trainval'\]",
    ):
        VOCDataset(root, [[2007, "test"]])
    with pytest.raises(FileNotFoundError, match=r"VOC2012 does not exist \(set data\.root"):
        VOCDataset(root, [[2012, "trainval"]])
    # root pointing one level too high: the message says where the VOCdevkit folder is
    with pytest.raises(FileNotFoundError, match=r"set data\.root to that directory"):
        VOCDataset(tmp_path, [[2007, "trainval"]])
    with pytest.raises(ValueError, match="image_sets must be a list of"):
        VOCDataset(root, "2007/trainval")


def test_image_without_objects_zero_and_float_coordinates(tmp_path):
    root = make_voc(
        tmp_path,
        {
            "000001": ann_xml([]),
            "000002": ann_xml([obj_xml("dog", ("0", "1.5", "40", "32.0"))]),
            "000003": ann_xml([obj_xml("cat", difficult=1)]),
        },
    )
    ds = VOCDataset(root, [[2007, "trainval"]])
    image, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["difficult"].shape == (0,)
    # coordinate 0 tolerated (clamped to the border); full-width box up to (W - 1) / W
    _, target = ds[1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0.5 / 32, 39 / 40, 31 / 32]]))
    # only a difficult object, dropped for training: G = 0
    assert ds.records[2].labels.numel() == 0
    # the SSD pipeline and the collate function accept G = 0
    ds.transform = build_transforms(train=True, image_size=32, augment="ssd")
    torch.manual_seed(0)
    for i in (0, 2):
        image, target = ds[i]
        assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4)


def test_image_size_mismatch_and_corrupt_jpeg(tmp_path):
    root = make_voc(tmp_path, {"000001": ann_xml([obj_xml()], width=50), "000002": GOOD})
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").write_bytes(b"not a jpeg")
    ds = VOCDataset(root, [[2007, "trainval"]])
    with pytest.raises(VOCAnnotationError, match=r"000001\.jpg: image is 40x32 .* says 50x32"):
        ds[0]
    with pytest.raises(VOCAnnotationError, match=r"000002\.jpg: cannot decode image"):
        ds[1]


def test_parse_voc_annotation_returns_difficult_and_raw_pixels(tmp_path):
    path = tmp_path / "Annotations" / "x.xml"
    path.parent.mkdir()
    path.write_text(ann_xml([obj_xml("bus", (1, 2, 30, 31)), obj_xml("car", difficult=1)]))
    record, skipped = parse_voc_annotation(path)
    assert skipped == []
    assert record.image_path == tmp_path / "JPEGImages" / "x.jpg"
    assert record.boxes.tolist() == [[1, 2, 30, 31], [2, 3, 20, 30]]
    assert record.labels.tolist() == [VOC_CLASSES.index("bus"), VOC_CLASSES.index("car")]
    assert record.difficult.tolist() == [False, True]


# --------------------------------------------------------------------------------------------
# your own classes
# --------------------------------------------------------------------------------------------
def test_own_classes_error_or_skip_unknown(tmp_path, caplog):
    xml = ann_xml([obj_xml("dog"), obj_xml("person", (5, 5, 10, 9)), obj_xml("cat", (3, 3, 9, 9))])
    root = make_voc(tmp_path, {"000001": xml, "000002": ann_xml([obj_xml("person")])})
    with pytest.raises(VOCAnnotationError, match=r"000001\.xml: object 1 \('person'\): unknown"):
        VOCDataset(root, [[2007, "trainval"]], classes=["cat", "dog"])
    with pytest.raises(VOCAnnotationError, match=r"set data\.unknown_classes=skip"):
        VOCDataset(root, [[2007, "trainval"]], classes=["cat", "dog"])
    with caplog.at_level(logging.INFO, logger="src.data.voc"):
        ds = VOCDataset(root, [[2007, "trainval"]], classes=["cat", "dog"], unknown_classes="skip")
    assert ds.classes == ("cat", "dog") and ds.num_classes == 2
    assert ds.records[0].labels.tolist() == [1, 0]  # dog -> 1, cat -> 0 (file order kept)
    assert ds.records[0].unknown == ("person",) and ds.num_unknown_objects == 2
    assert len(ds) == 2 and ds.records[1].labels.numel() == 0  # a background image now
    assert ds.num_skipped_objects == 0  # not invalid: just another class
    assert "left out 2 object(s) of classes not in data.classes: person (2)" in caplog.text
    assert ds.class_counts().tolist() == [1, 1]


def test_own_classes_from_a_file_and_config(tmp_path, mini_root):
    names = tmp_path / "classes.txt"
    names.write_text("# my classes\nperson\n\ndog\n")
    dm = VOCDataModule(
        mini_root,
        train_sets=[[2012, "trainval"]],
        val_sets=[[2012, "val"]],
        classes=str(names),
        unknown_classes="skip",
        image_size=64,
        num_workers=0,
        pin_memory=False,
    )
    assert dm.classes == ["person", "dog"] and dm.num_classes == 2 and dm.category_ids == [1, 2]
    dm.setup("fit")
    full = VOCDataset(mini_root, [[2012, "trainval"]]).class_counts()
    expected = [int(full[VOC_CLASSES.index("person")]), int(full[VOC_CLASSES.index("dog")])]
    assert dm.train_dataset.class_counts().tolist() == expected  # only those objects
    assert len(dm.train_dataset) == 100  # images without them stay as background
    labels = torch.cat([r.labels for r in dm.val_dataset.records])
    assert set(labels.tolist()) <= {0, 1}
    (tmp_path / "dup.txt").write_text("dog\nperson\ndog\n")
    with pytest.raises(ValueError, match=r"dup\.txt: class 'dog' is given twice"):
        VOCDataModule(mini_root, classes=str(tmp_path / "dup.txt"))


def test_own_classes_train_a_two_class_model(tmp_path, mini_root):
    from src.train import train
    from tests.conftest import compose_config

    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "data=voc_mini",
            f"data.root={mini_root}",
            "data.classes=[person,dog]",
            "data.unknown_classes=skip",
            "data.batch_size=2",
            "backbone=tiny",
            "backbone.image_size=128",
            "trainer.accelerator=cpu",
            "debug=fdr",
        ],
    )
    _, objects = train(cfg)
    assert objects["model"].net.num_classes == 2
    assert objects["model"].class_names == ["person", "dog"]


def test_skip_invalid_also_skips_images_that_do_not_decode(tmp_path, caplog):
    root = make_voc(tmp_path, {"000001": GOOD, "000002": GOOD})
    (root / "VOC2007" / "JPEGImages" / "000002.jpg").write_bytes(b"this is not a JPEG")
    ds = VOCDataset(root, [[2007, "trainval"]])  # without skip_invalid: found when loaded
    assert len(ds) == 2
    with pytest.raises(Exception, match="000002.jpg"):
        ds[1]
    with caplog.at_level(logging.WARNING, logger="src.data.voc"):
        ds = VOCDataset(root, [[2007, "trainval"]], skip_invalid=True)
    assert [r.image_id for r in ds.records] == ["000001"] and ds.num_skipped_images == 1
    assert "skipped 0 invalid object(s) and 1 image(s)" in caplog.text
    assert "000002.jpg" in caplog.text and "delete" not in caplog.text
