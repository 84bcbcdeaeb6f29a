"""Ultralytics YOLO detection format: ``data=yolo data.dataset_yaml=path/to/data.yaml``.

The dataset yaml (Ultralytics' ``data.yaml``)::

    path: ../datasets/pets   # dataset root; a relative path is relative to this yaml's folder;
                             # no `path`: the yaml's folder
    train: images/train      # a folder of images (searched recursively), a .txt list of image
                             # paths (relative lines: to the list's folder), or a list of these
    val: images/val
    test: images/test        # optional: without it the test split is the validation split
    names: [cat, dog]        # or {0: cat, 1: dog} (ids 0..C-1)
    nc: 2                    # optional; must equal the number of names
    category_ids: [17, 18]   # optional (written by coco2yolo): each class's COCO category id

Labels follow Ultralytics' rule: the label file of ``.../images/.../x.jpg`` is
``.../labels/.../x.txt`` (the last ``/images/`` path component becomes ``/labels/`` and the
suffix ``.txt``), one object a line::

    class cx cy w h          # class: 0-based index into names; box: centre, width and height,
                             # normalised by the image width / height

An image without a label file (or with an empty one) is a background image. A box may stick
out of ``[0, 1]`` by :data:`OUTSIDE_TOLERANCE` (it is clamped); beyond that, and for a wrong
column count, a non-number, a class id that is not an integer in ``[0, C)`` or a zero-size box,
:class:`YoloFormatError` names the label file and the line (``skip_invalid=True`` leaves such
lines out with one WARNING instead).

Boxes become the project's normalised xyxy ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``; the
base class turns them into pixels (``x * W``) for the transforms, which normalise them again.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor
from torchvision.ops import box_convert

from src.data.base import (
    IMAGE_SUFFIXES,
    DataFormatError,
    DetectionDataset,
    Transform,
    read_image_size,
    report_skipped,
)

log = logging.getLogger(__name__)

__all__ = [
    "OUTSIDE_TOLERANCE",
    "YoloDataset",
    "YoloFormatError",
    "YoloLabels",
    "YoloSpec",
    "image_files",
    "label_path",
    "load_dataset_yaml",
    "read_labels",
]

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: how far (normalised) a box may stick out of ``[0, 1]`` before it is an error; it is clamped
OUTSIDE_TOLERANCE = 1e-3


class YoloFormatError(DataFormatError):
    """A YOLO dataset yaml, label file or line in it is invalid."""


@dataclass(frozen=True)
class YoloSpec:
    """A parsed dataset yaml.

    Attributes:
        yaml_path: the dataset yaml.
        root: the dataset root (its ``path``, resolved).
        splits: ``{"train": [entry, ...], "val": [...], "test": [...]}``: the yaml's entries
            (folders or list files, relative to ``root`` unless absolute); no ``test`` key when
            the yaml has none.
        names: the class names (label ``i`` is ``names[i]``).
        category_ids: each class's COCO category id (the yaml's ``category_ids``), or None.
    """

    yaml_path: Path
    root: Path
    splits: dict[str, list[str]]
    names: list[str]
    category_ids: list[int] | None = None


def _names(value: Any, path: Path) -> list[str]:
    """``names`` as a list (from a list, or a dict with the keys ``0..C-1``)."""
    if isinstance(value, dict):
        keys = list(value)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            raise YoloFormatError(
                f"{path}: 'names' keys must be the class ids 0, 1, ..., got {keys!r}"
            )
        if sorted(keys) != list(range(len(keys))):
            raise YoloFormatError(
                f"{path}: 'names' ids must be 0..{len(keys) - 1} without gaps, got "
                f"{sorted(keys)}; YOLO class ids are contiguous"
            )
        value = [value[k] for k in range(len(keys))]
    if not isinstance(value, list) or not value:
        raise YoloFormatError(
            f"{path}: 'names' must be a non-empty list [cat, dog] or a dict {{0: cat, 1: dog}}, "
            f"got {value!r}"
        )
    names = [str(n).strip() if n is not None else "" for n in value]
    for i, name in enumerate(names):
        if not name:
            raise YoloFormatError(f"{path}: class {i} has an empty name in 'names'")
        if name in names[:i]:
            raise YoloFormatError(f"{path}: class {name!r} is named twice in 'names'")
    return names


def load_dataset_yaml(path: str | os.PathLike[str]) -> YoloSpec:
    """Read and check an Ultralytics dataset yaml.

    Args:
        path: the yaml file (``data.dataset_yaml``).

    Returns:
        The :class:`YoloSpec`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        YoloFormatError: not YAML, not a mapping, ``train`` / ``val`` / ``names`` missing or
            invalid, ``nc`` or ``category_ids`` not matching the names (the file and key named).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"data.dataset_yaml={path}: no such file; give the Ultralytics data.yaml (with "
            "path, train, val and names)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise YoloFormatError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise YoloFormatError(
            f"{path}: a dataset yaml is a mapping with path, train, val and names; got "
            f"{type(data).__name__}"
        )
    missing = [k for k in ("train", "val", "names") if data.get(k) in (None, "", [])]
    if missing:
        raise YoloFormatError(
            f"{path}: missing {', '.join(repr(k) for k in missing)}; a dataset yaml needs train "
            "and val (image folders or list files) and names (the classes)"
        )
    names = _names(data["names"], path)
    if "nc" in data and data["nc"] != len(names):
        raise YoloFormatError(
            f"{path}: nc is {data['nc']!r} but 'names' lists {len(names)} classes; fix nc or "
            "remove it"
        )
    ids = data.get("category_ids")
    if ids is not None and (
        not isinstance(ids, list)
        or len(ids) != len(names)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
    ):
        raise YoloFormatError(
            f"{path}: category_ids must list one integer per class ({len(names)}), got {ids!r}"
        )
    root = data.get("path")
    if root in (None, ""):
        base = path.parent
    else:
        base = Path(str(root)).expanduser()
        base = base if base.is_absolute() else path.parent / base
    splits: dict[str, list[str]] = {}
    for split in SPLITS:
        value = data.get(split)
        if value in (None, "", []):
            continue
        entries = value if isinstance(value, list) else [value]
        if not all(isinstance(e, (str, os.PathLike)) for e in entries):
            raise YoloFormatError(
                f"{path}: {split!r} must be a folder, a .txt list of images or a list of these, "
                f"got {value!r}"
            )
        splits[split] = [os.fspath(e) for e in entries]
    return YoloSpec(path, base, splits, names, ids)


def label_path(image: str | os.PathLike[str]) -> Path:
    """The label file of an image, by Ultralytics' rule.

    The last ``/images/`` path component becomes ``/labels/`` and the suffix ``.txt``:
    ``d/images/train/a.jpg`` -> ``d/labels/train/a.txt``; without an ``images`` component the
    label lies beside the image.
    """
    text = os.fspath(image)
    marker, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if marker in text:
        head, tail = text.rsplit(marker, 1)
        text = head + labels + tail
    return Path(text).with_suffix(".txt")


def image_files(spec: YoloSpec, split: str) -> list[Path]:
    """The images of ``split``: its folders searched recursively, its list files read.

    Raises:
        YoloFormatError: the split is not in the yaml, an entry does not exist, or it holds no
            images (the yaml and the key named).
    """
    if split not in spec.splits:
        raise YoloFormatError(f"{spec.yaml_path}: no {split!r} key; add it (an image folder)")
    files: list[Path] = []
    for entry in spec.splits[split]:
        where = f"{spec.yaml_path}: {split}: {entry}"
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else spec.root / path
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            )
            if not found:
                raise YoloFormatError(
                    f"{where}: the folder {path} holds no images "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))})"
                )
            files += found
        elif path.is_file() and path.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            listed = [Path(ln).expanduser() for ln in lines if ln and not ln.startswith("#")]
            listed = [p if p.is_absolute() else path.parent / p for p in listed]
            missing = [p for p in listed if not p.is_file()]
            if missing:
                raise YoloFormatError(
                    f"{path}: lists {len(missing)} image(s) that do not exist, e.g. {missing[0]} "
                    "(relative lines are relative to the list's folder)"
                )
            if not listed:
                raise YoloFormatError(f"{path}: lists no images")
            files += listed
        else:
            kind = "file is not a .txt list" if path.is_file() else "does not exist"
            raise YoloFormatError(
                f"{where}: {path} {kind}; give an image folder or a .txt list of images, "
                f"relative to the dataset root {spec.root} (the yaml's 'path')"
            )
    return files


@dataclass(frozen=True)
class YoloLabels:
    """The objects of a list of label files, grouped per image.

    Attributes:
        boxes: ``Tensor[N, 4]`` float64 normalised xyxy (clamped to ``[0, 1]``), image order
            then line order.
        labels: ``Tensor[N]`` int64 class ids.
        counts: ``Tensor[I]`` int64 objects per image.
        problems: one message per line left out (``skip_invalid=True``).
    """

    boxes: Tensor
    labels: Tensor
    counts: Tensor
    problems: list[str]

    @property
    def offsets(self) -> Tensor:
        """``Tensor[I + 1]`` int64: image ``i``'s objects are rows ``offsets[i]:offsets[i+1]``."""
        return torch.cat([torch.zeros(1, dtype=torch.int64), self.counts.cumsum(0)])


def _floats(tokens: list[str]) -> np.ndarray:
    """``tokens`` as float64; a token that is not a number becomes NaN."""
    try:
        return np.asarray(tokens, dtype=np.float64)
    except ValueError:  # error path only: find the bad tokens one by one
        out = np.empty(len(tokens), dtype=np.float64)
        for i, token in enumerate(tokens):
            try:
                out[i] = float(token)
            except ValueError:
                out[i] = np.nan
        return out


def read_labels(
    label_files: Sequence[Path], num_classes: int, skip_invalid: bool = False
) -> YoloLabels:
    """Parse and check the label files of a list of images (vectorised over all lines).

    Args:
        label_files: one per image; a file that does not exist means no objects.
        num_classes: class ids must lie in ``[0, num_classes)``.
        skip_invalid: leave out invalid lines (listed in ``problems``) instead of raising.

    Returns:
        The :class:`YoloLabels`.

    Raises:
        YoloFormatError: naming the label file, the line and what is wrong.
    """
    owner: list[int] = []  # image index of each non-blank line
    numbers: list[int] = []  # its line number in its file
    files: list[Path] = []
    rows: list[list[str]] = []
    for index, path in enumerate(label_files):
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            tokens = line.split()
            if tokens:
                owner.append(index)
                numbers.append(number)
                files.append(path)
                rows.append(tokens)
    count = len(rows)
    columns = np.fromiter((len(r) for r in rows), dtype=np.int64, count=count)
    five = columns == 5
    values = np.full((count, 5), np.nan)
    if five.any():
        flat = [t for r, ok in zip(rows, five.tolist(), strict=True) if ok for t in r]
        values[five] = _floats(flat).reshape(-1, 5)
    numeric = np.isfinite(values).all(axis=1)
    cls = values[:, 0]
    bad_class = numeric & ((cls != np.round(cls)) | (cls < 0) | (cls >= num_classes))
    cxcywh = torch.from_numpy(values[:, 1:].copy())
    zero = torch.from_numpy(numeric) & ((cxcywh[:, 2] <= 0) | (cxcywh[:, 3] <= 0))
    xyxy = box_convert(cxcywh, "cxcywh", "xyxy")
    outside = ((xyxy < -OUTSIDE_TOLERANCE) | (xyxy > 1 + OUTSIDE_TOLERANCE)).any(dim=1)
    outside = outside & torch.from_numpy(numeric) & ~zero
    bad = ~five | ~numeric | bad_class | zero.numpy() | outside.numpy()
    problems: list[str] = []
    for k in np.flatnonzero(bad).tolist():  # messages for the bad lines only
        where = f"{files[k]}: line {numbers[k]}"
        if not five[k]:
            problem = (
                f"{where}: {columns[k]} columns, expected 5 (class cx cy w h); segmentation "
                "polygons and keypoints are not supported"
            )
        elif not numeric[k]:
            problem = f"{where}: not a number in {' '.join(rows[k])!r}; expected class cx cy w h"
        elif bad_class[k]:
            problem = (
                f"{where}: class id {rows[k][0]} is not an integer in [0, {num_classes}) "
                "(the dataset yaml's names)"
            )
        elif zero[k]:
            problem = (
                f"{where}: zero-size box (w={rows[k][3]}, h={rows[k][4]}); w and h must be > 0"
            )
        else:
            box = ", ".join(f"{v:.6g}" for v in xyxy[k].tolist())
            problem = (
                f"{where}: box ({box}) (xyxy) lies outside the image [0, 1] by more than "
                f"{OUTSIDE_TOLERANCE:g}; YOLO boxes are class cx cy w h normalised by the image "
                "size"
            )
        if not skip_invalid:
            raise YoloFormatError(problem)
        problems.append(problem)
    keep = torch.from_numpy(~bad)
    index = torch.tensor(owner, dtype=torch.int64)[keep]
    return YoloLabels(
        boxes=xyxy[keep].clamp(0.0, 1.0).reshape(-1, 4),
        labels=torch.from_numpy(np.nan_to_num(cls)).to(torch.int64)[keep],
        counts=torch.bincount(index, minlength=len(label_files)),
        problems=problems,
    )


class YoloDataset(DetectionDataset):
    """One split of an Ultralytics YOLO dataset (see the module docstring).

    ``dataset[i]`` returns ``(image, target)`` as :class:`src.data.base.DetectionDataset`
    describes; ``target["image_id"]`` is the image's path relative to the dataset root without
    its suffix (``images/train/0001``); nothing is difficult or crowd.

    Args:
        dataset_yaml: the Ultralytics data.yaml.
        split: ``"train"``, ``"val"`` or ``"test"``; a ``test`` split the yaml does not have is
            the ``val`` split.
        transform: ``(image, target) -> (image, target)`` callable.
        skip_invalid: leave out invalid label lines with one WARNING instead of raising.

    Raises:
        FileNotFoundError: the yaml does not exist.
        YoloFormatError: see :func:`load_dataset_yaml`, :func:`image_files`, :func:`read_labels`.
        ImageReadError: an image header cannot be read (the file named).
    """

    def __init__(
        self,
        dataset_yaml: str | os.PathLike[str],
        split: str = "train",
        transform: Transform | None = None,
        skip_invalid: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.spec = load_dataset_yaml(dataset_yaml)
        if split == "test" and "test" not in self.spec.splits:
            log.info("%s has no test split: testing on the val split", self.spec.yaml_path)
            split = "val"
        self.split = split
        self.transform = transform
        self.skip_invalid = bool(skip_invalid)
        self.classes = tuple(self.spec.names)
        self.image_paths = image_files(self.spec, split)
        self.label_paths = [label_path(p) for p in self.image_paths]
        parsed = read_labels(self.label_paths, len(self.classes), self.skip_invalid)
        report_skipped(
            log, f"YoloDataset({self.spec.yaml_path}, {split})", parsed.problems,
            len(parsed.problems), 0,
        )  # fmt: skip
        self._boxes = parsed.boxes.to(torch.float32)
        self._labels = parsed.labels
        self._counts = parsed.counts
        self._offsets = parsed.offsets
        sizes = [read_image_size(p) for p in self.image_paths]
        self._sizes = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
        log.info(
            "YoloDataset %s %s: %d images (%d without objects), %d objects of %d classes",
            self.spec.yaml_path,
            split,
            len(self),
            int((self._counts == 0).sum()),
            int(self._counts.sum()),
            len(self.classes),
        )

    @classmethod
    def read_classes(cls, *args: Any, **kwargs: Any) -> tuple[list[str], list[int] | None]:
        """The yaml's ``names`` (and ``category_ids`` when it has them)."""
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        spec = load_dataset_yaml(bound.arguments["dataset_yaml"])
        return list(spec.names), spec.category_ids

    # ------------------------------------------------------------ DetectionDataset interface
    def __len__(self) -> int:
        return len(self.image_paths)

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.image_paths[index]

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` from the image header."""
        return int(self._sizes[index, 0]), int(self._sizes[index, 1])

    def file_name(self, index: int) -> str:
        """The image's path relative to the dataset root (else absolute), POSIX style."""
        path = self.image_paths[index]
        try:
            return path.relative_to(self.spec.root).as_posix()
        except ValueError:
            return path.as_posix()

    def image_key(self, index: int) -> str:
        """:meth:`file_name` without the suffix."""
        name = self.file_name(index)
        return name.rsplit(".", 1)[0] if "." in Path(name).name else name

    def error(self, message: str) -> Exception:
        """:class:`YoloFormatError`."""
        return YoloFormatError(message)

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """Pixel xyxy boxes of image ``index`` (new tensors; normalised boxes times W, H)."""
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        height, width = self.image_size(index)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        flags = torch.zeros(hi - lo, dtype=torch.bool)
        return {
            "boxes": self._boxes[lo:hi] * scale,
            "labels": self._labels[lo:hi].clone(),
            "difficult": flags,
            "iscrowd": flags.clone(),
        }

    def normalised_boxes(self, index: int) -> Tensor:
        """``Tensor[G, 4]`` float32 normalised xyxy of image ``index`` as the labels say."""
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        return self._boxes[lo:hi].clone()

    @property
    def num_objects(self) -> int:
        """Objects in the split."""
        return int(self._labels.numel())

    def class_counts(self) -> Tensor:
        """``Tensor[C]`` int64: objects per class."""
        return torch.bincount(self._labels, minlength=len(self.classes))

    def __repr__(self) -> str:
        return (
            f"YoloDataset(yaml={str(self.spec.yaml_path)!r}, split={self.split!r}, "
            f"images={len(self)}, objects={self.num_objects}, classes={len(self.classes)})"
        )
