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
import logging
import math
import os
from pathlib import Path

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

    With ``cache=True`` all images are decoded once at construction into one uint8 tensor
    ``[N, 3, H, W]`` (about 200 MB for the book's 1100 images, an
    :class:`src.data.base.ImageCache`), shared copy-on-write with forked DataLoader workers.
    With ``cache=False`` they are decoded per item.

    Args:
        root: the dataset directory (``.../banana-detection``) when ``split`` is given, else the
            split directory itself (``.../banana-detection/bananas_train``).
        split: ``"train"`` or ``"val"`` (also ``"bananas_train"`` / ``"bananas_val"``), or
            ``None``. Passing a callable here is accepted as ``transform`` (so
            ``BananaDataset(split_dir, transform)`` works).
        transform: optional ``(image, target) -> (image, target)`` callable.
        cache: decode every image up front and keep it in memory as uint8.

    Raises:
        FileNotFoundError: missing split directory, ``label.csv`` or referenced image (named).
        ValueError: malformed ``label.csv`` (file, line and value named), a label other than 0
            (file and line named), corrupt image (named), box outside its image (file, line,
            value and image size named).
    """

    classes: tuple[str, ...] = BANANA_CLASSES

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str | Transform | None = None,
        transform: Transform | None = None,
        cache: bool = True,
    ) -> None:
        if callable(split) and transform is None:
            split, transform = None, split
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
    """LightningDataModule for the banana-detection data (real, downloaded or synthetic).

    ``source`` resolution (``prepare_data`` on rank 0 may download / generate; ``setup`` on
    every rank then only finds what is on disk, falling back to the same procedure if nothing
    is there, e.g. when ``setup`` is called by hand):

    * ``"real"``: ``<data_dir>/banana-detection``; downloaded (SHA-1 verified, atomic) when
      missing and ``download``; otherwise a ``FileNotFoundError`` naming the path and the fix.
    * ``"synthetic"``: ``<data_dir>/banana-synthetic``, generated when missing or stale.
    * ``"auto"``: a local real copy, else a download (if ``download``), else the synthetic set
      with a ``WARNING`` saying so.

    The outcome (``"real"`` or ``"synthetic"``) is stored as ``self.hparams["resolved_source"]``
    in both ``prepare_data`` and ``setup``; it is also re-frozen into ``hparams_initial``,
    which is what the Trainer sends to the loggers (after ``setup``, in ``_log_hyperparams``).

    Args:
        data_dir: parent directory of ``banana-detection`` / ``banana-synthetic``.
        source: ``"auto"``, ``"real"`` or ``"synthetic"``.
        download: allow downloading the real data.
        url: archive URL (the book's by default).
        sha1: expected SHA-1 of the archive.
        download_timeout: socket timeout in seconds.
        batch_size: images per batch.
        num_workers: DataLoader workers (the image cache is built in ``setup``, before workers
            fork, so it is shared copy-on-write).
        pin_memory: DataLoader ``pin_memory``.
        augment: training augmentation, ``"none"`` or ``"ssd"``.
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
        if source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {source!r}")
        super().__init__(
            BANANA_CLASSES,
            augment=augment,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            cache=cache,
            fill=IMAGENET_MEAN,
        )
        if download_timeout <= 0:
            raise ValueError(f"data.download_timeout must be > 0, got {download_timeout}")
        if num_synthetic_train < 1 or num_synthetic_val < 1:
            raise ValueError(
                "data.num_synthetic_train and data.num_synthetic_val must be >= 1, got "
                f"{num_synthetic_train} and {num_synthetic_val}"
            )
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self._resolved: str | None = None

    # ------------------------------------------------------------------ resolution
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
        return self._resolved

    @property
    def dataset_dir(self) -> Path:
        """Directory the datasets are read from (after resolution)."""
        if self._resolved is None:
            raise RuntimeError("BananaDataModule: call prepare_data() or setup() first")
        return self.real_dir if self._resolved == "real" else self.synthetic_dir

    def _real_available(self) -> bool:
        return all((self.real_dir / d / "label.csv").is_file() for d in SPLIT_DIRS.values())

    def _synthetic_current(self) -> bool:
        hp = self.hparams
        return synthetic_is_current(
            self.synthetic_dir, hp.num_synthetic_train, hp.num_synthetic_val, hp.seed
        )

    def _download(self, timeout: float | None = None) -> None:
        hp = self.hparams
        if self.real_dir.exists():  # present but incomplete (else _real_available was True)
            missing = [
                str(self.real_dir / d / "label.csv")
                for d in SPLIT_DIRS.values()
                if not (self.real_dir / d / "label.csv").is_file()
            ]
            raise DownloadError(
                f"{self.real_dir} exists but is incomplete (missing {', '.join(missing)}); "
                "restore the missing files, or point data.data_dir elsewhere to download a "
                "fresh copy"
            )
        download_and_extract(
            hp.url,
            self.data_dir,
            REAL_FOLDER,
            sha1=hp.sha1,
            timeout=hp.download_timeout if timeout is None else timeout,
            required=[f"{d}/label.csv" for d in SPLIT_DIRS.values()],
        )

    def _generate(self) -> None:
        hp = self.hparams
        generate_banana_dataset(
            self.synthetic_dir, hp.num_synthetic_train, hp.num_synthetic_val, hp.seed
        )

    def _resolve(self, prefer_existing: bool) -> str:
        """Resolve ``source`` to ``"real"`` or ``"synthetic"``, downloading/generating if needed.

        Args:
            prefer_existing: if True (``setup`` under a Trainer, after rank 0's
                ``prepare_data``), ``auto`` takes an existing synthetic set before trying to
                download.
        """
        source = self.hparams.source
        if source == "synthetic":
            if not self._synthetic_current():
                self._generate()
            return "synthetic"
        if self._real_available():
            return "real"
        if source == "real":
            if not self.hparams.download:
                raise FileNotFoundError(
                    f"data.source=real but the banana dataset is missing: expected "
                    f"{self.real_dir}/bananas_train/label.csv and bananas_val/label.csv. Set "
                    "data.download=true to download it, put the book's data there, or use "
                    "data.source=synthetic to train on generated data"
                )
            try:
                self._download()
            except DownloadError as err:
                raise DownloadError(
                    f"{err}. data.source=real needs the real banana dataset in {self.real_dir}; "
                    "fix the network/URL (data.url), place the data there manually, or use "
                    "data.source=synthetic (or auto) to train on generated data"
                ) from err
            return "real"
        # auto
        if prefer_existing and self._synthetic_current():
            logger.info("Using the synthetic banana data in %s", self.synthetic_dir)
            return "synthetic"
        reason = f"no real banana data in {self.real_dir} and data.download=false"
        url = self.hparams.url
        if self.hparams.download and url in _FAILED_DOWNLOADS:
            reason = (
                f"the download failed earlier in this process ({_FAILED_DOWNLOADS[url]}); not "
                "retried (data.source=real retries)"
            )
        elif self.hparams.download:
            try:
                # a quick try: an offline machine falls back in seconds, not minutes
                self._download(timeout=min(float(self.hparams.download_timeout), AUTO_TIMEOUT))
                return "real"
            except DownloadError as err:
                _FAILED_DOWNLOADS[url] = str(err)
                reason = f"the download failed ({err})"
        if not self._synthetic_current():
            self._generate()
        logger.warning(
            "data.source=auto: %s; using SYNTHETIC banana data from %s instead. Results are "
            "not comparable with the book's real dataset; set data.source=real to require it.",
            reason,
            self.synthetic_dir,
        )
        return "synthetic"

    def _record(self, resolved: str) -> None:
        self._resolved = resolved
        # The Trainer logs ``hparams_initial`` (a frozen copy taken by save_hyperparameters),
        # not ``hparams``: save_hyperparameters(dict) merges the key into ``hparams`` and
        # re-freezes ``hparams_initial`` so the logged hyper-parameters include it.
        self.save_hyperparameters({"resolved_source": resolved})

    def prepare_data(self) -> None:
        """Download or generate the data if needed (rank 0 only) and record the source."""
        self._record(self._resolve(prefer_existing=False))

    def setup(self, stage: str | None = None) -> None:
        """Resolve the source (if ``prepare_data`` did not run in this process), build datasets.

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None`` (all).
        """
        if self._resolved is None:  # prepare_data ran on another rank / was not called
            self._record(self._resolve(prefer_existing=self.trainer is not None))
        super().setup(stage)

    def build_dataset(self, split: str) -> BananaDataset:
        """The :class:`BananaDataset` of ``split`` (``"test"`` is the validation split)."""
        train = split == "train"
        return BananaDataset(
            self.dataset_dir,
            "train" if train else "val",
            transform=self.train_transform if train else self.eval_transform,
            cache=self.cache,
        )
