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

Difficult objects: a training set drops them unless ``keep_difficult=True``; evaluation sets
(built by :class:`VOCDataModule`) always keep them, flagged in ``target["difficult"]``, so that
the metric ignores them as the devkit does.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image

from src.data.collate import detection_loader
from src.data.transforms import AUGMENTATIONS, IMAGENET_MEAN, build_transforms

log = logging.getLogger(__name__)

__all__ = [
    "VOC_CLASSES",
    "VOCAnnotationError",
    "VOCDataModule",
    "VOCDataset",
    "VOCRecord",
    "parse_voc_annotation",
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
_CLASS_TO_IDX = {name: i for i, name in enumerate(VOC_CLASSES)}
_COORDS = ("xmin", "ymin", "xmax", "ymax")
_MAX_REPORTED = 5

ImageSets = Sequence[Sequence[Any]]
Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


class VOCAnnotationError(ValueError):
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
        labels: ``Tensor[G]`` int64, 0-based indices into :data:`VOC_CLASSES`.
        difficult: ``Tensor[G]`` bool.

    """

    image_id: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    boxes: Tensor
    labels: Tensor
    difficult: Tensor


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return None
    return child.text.strip()


def parse_voc_annotation(
    path: str | os.PathLike[str],
    image_path: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
) -> tuple[VOCRecord, list[str]]:
    """Parse one VOC annotation XML file.

    Args:
        path: the XML file.
        image_path: the image it describes (default: ``../JPEGImages/{stem}.jpg``).
        skip_invalid: if False, any invalid object raises; if True, invalid objects are left out
            and described in the returned list. File-level problems (unreadable or malformed
            XML, missing or invalid ``<size>``) always raise.

    Returns:
        ``(record, skipped)``: the record (difficult objects included) and one message per
        skipped object.

    Raises:
        VOCAnnotationError: naming the file, and the object index (0-based, file order) and name
            for object-level problems.

    """
    path = Path(path)
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
            if name not in _CLASS_TO_IDX:
                raise VOCAnnotationError(
                    f"{where}: unknown class name {name!r}; expected one of "
                    f"{', '.join(VOC_CLASSES)}"
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
        labels.append(_CLASS_TO_IDX[name])
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


class VOCDataset(Dataset):
    """Pascal VOC detection dataset (20 classes, :data:`VOC_CLASSES`).

    ``dataset[i]`` returns ``(image, target)``. The image (``uint8`` ``tv_tensors.Image``
    ``[3, H, W]`` RGB) and ``target`` with ``boxes`` a pixel XYXY ``tv_tensors.BoundingBoxes``
    (0-based: devkit coordinates minus 1, ``canvas_size=(H, W)``), ``labels`` ``Tensor[G]``
    int64 (0-based), ``difficult`` ``Tensor[G]`` bool, ``orig_size`` ``Tensor[2]`` int64
    ``(H, W)`` and ``image_id`` ``str`` are given to ``transform`` (e.g.
    :func:`src.data.transforms.build_transforms`), whose output is returned. Without
    ``transform`` the image is returned as float32 ``[3, H, W]`` in ``[0, 1]`` and ``boxes``
    as ``Tensor[G, 4]`` float32 normalised xyxy ``(x - 1) / W`` (see the module docstring).

    Args:
        root: the ``VOCdevkit`` directory (containing ``VOC2007/``, ``VOC2012/``).
        image_sets: ``[[year, set], ...]``, e.g. ``[[2007, "trainval"], [2012, "trainval"]]``.
        transform: ``(image, target) -> (image, target)`` callable.
        keep_difficult: keep objects marked difficult (flagged in ``target["difficult"]``);
            if False they are removed (for training).
        skip_invalid: if False, a missing file or an invalid annotation raises
            :class:`VOCAnnotationError`; if True, invalid objects (or whole images whose XML or
            JPEG is missing or broken) are skipped and a warning gives the counts.

    Raises:
        FileNotFoundError: ``root``, ``root/VOC{year}`` or an ImageSets file does not exist.
        VOCAnnotationError: see ``skip_invalid``.

    """

    classes: tuple[str, ...] = VOC_CLASSES

    def __init__(
        self,
        root: str | os.PathLike[str],
        image_sets: ImageSets = ((2007, "trainval"),),
        transform: Transform | None = None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.image_sets = _normalise_image_sets(image_sets, "image_sets")
        self.transform = transform
        self.keep_difficult = bool(keep_difficult)
        self.skip_invalid = bool(skip_invalid)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"VOC root {str(self.root)!r} does not exist or is not a directory; set data.root "
                "to the VOCdevkit directory that contains VOC2007/ and/or VOC2012/"
            )
        self.records: list[VOCRecord] = []
        problems: list[str] = []
        skipped_images = 0
        skipped_objects = 0
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
                    record, bad = parse_voc_annotation(xml_path, jpg_path, self.skip_invalid)
                except VOCAnnotationError as err:
                    if not self.skip_invalid:
                        raise
                    skipped_images += 1
                    problems.append(str(err))
                    continue
                skipped_objects += len(bad)
                problems.extend(bad)
                if not self.keep_difficult and bool(record.difficult.any()):
                    keep = ~record.difficult
                    record = VOCRecord(
                        image_id=record.image_id,
                        image_path=record.image_path,
                        annotation_path=record.annotation_path,
                        width=record.width,
                        height=record.height,
                        boxes=record.boxes[keep],
                        labels=record.labels[keep],
                        difficult=record.difficult[keep],
                    )
                self.records.append(record)
        self.num_skipped_images = skipped_images
        self.num_skipped_objects = skipped_objects
        if problems:
            shown = "\n  ".join(problems[:_MAX_REPORTED])
            extra = len(problems) - _MAX_REPORTED
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            log.warning(
                "VOCDataset(%s, %s): skip_invalid=True skipped %d invalid object(s) and %d "
                "image(s):\n  %s%s",
                self.root,
                self.image_sets,
                skipped_objects,
                skipped_images,
                shown,
                more,
            )
        log.info(
            "VOCDataset %s: %d images, %d objects (keep_difficult=%s)",
            self.image_sets,
            len(self.records),
            self.num_objects,
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

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_objects(self) -> int:
        """Total number of objects kept (difficult ones included when kept)."""
        return sum(int(r.labels.numel()) for r in self.records)

    def class_counts(self) -> Tensor:
        """Return ``Tensor[20]`` int64: objects per class."""
        if not self.records:
            return torch.zeros(len(VOC_CLASSES), dtype=torch.int64)
        labels = torch.cat([r.labels for r in self.records])
        return torch.bincount(labels, minlength=len(VOC_CLASSES))

    def load_image(self, index: int) -> tv_tensors.Image:
        """Decode image ``index`` as a ``uint8`` RGB ``tv_tensors.Image`` ``[3, H, W]``.

        Raises:
            VOCAnnotationError: the image cannot be decoded or its size differs from the XML.

        """
        record = self.records[index]
        try:
            image = decode_image(str(record.image_path), mode=ImageReadMode.RGB)
        except (RuntimeError, OSError) as err:
            raise VOCAnnotationError(
                f"{record.image_path}: cannot decode image ({err}); replace the file or remove "
                "its id from the ImageSets file"
            ) from err
        if tuple(image.shape[-2:]) != (record.height, record.width):
            raise VOCAnnotationError(
                f"{record.image_path}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) but "
                f"{record.annotation_path} says {record.width}x{record.height}"
            )
        return tv_tensors.Image(image)

    def raw_target(self, index: int) -> dict[str, Any]:
        """Return the target given to ``transform`` (pixel XYXY ``BoundingBoxes``), no image.

        Args:
            index: dataset index.

        Returns:
            dict with ``boxes`` (``tv_tensors.BoundingBoxes`` float32 ``[G, 4]``, devkit
            coordinates minus 1, clamped at 0), ``labels``, ``difficult``, ``orig_size``,
            ``image_id``.

        """
        record = self.records[index]
        boxes = (record.boxes - 1.0).clamp(min=0.0)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                boxes,
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(record.height, record.width),
            ),
            "labels": record.labels.clone(),
            "difficult": record.difficult.clone(),
            "orig_size": torch.tensor([record.height, record.width], dtype=torch.int64),
            "image_id": record.image_id,
        }

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

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image = self.load_image(index)
        target = self.raw_target(index)
        if self.transform is not None:
            return self.transform(image, target)
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = (target["boxes"].as_subclass(Tensor) / scale).clamp(0.0, 1.0)
        return image.as_subclass(Tensor).float() / 255.0, {**target, "boxes": boxes}

    def __repr__(self) -> str:
        return (
            f"VOCDataset(root={str(self.root)!r}, image_sets={self.image_sets}, "
            f"images={len(self)}, keep_difficult={self.keep_difficult})"
        )


class VOCDataModule(LightningDataModule):
    """Pascal VOC DataModule: train on ``train_sets``, validate/test on ``val_sets``/``test_sets``.

    The training set uses ``build_transforms(train=True, image_size, augment, fill)`` and drops
    difficult objects unless ``keep_difficult``; validation and test sets use the deterministic
    resize and always keep difficult objects, flagged in ``target["difficult"]`` for the metric.

    Args:
        root: the ``VOCdevkit`` directory (config key ``data.root``).
        train_sets: ``[[year, set], ...]`` for training.
        val_sets: ``[[year, set], ...]`` for validation.
        test_sets: ``[[year, set], ...]`` for testing/prediction; None means ``val_sets``.
        keep_difficult: keep difficult objects in the training set.
        skip_invalid: skip invalid objects/images with a warning instead of raising.
        augment: ``"ssd"`` or ``"none"`` (training augmentation).
        image_size: output side ``S`` (or ``[H, W]``).
        batch_size: images per batch.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        num_classes: must be 20 (kept as a config key so the model can interpolate it).
        fill: zoom-out fill colour (RGB in ``[0, 1]``), the ImageNet mean by default.

    """

    classes: list[str]

    def __init__(
        self,
        root: str | os.PathLike[str],
        train_sets: ImageSets = ((2007, "trainval"), (2012, "trainval")),
        val_sets: ImageSets = ((2007, "test"),),
        test_sets: ImageSets | None = None,
        keep_difficult: bool = False,
        skip_invalid: bool = False,
        augment: str = "ssd",
        image_size: int | Sequence[int] = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        num_classes: int = 20,
        fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        super().__init__()
        if int(num_classes) != len(VOC_CLASSES):
            raise ValueError(
                f"data.num_classes must be {len(VOC_CLASSES)} for Pascal VOC, got {num_classes}"
            )
        if augment not in AUGMENTATIONS:
            raise ValueError(
                f"data.augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}"
            )
        if int(batch_size) <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.root = Path(str(root)).expanduser()
        self.train_sets = _normalise_image_sets(train_sets, "data.train_sets")
        self.val_sets = _normalise_image_sets(val_sets, "data.val_sets")
        self.test_sets = (
            self.val_sets
            if test_sets is None
            else _normalise_image_sets(test_sets, "data.test_sets")
        )
        self.keep_difficult = bool(keep_difficult)
        self.skip_invalid = bool(skip_invalid)
        self.augment = augment
        self.image_size = image_size
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.num_classes = len(VOC_CLASSES)
        self.classes = list(VOC_CLASSES)
        self.fill = tuple(float(f) for f in fill)
        self.train_transform = build_transforms(True, image_size, augment, self.fill)
        self.eval_transform = build_transforms(False, image_size, "none", self.fill)
        self.train_dataset: VOCDataset | None = None
        self.val_dataset: VOCDataset | None = None
        self.test_dataset: VOCDataset | None = None

    def _eval_dataset(self, sets: list[tuple[str, str]]) -> VOCDataset:
        return VOCDataset(
            self.root,
            sets,
            self.eval_transform,
            keep_difficult=True,
            skip_invalid=self.skip_invalid,
        )

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the datasets needed by ``stage`` (annotations are parsed here)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = VOCDataset(
                self.root,
                self.train_sets,
                self.train_transform,
                keep_difficult=self.keep_difficult,
                skip_invalid=self.skip_invalid,
            )
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._eval_dataset(self.val_sets)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            if self.test_sets == self.val_sets and self.val_dataset is not None:
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._eval_dataset(self.test_sets)

    def _loader(self, dataset: VOCDataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"VOCDataModule.{name}_dataloader() called before setup()")
        return detection_loader(
            dataset, self.batch_size, shuffle, self.num_workers, self.pin_memory
        )

    def train_dataloader(self) -> DataLoader:
        """Return shuffled training batches ``(images [B,3,S,S], targets)``."""
        return self._loader(self.train_dataset, True, "train")

    def val_dataloader(self) -> DataLoader:
        """Return validation batches (difficult objects flagged)."""
        return self._loader(self.val_dataset, False, "val")

    def test_dataloader(self) -> DataLoader:
        """Return test batches (difficult objects flagged)."""
        return self._loader(self.test_dataset, False, "test")

    def predict_dataloader(self) -> DataLoader:
        """Return the test batches (as :meth:`test_dataloader`)."""
        return self._loader(self.test_dataset, False, "test")
