"""Pascal VOC detection dataset and Lightning DataModule.

Layout (torchvision's ``VOCDetection`` / the official ``VOCdevkit``)::

    root/                      # data.root, e.g. .../VOCdevkit
      VOC2007/
        JPEGImages/{id}.jpg
        Annotations/{id}.xml
        ImageSets/Main/{set}.txt   # one image id per line (train, val, trainval, test)
      VOC2012/...

Annotations are parsed once, with :mod:`xml.etree.ElementTree`, when the dataset is built and
kept in memory; images are decoded lazily in ``__getitem__``.

Box convention (the one of ssd.pytorch): VOC pixel coordinates are 1-based and inclusive
(``1 <= xmin <= xmax <= W``). They are shifted to 0-based pixel indices ``x - 1`` and normalised
by the image size: ``x_norm = (x - 1) / W``, ``y_norm = (y - 1) / H``. Going back to pixels with
``x_norm * W`` therefore gives ``x - 1``: the devkit's boxes translated by one pixel, which leaves
every IoU unchanged, so :class:`src.metrics.voc_map.VOCMeanAveragePrecision` (inclusive ``+1``
areas) reproduces the devkit's numbers on ``boxes * (W, H, W, H)`` of ``orig_size``. To write
devkit result files, add 1 to such pixel coordinates. A coordinate of 0 (seen in some
third-party annotations) is accepted and clamped to the image border.

Classes: the 20 :data:`VOC_CLASSES` by default; ``data.classes=[cat,dog]`` (or the path of a text
file with one name a line) trains on those only, and ``data.unknown_classes=error|skip`` decides
what happens to objects of other classes.

Difficult objects: a training set drops them unless ``keep_difficult=True``; evaluation sets
(built by :class:`VOCDataModule`) always keep them, flagged in ``target["difficult"]``, so that
the metric ignores them as the devkit does.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from src.data.base import (
    DataFormatError,
    DetectionDataModule,
    DetectionDataset,
    ImageReadError,
    Transform,
    read_class_names,
    read_image,
    report_skipped,
)
from src.data.transforms import IMAGENET_MEAN

log = logging.getLogger(__name__)

__all__ = [
    "VOC_CLASSES",
    "VOCAnnotationError",
    "VOCDataModule",
    "VOCDataset",
    "VOCRecord",
    "parse_voc_annotation",
    "resolve_classes",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
_COORDS = ("xmin", "ymin", "xmax", "ymax")
UNKNOWN_CLASSES: tuple[str, ...] = ("error", "skip")

ImageSets = Sequence[Sequence[Any]]


class VOCAnnotationError(DataFormatError):
    """An annotation (or the file it refers to) is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class VOCRecord:
    """One parsed annotation file.

    Attributes:
        image_id: file stem, e.g. ``"2007_000027"``.
        image_path: the JPEG.
        annotation_path: the XML file.
        width: image width in pixels (from ``<size>``).
        height: image height in pixels.
        boxes: ``Tensor[G, 4]`` float32, devkit pixel xyxy (1-based, inclusive), file order.
        labels: ``Tensor[G]`` int64, 0-based indices into the class names given to
            :func:`parse_voc_annotation` (:data:`VOC_CLASSES` by default).
        difficult: ``Tensor[G]`` bool.
        unknown: names of the objects left out because their class is not among the classes
            (``unknown_classes="skip"``), file order.

    """

    image_id: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: Tensor
    labels: Tensor
    difficult: Tensor
    unknown: tuple[str, ...] = ()


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def parse_voc_annotation(
    path: str | os.PathLike[str],
    image_path: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
    classes: Sequence[str] = VOC_CLASSES,
    unknown_classes: str = "error",
) -> tuple[VOCRecord, list[str]]:
    """Parse one VOC annotation XML file.

    Args:
        path: the XML file.
        image_path: the image it describes (default: ``../JPEGImages/{stem}.jpg``).
        skip_invalid: if False, any invalid object raises; if True, invalid objects are left out
            and described in the returned list. File-level problems (unreadable or malformed
            XML, missing or invalid ``<size>``) always raise.
        classes: the class names; labels index into them.
        unknown_classes: ``"error"``: an object of another class is invalid; ``"skip"``: it is
            left out and its name listed in ``record.unknown`` (not a problem).

    Returns:
        ``(record, skipped)``: the record (difficult objects included) and one message per
        skipped object.

    Raises:
        VOCAnnotationError: naming the file, and the object index (0-based, file order) and name
            for object-level problems.

    """
    path = Path(path)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    unknown: list[str] = []
    if image_path is None:
        image_path = path.parent.parent / "JPEGImages" / f"{path.stem}.jpg"
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise VOCAnnotationError(f"{path}: malformed annotation XML ({err})") from err
    except OSError as err:
        raise VOCAnnotationError(f"{path}: cannot read annotation ({err})") from err

    size = root.find("size")
    if size is None:
        raise VOCAnnotationError(f"{path}: missing <size> element (with <width> and <height>)")
    dims = {}
    for tag in ("width", "height"):
        text = _text(size, tag)
        if text is None:
            raise VOCAnnotationError(f"{path}: missing <size>/<{tag}>")
        try:
            dims[tag] = int(float(text))
        except ValueError as err:
            raise VOCAnnotationError(f"{path}: <size>/<{tag}> is not a number: {text!r}") from err
        if dims[tag] <= 0:
            raise VOCAnnotationError(f"{path}: <size>/<{tag}> must be positive, got {text}")
    width, height = dims["width"], dims["height"]

    boxes: list[list[float]] = []
    labels: list[int] = []
    difficult: list[bool] = []
    skipped: list[str] = []
    for index, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        where = f"{path}: object {index} ({name!r})"
        try:
            if name is None:
                raise VOCAnnotationError(f"{where}: missing <name>")
            if name not in class_to_idx:
                if unknown_classes == "skip":
                    unknown.append(name)
                    continue
                raise VOCAnnotationError(
                    f"{where}: unknown class name {name!r}; expected one of "
                    f"{', '.join(classes)} (data.classes), or set data.unknown_classes=skip to "
                    "leave out objects of other classes"
                )
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise VOCAnnotationError(f"{where}: missing <bndbox>")
            coords = []
            for tag in _COORDS:
                text = _text(bndbox, tag)
                if text is None:
                    raise VOCAnnotationError(f"{where}: missing <bndbox>/<{tag}>")
                try:
                    coords.append(float(text))
                except ValueError as err:
                    raise VOCAnnotationError(
                        f"{where}: <bndbox>/<{tag}> is not a number: {text!r}"
                    ) from err
            xmin, ymin, xmax, ymax = coords
            if not (xmin < xmax and ymin < ymax):
                raise VOCAnnotationError(
                    f"{where}: degenerate box (xmin, ymin, xmax, ymax) = {tuple(coords)}; "
                    "need xmin < xmax and ymin < ymax"
                )
            if xmin < 0 or ymin < 0 or xmax > width or ymax > height:
                raise VOCAnnotationError(
                    f"{where}: box {tuple(coords)} lies outside the {width}x{height} image "
                    "(VOC coordinates are 1-based: 1 <= x <= width, 1 <= y <= height)"
                )
            diff_text = _text(obj, "difficult")
            if diff_text not in (None, "0", "1"):
                raise VOCAnnotationError(f"{where}: <difficult> must be 0 or 1, got {diff_text!r}")
        except VOCAnnotationError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        boxes.append(coords)
        labels.append(class_to_idx[name])
        difficult.append(diff_text == "1")

    record = VOCRecord(
        image_id=path.stem,
        image_path=Path(image_path),
        annotation_path=path,
        width=width,
        height=height,
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
        unknown=tuple(unknown),
    )
    return record, skipped


def _normalise_image_sets(image_sets: ImageSets, key: str) -> list[tuple[str, str]]:
    """Validate ``[[year, set], ...]`` and return ``[("2007", "trainval"), ...]``."""
    if isinstance(image_sets, (str, bytes)) or not isinstance(image_sets, Sequence):
        raise ValueError(f"{key} must be a list of [year, set] pairs, got {image_sets!r}")
    out = []
    for item in image_sets:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise ValueError(
                f"{key} must be a list of [year, set] pairs such as [[2007, trainval]], "
                f"got element {item!r}"
            )
        year, name = str(item[0]).strip(), str(item[1]).strip()
        if not year or not name:
            raise ValueError(f"{key}: empty year or set name in {item!r}")
        out.append((year, name))
    if not out:
        raise ValueError(f"{key} is empty; give at least one [year, set] pair")
    return out


def resolve_classes(
    classes: str | os.PathLike[str] | Sequence[str] | None, unknown_classes: str
) -> list[str]:
    """The class names of a VOC dataset: ``data.classes`` (list or file), default the 20 VOC ones.

    Raises:
        ValueError: ``unknown_classes`` is not ``error`` or ``skip``, or the names are invalid.
        FileNotFoundError: ``classes`` names a file that does not exist.
    """
    if unknown_classes not in UNKNOWN_CLASSES:
        raise ValueError(
            f"data.unknown_classes must be one of {', '.join(UNKNOWN_CLASSES)}; "
            f"got {unknown_classes!r}"
        )
    if classes is None:
        return list(VOC_CLASSES)
    return read_class_names(classes, "data.classes")


class VOCDataset(DetectionDataset):
    """Pascal VOC detection dataset (the 20 :data:`VOC_CLASSES` or your own ``classes``).

    ``dataset[i]`` returns ``(image, target)`` as :class:`src.data.base.DetectionDataset`
    describes: the transform receives a ``uint8`` ``tv_tensors.Image`` ``[3, H, W]`` and pixel
    XYXY ``boxes`` (0-based: devkit coordinates minus 1, clamped at 0), ``labels`` (0-based
    into ``classes``), ``difficult``, ``iscrowd`` (all False), ``orig_size``, ``image_id`` (the
    file stem) and ``coco_image_id`` (the index + 1). Without ``transform`` the image is float32 in
    ``[0, 1]`` and ``boxes`` ``Tensor[G, 4]`` normalised xyxy ``(x - 1) / W`` (see the module
    docstring).

    Args:
        root: the ``VOCdevkit`` directory (containing ``VOC2007/``, ``VOC2012/``).
        image_sets: ``[[year, set], ...]``, e.g. ``[[2007, "trainval"], [2012, "trainval"]]``.
        transform: ``(image, target) -> (image, target)`` callable.
        keep_difficult: keep objects marked difficult (flagged in ``target["difficult"]``);
            if False they are removed (for training).
        skip_invalid: if False, a missing file or an invalid annotation raises
            :class:`VOCAnnotationError`; if True, invalid objects (or whole images whose XML or
            JPEG is missing or broken) are skipped and a warning gives the counts.
        classes: the class names (default :data:`VOC_CLASSES`); label ``i`` is ``classes[i]``.
        unknown_classes: objects whose class is not in ``classes``: ``"error"`` raises (or is
            skipped as invalid under ``skip_invalid``), ``"skip"`` leaves them out (counted per
            name in an INFO log line); the image stays, as a background image if nothing is left.

    Raises:
        FileNotFoundError: ``root``, ``root/VOC{year}`` or an ImageSets file does not exist.
        VOCAnnotationError: see ``skip_invalid``.

    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_sets: ImageSets = ((2007, "trainval"),),
        transform: Transform | None = None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        classes: Sequence[str] = VOC_CLASSES,
        unknown_classes: str = "error",
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_sets = _normalise_image_sets(image_sets, "image_sets")
        self.transform = transform
        self.keep_difficult = bool(keep_difficult)
        self.skip_invalid = bool(skip_invalid)
        self.classes = tuple(resolve_classes(list(classes), unknown_classes))
        self.unknown_classes = unknown_classes
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"VOC root {str(self.root)!r} does not exist or is not a directory; set data.root "
                "to the VOCdevkit directory that contains VOC2007/ and/or VOC2012/"
            )
        self.records: list[VOCRecord] = []
        problems: list[str] = []
        skipped_images = 0
        skipped_objects = 0
        unknown: Counter[str] = Counter()
        for year, name in self.image_sets:
            for image_id, xml_path, jpg_path in self._list_set(year, name):
                try:
                    if not xml_path.is_file():
                        raise VOCAnnotationError(
                            f"{xml_path}: annotation file missing (image id {image_id!r} is "
                            f"listed in VOC{year}/ImageSets/Main/{name}.txt)"
                        )
                    if not jpg_path.is_file():
                        raise VOCAnnotationError(
                            f"{jpg_path}: image file missing (image id {image_id!r} is listed "
                            f"in VOC{year}/ImageSets/Main/{name}.txt)"
                        )
                    record, bad = parse_voc_annotation(
                        xml_path, jpg_path, self.skip_invalid, self.classes, unknown_classes
                    )
                    if self.skip_invalid:  # images that do not decode are skipped too
                        try:
                            read_image(jpg_path)
                        except ImageReadError as err:
                            raise VOCAnnotationError(str(err)) from err
                except VOCAnnotationError as err:
                    if not self.skip_invalid:
                        raise
                    skipped_images += 1
                    problems.append(str(err))
                    continue
                skipped_objects += len(bad)
                problems.extend(bad)
                unknown.update(record.unknown)
                if not self.keep_difficult and bool(record.difficult.any()):
                    keep = ~record.difficult
                    record = replace(
                        record,
                        boxes=record.boxes[keep],
                        labels=record.labels[keep],
                        difficult=record.difficult[keep],
                    )
                self.records.append(record)
        self.num_skipped_images = skipped_images
        self.num_skipped_objects = skipped_objects
        self.num_unknown_objects = sum(unknown.values())
        report_skipped(
            log, f"VOCDataset({self.root}, {self.image_sets})", problems, skipped_objects,
            skipped_images,
        )  # fmt: skip
        if unknown:
            log.info(
                "VOCDataset %s: left out %d object(s) of classes not in data.classes: %s",
                self.image_sets,
                self.num_unknown_objects,
                ", ".join(f"{n} ({c})" for n, c in unknown.most_common()),
            )
        log.info(
            "VOCDataset %s: %d images, %d objects of %d classes (keep_difficult=%s)",
            self.image_sets,
            len(self.records),
            self.num_objects,
            len(self.classes),
            self.keep_difficult,
        )

    def _list_set(self, year: str, name: str) -> list[tuple[str, Path, Path]]:
        """Image ids of ``VOC{year}/ImageSets/Main/{name}.txt`` with their XML / JPEG paths."""
        base = self.root / f"VOC{year}"
        if not base.is_dir():
            found = sorted(p.name for p in self.root.iterdir() if p.name.startswith("VOC"))
            hint = ""
            if (self.root / "VOCdevkit" / f"VOC{year}").is_dir():
                hint = f" (found {self.root / 'VOCdevkit'}: set data.root to that directory)"
            raise FileNotFoundError(
                f"{base} does not exist (set data.root to the VOCdevkit directory that contains "
                f"VOC{year}/, or remove [{year}, {name}] from the image sets; found "
                f"{found or 'no VOC* directories'} in {self.root}){hint}"
            )
        set_file = base / "ImageSets" / "Main" / f"{name}.txt"
        if not set_file.is_file():
            main = base / "ImageSets" / "Main"
            available = (
                sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem)
                if main.is_dir()
                else []
            )
            raise FileNotFoundError(
                f"image set file {set_file} does not exist; check data.root ({self.root}) and "
                f"the [year, set] pairs in data.train_sets / data.val_sets / data.test_sets "
                f"(available sets for VOC{year}: {available or 'none'})"
            )
        ids = []
        with open(set_file, encoding="utf-8") as fh:
            for line in fh:
                parts = line.split()
                if parts:
                    ids.append(parts[0])
        return [
            (i, base / "Annotations" / f"{i}.xml", base / "JPEGImages" / f"{i}.jpg") for i in ids
        ]

    # ------------------------------------------------------------ DetectionDataset interface
    def __len__(self) -> int:
        return len(self.records)

    def image_path(self, index: int) -> Path:
        """The JPEG of item ``index``."""
        return self.records[index].image_path

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` from the XML ``<size>``."""
        record = self.records[index]
        return record.height, record.width

    def image_key(self, index: int) -> str:
        """The VOC image id (file stem), e.g. ``"2007_000027"``."""
        return self.records[index].image_id

    def file_name(self, index: int) -> str:
        """The JPEG's path relative to ``root`` (``VOC2012/JPEGImages/2007_000027.jpg``)."""
        path = self.records[index].image_path
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def error(self, message: str) -> Exception:
        """:class:`VOCAnnotationError`."""
        return VOCAnnotationError(message)

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """Boxes in the base frame: devkit coordinates minus 1, clamped at 0 (new tensors)."""
        record = self.records[index]
        return {
            "boxes": (record.boxes - 1.0).clamp(min=0.0),
            "labels": record.labels.clone(),
            "difficult": record.difficult.clone(),
            "iscrowd": torch.zeros_like(record.difficult),
        }

    @property
    def num_objects(self) -> int:
        """Total number of objects kept (difficult ones included when kept)."""
        return sum(int(r.labels.numel()) for r in self.records)

    def pixel_target(self, index: int) -> dict[str, Tensor]:
        """Return the ground truth of image ``index`` for :class:`VOCMeanAveragePrecision`.

        Returns:
            dict with ``boxes`` ``Tensor[G, 4]`` float32 devkit pixel xyxy (1-based, inclusive),
            ``labels`` and ``difficult``.

        """
        record = self.records[index]
        return {
            "boxes": record.boxes.clone(),
            "labels": record.labels.clone(),
            "difficult": record.difficult.clone(),
        }

    def __repr__(self) -> str:
        return (
            f"VOCDataset(root={str(self.root)!r}, image_sets={self.image_sets}, "
            f"images={len(self)}, classes={len(self.classes)}, "
            f"keep_difficult={self.keep_difficult})"
        )


class VOCDataModule(DetectionDataModule):
    """Pascal VOC DataModule: train on ``train_sets``, validate/test on ``val_sets``/``test_sets``.

    The training set uses ``build_transforms(train=True, image_size, augment, fill)`` and drops
    difficult objects unless ``keep_difficult``; validation and test sets use the deterministic
    resize and always keep difficult objects, flagged in ``target["difficult"]`` for the metric.
    ``classes`` and ``num_classes`` are known right after ``__init__`` (the model is sized from
    them).

    Args:
        root: the ``VOCdevkit`` directory (config key ``data.root``).
        train_sets: ``[[year, set], ...]`` for training.
        val_sets: ``[[year, set], ...]`` for validation.
        test_sets: ``[[year, set], ...]`` for testing/prediction; None means ``val_sets``.
        classes: the class names to train on, as a list or the path of a text file with one
            name a line (``data.classes``); None: the 20 :data:`VOC_CLASSES`.
        unknown_classes: ``"error"`` or ``"skip"``: what happens to objects of other classes
            (``data.unknown_classes``).
        keep_difficult: keep difficult objects in the training set.
        skip_invalid: skip invalid objects/images with a warning instead of raising.
        augment: ``"ssd"`` or ``"none"`` (training augmentation).
        image_size: output side ``S`` (or ``[H, W]``).
        batch_size: images per batch.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        cache: decode every image once in ``setup`` and keep it in memory (uint8).
        fill: zoom-out fill colour (RGB in ``[0, 1]``), the ImageNet mean by default.

    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        train_sets: ImageSets = ((2007, "trainval"), (2012, "trainval")),
        val_sets: ImageSets = ((2007, "test"),),
        test_sets: ImageSets | None = None,
        classes: str | os.PathLike[str] | Sequence[str] | None = None,
        unknown_classes: str = "error",
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        augment: str = "ssd",
        image_size: int | Sequence[int] = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        cache: bool = False,
        fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        super().__init__(
            resolve_classes(classes, unknown_classes),
            augment=augment,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            skip_invalid=skip_invalid,
            cache=cache,
            fill=fill,
        )
        self.unknown_classes = unknown_classes
        self.root = Path(str(root)).expanduser()
        self.train_sets = _normalise_image_sets(train_sets, "data.train_sets")
        self.val_sets = _normalise_image_sets(val_sets, "data.val_sets")
        self.test_sets = (
            self.val_sets
            if test_sets is None
            else _normalise_image_sets(test_sets, "data.test_sets")
        )
        self.keep_difficult = bool(keep_difficult)

    def test_is_val(self) -> bool:
        """Whether ``test_sets`` equals ``val_sets``."""
        return self.test_sets == self.val_sets

    def build_dataset(self, split: str) -> VOCDataset:
        """The :class:`VOCDataset` of ``split`` (annotations are parsed here)."""
        train = split == "train"
        sets = {"train": self.train_sets, "val": self.val_sets, "test": self.test_sets}[split]
        return VOCDataset(
            self.root,
            sets,
            self.train_transform if train else self.eval_transform,
            keep_difficult=self.keep_difficult if train else True,
            skip_invalid=self.skip_invalid,
            classes=self.classes,
            unknown_classes=self.unknown_classes,
        )
