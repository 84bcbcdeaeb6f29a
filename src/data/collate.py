"""Batch collation for detection datasets."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


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


def detection_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool
) -> DataLoader:
    """A ``DataLoader`` of ``(images, targets)`` batches with :func:`detection_collate`.

    Workers persist across epochs when ``num_workers > 0``. Under distributed evaluation
    (``shuffle=False`` with an initialised process group of several ranks) each rank gets every
    ``world_size``-th image and nothing is padded, so validation and test metrics count each
    image exactly once and equal single-process ones (Lightning's own sampler would repeat
    images to even out the ranks). Training loaders are left to Lightning's
    ``DistributedSampler``.
    """
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
