"""The D2L banana-detection dataset (Dive into Deep Learning, ch. 14.6) and its DataModule.

On-disk layout (the book's zip, or the synthetic generator's output)::

    <dataset_dir>/bananas_train/label.csv      img_name,label,xmin,ymin,xmax,ymax
    <dataset_dir>/bananas_train/images/<img_name>
    <dataset_dir>/bananas_val/...

Boxes in ``label.csv`` are pixels of the (256 x 256) images; one row per box (the book has one
banana per image; several rows with the same ``img_name`` give several boxes). Targets are
normalised by the image size (the book divides by 256); the book's raw-pixel input convention
is handled by the model (``pixel_std = 1/255``), not here.

Real data lives in ``<data_dir>/banana-detection``, synthetic data (see
:mod:`src.data.synthetic`) in ``<data_dir>/banana-synthetic`` so it never masquerades as real.
"""

from __future__ import annotations

import csv
import functools
import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from src.data.base import (
    DataFormatError,
    DetectionDataModule,
    DetectionDataset,
    ImageCache,
    Transform,
    read_image_size,
)
from src.data.download import BANANA_SHA1, BANANA_URL, DownloadError, download_and_extract
from src.data.synthetic import generate_banana_dataset, synthetic_is_current
from src.data.transforms import IMAGENET_MEAN

logger = logging.getLogger(__name__)

#: socket timeout of the download that ``source=auto`` tries (``source=real`` waits
#: ``data.download_timeout``).
AUTO_TIMEOUT = 10.0
#: URLs whose download failed in this process: ``source=auto`` does not retry them (a sweep's
#: jobs in one process try once).
_FAILED_DOWNLOADS: dict[str, str] = {}

BANANA_CLASSES: tuple[str, ...] = ("banana",)
REAL_FOLDER = "banana-detection"
SYNTHETIC_FOLDER = "banana-synthetic"
SPLIT_DIRS: dict[str, str] = {"train": "bananas_train", "val": "bananas_val"}
CSV_COLUMNS: tuple[str, ...] = ("img_name", "label", "xmin", "ymin", "xmax", "ymax")
SOURCES: tuple[str, ...] = ("auto", "real", "synthetic")


def _parse_number(value: str | None, csv_path: Path, line: int, column: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(
            f"{csv_path}: line {line}: column {column!r} has non-numeric value {value!r}; "
            "fix or remove that row"
        )
    return number


def read_label_csv(
    csv_path: Path,
) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Parse and validate a banana ``label.csv``.

    Args:
        csv_path: path of ``label.csv``.

    Returns:
        ``(img_names, boxes, labels, lines)``, one entry per distinct image in order of first
        appearance: ``boxes[i]`` float32 ``[G_i, 4]`` pixel xyxy, ``labels[i]`` int64 ``[G_i]``,
        ``lines[i]`` int64 ``[G_i]`` (1-based CSV line of each box, for error messages).

    Raises:
        FileNotFoundError: missing file.
        ValueError: empty file, missing columns, non-numeric values, negative / non-integer
            labels, ``xmin >= xmax`` or ``ymin >= ymax`` or negative coordinates (the message
            names the file, the line and the value).
    """
    if not csv_path.is_file():
        raise FileNotFoundError(f"label file {csv_path} does not exist")
    order: dict[str, int] = {}
    rows: list[tuple[int, list[float], int, int]] = []  # (image idx, box, label, line)
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # tolerate a BOM
        reader = csv.DictReader(fh)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{csv_path}: missing column(s) {', '.join(missing)} (found {header}); "
                f"expected header {','.join(CSV_COLUMNS)}"
            )
        reader.fieldnames = header
        for row in reader:
            line = reader.line_num
            name = (row["img_name"] or "").strip()
            if not name:
                raise ValueError(f"{csv_path}: line {line}: empty img_name")
            label = _parse_number(row["label"], csv_path, line, "label")
            if label < 0 or label != int(label):
                raise ValueError(
                    f"{csv_path}: line {line}: label must be a non-negative integer, "
                    f"got {row['label']!r}"
                )
            box = [_parse_number(row[c], csv_path, line, c) for c in CSV_COLUMNS[2:]]
            xmin, ymin, xmax, ymax = box
            if xmin >= xmax or ymin >= ymax:
                raise ValueError(
                    f"{csv_path}: line {line}: degenerate box (xmin, ymin, xmax, ymax) = "
                    f"{tuple(box)} for {name}: need xmin < xmax and ymin < ymax"
                )
            if min(box) < 0:
                raise ValueError(
                    f"{csv_path}: line {line}: box {tuple(box)} for {name} has a negative "
                    "coordinate; boxes must lie inside the image [0, width] x [0, height]"
                )
            idx = order.setdefault(name, len(order))
            rows.append((idx, box, int(label), line))
    if not rows:
        raise ValueError(f"{csv_path}: no annotation rows (only a header)")

    image_idx = np.array([r[0] for r in rows], dtype=np.int64)
    all_boxes = np.array([r[1] for r in rows], dtype=np.float32).reshape(-1, 4)
    all_labels = np.array([r[2] for r in rows], dtype=np.int64)
    all_lines = np.array([r[3] for r in rows], dtype=np.int64)
    sort = np.argsort(image_idx, kind="stable")
    splits = np.cumsum(np.bincount(image_idx, minlength=len(order)))[:-1]
    names = list(order)
    boxes = np.split(all_boxes[sort], splits)
    labels = np.split(all_labels[sort], splits)
    lines = np.split(all_lines[sort], splits)
    return names, boxes, labels, lines


def check_source_args(
    source: str, download_timeout: float, num_synthetic_train: int, num_synthetic_val: int
) -> None:
    """Check the banana source keys (one ``ValueError`` naming the key)."""
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
    if download_timeout <= 0:
        raise ValueError(f"data.download_timeout must be > 0, got {download_timeout}")
    if num_synthetic_train < 1 or num_synthetic_val < 1:
        raise ValueError(
            "data.num_synthetic_train and data.num_synthetic_val must be >= 1, got "
            f"{num_synthetic_train} and {num_synthetic_val}"
        )


def _real_available(real_dir: Path) -> bool:
    return all((real_dir / d / "label.csv").is_file() for d in SPLIT_DIRS.values())


def _download(real_dir: Path, url: str, sha1: str | None, timeout: float) -> None:
    if real_dir.exists():  # present but incomplete (else _real_available was True)
        missing = [
            str(real_dir / d / "label.csv")
            for d in SPLIT_DIRS.values()
            if not (real_dir / d / "label.csv").is_file()
        ]
        raise DownloadError(
            f"{real_dir} exists but is incomplete (missing {', '.join(missing)}); "
            "restore the missing files, or point data.data_dir elsewhere to download a "
            "fresh copy"
        )
    download_and_extract(
        url,
        real_dir.parent,
        REAL_FOLDER,
        sha1=sha1,
        timeout=timeout,
        required=[f"{d}/label.csv" for d in SPLIT_DIRS.values()],
    )


def resolve_source(
    data_dir: str | os.PathLike[str],
    source: str = "auto",
    download: bool = True,
    url: str = BANANA_URL,
    sha1: str | None = BANANA_SHA1,
    download_timeout: float = 60.0,
    num_synthetic_train: int = 1000,
    num_synthetic_val: int = 100,
    seed: int = 0,
    prefer_existing: bool = True,
) -> str:
    """Resolve ``source`` to ``"real"`` or ``"synthetic"``, downloading / generating if needed.

    * ``"real"``: ``<data_dir>/banana-detection``; downloaded (SHA-1 verified, atomic) when
      missing and ``download``; otherwise a ``FileNotFoundError`` naming the path and the fix.
    * ``"synthetic"``: ``<data_dir>/banana-synthetic``, generated when missing or stale.
    * ``"auto"``: a local real copy, else a download (if ``download``), else the synthetic set
      with a ``WARNING`` saying so.

    Args:
        data_dir: parent directory of ``banana-detection`` / ``banana-synthetic``.
        source: ``"auto"``, ``"real"`` or ``"synthetic"``.
        download: allow downloading the real data.
        url: archive URL (the book's by default).
        sha1: expected SHA-1 of the archive.
        download_timeout: socket timeout in seconds.
        num_synthetic_train: synthetic training images.
        num_synthetic_val: synthetic validation images.
        seed: seed of the synthetic generator.
        prefer_existing: ``auto`` takes an existing synthetic set before trying to download
            (a split after the first, another rank after rank 0's ``prepare_data``).

    Returns:
        ``"real"`` or ``"synthetic"``.
    """
    data_dir = Path(data_dir)
    real_dir, synthetic_dir = data_dir / REAL_FOLDER, data_dir / SYNTHETIC_FOLDER

    def synthetic() -> str:
        if not synthetic_is_current(synthetic_dir, num_synthetic_train, num_synthetic_val, seed):
            generate_banana_dataset(synthetic_dir, num_synthetic_train, num_synthetic_val, seed)
        return "synthetic"

    if source == "synthetic":
        return synthetic()
    if _real_available(real_dir):
        return "real"
    if source == "real":
        if not download:
            raise FileNotFoundError(
                f"data.source=real but the banana dataset is missing: expected "
                f"{real_dir}/bananas_train/label.csv and bananas_val/label.csv. Set "
                "data.download=true to download it, put the book's data there, or use "
                "data.source=synthetic to train on generated data"
            )
        try:
            _download(real_dir, url, sha1, download_timeout)
        except DownloadError as err:
            raise DownloadError(
                f"{err}. data.source=real needs the real banana dataset in {real_dir}; "
                "fix the network/URL (data.url), place the data there manually, or use "
                "data.source=synthetic (or auto) to train on generated data"
            ) from err
        return "real"
    # auto
    if prefer_existing and synthetic_is_current(
        synthetic_dir, num_synthetic_train, num_synthetic_val, seed
    ):
        logger.info("Using the synthetic banana data in %s", synthetic_dir)
        return "synthetic"
    reason = f"no real banana data in {real_dir} and data.download=false"
    if download and url in _FAILED_DOWNLOADS:
        reason = (
            f"the download failed earlier in this process ({_FAILED_DOWNLOADS[url]}); not "
            "retried (data.source=real retries)"
        )
    elif download:
        try:
            # a quick try: an offline machine falls back in seconds, not minutes
            _download(real_dir, url, sha1, min(float(download_timeout), AUTO_TIMEOUT))
            return "real"
        except DownloadError as err:
            _FAILED_DOWNLOADS[url] = str(err)
            reason = f"the download failed ({err})"
    synthetic()
    logger.warning(
        "data.source=auto: %s; using SYNTHETIC banana data from %s instead. Results are "
        "not comparable with the book's real dataset; set data.source=real to require it.",
        reason,
        synthetic_dir,
    )
    return "synthetic"


class BananaDataset(DetectionDataset):
    """One split of the banana-detection layout.

    Items are ``(image, target)`` (see :class:`src.data.base.DetectionDataset`):

    * without ``transform``: ``image`` float32 ``[3, H, W]`` in ``[0, 1]`` at the stored size;
      ``target = {"boxes": float32 [G, 4] xyxy normalised by (W, H, W, H), "labels": int64 [G]
      (0 = banana), "difficult" / "iscrowd": bool [G] (all False), "orig_size": int64 [2]
      (H, W), "image_id": str (file stem), "coco_image_id": int (index + 1)}``;
    * with ``transform`` (see :func:`src.data.transforms.build_transforms`): it receives a
      ``tv_tensors.Image`` uint8 ``[3, H, W]`` and the same target with ``boxes`` as pixel
      XYXY ``tv_tensors.BoundingBoxes`` (``canvas_size=(H, W)``), and its output is returned.

    The folder is either given (``root``) or found from ``data_dir`` and ``source`` by
    :func:`resolve_source` (the config's way: real data, downloaded, or the synthetic set);
    :meth:`prepare` runs that resolution in ``prepare_data``, where downloads belong.

    With ``cache=True`` all images are decoded once at construction into one uint8 tensor
    ``[N, 3, H, W]`` (about 200 MB for the book's 1100 images, an
    :class:`src.data.base.ImageCache`), shared copy-on-write with forked DataLoader workers.
    With ``cache=False`` they are decoded per item.

    Args:
        root: the dataset directory (``.../banana-detection``) when ``split`` is given, else the
            split directory itself (``.../banana-detection/bananas_train``); None with
            ``data_dir``.
        split: ``"train"`` or ``"val"`` (also ``"bananas_train"`` / ``"bananas_val"``), or
            ``None``. Passing a callable here is accepted as ``transform`` (so
            ``BananaDataset(split_dir, transform)`` works).
        transform: optional ``(image, target) -> (image, target)`` callable.
        cache: decode every image up front and keep it in memory as uint8.
        data_dir: instead of ``root``: the parent of ``banana-detection`` / ``banana-synthetic``;
            the folder is chosen by :func:`resolve_source` with the keys below.
        source: ``"auto"``, ``"real"`` or ``"synthetic"``.
        download: allow downloading the real data.
        url: archive URL (the book's by default).
        sha1: expected SHA-1 of the archive.
        download_timeout: socket timeout in seconds.
        num_synthetic_train: synthetic training images.
        num_synthetic_val: synthetic validation images.
        seed: seed of the synthetic generator.

    Raises:
        FileNotFoundError: missing split directory, ``label.csv`` or referenced image (named).
        ValueError: malformed ``label.csv`` (file, line and value named), a label other than 0
            (file and line named), corrupt image (named), box outside its image (file, line,
            value and image size named), a bad source key (named).
    """

    classes: tuple[str, ...] = BANANA_CLASSES

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str | Transform | None = None,
        transform: Transform | None = None,
        cache: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        source: str = "auto",
        download: bool = True,
        url: str = BANANA_URL,
        sha1: str | None = BANANA_SHA1,
        download_timeout: float = 60.0,
        num_synthetic_train: int = 1000,
        num_synthetic_val: int = 100,
        seed: int = 0,
    ) -> None:
        if callable(split) and transform is None:
            split, transform = None, split
        self.resolved_source: str | None = None
        if (root is None) == (data_dir is None):
            raise ValueError("BananaDataset: give either root (a dataset folder) or data_dir")
        if data_dir is not None:
            check_source_args(source, download_timeout, num_synthetic_train, num_synthetic_val)
            self.resolved_source = resolve_source(
                data_dir, source, download, url, sha1, download_timeout,
                num_synthetic_train, num_synthetic_val, seed, prefer_existing=True,
            )  # fmt: skip
            root = Path(data_dir) / (
                REAL_FOLDER if self.resolved_source == "real" else SYNTHETIC_FOLDER
            )
        root = Path(root)
        if split is None:
            split_dir = root
        elif split in SPLIT_DIRS:
            split_dir = root / SPLIT_DIRS[split]
        elif split in SPLIT_DIRS.values():
            split_dir = root / split
        else:
            raise ValueError(f"split must be one of train, val; got {split!r}")
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"banana split directory {split_dir} does not exist (expected "
                "<dataset>/bananas_train or <dataset>/bananas_val with label.csv and images/)"
            )
        self.split_dir = split_dir
        self.transform = transform
        csv_path = split_dir / "label.csv"
        names, boxes, labels, lines = read_label_csv(csv_path)
        self._check_labels(csv_path, labels, lines)
        self.image_paths = [split_dir / "images" / name for name in names]
        for name, path, line in zip(names, self.image_paths, lines, strict=True):
            if not path.is_file():
                raise FileNotFoundError(
                    f"image {path} referenced by {csv_path} (line {int(line[0])}, img_name "
                    f"{name!r}) does not exist; restore it or remove its rows"
                )
        self.image_ids = [Path(name).stem for name in names]
        self._boxes = [torch.from_numpy(b) for b in boxes]
        self._labels = [torch.from_numpy(lab) for lab in labels]

        self._cache: ImageCache | None = None
        if cache:
            self.build_cache()
            self._sizes = self._cache.sizes
        else:
            sizes = [read_image_size(p) for p in self.image_paths]
            self._sizes = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
        self._check_inside(csv_path, names, boxes, lines)

    # ------------------------------------------------------------ format hooks
    @classmethod
    def read_classes(cls, *args: Any, **kwargs: Any) -> tuple[list[str], list[int] | None]:
        """``["banana"]``; checks the source keys first (a bad config fails at once)."""
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["data_dir"] is not None:
            check_source_args(
                a["source"], a["download_timeout"], a["num_synthetic_train"], a["num_synthetic_val"]
            )
        return list(BANANA_CLASSES), None

    @classmethod
    def prepare(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Resolve the source (download or generate); ``{"resolved_source": ...}``.

        The training split may download (an ``auto`` source tries once); any other split takes
        what is on disk first, so that the splits of one run always agree.
        """
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a["data_dir"] is None:
            return {}
        names = ("source", "download", "url", "sha1", "download_timeout")
        names += ("num_synthetic_train", "num_synthetic_val", "seed")
        resolved = resolve_source(
            a["data_dir"],
            **{k: a[k] for k in names},
            prefer_existing=a["split"] not in ("train", SPLIT_DIRS["train"]),
        )
        return {"resolved_source": resolved}

    def facts(self) -> dict[str, Any]:
        """``{"resolved_source": "real" | "synthetic"}`` when built from ``data_dir``."""
        return {"resolved_source": self.resolved_source} if self.resolved_source else {}

    def _check_labels(
        self, csv_path: Path, labels: list[np.ndarray], lines: list[np.ndarray]
    ) -> None:
        """Raise if a label is not a class of :data:`BANANA_CLASSES` (vectorised)."""
        all_labels = np.concatenate(labels)
        bad = np.flatnonzero(all_labels >= len(self.classes))
        if len(bad) == 0:
            return
        k = int(bad[0])
        raise DataFormatError(
            f"{csv_path}: line {int(np.concatenate(lines)[k])}: label {int(all_labels[k])} but "
            f"the banana data have {len(self.classes)} class ({', '.join(self.classes)}): labels "
            "are 0-based class indices"
        )

    def _check_inside(
        self, csv_path: Path, names: list[str], boxes: list[np.ndarray], lines: list[np.ndarray]
    ) -> None:
        """Raise if any box exceeds its image (vectorised over all boxes)."""
        counts = torch.tensor([len(b) for b in boxes])
        all_boxes = torch.from_numpy(np.concatenate(boxes))
        limits = self._sizes.flip(1).repeat(1, 2).repeat_interleave(counts, dim=0)  # W,H,W,H
        bad = (all_boxes > limits).any(dim=1).nonzero()
        if len(bad) == 0:
            return
        k = int(bad[0])
        img = int(torch.arange(len(names)).repeat_interleave(counts)[k])
        line = int(np.concatenate(lines)[k])
        height, width = self._sizes[img].tolist()
        raise ValueError(
            f"{csv_path}: line {line}: box {tuple(all_boxes[k].tolist())} for {names[img]} lies "
            f"outside the image (width {width}, height {height}); boxes must be within "
            "[0, width] x [0, height] in pixels"
        )

    @property
    def max_label(self) -> int:
        """Largest label in the split (``-1`` if there are no boxes)."""
        return max((int(lab.max()) for lab in self._labels if len(lab)), default=-1)

    # ------------------------------------------------------------ DetectionDataset interface
    def __len__(self) -> int:
        return len(self.image_paths)

    def image_path(self, index: int) -> Path:
        """The image file of item ``index``."""
        return self.image_paths[index]

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of the stored image."""
        return int(self._sizes[index, 0]), int(self._sizes[index, 1])

    def image_key(self, index: int) -> str:
        """The image's file stem."""
        return self.image_ids[index]

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """Pixel boxes of ``label.csv`` (new tensors); nothing is difficult or crowd."""
        labels = self._labels[index].clone()
        flags = torch.zeros(labels.shape, dtype=torch.bool)
        return {
            "boxes": self._boxes[index].clone(),
            "labels": labels,
            "difficult": flags,
            "iscrowd": flags.clone(),
        }


class BananaDataModule(DetectionDataModule):
    """The banana DataModule of earlier versions, kept so that their checkpoints and code load.

    ``conf/data/banana.yaml`` now builds :class:`~src.data.base.DetectionDataModule` with
    :class:`BananaDataset` factories (``data_dir`` + ``source``) directly; this class makes the
    same from the old keys. The resolved source (``"real"`` or ``"synthetic"``, see
    :func:`resolve_source`) is stored as ``self.hparams["resolved_source"]`` in both
    ``prepare_data`` and ``setup``, and re-frozen into ``hparams_initial``, which is what the
    Trainer sends to the loggers.

    Args:
        data_dir: parent directory of ``banana-detection`` / ``banana-synthetic``.
        source: ``"auto"``, ``"real"`` or ``"synthetic"``.
        download: allow downloading the real data.
        url: archive URL (the book's by default).
        sha1: expected SHA-1 of the archive.
        download_timeout: socket timeout in seconds.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        augment: training augmentation.
        image_size: model input side (images are resized to ``image_size x image_size``).
        num_synthetic_train: synthetic training images.
        num_synthetic_val: synthetic validation images.
        seed: seed of the synthetic generator.
        cache: keep decoded images in memory.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "data",
        source: str = "auto",
        download: bool = True,
        url: str = BANANA_URL,
        sha1: str | None = BANANA_SHA1,
        download_timeout: float = 60.0,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        augment: str = "none",
        image_size: int = 256,
        num_synthetic_train: int = 1000,
        num_synthetic_val: int = 100,
        seed: int = 0,
        cache: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        options = {
            "data_dir": str(self.data_dir),
            "source": source,
            "download": download,
            "url": url,
            "sha1": sha1,
            "download_timeout": download_timeout,
            "num_synthetic_train": num_synthetic_train,
            "num_synthetic_val": num_synthetic_val,
            "seed": seed,
        }
        split = functools.partial(BananaDataset, cache=False, **options)
        super().__init__(
            train=functools.partial(split, split="train"),
            val=functools.partial(split, split="val"),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            augment=augment,
            image_size=image_size,
            cache=cache,
            fill=IMAGENET_MEAN,
            **options,
        )

    @property
    def real_dir(self) -> Path:
        """Directory of the real data, ``<data_dir>/banana-detection``."""
        return self.data_dir / REAL_FOLDER

    @property
    def synthetic_dir(self) -> Path:
        """Directory of the synthetic data, ``<data_dir>/banana-synthetic``."""
        return self.data_dir / SYNTHETIC_FOLDER

    @property
    def resolved_source(self) -> str | None:
        """``"real"`` / ``"synthetic"`` once resolved, else ``None``."""
        return self.hparams.get("resolved_source")

    @property
    def dataset_dir(self) -> Path:
        """Directory the datasets are read from (after resolution)."""
        if self.resolved_source is None:
            raise RuntimeError("BananaDataModule: call prepare_data() or setup() first")
        return self.real_dir if self.resolved_source == "real" else self.synthetic_dir
