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

import csv
import functools
import inspect
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
    IMAGE_SUFFIXES,
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

ImageSets = Sequence[Any]
#: the default of :class:`VOCDataset`'s ``pool``: draw the hold-out from ``image_sets``
SAME_AS_IMAGE_SETS: Any = object()
#: a normalised image-set entry: ``(year, set)`` or ``(None, set name or list file)``
SetEntry = tuple[str | None, str]


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


def _is_list_file(name: str) -> bool:
    """Whether an image-set entry names a list file (``.txt`` / ``.csv``) rather than a set."""
    return name.lower().endswith((".txt", ".csv")) or "/" in name or os.sep in name


def show_sets(entries: Sequence[SetEntry]) -> str:
    """Image-set entries for people: ``VOC2007/trainval, train_labels.csv`` (``all XMLs``)."""
    if not entries:
        return "all annotations"
    return ", ".join(name if year is None else f"VOC{year}/{name}" for year, name in entries)


def _normalise_image_sets(image_sets: ImageSets | None, key: str) -> list[SetEntry]:
    """Validate the image-set entries of ``key``.

    Entries: ``[year, set]`` pairs (a VOCdevkit root), set names (``ImageSets/Main/<set>.txt``
    of a plain VOC folder) and list files (a ``.txt`` with one image stem a line, or a ``.csv``
    with a ``filename`` column).

    Returns:
        ``[(year, name), ...]``: ``year`` a string for pairs, None for set names and list files.

    Raises:
        ValueError: not a list, an empty entry, or an empty list.
    """
    if isinstance(image_sets, (str, bytes)) or not isinstance(image_sets, Sequence):
        raise ValueError(
            f"{key} must be a list of [year, set] pairs, set names or list files, such as "
            f"[[2007, trainval]] or [train]; got {image_sets!r}"
        )
    out: list[SetEntry] = []
    for item in image_sets:
        if isinstance(item, (str, os.PathLike)):
            name = os.fspath(item).strip()
            if not name:
                raise ValueError(f"{key}: empty set name in {list(image_sets)!r}")
            out.append((None, name))
            continue
        if (
            isinstance(item, (bytes, int, float))
            or not isinstance(item, Sequence)
            or len(item) != 2
        ):
            raise ValueError(
                f"{key} must be a list of [year, set] pairs such as [[2007, trainval]], set "
                f"names such as [train] or list files, got element {item!r}"
            )
        year, name = str(item[0]).strip(), str(item[1]).strip()
        if not year or not name:
            raise ValueError(f"{key}: empty year or set name in {item!r}")
        out.append((year, name))
    if not out:
        raise ValueError(f"{key} is empty; give at least one [year, set] pair, set or list file")
    return out


def read_image_list(path: Path) -> list[str]:
    """Image stems from a list file, in order, without duplicates.

    Args:
        path: a ``.txt`` file with one image stem (or file name) a line (the first
            whitespace-separated token; blank lines and ``#`` comments ignored), or a ``.csv``
            file with a ``filename`` column (one row per box, as raccoon's
            ``train_labels.csv``: stems deduplicated, first appearance kept).

    Returns:
        The stems (an image suffix such as ``.jpg`` removed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        VOCAnnotationError: a CSV without a ``filename`` column, or an empty list.
    """
    if not path.is_file():
        raise FileNotFoundError(f"image list {path} does not exist")
    names: list[str] = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [c.strip() for c in (reader.fieldnames or [])]
            if "filename" not in header:
                raise VOCAnnotationError(
                    f"{path}: no 'filename' column (found {header}); a CSV image list needs "
                    "one, naming each image's file"
                )
            reader.fieldnames = header
            names = [(row["filename"] or "").strip() for row in reader]
    else:
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if parts and not parts[0].startswith("#"):
                names.append(parts[0])
    stems = [
        Path(n).stem if Path(n).suffix.lower() in IMAGE_SUFFIXES else Path(n).name
        for n in names
        if n
    ]
    if not stems:
        raise VOCAnnotationError(f"{path}: lists no images")
    return list(dict.fromkeys(stems))


def hold_out(ids: Sequence[str], fraction: float, seed: int, part: str) -> list[str]:
    """One part of a seeded random split of ``ids`` (their order kept).

    Args:
        ids: the image ids of the pool.
        fraction: the share held out for validation, in ``(0, 1)``; ``round(fraction * N)``
            images (at least 1, at most ``N - 1``).
        seed: the permutation's seed (the same seed gives the same split on every machine).
        part: ``"val"`` for the held-out images, ``"train"`` for the others.

    Raises:
        ValueError: ``fraction`` outside ``(0, 1)``, ``part`` unknown or fewer than 2 images.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"data.val_fraction must lie in (0, 1), got {fraction}")
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if len(ids) < 2:
        raise ValueError(f"data.val_fraction needs at least 2 images to split, got {len(ids)}")
    count = min(max(round(float(fraction) * len(ids)), 1), len(ids) - 1)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(int(seed)))
    held = torch.zeros(len(ids), dtype=torch.bool)
    held[order[:count]] = True
    keep = held if part == "val" else ~held
    return [ids[i] for i in keep.nonzero().flatten().tolist()]


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
    """Pascal VOC detection dataset: a VOCdevkit or a plain folder of VOC XML files.

    Two layouts of ``root``:

    * a **VOCdevkit** (``root/VOC2007/Annotations``, ...): ``image_sets`` are ``[year, set]``
      pairs read from ``VOC{year}/ImageSets/Main/{set}.txt``;
    * a **plain VOC folder** (``root/Annotations`` directly, no year; the folder names are
      ``annotations_dir`` and ``images_dir``): ``image_sets`` are set names read from
      ``root/ImageSets/Main/{set}.txt``, list files (a ``.txt`` with one stem a line or a
      ``.csv`` with a ``filename`` column, relative to ``root`` or the working directory), or
      None for every annotation file in the folder. Images are looked up by stem with any
      image suffix (``.jpg``, ``.png``, ...).

    ``val_fraction`` splits the images of ``pool`` (default ``image_sets``) at random with
    ``split_seed``: ``part="val"`` keeps the held-out ``val_fraction``, ``part="train"`` the
    rest, so two datasets with the same pool and seed never share an image.

    ``dataset[i]`` returns ``(image, target)`` as :class:`src.data.base.DetectionDataset`
    describes: the transform receives a ``uint8`` ``tv_tensors.Image`` ``[3, H, W]`` and pixel
    XYXY ``boxes`` (0-based: devkit coordinates minus 1, clamped at 0), ``labels`` (0-based
    into ``classes``), ``difficult``, ``iscrowd`` (all False), ``orig_size``, ``image_id`` (the
    file stem) and ``coco_image_id`` (the index + 1). Without ``transform`` the image is float32
    in ``[0, 1]`` and ``boxes`` ``Tensor[G, 4]`` normalised xyxy ``(x - 1) / W`` (see the module
    docstring).

    Args:
        root: the ``VOCdevkit`` directory (containing ``VOC2007/``, ``VOC2012/``) or a plain
            VOC folder.
        image_sets: the entries above, e.g. ``[[2007, "trainval"], [2012, "trainval"]]`` or
            ``["train"]`` or ``["train_labels.csv"]``; None: every annotation of a plain folder.
        transform: ``(image, target) -> (image, target)`` callable.
        keep_difficult: keep objects marked difficult (flagged in ``target["difficult"]``);
            if False they are removed (for training).
        skip_invalid: if False, a missing file or an invalid annotation raises
            :class:`VOCAnnotationError`; if True, invalid objects (or whole images whose XML or
            JPEG is missing or broken) are skipped and a warning gives the counts.
        classes: the class names (default :data:`VOC_CLASSES`), a list or a text file with one
            name a line; label ``i`` is ``classes[i]``.
        unknown_classes: objects whose class is not in ``classes``: ``"error"`` raises (or is
            skipped as invalid under ``skip_invalid``), ``"skip"`` leaves them out (counted per
            name in an INFO log line); the image stays, as a background image if nothing is left.
        images_dir: the image folder's name (``JPEGImages``; raccoon: ``images``).
        annotations_dir: the XML folder's name (``Annotations``; raccoon: ``annotations``).
        val_fraction: hold out this share of ``pool`` (see above); None: no random split.
        split_seed: the seed of that split.
        part: ``"train"`` or ``"val"``: which part of the split this dataset is.
        pool: the image sets the split is drawn from (default: ``image_sets``; None: every
            annotation of a plain folder).

    Raises:
        FileNotFoundError: ``root``, ``root/VOC{year}``, an ImageSets file or a list file does
            not exist.
        VOCAnnotationError: see ``skip_invalid``.
        ValueError: bad ``image_sets`` (year pairs on a plain folder, set names on a VOCdevkit)
            or ``val_fraction``.

    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_sets: ImageSets | None = ((2007, "trainval"),),
        transform: Transform | None = None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        classes: str | os.PathLike[str] | Sequence[str] | None = VOC_CLASSES,
        unknown_classes: str = "error",
        images_dir: str = "JPEGImages",
        annotations_dir: str = "Annotations",
        val_fraction: float | None = None,
        split_seed: int = 0,
        part: str = "train",
        pool: ImageSets | None | object = SAME_AS_IMAGE_SETS,
    ) -> None:
        self.root = Path(root).expanduser()
        self.images_dir = str(images_dir)
        self.annotations_dir = str(annotations_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"VOC root {str(self.root)!r} does not exist or is not a directory; set data.root "
                "to the VOCdevkit directory that contains VOC2007/ and/or VOC2012/, or to a "
                f"folder with {self.annotations_dir}/ and {self.images_dir}/"
            )
        self.plain = (self.root / self.annotations_dir).is_dir()
        sets = image_sets if val_fraction is None or pool is SAME_AS_IMAGE_SETS else pool
        self.image_sets = self._check_sets(sets, "image_sets")
        self.transform = transform
        self.keep_difficult = bool(keep_difficult)
        self.skip_invalid = bool(skip_invalid)
        names = None if classes is None else classes
        if names is not None and not isinstance(names, (str, os.PathLike)):
            names = list(names)
        self.classes = tuple(resolve_classes(names, unknown_classes))
        self.unknown_classes = unknown_classes
        self.split_note = ""
        entries = self._list_all()
        if val_fraction is not None:
            ids = hold_out([e[0] for e in entries], val_fraction, split_seed, part)
            chosen = set(ids)
            entries = [e for e in entries if e[0] in chosen]
            self.split_note = f" ({part} part of a {val_fraction:g} hold-out, seed {split_seed})"
        self.records: list[VOCRecord] = []
        problems: list[str] = []
        skipped_images = 0
        skipped_objects = 0
        unknown: Counter[str] = Counter()
        for image_id, xml_path, jpg_path, listed_in in entries:
            try:
                if not xml_path.is_file():
                    raise VOCAnnotationError(
                        f"{xml_path}: annotation file missing (image id {image_id!r} is "
                        f"listed in {listed_in})"
                    )
                if not jpg_path.is_file():
                    raise VOCAnnotationError(
                        f"{jpg_path}: image file missing (image id {image_id!r} is listed "
                        f"in {listed_in})"
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
        where = f"VOCDataset({self.root}, {show_sets(self.image_sets)})"
        report_skipped(log, where, problems, skipped_objects, skipped_images)
        if unknown:
            log.info(
                "VOCDataset %s: left out %d object(s) of classes not in data.classes: %s",
                show_sets(self.image_sets),
                self.num_unknown_objects,
                ", ".join(f"{n} ({c})" for n, c in unknown.most_common()),
            )
        log.info(
            "VOCDataset %s%s: %d images, %d objects of %d classes (keep_difficult=%s)",
            show_sets(self.image_sets),
            self.split_note,
            len(self.records),
            self.num_objects,
            len(self.classes),
            self.keep_difficult,
        )

    @classmethod
    def read_classes(cls, *args: Any, **kwargs: Any) -> tuple[list[str], list[int] | None]:
        """``classes`` (list or file, default the 20 VOC ones), checked with ``unknown_classes``."""
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        classes = bound.arguments["classes"]
        if classes is not None and not isinstance(classes, (str, os.PathLike)):
            classes = list(classes)
        return resolve_classes(classes, bound.arguments["unknown_classes"]), None

    # ------------------------------------------------------------ listing
    def _check_sets(self, image_sets: ImageSets | None, key: str) -> list[SetEntry]:
        """Normalise ``image_sets`` and check they fit the layout of ``root``."""
        if image_sets is None:
            if not self.plain:
                raise ValueError(
                    f"{key}=null (every annotation) needs a plain VOC folder with "
                    f"{self.annotations_dir}/ directly under data.root; {self.root} has none: "
                    "give [year, set] pairs such as [[2012, trainval]] (data.test_sets=null no "
                    "longer means the val sets: leave data.test_sets unset, it defaults to "
                    "data.val_sets)"
                )
            return []
        entries = _normalise_image_sets(image_sets, key)
        for year, name in entries:
            if self.plain and year is not None:
                raise ValueError(
                    f"[{year}, {name}] is a VOCdevkit [year, set] pair, but data.root={self.root} "
                    f"is a plain VOC folder ({self.annotations_dir}/ directly in it): give set "
                    "names read from ImageSets/Main/<set>.txt (data.train_sets=[train] "
                    "data.val_sets=[val]), list files (data.train_sets=[train.txt]), or "
                    "data.train_sets=null data.val_fraction=0.2 for a random split"
                )
            if not self.plain and year is None:
                raise ValueError(
                    f"{name!r} has no year, but data.root={self.root} is a VOCdevkit (no "
                    f"{self.annotations_dir}/ directly in it): give [year, set] pairs such as "
                    f"[[2012, {name}]], or point data.root at a plain VOC folder"
                )
        return entries

    def _list_all(self) -> list[tuple[str, Path, Path, str]]:
        """``(image id, xml, image, where it is listed)`` of every entry, in order."""
        if not self.image_sets:  # every annotation file of a plain folder
            folder = self.root / self.annotations_dir
            stems = sorted(p.stem for p in folder.glob("*.xml"))
            if not stems:
                raise FileNotFoundError(f"{folder} holds no .xml annotation files")
            return self._plain_paths(stems, f"{folder}")
        out: list[tuple[str, Path, Path, str]] = []
        for year, name in self.image_sets:
            if year is not None:
                out += self._list_set(year, name)
            elif _is_list_file(name):
                path = self._list_file(name)
                out += self._plain_paths(read_image_list(path), str(path))
            else:
                set_file = self.root / "ImageSets" / "Main" / f"{name}.txt"
                if not set_file.is_file():
                    main = set_file.parent
                    available = sorted(p.stem for p in main.glob("*.txt")) if main.is_dir() else []
                    raise FileNotFoundError(
                        f"image set file {set_file} does not exist; check data.root "
                        f"({self.root}) and the set names in data.train_sets / data.val_sets / "
                        f"data.test_sets (available sets: {available or 'none'}), or give list "
                        "files (data.train_sets=[train.txt]) or data.val_fraction"
                    )
                out += self._plain_paths(read_image_list(set_file), f"ImageSets/Main/{name}.txt")
        return out

    def _list_file(self, name: str) -> Path:
        """A list file: relative to ``root`` when it exists there, else as given."""
        path = Path(name).expanduser()
        if not path.is_absolute() and (self.root / path).is_file():
            return self.root / path
        if path.is_file():
            return path
        raise FileNotFoundError(
            f"image list {name} does not exist (looked in {self.root} and the working "
            "directory); give a .txt with one image stem a line or a .csv with a filename column"
        )

    def _plain_paths(self, stems: list[str], listed_in: str) -> list[tuple[str, Path, Path, str]]:
        """Paths of a plain folder's images: looked up by stem with any image suffix."""
        if not hasattr(self, "_image_files"):
            folder = self.root / self.images_dir
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"image folder {folder} does not exist; set data.images_dir to the folder "
                    f"(inside data.root) that holds the images of {self.annotations_dir}/"
                )
            files: dict[str, Path] = {}
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    files.setdefault(p.stem, p)
            self._image_files = files
        annotations = self.root / self.annotations_dir
        images = self.root / self.images_dir
        return [
            (s, annotations / f"{s}.xml", self._image_files.get(s, images / f"{s}.jpg"), listed_in)
            for s in stems
        ]

    def _list_set(self, year: str, name: str) -> list[tuple[str, Path, Path, str]]:
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
        listed = f"VOC{year}/ImageSets/Main/{name}.txt"
        return [
            (
                i,
                base / self.annotations_dir / f"{i}.xml",
                base / self.images_dir / f"{i}.jpg",
                listed,
            )
            for i in ids
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
            f"VOCDataset(root={str(self.root)!r}, image_sets=[{show_sets(self.image_sets)}], "
            f"images={len(self)}, classes={len(self.classes)}, "
            f"keep_difficult={self.keep_difficult})"
        )


class VOCDataModule(DetectionDataModule):
    """The VOC DataModule of earlier versions, kept so that their checkpoints and code load.

    Run configs stored in older checkpoints name ``_target_: src.data.voc.VOCDataModule`` with
    these keys; ``conf/data/voc.yaml`` now builds :class:`~src.data.base.DetectionDataModule`
    with :class:`VOCDataset` factories directly. The training set drops difficult objects
    unless ``keep_difficult``; validation and test sets keep them, flagged for the metric.

    Args:
        root: the ``VOCdevkit`` directory or a plain VOC folder (``data.root``).
        train_sets: image sets for training (see :class:`VOCDataset`).
        val_sets: image sets for validation.
        test_sets: image sets for testing/prediction; None means ``val_sets``.
        classes: the class names (list or text file); None: the 20 :data:`VOC_CLASSES`.
        unknown_classes: ``"error"`` or ``"skip"``.
        keep_difficult: keep difficult objects in the training set.
        skip_invalid: skip invalid objects/images with a warning instead of raising.
        augment: training augmentation.
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
        self.root = Path(str(root)).expanduser()
        self.train_sets = _normalise_image_sets(train_sets, "data.train_sets")
        self.val_sets = _normalise_image_sets(val_sets, "data.val_sets")
        self.test_sets = (
            self.val_sets
            if test_sets is None
            else _normalise_image_sets(test_sets, "data.test_sets")
        )
        self.keep_difficult = bool(keep_difficult)
        self.unknown_classes = unknown_classes
        names = (
            classes if classes is None or isinstance(classes, (str, os.PathLike)) else list(classes)
        )
        common = {
            "root": self.root,
            "skip_invalid": bool(skip_invalid),
            "classes": names,
            "unknown_classes": unknown_classes,
        }
        split = functools.partial(VOCDataset, **common)
        super().__init__(
            train=functools.partial(
                split, image_sets=self.train_sets, keep_difficult=self.keep_difficult
            ),
            val=functools.partial(split, image_sets=self.val_sets, keep_difficult=True),
            test=functools.partial(split, image_sets=self.test_sets, keep_difficult=True),
            augment=augment,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            cache=cache,
            fill=fill,
            root=str(self.root),
            train_sets=[list(e) for e in self.train_sets],
            val_sets=[list(e) for e in self.val_sets],
            test_sets=None if test_sets is None else [list(e) for e in self.test_sets],
            classes=names,
            unknown_classes=unknown_classes,
            keep_difficult=self.keep_difficult,
            skip_invalid=bool(skip_invalid),
        )
