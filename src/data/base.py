"""What every detection format shares: one image reader, the image cache, targets, DataModule.

A format module (:mod:`src.data.banana`, :mod:`src.data.voc`, :mod:`src.data.coco`,
:mod:`src.data.yolo`) only parses its files. It subclasses :class:`DetectionDataset` and
implements ``__len__``, :meth:`~DetectionDataset.image_path`,
:meth:`~DetectionDataset.image_size` and :meth:`~DetectionDataset.pixel_annotations`; the base
decodes images (:func:`read_image`, optionally from an in-memory :class:`ImageCache`), builds
the target dict, applies the transform and exports the ground truth as COCO
(:meth:`~DetectionDataset.coco_ground_truth`). Two class-level hooks let the one
:class:`DetectionDataModule` serve it: :meth:`~DetectionDataset.read_classes` (the class names
before any dataset is built) and, for data that must be fetched, :meth:`~DetectionDataset.prepare`.

The format's yaml (``conf/data/<format>.yaml``) then builds :class:`DetectionDataModule` with
``train`` / ``val`` / ``test`` factories of that dataset (``_partial_: true``) and includes
``conf/data/_loader.yaml`` for the loader keys; no DataModule subclass is needed (docs/data.md).

Target dict of every dataset (before the transform; :mod:`src.data.transforms` then turns the
boxes into normalised xyxy):

* ``boxes``: ``tv_tensors.BoundingBoxes`` float32 ``[G, 4]`` pixel XYXY, 0-based continuous
  coordinates (``0 <= x1 < x2 <= W``), ``canvas_size=(H, W)``;
* ``labels``: ``Tensor[G]`` int64, 0-based indices into ``dataset.classes``;
* ``difficult``: ``Tensor[G]`` bool, objects an evaluation ignores (VOC's difficult flag; COCO
  crowd regions);
* ``iscrowd``: ``Tensor[G]`` bool, COCO crowd regions (all False for other formats);
* ``orig_size``: ``Tensor[2]`` int64 ``(H, W)`` of the image on disk;
* ``image_id``: the format's own id (file stem for VOC and bananas, the JSON ``id`` for COCO);
* ``coco_image_id``: ``int``, the image's id in :meth:`DetectionDataset.coco_ground_truth` and
  in COCO result files (the JSON ``id`` for COCO, the dataset index + 1 otherwise).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning import LightningDataModule
from omegaconf import OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_convert

from src.data.collate import detection_loader
from src.data.transforms import AUGMENTATIONS, IMAGENET_MEAN, build_transforms, parse_image_size

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "DataFormatError",
    "DetectionDataModule",
    "DetectionDataset",
    "ImageCache",
    "ImageReadError",
    "Transform",
    "check_boxes",
    "read_class_names",
    "read_image",
    "read_image_size",
    "report_skipped",
]

Transform = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]]
SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_REPORTED = 5
#: image files the folder-based formats (plain VOC folders, YOLO) pick up (what
#: :func:`read_image` decodes)
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif"})


class DataFormatError(ValueError):
    """An annotation file, an annotation in it, or an image it refers to is invalid."""


class ImageReadError(ValueError):
    """An image file exists but cannot be decoded."""


def read_image(path: str | os.PathLike[str]) -> Tensor:
    """Decode an image file (JPEG, PNG, ...) to RGB: the one image reader of every dataset.

    Args:
        path: the image file.

    Returns:
        ``Tensor[3, H, W]`` uint8 RGB (grey and palette images converted, alpha dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: the file is corrupt, truncated or not an image (the path is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError) as err:
        raise ImageReadError(
            f"cannot read image {path}: {err}. The file is corrupt or not an image; replace it "
            "or remove it from the annotations"
        ) from err


def read_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """Return ``(H, W)`` of an image from its header, without decoding the pixels.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageReadError: the header cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageReadError(
            f"cannot read image {path}: {err}. The file is corrupt or not an image; replace it "
            "or remove it from the annotations"
        ) from err
    return height, width


class ImageCache:
    """Every image of a dataset decoded once and kept in memory as uint8.

    Images of one size are stored in one contiguous ``Tensor[N, 3, H, W]`` (shared
    copy-on-write with forked DataLoader workers); mixed sizes fall back to a list.

    Args:
        paths: the image files, in dataset order.
        reader: the decoder (default :func:`read_image`).

    Attributes:
        images: ``Tensor[N, 3, H, W]`` uint8, or a list of ``Tensor[3, H_i, W_i]`` uint8.
        sizes: ``Tensor[N, 2]`` int64 ``(H, W)`` of each image.
    """

    def __init__(
        self, paths: Sequence[Path], reader: Callable[[Path], Tensor] | None = None
    ) -> None:
        reader = reader if reader is not None else read_image
        stacked: Tensor | None = None
        tensors: list[Tensor] = []
        sizes: list[tuple[int, int]] = []
        for i, path in enumerate(paths):
            image = reader(path)
            height, width = int(image.shape[-2]), int(image.shape[-1])
            sizes.append((height, width))
            if i == 0:
                stacked = torch.empty((len(paths), 3, height, width), dtype=torch.uint8)
            if stacked is not None and stacked.shape[-2:] == image.shape[-2:]:
                stacked[i] = image
                continue
            if stacked is not None:  # mixed sizes: fall back to a list of tensors
                tensors = [stacked[j].clone() for j in range(i)]
                stacked = None
            tensors.append(image.contiguous())
        self.images: Tensor | list[Tensor] = stacked if stacked is not None else tensors
        self.sizes = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
        log.debug("Decoded %d images into memory", len(sizes))

    def __len__(self) -> int:
        return int(self.sizes.shape[0])

    def __getitem__(self, index: int) -> Tensor:
        """Return image ``index`` (a view of the cache: never write into it)."""
        return self.images[index]


def check_boxes(
    boxes: Tensor, sizes: Tensor, tolerance: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorised validity check of pixel boxes against their images.

    Args:
        boxes: ``Tensor[N, 4]`` float pixel xyxy (0-based continuous coordinates).
        sizes: ``Tensor[N, 2]`` ``(H, W)`` of each box's image.
        tolerance: how far (pixels) a box may stick out of its image and still be valid; such
            boxes are clamped to the image.

    Returns:
        ``(degenerate, outside, clamped)``: ``Tensor[N]`` bool masks of boxes with
        ``x2 <= x1`` or ``y2 <= y1`` or a non-finite value, of boxes outside the image by more
        than ``tolerance``, and the clamped boxes ``Tensor[N, 4]`` (a new tensor).
    """
    boxes = boxes.to(torch.float32).reshape(-1, 4)
    limits = sizes.to(torch.float32).reshape(-1, 2).flip(1).repeat(1, 2)  # W, H, W, H
    finite = torch.isfinite(boxes).all(dim=1)
    degenerate = ~finite | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    outside = ((boxes < -tolerance) | (boxes > limits + tolerance)).any(dim=1) & finite
    clamped = torch.minimum(boxes.clamp(min=0.0), limits)
    return degenerate, outside, clamped


def report_skipped(
    logger: logging.Logger, what: str, problems: Sequence[str], objects: int, images: int
) -> None:
    """Log one WARNING with the counts and the first problems that ``skip_invalid`` skipped."""
    if not problems:
        return
    shown = "\n  ".join(problems[:MAX_REPORTED])
    extra = len(problems) - MAX_REPORTED
    more = f"\n  ... and {extra} more" if extra > 0 else ""
    logger.warning(
        "%s: skip_invalid=True skipped %d invalid object(s) and %d image(s):\n  %s%s",
        what,
        objects,
        images,
        shown,
        more,
    )


def read_class_names(
    classes: str | os.PathLike[str] | Sequence[str], key: str = "data.classes"
) -> list[str]:
    """Class names from a list or from a text file with one name a line.

    Args:
        classes: a list of names, or the path of a text file (blank lines and lines starting
            with ``#`` are ignored).
        key: the config key named in error messages.

    Returns:
        The names in order (label ``i`` is ``names[i]``).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no names, an empty name, or a name given twice (file line named).
    """
    where = key
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{key}={classes}: no such file; give a list such as {key}=[cat,dog] or a text "
                "file with one class name a line"
            )
        names, lines = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            text = line.strip()
            if text and not text.startswith("#"):
                names.append(text)
                lines.append(number)
        where = f"{path}"
    else:
        names = [str(n).strip() for n in classes]
        lines = list(range(len(names)))
    if not names:
        raise ValueError(f"{where}: no class names; give at least one ({key}=[cat,dog])")
    seen: dict[str, int] = {}
    for name, line in zip(names, lines, strict=True):
        pos = f"line {line}" if where != key else f"entry {line}"
        if not name:
            raise ValueError(f"{where}: {pos} is an empty class name")
        if name in seen:
            raise ValueError(f"{where}: class {name!r} is given twice; class names must be unique")
        seen[name] = line
    return names


class DetectionDataset(Dataset):
    """Base of the detection datasets: image decoding, cache, target dict, transform, COCO export.

    Subclasses set ``self.classes`` and ``self.transform`` and implement ``__len__``,
    :meth:`image_path`, :meth:`image_size` and :meth:`pixel_annotations`; they may override
    :meth:`image_key`, :meth:`coco_image_id`, :meth:`file_name` and :meth:`error`.

    ``dataset[i]`` returns ``transform(image, target)`` (see the module docstring for the
    target dict; the image is a ``uint8`` ``tv_tensors.Image`` ``[3, H, W]``). Without a
    transform: ``(image float32 [3, H, W] in [0, 1], target with boxes Tensor[G, 4] float32
    normalised xyxy)``.
    """

    classes: tuple[str, ...] = ()
    transform: Transform | None = None
    _cache: ImageCache | None = None

    # ------------------------------------------------------------ what a format implements
    def __len__(self) -> int:
        raise NotImplementedError

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of item ``index`` as the annotations say."""
        raise NotImplementedError

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """Annotations of item ``index`` in the base frame.

        Returns:
            dict with ``boxes`` ``Tensor[G, 4]`` float32 pixel XYXY (0-based continuous),
            ``labels`` ``Tensor[G]`` int64, ``difficult`` and ``iscrowd`` ``Tensor[G]`` bool;
            new tensors the caller may modify.
        """
        raise NotImplementedError

    def image_key(self, index: int) -> Any:
        """The format's own id of item ``index`` (``target["image_id"]``)."""
        return str(index)

    def coco_image_id(self, index: int) -> int:
        """The id of item ``index`` in COCO ground truth and result files (default: index + 1)."""
        return int(index) + 1

    def file_name(self, index: int) -> str:
        """The image's ``file_name`` in :meth:`coco_ground_truth` (default: the file's name)."""
        return self.image_path(index).name

    def error(self, message: str) -> Exception:
        """The exception raised for a bad image (subclasses use their format's error)."""
        return DataFormatError(message)

    # ------------------------------------------------------------ format hooks (class level)
    @classmethod
    def read_classes(cls, *args: Any, **kwargs: Any) -> tuple[list[str], list[int] | None]:
        """The class names a dataset built with these arguments will have, read cheaply.

        :class:`DetectionDataModule` calls it with its ``train`` factory's arguments in
        ``__init__``, before any dataset is built, to size the model; a format whose classes
        live in its files (COCO categories, YOLO ``names``) reads just those, and may check its
        arguments here so that a bad config fails at once.

        Returns:
            ``(names, category_ids)``: label ``i`` is ``names[i]``; ``category_ids[i]`` is its
            id in COCO result files, or None for ``1..C``. Default: the factory's ``classes``
            keyword (a list or a text file, :func:`read_class_names`), else the class
            attribute ``classes``.

        Raises:
            TypeError: the format cannot say its classes before it is built.
        """
        if kwargs.get("classes") is not None:
            return read_class_names(kwargs["classes"], "data.classes"), None
        if not cls.classes:
            raise TypeError(
                f"{cls.__name__} does not say its classes before it is built: give the factory "
                "a classes keyword, set the class attribute classes, or implement read_classes()"
            )
        return list(cls.classes), None

    @classmethod
    def prepare(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Fetch or generate the files a dataset built with these arguments reads.

        :meth:`DetectionDataModule.prepare_data` calls it once per distinct factory, on one
        process only (Lightning's place for downloads). Default: nothing to do.

        Returns:
            Facts to record in the DataModule's hyper-parameters (e.g. ``resolved_source``).
        """
        return {}

    def facts(self) -> dict[str, Any]:
        """Facts found while building this dataset, recorded in the DataModule's hparams."""
        return {}

    # ------------------------------------------------------------ shared behaviour
    @property
    def num_classes(self) -> int:
        """Number of object classes (``len(self.classes)``)."""
        return len(self.classes)

    def build_cache(self) -> None:
        """Decode every image once into memory (call before DataLoader workers fork)."""
        self._cache = ImageCache([self.image_path(i) for i in range(len(self))])

    @property
    def cached(self) -> bool:
        """Whether the images are held in memory."""
        return self._cache is not None

    def load_image(self, index: int) -> tv_tensors.Image:
        """Decode image ``index`` as a ``uint8`` RGB ``tv_tensors.Image`` ``[3, H, W]``.

        Raises:
            Exception: ``self.error(...)`` naming the file when it cannot be decoded or its size
                differs from the annotations'.
        """
        if self._cache is not None:
            image = self._cache[index]
        else:
            path = self.image_path(index)
            try:
                image = read_image(path)
            except (ImageReadError, FileNotFoundError) as err:
                raise self.error(
                    f"{path}: cannot decode image ({err}); replace the file or remove it from "
                    "the annotations"
                ) from err
        height, width = self.image_size(index)
        if tuple(image.shape[-2:]) != (height, width):
            raise self.error(
                f"{self.image_path(index)}: image is {image.shape[-1]}x{image.shape[-2]} (WxH) "
                f"but its annotation says {width}x{height}"
            )
        return tv_tensors.Image(image)

    def raw_target(self, index: int) -> dict[str, Any]:
        """The target given to ``transform`` (pixel XYXY ``BoundingBoxes``), without the image."""
        height, width = self.image_size(index)
        ann = self.pixel_annotations(index)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                ann["boxes"].to(torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(height, width),
            ),
            "labels": ann["labels"],
            "difficult": ann["difficult"],
            "iscrowd": ann["iscrowd"],
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "image_id": self.image_key(index),
            "coco_image_id": self.coco_image_id(index),
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

    @property
    def num_objects(self) -> int:
        """Total number of objects (crowd and difficult ones included when kept)."""
        return sum(int(self.pixel_annotations(i)["labels"].numel()) for i in range(len(self)))

    def class_counts(self) -> Tensor:
        """``Tensor[C]`` int64: objects per class."""
        labels = [self.pixel_annotations(i)["labels"] for i in range(len(self))]
        if not labels:
            return torch.zeros(self.num_classes, dtype=torch.int64)
        return torch.bincount(torch.cat(labels), minlength=self.num_classes)

    def coco_ground_truth(self, category_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """The dataset's annotations as a COCO detection dict (for pycocotools or a JSON file).

        Args:
            category_ids: the COCO category id of each label (default ``1 .. C``).

        Returns:
            ``{"images", "annotations", "categories"}`` with pixel ``bbox`` ``[x, y, w, h]``
            (0-based continuous), ``area = w * h``, ``iscrowd`` (difficult objects count as
            crowd, so that COCO evaluation ignores them), image ids :meth:`coco_image_id`.
        """
        ids = [int(c) for c in category_ids] if category_ids is not None else None
        ids = ids if ids is not None else list(range(1, len(self.classes) + 1))
        if len(ids) != len(self.classes):
            raise ValueError(
                f"category_ids has {len(ids)} entries but the dataset has {len(self.classes)} "
                "classes"
            )
        lookup = torch.tensor(ids, dtype=torch.int64)
        images, annotations = [], []
        for i in range(len(self)):
            height, width = self.image_size(i)
            image_id = self.coco_image_id(i)
            images.append(
                {"id": image_id, "file_name": self.file_name(i), "width": width, "height": height}
            )
            ann = self.pixel_annotations(i)
            xywh = box_convert(ann["boxes"].to(torch.float64), "xyxy", "xywh")
            crowd = (ann["iscrowd"] | ann["difficult"]).tolist()
            cats = lookup[ann["labels"]].tolist()
            for box, cat, is_crowd in zip(xywh.tolist(), cats, crowd, strict=True):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": cat,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": int(is_crowd),
                    }
                )
        categories = [
            {"id": cid, "name": name, "supercategory": "none"}
            for cid, name in zip(ids, self.classes, strict=True)
        ]
        return {"images": images, "annotations": annotations, "categories": categories}


DatasetFactory = Callable[..., "DetectionDataset"]


def _factory_parts(factory: Any) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(target, args, keywords)`` of a dataset factory (a ``functools.partial`` or a class)."""
    if isinstance(factory, functools.partial):
        return factory.func, tuple(factory.args), dict(factory.keywords)
    return factory, (), {}


def _same_factory(a: Any, b: Any) -> bool:
    """Whether two dataset factories build the same dataset (same target and arguments)."""
    if a is b:
        return True
    fa, aa, ka = _factory_parts(a)
    fb, ab, kb = _factory_parts(b)
    if fa is not fb or len(aa) != len(ab) or set(ka) != set(kb):
        return False
    try:
        return bool(aa == ab) and all(bool(ka[k] == kb[k]) for k in ka)
    except Exception:  # values without a usable ==: treat as different
        return False


def _plain(value: Any) -> Any:
    """OmegaConf containers and paths as plain Python values (for ``hparams``)."""
    if OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


class DetectionDataModule(LightningDataModule):
    """The one DataModule of every format: dataset factories in, four DataLoaders out.

    A format contributes a :class:`DetectionDataset` subclass; its config
    (``conf/data/<format>.yaml``) gives the factories as ``_partial_: true`` objects and includes
    ``conf/data/_loader.yaml``, which holds the loader arguments below once::

        defaults: [_loader, _self_]
        _target_: src.data.base.DetectionDataModule
        root: ???
        train: {_target_: src.data.my_format.MyDataset, _partial_: true, root: ${..root},
                split: train}
        val: {_target_: src.data.my_format.MyDataset, _partial_: true, root: ${..root},
              split: val}

    Each factory is called once, in :meth:`setup`, as ``factory(transform=...)`` (the training
    pipeline for ``train``, the deterministic one for ``val`` and ``test``). The class names are
    known right after ``__init__`` (the model is sized from them): the ``train`` factory's
    :meth:`DetectionDataset.read_classes` reads them without building the dataset. Every other
    split must have the same classes. :meth:`prepare_data` calls each factory's
    :meth:`DetectionDataset.prepare` (downloads, generated data).

    Every argument, the format's own keys (``**options``) included, is saved as a
    hyper-parameter (``self.hparams``: logged, stored in checkpoints, shown by the start
    summary); the factories themselves are not.

    Args:
        train: factory of the training split.
        val: factory of the validation split.
        test: factory of the test split; None, or a factory equal to ``val`` (same target and
            arguments): the test split is the validation split (one dataset serves both).
        batch_size: images per batch.
        num_workers: DataLoader workers (the image cache is built in ``setup``, before the
            workers fork, so they share it copy-on-write).
        pin_memory: DataLoader ``pin_memory``.
        augment: training augmentation, ``"none"``, ``"flip"``, ``"photometric"`` or ``"ssd"``
            (:func:`src.data.transforms.build_transforms`).
        image_size: model input side ``S`` or ``[H, W]``.
        cache: decode every image once in ``setup`` and keep it in memory (uint8).
        fill: zoom-out fill colour (RGB in ``[0, 1]``).
        allow_empty: train on a training split without any object (``data.allow_empty``);
            by default :meth:`setup` stops with an error naming the data.
        **options: the format's own config keys (``data.root``, ``data.train_sets``, ...) that
            the factories read through interpolation (``${..root}``); only recorded here.

    Attributes:
        classes: the class names (label ``i`` is ``classes[i]``).
        num_classes: ``len(classes)``.
        category_ids: COCO category id of each label (a COCO JSON's ids, else ``1..C``).
        train_dataset, val_dataset, test_dataset: built by :meth:`setup`.

    Raises:
        ValueError: a loader argument out of range (the config key is named).
        TypeError: a factory is missing or is not a :class:`DetectionDataset` (partial), or
            ``num_classes`` is given (the count comes from the classes).
    """

    def __init__(
        self,
        train: DatasetFactory,
        val: DatasetFactory,
        test: DatasetFactory | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: str = "none",
        image_size: int | Sequence[int] = 300,
        cache: bool = False,
        fill: Sequence[float] = IMAGENET_MEAN,
        allow_empty: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if "num_classes" in options:
            raise TypeError(
                "data.num_classes is not a config key: the class count comes from the classes "
                "(data.classes, or the dataset's own list); remove it"
            )
        for split, factory in (("train", train), ("val", val), ("test", test)):
            if factory is None and split != "test":
                raise TypeError(
                    f"data.{split} is missing: give a dataset factory (_partial_: true)"
                )
            target = _factory_parts(factory)[0] if factory is not None else None
            if factory is not None and not (
                isinstance(target, type) and issubclass(target, DetectionDataset)
            ):
                raise TypeError(
                    f"data.{split} must build a DetectionDataset subclass (a _target_ with "
                    f"_partial_: true), got {factory!r}"
                )
        if augment not in AUGMENTATIONS:
            raise ValueError(
                f"data.augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}"
            )
        parse_image_size(image_size, "data.image_size")
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.factories: dict[str, DatasetFactory | None] = {
            "train": train,
            "val": val,
            "test": test,
        }
        names, ids = self._call_hook(train, "read_classes")
        self.classes: list[str] = [str(n) for n in names]
        if not self.classes:
            raise ValueError(f"{self.format_name}: no object classes")
        self.category_ids: list[int] = (
            [int(c) for c in ids] if ids is not None else list(range(1, len(self.classes) + 1))
        )
        if len(self.category_ids) != len(self.classes):
            raise ValueError(
                f"{len(self.category_ids)} category ids for {len(self.classes)} classes"
            )
        self.augment = augment
        self.image_size = _plain(image_size)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.cache = bool(cache)
        self.allow_empty = bool(allow_empty)
        self.fill = tuple(float(f) for f in fill)
        self.train_transform = build_transforms(True, self.image_size, augment, self.fill)
        self.eval_transform = build_transforms(False, self.image_size, "none", self.fill)
        self.train_dataset: DetectionDataset | None = None
        self.val_dataset: DetectionDataset | None = None
        self.test_dataset: DetectionDataset | None = None
        self._prepared = False
        self.save_hyperparameters(
            {
                "batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "pin_memory": self.pin_memory,
                "augment": augment,
                "image_size": self.image_size,
                "cache": self.cache,
                "allow_empty": self.allow_empty,
                **{k: _plain(v) for k, v in options.items()},
            }
        )

    @staticmethod
    def _call_hook(factory: DatasetFactory, name: str) -> Any:
        """Call the factory target's class method ``name`` with the factory's arguments."""
        target, args, keywords = _factory_parts(factory)
        return getattr(target, name)(*args, **keywords)

    @property
    def num_classes(self) -> int:
        """Number of object classes (the model adds background)."""
        return len(self.classes)

    @property
    def format_name(self) -> str:
        """The dataset class of the training factory, e.g. ``"VOCDataset"``."""
        return getattr(_factory_parts(self.factories["train"])[0], "__name__", "dataset")

    @property
    def skip_invalid(self) -> bool:
        """The format's ``skip_invalid`` option (False when it has none)."""
        return bool(self.hparams.get("skip_invalid", False))

    def test_is_val(self) -> bool:
        """Whether the test split is the validation split (no or the same factory)."""
        test = self.factories["test"]
        return test is None or _same_factory(test, self.factories["val"])

    def _record(self, facts: dict[str, Any]) -> None:
        """Add facts found while preparing / building (e.g. ``resolved_source``) to hparams.

        ``save_hyperparameters(dict)`` merges them and re-freezes ``hparams_initial``, which is
        what the Trainer sends to the loggers (after ``setup``).
        """
        if facts and any(self.hparams.get(k) != v for k, v in facts.items()):
            self.save_hyperparameters({k: _plain(v) for k, v in facts.items()})

    def prepare_data(self) -> None:
        """Call each distinct factory's :meth:`DetectionDataset.prepare` (rank 0 only)."""
        seen: list[DatasetFactory] = []
        for factory in self.factories.values():
            if factory is None or any(_same_factory(factory, s) for s in seen):
                continue
            seen.append(factory)
            self._record(self._call_hook(factory, "prepare") or {})
        self._prepared = True

    def build_dataset(self, split: str) -> DetectionDataset:
        """Build the dataset of ``split`` (``"train"``, ``"val"`` or ``"test"``) from its factory.

        Raises:
            DataFormatError: its classes differ from the training split's.
        """
        transform = self.train_transform if split == "train" else self.eval_transform
        factory = self.factories[split] or self.factories["val"]
        dataset = factory(transform=transform)
        if list(dataset.classes) != self.classes:
            raise DataFormatError(
                f"the {split} split has the classes {list(dataset.classes)} but the train split "
                f"{self.classes}: every split needs the same class list (data.classes)"
            )
        return dataset

    def _build(self, split: str) -> DetectionDataset:
        dataset = self.build_dataset(split)
        if self.cache and not dataset.cached:
            dataset.build_cache()
        self._record(dataset.facts())
        return dataset

    def setup(self, stage: str | None = None) -> None:
        """Build (once) the datasets ``stage`` needs (annotations are parsed here).

        Called by hand, without a Trainer and before :meth:`prepare_data`, it prepares first.
        """
        if not self._prepared and self.trainer is None:
            self.prepare_data()
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build("train")
            self._check_objects(self.train_dataset, "train")
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build("val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            if self.test_is_val():
                if self.val_dataset is None:
                    self.val_dataset = self._build("val")
                self.test_dataset = self.val_dataset
            else:
                self.test_dataset = self._build("test")

    def _check_objects(self, dataset: DetectionDataset, split: str) -> None:
        """Stop when the ``split`` dataset holds no object at all (unless ``allow_empty``).

        Raises:
            DataFormatError: naming the data, the split and ``data.allow_empty=true``.
        """
        if self.allow_empty or dataset.num_objects > 0:
            return
        keys = ("root", "dataset_yaml", "train_json", "data_dir", "source")
        where = [f"data.{k}={self.hparams[k]}" for k in keys if self.hparams.get(k)]
        raise DataFormatError(
            f"the {split} split of {self.format_name} ({', '.join(where) or 'data'}; "
            f"{len(dataset)} images) holds no object: a detector learns nothing from it. Check "
            "the annotations and the split, or set data.allow_empty=true to train anyway"
        )

    def _loader(self, dataset: DetectionDataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            stage = {"train": "fit", "val": "validate"}.get(name, name)
            raise RuntimeError(
                f"{type(self).__name__}.{name}_dataloader() called before setup(); call "
                f"setup({stage!r}) first"
            )
        return detection_loader(
            dataset,
            self.batch_size,
            shuffle,
            self.num_workers,
            self.pin_memory,
            resumable=name == "train",  # its position travels in checkpoints (exact resume)
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(images [B, 3, S, S], targets)``."""
        return self._loader(self.train_dataset, True, "train")

    def val_dataloader(self) -> DataLoader:
        """Validation batches (deterministic order, no augmentation)."""
        return self._loader(self.val_dataset, False, "val")

    def _test_dataset(self) -> DetectionDataset | None:
        if self.test_dataset is None and self.test_is_val():
            return self.val_dataset
        return self.test_dataset

    def test_dataloader(self) -> DataLoader:
        """Test batches (the validation split when :meth:`test_is_val`)."""
        return self._loader(self._test_dataset(), False, "test")

    def predict_dataloader(self) -> DataLoader:
        """The test batches, for prediction."""
        return self._loader(self._test_dataset(), False, "predict")
