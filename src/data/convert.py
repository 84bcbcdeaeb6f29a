"""Dataset format conversion: ``python -m src.data.convert voc2coco ...``.

``voc2coco`` writes one COCO detection JSON for a VOCdevkit split::

    python -m src.data.convert voc2coco --root data/VOCdevkit --split trainval --out voc.json

* images: every ``VOC{year}`` under ``--root`` that has ``ImageSets/Main/{split}.txt`` (or the
  ``--year`` given), ids ``1..N`` in ImageSets order, ``file_name`` relative to ``--root``
  (``VOC2012/JPEGImages/2007_000027.jpg``): train with ``data.train_images=<root>``;
* categories: the 20 VOC classes (or ``--classes``), ids ``1..C`` in that order;
* boxes: devkit pixels (1-based, inclusive) become COCO ``[xmin - 1, ymin - 1, xmax - xmin,
  ymax - ymin]``, the frame :class:`src.data.voc.VOCDataset` uses, so the COCO loader gives the
  same normalised boxes as the VOC loader;
* difficult objects: ``--difficult crowd`` (default) writes them with ``iscrowd: 1``, so they
  stay out of training and COCO evaluation ignores them as the VOC devkit does; ``keep`` writes
  them as ordinary objects, ``drop`` leaves them out.

``coco2yolo`` writes one COCO split as an Ultralytics YOLO dataset::

    python -m src.data.convert coco2yolo --json train.json --images images/ --out yolo/ \
        --split train

* images: linked (``--copy``: copied) to ``<out>/images/<split>/<file_name>``;
* labels: ``<out>/labels/<split>/<file_name stem>.txt``, one ``class cx cy w h`` line per
  annotation in JSON order, normalised by the image size, 10 significant digits; an image
  without annotations gets an empty file (a background image); crowd regions are left out
  (YOLO has no crowd flag) and counted;
* ``<out>/data.yaml``: ``path`` (absolute), ``<split>: images/<split>``, ``names`` (the categories
  sorted by id, as the COCO loader orders them) and ``category_ids`` (their COCO ids, so that
  results files and ``yolo2coco`` keep them). Convert ``train`` and ``val`` into the same
  ``--out``: the yaml gains one key per split.

``yolo2coco`` writes one split of a YOLO dataset as COCO JSON::

    python -m src.data.convert yolo2coco --data yolo/data.yaml --split val --out val.json

* images: ids ``1..N`` in the split's (sorted) order, ``file_name`` relative to the yaml's
  ``path`` (train with ``data.val_images=<path>``), sizes from the image headers;
* categories: ``names`` with the yaml's ``category_ids`` (else ``1..C``);
* boxes: ``[x, y, w, h]`` pixels computed in float64 from the normalised lines.

COCO -> YOLO -> COCO gives the same categories and boxes (to 1e-9 of the image size); YOLO ->
COCO -> YOLO gives the same label lines (numbers compared as values: ``0.500`` is written
``0.5``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torchvision.ops import box_convert

from src.data.base import read_class_names, read_image_size
from src.data.coco import CocoDataset, load_coco_json
from src.data.voc import VOC_CLASSES, VOCDataset
from src.data.yolo import YoloFormatError, image_files, label_path, load_dataset_yaml, read_labels

log = logging.getLogger(__name__)

__all__ = ["DIFFICULT_MODES", "coco_to_yolo", "main", "voc_to_coco", "yolo_to_coco"]

DIFFICULT_MODES: tuple[str, ...] = ("crowd", "keep", "drop")
#: significant digits of the numbers coco2yolo writes
YOLO_DIGITS = 10


def _years_with_split(root: Path, split: str) -> list[str]:
    """Years ``Y`` with ``root/VOC{Y}/ImageSets/Main/{split}.txt``."""
    return sorted(
        p.name[3:]
        for p in root.glob("VOC*")
        if (p / "ImageSets" / "Main" / f"{split}.txt").is_file()
    )


def voc_to_coco(
    root: str | Path,
    split: str,
    years: Sequence[str | int] | None = None,
    classes: Sequence[str] = VOC_CLASSES,
    unknown_classes: str = "error",
    difficult: str = "crowd",
) -> dict[str, Any]:
    """A VOCdevkit split as a COCO detection dict.

    Args:
        root: the VOCdevkit directory.
        split: the image set (``train``, ``val``, ``trainval``, ``test``).
        years: the ``VOC{year}`` folders to read (default: every one that has ``split``).
        classes: the class names (category ids ``1..C`` in this order).
        unknown_classes: ``"error"`` or ``"skip"`` for objects of other classes.
        difficult: ``"crowd"``, ``"keep"`` or ``"drop"`` (see the module docstring).

    Returns:
        ``{"images", "annotations", "categories"}`` ready for ``json.dump``.

    Raises:
        FileNotFoundError: ``root`` or the split is missing (the message lists what exists).
        ValueError: unknown ``difficult`` mode.
        VOCAnnotationError: an invalid annotation (file and object named).
    """
    root = Path(root).expanduser()
    if difficult not in DIFFICULT_MODES:
        raise ValueError(
            f"--difficult must be one of {', '.join(DIFFICULT_MODES)}, got {difficult!r}"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} does not exist; give the VOCdevkit directory")
    chosen = [str(y) for y in years] if years else _years_with_split(root, split)
    if not chosen:
        found = sorted(p.name for p in root.glob("VOC*")) or "no VOC* folders"
        raise FileNotFoundError(
            f"no VOC{{year}}/ImageSets/Main/{split}.txt under {root} (found {found}); check "
            "--root (the VOCdevkit directory) and --split"
        )
    dataset = VOCDataset(
        root,
        [[y, split] for y in chosen],
        keep_difficult=difficult != "drop",
        classes=classes,
        unknown_classes=unknown_classes,
    )
    if difficult == "keep":
        # the COCO export marks difficult objects as crowd; "keep" makes them ordinary objects
        for i, record in enumerate(dataset.records):
            dataset.records[i] = replace(record, difficult=torch.zeros_like(record.difficult))
    coco = dataset.coco_ground_truth()
    for position, image in enumerate(coco["images"]):
        image["voc_id"] = dataset.image_key(position)
    log.info(
        "VOC %s %s: %d images, %d objects (%d crowd), %d categories",
        chosen,
        split,
        len(coco["images"]),
        len(coco["annotations"]),
        sum(a["iscrowd"] for a in coco["annotations"]),
        len(coco["categories"]),
    )
    return coco


def coco_to_yolo(
    json_path: str | Path,
    images_dir: str | Path,
    out_dir: str | Path,
    split: str = "train",
    copy: bool = False,
) -> Path:
    """Write one COCO split as an Ultralytics YOLO dataset (see the module docstring).

    Args:
        json_path: the COCO JSON.
        images_dir: the folder its ``file_name`` entries are relative to.
        out_dir: the YOLO dataset folder (created; ``data.yaml`` merged when present).
        split: the split's name in ``data.yaml`` (``train``, ``val`` or ``test``).
        copy: copy the images instead of linking them.

    Returns:
        The path of ``data.yaml``.

    Raises:
        FileNotFoundError: the JSON or the image folder does not exist.
        CocoFormatError: the JSON is invalid (checked as ``data=coco`` checks it).
        ValueError: ``out_dir`` already holds a dataset with other class names.
    """
    json_path, out = Path(json_path).expanduser(), Path(out_dir).expanduser().resolve()
    data = load_coco_json(json_path, "--json")
    dataset = CocoDataset(json_path, images_dir, keep_crowd=True, data=data)  # every check
    label_of = {cid: i for i, cid in enumerate(dataset.category_ids)}
    index_of = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    kept = [a for a in data["annotations"] if a["image_id"] in index_of and not a.get("iscrowd", 0)]
    crowd = sum(1 for a in data["annotations"] if a.get("iscrowd", 0))
    owner = torch.tensor([index_of[a["image_id"]] for a in kept], dtype=torch.int64)
    labels = [label_of[a["category_id"]] for a in kept]
    xyxy = box_convert(
        torch.tensor([a["bbox"] for a in kept], dtype=torch.float64).reshape(-1, 4),
        "xywh",
        "xyxy",
    )
    image_sizes = torch.tensor([dataset.image_size(i) for i in range(len(dataset))])
    sizes = image_sizes.reshape(-1, 2)[owner].to(torch.float64)  # (H, W) of each box's image
    limits = sizes.flip(1).repeat(1, 2)  # W, H, W, H
    xyxy = torch.minimum(xyxy.clamp(min=0.0), limits)  # COCO's 1-pixel tolerance, as the loader
    cxcywh = box_convert(xyxy / limits, "xyxy", "cxcywh")
    lines: list[list[str]] = [[] for _ in dataset.image_ids]
    for k, (label, box) in enumerate(zip(labels, cxcywh.tolist(), strict=True)):
        numbers = " ".join(f"{v:.{YOLO_DIGITS}g}" for v in box)
        lines[int(owner[k])].append(f"{label} {numbers}")
    for i, name in enumerate(dataset.file_names):
        image = out / "images" / split / name
        image.parent.mkdir(parents=True, exist_ok=True)
        source = (dataset.images_dir / name).resolve()
        if image.is_symlink() or image.exists():
            image.unlink()
        if copy:
            shutil.copy2(source, image)
        else:
            image.symlink_to(source)
        labels_file = label_path(image)
        labels_file.parent.mkdir(parents=True, exist_ok=True)
        labels_file.write_text("".join(f"{line}\n" for line in lines[i]), encoding="utf-8")
    names = {i: name for i, name in enumerate(dataset.classes)}
    yaml_path = out / "data.yaml"
    spec: dict[str, Any] = {"path": str(out)}
    if yaml_path.is_file():
        spec = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or spec
        if spec.get("names") not in (None, names) or spec.get("category_ids") not in (
            None,
            dataset.category_ids,
        ):
            raise ValueError(
                f"{yaml_path} already describes a dataset with other classes "
                f"({spec.get('names')}); convert into another --out, or delete it"
            )
    spec.update({"path": str(out), split: f"images/{split}"})
    spec.update({"names": names, "category_ids": list(dataset.category_ids)})
    order = ["path", "train", "val", "test", "names", "category_ids"]
    spec = {k: spec[k] for k in [*order, *sorted(set(spec) - set(order), key=str)] if k in spec}
    yaml_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    log.info(
        "COCO %s -> YOLO %s (%s): %d images, %d objects, %d crowd regions left out, %d classes",
        json_path,
        out,
        split,
        len(dataset),
        len(kept),
        crowd,
        len(names),
    )
    return yaml_path


def yolo_to_coco(dataset_yaml: str | Path, split: str = "val") -> dict[str, Any]:
    """One split of a YOLO dataset as a COCO detection dict (see the module docstring).

    Args:
        dataset_yaml: the Ultralytics data.yaml.
        split: ``train``, ``val`` or ``test``.

    Returns:
        ``{"images", "annotations", "categories"}`` ready for ``json.dump``.

    Raises:
        FileNotFoundError: the yaml does not exist.
        YoloFormatError: an invalid yaml, split or label line (file and line named).
    """
    spec = load_dataset_yaml(dataset_yaml)
    files = image_files(spec, split)
    parsed = read_labels([label_path(f) for f in files], len(spec.names))
    sizes = torch.tensor([read_image_size(f) for f in files], dtype=torch.float64).reshape(-1, 2)
    per_box = sizes.flip(1).repeat(1, 2).repeat_interleave(parsed.counts, dim=0)  # W, H, W, H
    xywh = box_convert(parsed.boxes * per_box, "xyxy", "xywh")
    category_ids = spec.category_ids or list(range(1, len(spec.names) + 1))
    images = []
    for i, path in enumerate(files):
        try:
            name = path.relative_to(spec.root).as_posix()
        except ValueError:
            name = path.as_posix()
        height, width = (int(v) for v in sizes[i].tolist())
        images.append({"id": i + 1, "file_name": name, "width": width, "height": height})
    owner = torch.arange(len(files)).repeat_interleave(parsed.counts).tolist()
    annotations = [
        {
            "id": k + 1,
            "image_id": owner[k] + 1,
            "category_id": category_ids[label],
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": 0,
        }
        for k, (label, box) in enumerate(zip(parsed.labels.tolist(), xywh.tolist(), strict=True))
    ]
    categories = [
        {"id": cid, "name": name, "supercategory": "none"}
        for cid, name in zip(category_ids, spec.names, strict=True)
    ]
    log.info(
        "YOLO %s %s: %d images, %d objects, %d categories",
        spec.yaml_path,
        split,
        len(images),
        len(annotations),
        len(categories),
    )
    return {"images": images, "annotations": annotations, "categories": categories}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m src.data.convert --help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m src.data.convert", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    voc = commands.add_parser("voc2coco", help="a VOCdevkit split to one COCO detection JSON")
    voc.add_argument("--root", type=Path, required=True, help="the VOCdevkit directory")
    voc.add_argument("--split", required=True, help="image set: train, val, trainval, test")
    voc.add_argument("--out", type=Path, required=True, help="the COCO JSON to write")
    voc.add_argument(
        "--year", action="append", help="VOC year to read (repeatable; default: all with the split)"
    )
    voc.add_argument(
        "--classes",
        help="comma-separated class names, or a text file with one a line (default: VOC's 20)",
    )
    voc.add_argument(
        "--unknown-classes",
        choices=("error", "skip"),
        default="error",
        help="objects of classes not in --classes: error (default) or skip",
    )
    voc.add_argument("--difficult", choices=DIFFICULT_MODES, default="crowd")
    c2y = commands.add_parser("coco2yolo", help="a COCO split to an Ultralytics YOLO dataset")
    c2y.add_argument("--json", type=Path, required=True, help="the COCO JSON of the split")
    c2y.add_argument("--images", type=Path, required=True, help="folder of its file_name entries")
    c2y.add_argument("--out", type=Path, required=True, help="the YOLO dataset folder")
    c2y.add_argument("--split", default="train", choices=("train", "val", "test"))
    c2y.add_argument("--copy", action="store_true", help="copy the images (default: link them)")
    y2c = commands.add_parser("yolo2coco", help="a split of a YOLO dataset to one COCO JSON")
    y2c.add_argument("--data", type=Path, required=True, help="the Ultralytics data.yaml")
    y2c.add_argument("--split", default="val", choices=("train", "val", "test"))
    y2c.add_argument("--out", type=Path, required=True, help="the COCO JSON to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "coco2yolo":
        try:
            path = coco_to_yolo(args.json, args.images, args.out, args.split, args.copy)
        except (FileNotFoundError, ValueError) as err:
            log.error("error: %s", err)
            return 2
        log.info("Wrote %s: train with data=yolo data.dataset_yaml=%s", path, path)
        return 0
    if args.command == "yolo2coco":
        try:
            coco = yolo_to_coco(args.data, args.split)
        except (FileNotFoundError, ValueError, YoloFormatError) as err:
            log.error("error: %s", err)
            return 2
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(coco), encoding="utf-8")
        root = load_dataset_yaml(args.data).root
        log.info("Wrote %s (images relative to %s: data.*_images=%s)", args.out, root, root)
        return 0
    classes: Sequence[str] = VOC_CLASSES
    if args.classes:
        source = args.classes if Path(args.classes).is_file() else args.classes.split(",")
        classes = read_class_names(source, "--classes")
    try:
        coco = voc_to_coco(
            args.root, args.split, args.year, classes, args.unknown_classes, args.difficult
        )
    except (FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(coco), encoding="utf-8")
    log.info("Wrote %s (images relative to %s: data.*_images=%s)", args.out, args.root, args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
