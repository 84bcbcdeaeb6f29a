"""COCO-format detection data (the JSON of CVAT, Label Studio, Roboflow, COCO itself).

A split is a JSON file and an image folder (``data.train_json`` / ``data.train_images``, ...)::

    {"images":      [{"id": 7, "file_name": "a/x.jpg", "width": 640, "height": 480}, ...],
     "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [x, y, w, h],
                      "iscrowd": 0}, ...],
     "categories":  [{"id": 18, "name": "dog"}, ...]}

``file_name`` is relative to the image folder. ``bbox`` is ``[x, y, w, h]`` in pixels with
continuous coordinates (the image spans ``[0, W] x [0, H]``); it becomes the project's
normalised xyxy ``(x / W, y / H, (x + w) / W, (y + h) / H)``.

Classes are the train JSON's ``categories`` sorted by id: label ``i`` is the ``i``-th category,
so non-contiguous ids (COCO's 1..90 with gaps) map to contiguous labels ``0..C-1``, and
``CocoDataModule.category_ids[i]`` maps them back when results are written
(:mod:`src.data.coco_results`).

Crowd regions (``iscrowd: 1``) are left out of training targets; evaluation sets keep them,
flagged in ``target["iscrowd"]`` (and ``target["difficult"]``, so the VOC metric ignores them
too), as COCO's evaluation does. Images without annotations are kept as background images.

Checked when a split is loaded, each error naming the file and the image / annotation id:
missing ``images``, ``annotations`` or ``categories``; duplicate image ids; a missing image file;
an annotation whose ``image_id`` or ``category_id`` is unknown; a zero or negative width or
height; a box outside its image by more than 1 pixel (within 1 pixel it is clamped). With
``skip_invalid=True`` the offending annotations (or images) are left out and one WARNING gives
the counts.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert

from src.data.base import (
    DataFormatError,
    DetectionDataModule,
    DetectionDataset,
    Transform,
    check_boxes,
    report_skipped,
)
from src.data.transforms import IMAGENET_MEAN

log = logging.getLogger(__name__)

__all__ = [
    "CocoDataModule",
    "CocoDataset",
    "CocoFormatError",
    "load_coco_json",
    "parse_categories",
]

REQUIRED_KEYS: tuple[str, ...] = ("images", "annotations", "categories")
# how far (pixels) a box may stick out of its image before it is an error; it is clamped
OUTSIDE_TOLERANCE = 1.0


class CocoFormatError(DataFormatError):
    """A COCO JSON file, an image or an annotation in it is invalid."""


def load_coco_json(path: str | os.PathLike[str], key: str = "data.train_json") -> dict[str, Any]:
    """Read a COCO detection JSON and check its top-level structure.

    Args:
        path: the JSON file.
        key: the config key that named it (for error messages).

    Returns:
        The parsed dict (with ``images``, ``annotations`` and ``categories`` lists).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CocoFormatError: not JSON, or not a COCO detection file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: no such file; give the COCO JSON of that split")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise CocoFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise CocoFormatError(
            f"{path}: not a COCO detection file: the top level is a {type(data).__name__}, "
            "expected an object with images, annotations and categories (a COCO *results* "
            "file, a list of detections, cannot be used as ground truth)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CocoFormatError(
            f"{path}: not a COCO detection file: missing {', '.join(repr(k) for k in missing)} "
            f"(found keys {sorted(data)}); a COCO JSON needs images, annotations and categories"
        )
    for k in REQUIRED_KEYS:
        if not isinstance(data[k], list):
            raise CocoFormatError(f"{path}: {k!r} must be a list, got {type(data[k]).__name__}")
    return data


def parse_categories(
    data: dict[str, Any], path: str | os.PathLike[str]
) -> tuple[list[int], list[str]]:
    """The categories of a COCO dict, sorted by id.

    Returns:
        ``(ids, names)``: label ``i`` is category ``ids[i]`` named ``names[i]``.

    Raises:
        CocoFormatError: no categories, a category without an integer ``id`` or a ``name``,
            duplicate ids or names.
    """
    ids: list[int] = []
    names: list[str] = []
    for i, cat in enumerate(data["categories"]):
        cid = cat.get("id") if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise CocoFormatError(f"{path}: categories[{i}] has no integer 'id' ({cat!r})")
        if not isinstance(name, str) or not name.strip():
            raise CocoFormatError(f"{path}: category id {cid} has no 'name' ({cat!r})")
        ids.append(cid)
        names.append(name.strip())
    if not ids:
        raise CocoFormatError(f"{path}: 'categories' is empty; list the object classes there")
    for label, values in (("id", ids), ("name", names)):
        seen: set[Any] = set()
        for v in values:
            if v in seen:
                raise CocoFormatError(
                    f"{path}: category {label} {v!r} appears twice in 'categories'"
                )
            seen.add(v)
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return [ids[i] for i in order], [names[i] for i in order]


#: the last COCO JSON that :meth:`CocoDataset.read_classes` parsed, kept for the dataset built
#: next from the same file (a big train JSON is then read once), keyed by path, size and mtime
_PARSED: dict[tuple[str, int, int], dict[str, Any]] = {}
#: categories ``(ids, names)`` of the JSON files read so far, by the same key
_CATEGORIES: dict[tuple[str, int, int], tuple[list[int], list[str]]] = {}


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _categories_of(path: Path, key: str) -> tuple[list[int], list[str]]:
    """The sorted categories of a COCO JSON, read once per file version."""
    path = Path(path).expanduser()
    if not path.is_file():
        load_coco_json(path, key)  # raises the FileNotFoundError naming the key
    file_key = _file_key(path)
    if file_key not in _CATEGORIES:
        data = load_coco_json(path, key)
        _CATEGORIES[file_key] = parse_categories(data, path)
        _PARSED.clear()
        _PARSED[file_key] = data
    return _CATEGORIES[file_key]


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value <= 0 or value != int(value):
        return None
    return int(value)


class CocoDataset(DetectionDataset):
    """One COCO-format split: a JSON file and its image folder.

    ``dataset[i]`` returns ``(image, target)`` as :class:`src.data.base.DetectionDataset`
    describes; ``target["image_id"]`` and ``target["coco_image_id"]`` are the JSON image id,
    ``target["iscrowd"]`` flags crowd regions (also set in ``target["difficult"]``).

    Args:
        json_path: the COCO JSON.
        images_dir: the folder ``file_name`` is relative to.
        transform: ``(image, target) -> (image, target)`` callable.
        category_ids: the category id of each label (default: this JSON's ids, sorted); an
            annotation of another category is invalid.
        classes: the class names of ``category_ids`` (default: this JSON's names).
        keep_crowd: keep crowd regions (evaluation); False leaves them out (training).
        skip_invalid: leave out invalid annotations / images with one WARNING instead of
            raising.
        data: the already parsed JSON (saves reading it twice), else it is read here.
        categories_from: another split's COCO JSON (the train JSON) whose categories this one
            must use: ``category_ids`` and ``classes`` are read from it, and a category of this
            JSON with one of its ids but another name is an error.
        split: ``"train"``, ``"val"`` or ``"test"``: names the config key in errors
            (``data.val_json``).

    Raises:
        FileNotFoundError: ``json_path`` or ``images_dir`` does not exist.
        CocoFormatError: see the module docstring.
    """

    def __init__(
        self,
        json_path: str | os.PathLike[str],
        images_dir: str | os.PathLike[str],
        transform: Transform | None = None,
        category_ids: Sequence[int] | None = None,
        classes: Sequence[str] | None = None,
        keep_crowd: bool = True,
        skip_invalid: bool = False,
        data: dict[str, Any] | None = None,
        categories_from: str | os.PathLike[str] | None = None,
        split: str | None = None,
    ) -> None:
        if json_path is None or images_dir is None:
            raise ValueError(
                "a COCO split needs a JSON and an image folder, got null (data.test_json=null "
                "no longer means the val split: leave data.test_json and data.test_images unset, "
                "they default to the val ones)"
            )
        self.json_path = Path(json_path).expanduser()
        self.images_dir = Path(images_dir).expanduser()
        self.transform = transform
        self.keep_crowd = bool(keep_crowd)
        self.skip_invalid = bool(skip_invalid)
        key = f"data.{split}_json" if split else "json_path"
        if not split and categories_from is not None:
            key = "data.val_json / data.test_json"
        if data is None:
            stashed = (
                _PARSED.pop(_file_key(self.json_path), None) if self.json_path.is_file() else None
            )
            data = stashed if stashed is not None else load_coco_json(self.json_path, key)
        if categories_from is not None:
            source = Path(categories_from).expanduser()
            ref_ids, ref_names = _categories_of(source, "data.train_json")
            names_by_id = dict(zip(ref_ids, ref_names, strict=True))
            for cid, name in zip(*parse_categories(data, self.json_path), strict=True):
                if cid in names_by_id and names_by_id[cid] != name:
                    raise CocoFormatError(
                        f"{self.json_path}: category id {cid} is named {name!r} but "
                        f"{names_by_id[cid]!r} in {source}; every split must use the train "
                        "JSON's category ids and names"
                    )
            category_ids = ref_ids if category_ids is None else category_ids
            classes = ref_names if classes is None else classes
        if not self.images_dir.is_dir():
            raise FileNotFoundError(
                f"image folder {self.images_dir} (for {self.json_path}) does not exist; set "
                "data.train_images / data.val_images / data.test_images to the folder that "
                "the JSON's file_name entries are relative to"
            )
        own_ids, own_names = parse_categories(data, self.json_path)
        self.category_ids = list(category_ids) if category_ids is not None else own_ids
        names = list(classes) if classes is not None else None
        if names is None:
            by_id = dict(zip(own_ids, own_names, strict=True))
            names = [by_id.get(c, str(c)) for c in self.category_ids]
        self.classes = tuple(names)
        self._problems: list[str] = []
        self._parse_images(data["images"])
        self._parse_annotations(data["annotations"])
        report_skipped(
            log,
            f"CocoDataset({self.json_path})",
            self._problems,
            self.num_skipped_objects,
            self.num_skipped_images,
        )
        log.info(
            "CocoDataset %s: %d images (%d without objects), %d objects (%d crowd) of %d classes",
            self.json_path,
            len(self),
            int((self._counts == 0).sum()),
            int(self._counts.sum()),
            int(self._crowd_all.sum()),
            len(self.classes),
        )

    @classmethod
    def read_classes(cls, *args: Any, **kwargs: Any) -> tuple[list[str], list[int] | None]:
        """The categories of ``categories_from`` or ``json_path``, sorted by id: ``(names, ids)``.

        The parsed JSON is kept for the dataset built next from the same file, so that a big
        train JSON is read once.
        """
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["category_ids"] is not None and a["classes"] is not None:
            return list(a["classes"]), list(a["category_ids"])
        source = a["categories_from"] if a["categories_from"] is not None else a["json_path"]
        split = a["split"] if a["categories_from"] is None else "train"
        ids, names = _categories_of(Path(source), f"data.{split or 'train'}_json")
        return names, ids

    # ------------------------------------------------------------ parsing
    def _fail(self, message: str) -> None:
        if not self.skip_invalid:
            raise CocoFormatError(f"{self.json_path}: {message}")
        self._problems.append(f"{self.json_path}: {message}")

    def _parse_images(self, images: list[Any]) -> None:
        self.image_ids: list[int] = []
        self.file_names: list[str] = []
        sizes: list[tuple[int, int]] = []
        self._index: dict[int, int] = {}
        self._dropped: set[int] = set()
        skipped = 0
        for position, entry in enumerate(images):
            image_id = entry.get("id") if isinstance(entry, dict) else None
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                self._fail(f"images[{position}] has no integer 'id' ({entry!r})")
                skipped += 1
                continue
            where = f"image id {image_id}"
            if image_id in self._index:
                self._fail(
                    f"duplicate image id {image_id} (images[{position}] and an earlier entry); "
                    "image ids must be unique"
                )
                skipped += 1
                continue
            name = entry.get("file_name")
            width, height = _positive_int(entry.get("width")), _positive_int(entry.get("height"))
            problem = None
            if not isinstance(name, str) or not name:
                problem = f"{where} has no 'file_name'"
            elif width is None or height is None:
                problem = (
                    f"{where} ({name}): 'width' and 'height' must be positive integers, got "
                    f"{entry.get('width')!r} x {entry.get('height')!r}"
                )
            elif not (self.images_dir / name).is_file():
                problem = (
                    f"{where}: image file {self.images_dir / name} is missing (file_name "
                    f"{name!r} relative to the image folder); restore it or remove the image"
                )
            if problem is not None:
                self._fail(problem)
                self._dropped.add(image_id)
                skipped += 1
                continue
            self._index[image_id] = len(self.image_ids)
            self.image_ids.append(image_id)
            self.file_names.append(name)
            sizes.append((height, width))
        self._sizes = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
        self.num_skipped_images = skipped

    def _parse_annotations(self, annotations: list[Any]) -> None:
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        ann_ids: list[Any] = []
        image_index: list[int] = []
        labels: list[int] = []
        crowd: list[bool] = []
        xywh: list[list[float]] = []
        skipped = 0
        for position, ann in enumerate(annotations):
            if not isinstance(ann, dict):
                self._fail(f"annotations[{position}] is not an object ({ann!r})")
                skipped += 1
                continue
            ann_id = ann.get("id", f"#{position}")
            image_id = ann.get("image_id")
            where = f"annotation id {ann_id} (image id {image_id})"
            if image_id in self._dropped:  # its image was left out (already reported)
                skipped += 1
                continue
            bbox = ann.get("bbox")
            problem = None
            if image_id not in self._index:
                problem = f"{where}: unknown image_id {image_id!r} (not in 'images')"
            elif ann.get("category_id") not in label_of:
                problem = (
                    f"{where}: unknown category_id {ann.get('category_id')!r}; known ids "
                    f"{self.category_ids} ({', '.join(self.classes)})"
                )
            elif (
                not isinstance(bbox, (list, tuple))
                or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
            ):
                problem = f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}"
            if problem is not None:
                self._fail(problem)
                skipped += 1
                continue
            ann_ids.append(ann_id)
            image_index.append(self._index[image_id])
            labels.append(label_of[ann["category_id"]])
            crowd.append(bool(ann.get("iscrowd", 0)))
            xywh.append([float(v) for v in bbox])

        index = torch.tensor(image_index, dtype=torch.int64)
        boxes_xywh = torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)
        boxes = box_convert(boxes_xywh, "xywh", "xyxy")
        sizes = self._sizes[index] if len(index) else torch.zeros(0, 2, dtype=torch.int64)
        degenerate, outside, clamped = check_boxes(boxes, sizes, OUTSIDE_TOLERANCE)
        degenerate = degenerate | ~(boxes_xywh[:, 2:] > 0).all(dim=1)
        bad = degenerate | outside
        for k in bad.nonzero().flatten().tolist():
            image_id = self.image_ids[image_index[k]]
            height, width = sizes[k].tolist()
            where = f"annotation id {ann_ids[k]} (image id {image_id})"
            if degenerate[k]:
                self._fail(
                    f"{where}: bbox {xywh[k]} has a zero or negative width or height; "
                    "COCO boxes are [x, y, width, height] with width, height > 0"
                )
            else:
                self._fail(
                    f"{where}: bbox {xywh[k]} lies outside the {width}x{height} image by more "
                    f"than {OUTSIDE_TOLERANCE:g} pixel (COCO boxes are [x, y, width, height] "
                    "in pixels)"
                )
        skipped += int(bad.sum())
        keep = ~bad
        crowd_t = torch.tensor(crowd, dtype=torch.bool)
        self._crowd_all = crowd_t[keep]
        if not self.keep_crowd:
            keep = keep & ~crowd_t
        self.num_skipped_objects = skipped
        self.num_crowd_left_out = int((crowd_t & ~bad).sum()) if not self.keep_crowd else 0
        # group the kept annotations per image (stable: JSON order within an image)
        index = index[keep]
        order = torch.argsort(index, stable=True)
        self._counts = torch.bincount(index, minlength=len(self.image_ids))
        self._offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self._counts.cumsum(0)])
        self._boxes = clamped[keep][order].to(torch.float32)
        self._labels = torch.tensor(labels, dtype=torch.int64)[keep][order]
        self._crowd = crowd_t[keep][order]
        self.annotation_ids = [ann_ids[k] for k in keep.nonzero().flatten()[order].tolist()]

    # ------------------------------------------------------------ DetectionDataset interface
    def __len__(self) -> int:
        return len(self.image_ids)

    def image_path(self, index: int) -> Path:
        """``images_dir / file_name`` of item ``index``."""
        return self.images_dir / self.file_names[index]

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` from the JSON."""
        return int(self._sizes[index, 0]), int(self._sizes[index, 1])

    def image_key(self, index: int) -> int:
        """The JSON image id."""
        return self.image_ids[index]

    def coco_image_id(self, index: int) -> int:
        """The JSON image id."""
        return self.image_ids[index]

    def file_name(self, index: int) -> str:
        """The JSON ``file_name``."""
        return self.file_names[index]

    def error(self, message: str) -> Exception:
        """:class:`CocoFormatError`."""
        return CocoFormatError(message)

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """Pixel xyxy boxes of image ``index`` (new tensors); crowd regions flagged."""
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        crowd = self._crowd[lo:hi].clone()
        return {
            "boxes": self._boxes[lo:hi].clone(),
            "labels": self._labels[lo:hi].clone(),
            "difficult": crowd.clone(),
            "iscrowd": crowd,
        }

    @property
    def num_objects(self) -> int:
        """Objects kept (crowd regions included when kept)."""
        return int(self._labels.numel())

    def class_counts(self) -> Tensor:
        """``Tensor[C]`` int64: objects per class."""
        return torch.bincount(self._labels, minlength=len(self.classes))

    def __repr__(self) -> str:
        return (
            f"CocoDataset(json={str(self.json_path)!r}, images={len(self)}, "
            f"objects={self.num_objects}, classes={len(self.classes)})"
        )


class CocoDataModule(DetectionDataModule):
    """The COCO DataModule of earlier versions, kept so that their checkpoints and code load.

    ``conf/data/coco.yaml`` now builds :class:`~src.data.base.DetectionDataModule` with
    :class:`CocoDataset` factories directly; this class makes the same from the old keys. The
    class names and ids are read from the train JSON's ``categories`` in ``__init__``; the
    validation and test JSONs must use the same category ids (names agreeing).

    Args:
        train_json: COCO JSON of the training split.
        train_images: folder the training ``file_name`` entries are relative to.
        val_json: COCO JSON of the validation split.
        val_images: its image folder.
        test_json: COCO JSON of the test split; None: the validation split.
        test_images: its image folder (required with ``test_json``).
        skip_invalid: leave out invalid annotations / images with a WARNING instead of raising.
        augment: training augmentation.
        image_size: model input side ``S`` or ``[H, W]``.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        cache: decode every image once in ``setup`` and keep it in memory (uint8).
        fill: zoom-out fill colour (RGB in ``[0, 1]``).

    Raises:
        FileNotFoundError: a JSON file does not exist (the config key is named).
        CocoFormatError: the train JSON is not COCO, or the splits disagree on categories.
        ValueError: ``test_json`` without ``test_images``, or a shared key out of range.
    """

    def __init__(
        self,
        train_json: str | os.PathLike[str],
        train_images: str | os.PathLike[str],
        val_json: str | os.PathLike[str],
        val_images: str | os.PathLike[str],
        test_json: str | os.PathLike[str] | None = None,
        test_images: str | os.PathLike[str] | None = None,
        skip_invalid: bool = False,
        augment: str = "ssd",
        image_size: int | Sequence[int] = 300,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        cache: bool = False,
        fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        if (test_json is None) != (test_images is None):
            raise ValueError(
                "data.test_json and data.test_images go together: set both (a test split) or "
                f"neither (test on the validation split); got {test_json!r} and {test_images!r}"
            )
        paths = {
            "train": (train_json, train_images),
            "val": (val_json, val_images),
            "test": (test_json, test_images),
        }
        self.paths = {
            split: (Path(str(j)).expanduser(), Path(str(i)).expanduser())
            for split, (j, i) in paths.items()
            if j is not None
        }

        def factory(split: str) -> functools.partial[CocoDataset]:
            json_path, images_dir = self.paths[split]
            return functools.partial(
                CocoDataset,
                json_path=json_path,
                images_dir=images_dir,
                keep_crowd=split != "train",
                skip_invalid=bool(skip_invalid),
                categories_from=None if split == "train" else self.paths["train"][0],
                split=split,
            )

        keys = {
            f"{split}_{kind}": None if value is None else str(value)
            for split, pair in paths.items()
            for kind, value in zip(("json", "images"), pair, strict=True)
        }
        super().__init__(
            train=factory("train"),
            val=factory("val"),
            test=factory("test") if "test" in self.paths else None,
            augment=augment,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            cache=cache,
            fill=fill,
            skip_invalid=bool(skip_invalid),
            **keys,
        )
