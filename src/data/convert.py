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
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from src.data.base import read_class_names
from src.data.voc import VOC_CLASSES, VOCDataset

log = logging.getLogger(__name__)

__all__ = ["DIFFICULT_MODES", "main", "voc_to_coco"]

DIFFICULT_MODES: tuple[str, ...] = ("crowd", "keep", "drop")


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
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
