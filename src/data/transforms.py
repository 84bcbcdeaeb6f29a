"""Detection transforms on ``torchvision.transforms.v2``.

Every transform built here is a callable ``(image, target) -> (image, target)``:

* input ``image``: a ``tv_tensors.Image`` (``uint8`` or float ``[3, H, W]``); PIL images, numpy
  arrays and plain tensors are converted with :func:`torchvision.transforms.v2.functional.to_image`.
* input ``target``: a dict with

  - ``boxes``: ``tv_tensors.BoundingBoxes`` in pixels with ``canvas_size=(H, W)`` (any format,
    converted to XYXY first; a plain ``Tensor[G, 4]`` is read as pixel XYXY on the image canvas),
  - ``labels``: ``Tensor[G]`` int64 (0-based object classes),
  - optionally ``difficult`` and ``iscrowd``: ``Tensor[G]`` bool,
  - any other keys (``orig_size``: ``Tensor[2]`` int64 ``(H, W)`` of the original image,
    ``image_id``: ``str``, ...) which are passed through untouched: geometric transforms never
    change them, because ``orig_size`` always refers to the image as stored on disk (metrics
    rescale predictions to it).

* output ``image``: a plain ``Tensor[3, S_h, S_w]`` float32 in ``[0, 1]``, ``S = image_size``.
* output ``target``: the same dict with ``boxes`` a plain ``Tensor[G', 4]`` float32 normalised
  XYXY in ``[0, 1]`` and the per-box keys ``labels`` / ``difficult`` / ``iscrowd`` filtered
  consistently (``G' <= G``; only the ``"ssd"`` augmentation removes boxes). ``G`` may be 0.

The input image and target tensors are never modified in place (images may be views of an
in-memory cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

AUGMENTATIONS: tuple[str, ...] = ("none", "flip", "photometric", "ssd")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
# target keys holding one entry per box, filtered together with the boxes
PER_BOX_KEYS: tuple[str, ...] = ("labels", "difficult", "iscrowd")

Target = dict[str, Any]
DetectionTransformFn = Callable[[Any, Target], tuple[Tensor, Target]]


def parse_image_size(image_size: int | Sequence[int], key: str = "image_size") -> tuple[int, int]:
    """Return ``(H, W)`` from an int or a ``[height, width]`` pair.

    Args:
        image_size: side ``S`` (square) or ``(H, W)``.
        key: config key named in the error message.

    Raises:
        ValueError: not an int / pair, or not positive.
    """
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        size = (image_size, image_size)
    elif isinstance(image_size, Sequence) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"{key} must be an int or a [height, width] pair, got {image_size!r}")
    if min(size) <= 0:
        raise ValueError(f"{key} must be positive, got {image_size!r}")
    return size


def _labels_getter(inputs: Any) -> tuple[Tensor, ...]:
    """Return the per-box tensors ``SanitizeBoundingBoxes`` must filter with the boxes.

    Args:
        inputs: the ``(image, target)`` pair given to the transform.

    Returns:
        ``labels`` and, where present, ``difficult`` and ``iscrowd`` (:data:`PER_BOX_KEYS`):
        the very tensor objects stored in ``target`` (``SanitizeBoundingBoxes`` matches them
        by identity).
    """
    target = inputs[1]
    return tuple(target[key] for key in PER_BOX_KEYS if key in target)


class _PrepareInputs:
    """Convert the image to ``tv_tensors.Image`` and the boxes to pixel XYXY ``BoundingBoxes``."""

    def __call__(self, image: Any, target: Target) -> tuple[tv_tensors.Image, Target]:
        if not isinstance(image, tv_tensors.Image):
            image = F.to_image(image)
        if "boxes" not in target or "labels" not in target:
            raise KeyError(
                f"detection target must contain 'boxes' and 'labels', got keys {sorted(target)}"
            )
        boxes = target["boxes"]
        if not isinstance(boxes, tv_tensors.BoundingBoxes):
            boxes = tv_tensors.BoundingBoxes(
                torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=tuple(image.shape[-2:]),
            )
        elif boxes.format != tv_tensors.BoundingBoxFormat.XYXY:
            boxes = F.convert_bounding_box_format(
                boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY
            )
        if boxes.dtype != torch.float32:
            boxes = tv_tensors.wrap(boxes.to(torch.float32), like=boxes)
        target = {**target, "boxes": boxes}  # shallow copy: never mutate the caller's dict
        return image, target


class _RandomZoomOut:
    """``v2.RandomZoomOut`` whose fill colour follows the image dtype (uint8 or float range).

    Args:
        fill: RGB fill colour in ``[0, 1]`` (scaled to ``[0, 255]`` for uint8 images).
        side_range: canvas side multiplier range.
        p: probability of zooming out.
    """

    def __init__(self, fill: Sequence[float], side_range: tuple[float, float], p: float) -> None:
        fill_u8 = [int(round(255.0 * f)) for f in fill]
        self._uint8 = v2.RandomZoomOut(fill=fill_u8, side_range=side_range, p=p)
        self._float = v2.RandomZoomOut(fill=[float(f) for f in fill], side_range=side_range, p=p)

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[Any, Target]:
        op = self._uint8 if image.dtype == torch.uint8 else self._float
        return op(image, target)

    def __repr__(self) -> str:
        return f"_RandomZoomOut({self._float!r})"


class _RandomIoUCropIfBoxes:
    """``v2.RandomIoUCrop`` skipped for images without boxes (it needs at least one box)."""

    def __init__(self) -> None:
        self._crop = v2.RandomIoUCrop()

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[Any, Target]:
        if target["boxes"].shape[0] == 0:
            return image, target
        return self._crop(image, target)

    def __repr__(self) -> str:
        return f"_RandomIoUCropIfBoxes({self._crop!r})"


class _FinalizeTarget:
    """Image to a plain float32 tensor in ``[0, 1]``; boxes to plain normalised XYXY float32."""

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[Tensor, Target]:
        image = F.to_dtype(image, torch.float32, scale=True).as_subclass(Tensor)
        boxes = target["boxes"]
        height, width = boxes.canvas_size
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        norm = (boxes.as_subclass(Tensor).to(torch.float32) / scale).clamp(0.0, 1.0)
        return image, {**target, "boxes": norm}


class DetectionTransform:
    """A picklable ``(image, target) -> (image, target)`` pipeline (see the module docstring).

    Attributes:
        train: whether this is a training pipeline.
        augment: one of :data:`AUGMENTATIONS` (always ``"none"`` for eval pipelines).
        image_size: output ``(H, W)``.
        steps: the ``v2.Compose`` applied between input preparation and finalisation.
    """

    def __init__(
        self, train: bool, augment: str, image_size: tuple[int, int], steps: v2.Compose
    ) -> None:
        self.train = train
        self.augment = augment
        self.image_size = image_size
        self.steps = steps
        self._prepare = _PrepareInputs()
        self._finalize = _FinalizeTarget()

    def __call__(self, image: Any, target: Target) -> tuple[Tensor, Target]:
        """Apply the pipeline.

        Args:
            image: ``tv_tensors.Image`` ``[3, H, W]`` (uint8 or float), PIL image or array.
            target: dict with pixel ``boxes`` and ``labels`` (see module docstring).

        Returns:
            ``(image float32 [3, S_h, S_w] in [0, 1], target with normalised xyxy boxes)``.
        """
        image, target = self._prepare(image, target)
        input_ptr = image.data_ptr()
        image, target = self.steps(image, target)
        image, target = self._finalize(image, target)
        if image.data_ptr() == input_ptr:  # float input and no-op steps: never alias the input
            image = image.clone()
        return image, target

    def __repr__(self) -> str:
        return (
            f"DetectionTransform(train={self.train}, augment={self.augment!r}, "
            f"image_size={self.image_size}, steps={self.steps})"
        )


def build_transforms(
    train: bool,
    image_size: int | Sequence[int],
    augment: str = "none",
    fill: Sequence[float] = IMAGENET_MEAN,
) -> DetectionTransform:
    """Build the detection transform for a split.

    Args:
        train: training pipeline (augmentation applies) or evaluation pipeline (always the
            deterministic resize + float conversion, whatever ``augment`` says).
        image_size: output side ``S`` (square ``S x S``) or ``(H, W)``.
        augment: ``"none"``: resize to ``image_size`` (a no-op when the image already has that
            size) and convert to float32 in ``[0, 1]``. ``"ssd"``: the SSD paper's augmentation
            ``RandomPhotometricDistort -> RandomZoomOut(fill, side_range=(1, 4), p=0.5) ->
            RandomIoUCrop (skipped when the image has no boxes) -> RandomHorizontalFlip ->
            Resize -> ClampBoundingBoxes -> SanitizeBoundingBoxes`` (drops degenerate boxes and
            the matching ``labels`` / ``difficult`` entries), then float conversion.
            ``"flip"``: ``RandomHorizontalFlip -> Resize`` only (cheap, keeps every box; the
            default banana recipe). ``"photometric"``: ``RandomHorizontalFlip -> Resize ->
            RandomPhotometricDistort``: the SSD augmentation's colour changes and flip
            without its geometry (keeps every box where it is, mirrored or not; the raccoon
            recipe, whose objects fill much of the photo, where the IoU crop and zoom out cost
            accuracy in a short schedule).
        fill: zoom-out canvas colour as RGB in ``[0, 1]`` (the dataset mean); it is scaled to
            ``[0, 255]`` for uint8 images.

    Returns:
        A :class:`DetectionTransform` (picklable, usable in DataLoader workers).

    Raises:
        ValueError: unknown ``augment``, bad ``image_size`` or ``fill``.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {', '.join(AUGMENTATIONS)}; got {augment!r}")
    size = parse_image_size(image_size, "data.image_size")
    fill = tuple(float(f) for f in fill)
    if len(fill) != 3 or not all(0.0 <= f <= 1.0 for f in fill):
        raise ValueError(f"fill must be 3 values in [0, 1] (an RGB mean), got {fill!r}")

    resize = v2.Resize(size, antialias=True)
    if not train or augment == "none":
        return DetectionTransform(train, "none", size, v2.Compose([resize]))

    if augment == "flip":
        return DetectionTransform(
            train, augment, size, v2.Compose([v2.RandomHorizontalFlip(p=0.5), resize])
        )
    if augment == "photometric":
        # colours after the resize: the same distortion (per-pixel, or image means), on S x S
        # pixels instead of the photo's
        steps = [v2.RandomHorizontalFlip(p=0.5), resize, v2.RandomPhotometricDistort(p=0.5)]
        return DetectionTransform(train, augment, size, v2.Compose(steps))
    steps = v2.Compose(
        [
            v2.RandomPhotometricDistort(p=0.5),
            _RandomZoomOut(fill, side_range=(1.0, 4.0), p=0.5),
            _RandomIoUCropIfBoxes(),
            v2.RandomHorizontalFlip(p=0.5),
            resize,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=_labels_getter),
        ]
    )
    return DetectionTransform(train, augment, size, steps)
