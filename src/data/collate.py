"""Batch collation and the DataLoaders of detection datasets.

The training loader is resumable from any batch: :class:`ResumableSampler` draws the data order
from ``(seed, epoch)`` and gives every sample its own augmentation seed, a function of
``(seed, epoch, index)`` (:func:`sample_seed`); :class:`ResumableDataLoader` counts the batches
it has handed out and exposes ``state_dict()`` / ``load_state_dict()``, which Lightning saves in
the fit loop's checkpoint state and restores before the rest of an interrupted epoch is drawn.
A run stopped in the middle of an epoch therefore sees, once resumed, the very batches and
augmentations an uninterrupted run would have seen, whatever ``num_workers`` is.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


def detection_collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, list[dict]]:
    """Stack images and keep targets as a list (boxes differ in number per image).

    Args:
        batch: ``(image, target)`` pairs; images ``Tensor[3, H, W]`` float32 in ``[0, 1]``, all of
            the same size; targets dicts with ``boxes: Tensor[G_i, 4]`` normalised xyxy,
            ``labels: Tensor[G_i]`` int64, ``orig_size``, ``image_id`` (optionally ``difficult``).

    Returns:
        ``(images: Tensor[B, 3, H, W], targets: list[dict])`` with the targets in batch order
        (the dicts are the datasets' own objects, not copies).

    Raises:
        ValueError: empty batch or images of different shapes (resize them to a common
            ``data.image_size`` in the dataset transform).
    """
    if len(batch) == 0:
        raise ValueError("detection_collate got an empty batch")
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    shapes = {tuple(img.shape) for img in images}
    if len(shapes) != 1:
        ids = [t.get("image_id") for t in targets]
        raise ValueError(
            f"cannot batch images of different shapes {sorted(shapes)} (image ids {ids}); "
            "the dataset transform must resize every image to data.image_size"
        )
    return torch.stack(images, dim=0), targets


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """The augmentation seeds of samples ``indices`` in epoch ``epoch`` of a run seeded ``seed``.

    Args:
        seed: the run's data seed (``ResumableSampler.seed``).
        epoch: the training epoch (0-based).
        indices: ``int64[N]`` sample indices in the dataset.

    Returns:
        ``int64[N]`` seeds in ``[0, 2**63)``: the SplitMix64 mix of ``(seed, epoch, index)``,
        computed in one vectorised pass; the same in every process and on every resume, and
        unrelated for neighbouring indices, epochs and seeds.
    """
    mask = (1 << 64) - 1
    key = ((int(seed) * 0x9E3779B97F4A7C15) ^ (int(epoch) * 0xD1B54A32D192ED03)) & mask
    with np.errstate(over="ignore"):
        x = np.asarray(indices).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
        x ^= np.uint64(key)
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(1)).astype(np.int64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one sample (:func:`sample_seeds` of ``[index]``)."""
    return int(sample_seeds(seed, epoch, np.array([index]))[0])


class SeededDataset(Dataset):
    """Wraps a dataset so that each sample's random transform is seeded by its sampler key.

    Indexed with ``(index, seed)`` (what :class:`ResumableSampler` yields) it returns
    ``dataset[index]`` computed with torch's generator seeded ``seed`` (the random transforms of
    ``torchvision.transforms.v2`` draw from it), inside ``torch.random.fork_rng`` so the
    caller's random stream is left as it was. Indexed with a plain ``int`` (a sampler Lightning
    substituted, e.g. for ``overfit_batches``) it returns ``dataset[index]`` unseeded.

    Args:
        dataset: a map-style dataset of ``(image, target)`` pairs.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        """The wrapped dataset's attributes (``classes``, ``coco_ground_truth``, ...)."""
        if name == "dataset":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(DistributedSampler):
    """The training order as a function of ``(seed, epoch)``, resumable at any sample.

    A :class:`~torch.utils.data.DistributedSampler` (so Lightning keeps it under DDP and calls
    its ``set_epoch`` every epoch; one process is one replica) that yields
    ``(index, sample_seed(seed, epoch, index))`` keys for :class:`SeededDataset`. After
    :meth:`resume_at` the epoch it names starts at that position.

    Args:
        dataset: the (wrapped) training dataset.
        shuffle: a new permutation every epoch (else the dataset order).
        seed: the data seed: the permutation of epoch ``e`` is drawn from ``seed + e``.
        num_replicas: processes sharing the data (default: the process group's size, else 1).
        rank: this process's rank (default: the process group's rank, else 0).
    """

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self._resume: tuple[int, int] | None = None  # (epoch, samples already drawn)

    def resume_at(self, epoch: int, samples: int) -> None:
        """Start epoch ``epoch`` at its ``samples``-th sample (when it is next iterated)."""
        self._resume = (int(epoch), int(samples))

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch, skip = self.epoch, 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        indices = np.asarray(list(super().__iter__()), dtype=np.int64)[skip:]
        seeds = sample_seeds(self.seed, epoch, indices)
        return iter(zip(indices.tolist(), seeds.tolist(), strict=True))


def _ignore_sigint(worker_id: int) -> None:
    """``worker_init_fn``: the workers ignore SIGINT.

    A Ctrl+C in the terminal reaches the workers too; the main process stops the run after the
    current batch (:class:`src.callbacks.faults.InterruptCallback`) and needs them until then.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _CountingIterator(Iterator[Any]):
    """The batches of a :class:`ResumableDataLoader`, counted.

    The DataLoader's own iterator is created at the first ``next()``, so a position restored
    after ``iter()`` still applies.
    """

    def __init__(self, loader: ResumableDataLoader) -> None:
        self.loader = loader
        self.inner: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self.inner is None:
            self.loader._start_epoch()
            self.inner = DataLoader.__iter__(self.loader)
        batch = next(self.inner)
        self.loader._batches += 1
        return batch

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "inner": None}


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch travels in checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one in the fit loop's state
    (``checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]``) and calls
    ``load_state_dict()`` on resume (:class:`src.callbacks.faults.ResumeCallback` makes sure it
    does). With a :class:`ResumableSampler` the state is the epoch, the batches handed out in
    it and the data seed, which fix the remaining order and every augmentation; with another
    sampler (one Lightning substituted) it is empty.

    Lightning does not pre-fetch from loaders with a length, so the batches handed out are the
    batches trained on.
    """

    _batches: int = 0
    _resume_batches: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return _CountingIterator(self)

    def _start_epoch(self) -> None:
        sampler = self.sampler
        epoch = getattr(sampler, "epoch", 0)
        resume, self._resume_batches = self._resume_batches, None
        self._batches = resume[1] if resume is not None and resume[0] == epoch else 0

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "batches", "seed", "samples"}`` (empty without a ResumableSampler)."""
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        return {
            "epoch": int(sampler.epoch),
            "batches": int(self._batches),
            "seed": int(sampler.seed),
            "samples": len(self.dataset),  # type: ignore[arg-type]
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch after its last batch handed out, with the saved seed."""
        sampler = self.sampler
        if not state_dict or not isinstance(sampler, ResumableSampler):
            return
        samples = len(self.dataset)  # type: ignore[arg-type]
        if int(state_dict["samples"]) != samples:
            log.warning(
                "The checkpoint's training loader had %d images, this one has %d: the resumed "
                "epoch starts from its beginning in a new order (not an exact resume)",
                state_dict["samples"],
                samples,
            )
            return
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        sampler.seed = int(state_dict["seed"])
        sampler.set_epoch(epoch)
        batch_size = self.batch_size or 1
        if batches * batch_size >= sampler.num_samples:  # saved at the end of the epoch
            return
        sampler.resume_at(epoch, batches * batch_size)
        self._resume_batches = (epoch, batches)


def detection_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    pin_memory: bool,
    resumable: bool = False,
) -> DataLoader:
    """A ``DataLoader`` of ``(images, targets)`` batches with :func:`detection_collate`.

    Workers persist across epochs when ``num_workers > 0``. Under distributed evaluation
    (``shuffle=False`` with an initialised process group of several ranks) each rank gets every
    ``world_size``-th image and nothing is padded, so validation and test metrics count each
    image exactly once and equal single-process ones (Lightning's own sampler would repeat
    images to even out the ranks).

    With ``resumable=True`` (the training loader) it is a :class:`ResumableDataLoader` over a
    :class:`ResumableSampler` (shuffled when ``shuffle``, split over the ranks under DDP) and a
    :class:`SeededDataset`: the data order depends on the data seed and the epoch only, every
    sample's augmentation on ``(seed, epoch, index)`` only, and a run resumed from a checkpoint
    written in the middle of an epoch goes on with the same batches. The data seed is
    ``seed`` of the run (``PL_GLOBAL_SEED``, set by ``seed_everything``), else torch's initial
    seed; the workers ignore SIGINT (the main process stops the run after the current batch).
    """
    if resumable:
        seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % 2**63
        wrapped = SeededDataset(dataset)
        return ResumableDataLoader(
            wrapped,
            batch_size=batch_size,
            sampler=ResumableSampler(wrapped, shuffle=shuffle, seed=seed),
            num_workers=num_workers,
            pin_memory=pin_memory,
            collate_fn=detection_collate,
            persistent_workers=num_workers > 0,
            worker_init_fn=_ignore_sigint if num_workers > 0 else None,
            # the workers' base seed, drawn without touching the global random stream
            generator=torch.Generator().manual_seed(seed),
        )
    sampler = None
    if not shuffle and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=detection_collate,
        persistent_workers=num_workers > 0,
    )
