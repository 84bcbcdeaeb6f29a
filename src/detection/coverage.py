"""Anchor coverage: which ground-truth boxes have an anchor the target encoder can match.

The target encoder gives an anchor to a ground truth when their IoU reaches its threshold
(``model.target_encoder.iou_threshold``, 0.5). A box whose *best* anchor stays below it still
gets one anchor from the greedy step, but only one, and that anchor's offsets must bridge a large
gap: such boxes are the first ones a detector misses. The share of boxes whose best anchor
reaches the threshold is the *anchor coverage*, a recall ceiling of the matching.

Everything here is plain PyTorch (no Lightning, no Hydra):

* :func:`best_anchor_iou`, :func:`size_categories`, :func:`anchor_coverage`: coverage of boxes
  by anchors, overall, per class and per COCO size (small / medium / large in network-input
  pixels);
* :func:`anchor_shapes`: the distinct anchor widths and heights;
* :func:`scale_sizes`, :func:`ratio_options`, :func:`search_anchors`: a search over the anchor
  config's size ladder (scaled by factors) and ratio sets, for the setting with the highest
  coverage; the caller injects ``build(overrides) -> anchors`` so that this module never knows
  how a config is instantiated;
* :func:`dataset_boxes`, :func:`feature_sizes`: reading the boxes of a dataset (anything with
  ``__len__``, ``image_size(i)``, ``pixel_annotations(i)``, see
  :class:`src.data.base.DetectionDataset`) and the feature-map sizes of a backbone.

Box convention: ``Tensor[G, 4]`` xyxy normalised to ``[0, 1]`` of the image (datasets and
anchors); pixels appear only as ``image_size = (H, W)`` of the network input, to bin areas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from src.detection.box_ops import box_iou

__all__ = [
    "COCO_AREA_LIMITS",
    "SIZE_NAMES",
    "AnchorCandidate",
    "AnnotatedDataset",
    "Coverage",
    "anchor_coverage",
    "anchor_shapes",
    "best_anchor_iou",
    "dataset_boxes",
    "feature_sizes",
    "format_overrides",
    "low_coverage_message",
    "ratio_options",
    "scale_sizes",
    "search_anchors",
    "size_categories",
]

#: COCO's object size limits: area (input pixels^2) below 32^2 is small, below 96^2 medium.
COCO_AREA_LIMITS: tuple[float, float] = (32.0**2, 96.0**2)
SIZE_NAMES: tuple[str, str, str] = ("small", "medium", "large")
#: anchor config keys holding sizes (scaled by the search) and ratios (replaced by ratio sets)
SIZE_KEYS: tuple[str, ...] = ("sizes", "min_sizes", "max_sizes")
RATIO_KEYS: tuple[str, ...] = ("ratios", "aspect_ratios")
#: factors applied to the size ladder by :func:`search_anchors` (1.0: the current sizes)
DEFAULT_SCALES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6)
# IoU values computed at once: 4 MB of float32 chunks stay in cache (2x faster than one table
# of 1000 boxes x 5444 anchors on a 2-core CPU)
_IOU_BUDGET = 1 << 20


def best_anchor_iou(boxes: Tensor, anchors: Tensor) -> Tensor:
    """The IoU of each box with its best anchor.

    Args:
        boxes: ``Tensor[G, 4]`` float, xyxy normalised to ``[0, 1]``.
        anchors: ``Tensor[A, 4]`` float, xyxy normalised (``A >= 1``).

    Returns:
        ``Tensor[G]`` float32 in ``[0, 1]``. The IoU table is computed in chunks of boxes of
        about 1M values (cache-sized, and bounded memory for COCO against SSD512's anchors).
    """
    boxes = boxes.reshape(-1, 4).float()
    anchors = anchors.reshape(-1, 4).float()
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0)
    chunk = max(1, _IOU_BUDGET // max(1, anchors.shape[0]))
    return torch.cat([box_iou(part, anchors).amax(dim=1) for part in boxes.split(chunk)])


def size_categories(boxes: Tensor, image_size: tuple[int, int]) -> Tensor:
    """COCO size category of each box at the network input: 0 small, 1 medium, 2 large.

    Args:
        boxes: ``Tensor[G, 4]`` xyxy normalised to ``[0, 1]``.
        image_size: ``(H, W)`` of the network input in pixels.

    Returns:
        ``Tensor[G]`` int64: 0 where the area in input pixels is below ``32^2``, 1 below
        ``96^2``, 2 otherwise (:data:`COCO_AREA_LIMITS`).
    """
    height, width = image_size
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0.0)
    area = wh[:, 0] * float(width) * wh[:, 1] * float(height)
    limits = torch.tensor(COCO_AREA_LIMITS, dtype=area.dtype)
    return torch.bucketize(area, limits, right=True)


def _shares(covered: Tensor, groups: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Per-group share of ``covered``: ``(Tensor[count] float, nan where empty; Tensor[count])``."""
    total = torch.bincount(groups, minlength=count)[:count]
    # float64 also for no boxes at all (bincount of an empty input returns int64)
    hits = torch.bincount(groups, weights=covered.double(), minlength=count)[:count].double()
    share = torch.where(total > 0, hits / total.clamp(min=1), torch.full_like(hits, math.nan))
    return share.float(), total


@dataclass(frozen=True)
class Coverage:
    """Anchor coverage of a set of boxes.

    Attributes:
        threshold: the IoU a box's best anchor must reach.
        best_iou: ``Tensor[G]`` float32, each box's best-anchor IoU.
        covered: ``Tensor[G]`` bool, ``best_iou >= threshold``.
        per_class: ``Tensor[C]`` float32 share covered per class (nan: no box of that class).
        class_counts: ``Tensor[C]`` int64 boxes per class.
        per_size: ``Tensor[3]`` float32 share covered per COCO size (nan: no box of that size).
        size_counts: ``Tensor[3]`` int64 boxes per size (small, medium, large).
    """

    threshold: float
    best_iou: Tensor
    covered: Tensor
    per_class: Tensor
    class_counts: Tensor
    per_size: Tensor
    size_counts: Tensor

    @property
    def total(self) -> int:
        """Number of boxes."""
        return int(self.covered.numel())

    @property
    def num_covered(self) -> int:
        """Number of boxes whose best anchor reaches the threshold."""
        return int(self.covered.sum())

    @property
    def overall(self) -> float:
        """Share of boxes covered (nan without boxes)."""
        return self.num_covered / self.total if self.total else math.nan


def anchor_coverage(
    boxes: Tensor,
    labels: Tensor,
    anchors: Tensor,
    threshold: float,
    image_size: tuple[int, int],
    num_classes: int,
) -> Coverage:
    """Share of boxes whose best anchor has IoU ``>= threshold``, overall, per class and size.

    Args:
        boxes: ``Tensor[G, 4]`` float, xyxy normalised to ``[0, 1]``.
        labels: ``Tensor[G]`` int64, 0-based classes ``< num_classes``.
        anchors: ``Tensor[A, 4]`` float, xyxy normalised.
        threshold: the target encoder's IoU threshold.
        image_size: ``(H, W)`` of the network input (for the COCO size bins).
        num_classes: ``C``.

    Returns:
        A :class:`Coverage`.
    """
    best = best_anchor_iou(boxes, anchors)
    covered = best >= float(threshold)
    labels = labels.reshape(-1).long()
    per_class, class_counts = _shares(covered, labels, int(num_classes))
    sizes = size_categories(boxes.reshape(-1, 4).float(), image_size)
    per_size, size_counts = _shares(covered, sizes, len(SIZE_NAMES))
    return Coverage(float(threshold), best, covered, per_class, class_counts, per_size, size_counts)


def anchor_shapes(anchors: Tensor, decimals: int = 4) -> Tensor:
    """The distinct anchor shapes ``(w, h)``, normalised to the image.

    Args:
        anchors: ``Tensor[A, 4]`` xyxy normalised.
        decimals: shapes equal after rounding to this many decimals are one shape (anchors
            clipped at the image border differ from the others only there).

    Returns:
        ``Tensor[K, 2]`` float32 ``(w, h)``, sorted by area.
    """
    wh = (anchors[:, 2:] - anchors[:, :2]).float()
    unique = torch.unique(torch.round(wh, decimals=decimals), dim=0)
    return unique[torch.argsort(unique.prod(dim=1), stable=True)]


def low_coverage_message(coverage: Coverage, minimum: float, command: str) -> str | None:
    """The warning for a coverage below ``minimum``, or ``None`` when it is not below.

    Args:
        coverage: the training boxes' coverage.
        minimum: the share in ``[0, 1]`` below which to warn (0.9).
        command: the ``python -m src.inspect ...`` line the message suggests.

    Returns:
        One message naming the coverage, the threshold, the size bins and the command.
    """
    if coverage.total == 0 or coverage.overall >= minimum:
        return None
    bins = ", ".join(
        f"{name} {share:.0%} of {n}"
        for name, share, n in zip(
            SIZE_NAMES, coverage.per_size.tolist(), coverage.size_counts.tolist(), strict=True
        )
        if n
    )
    return (
        f"anchor coverage {coverage.overall:.1%} is below {minimum:.0%}: "
        f"{coverage.total - coverage.num_covered} of {coverage.total} training boxes have no "
        f"anchor with IoU >= {coverage.threshold:g} ({bins}); the detector misses such boxes "
        f"first. See the box sizes against the anchors and suggested anchor sizes: {command}"
    )


# ------------------------------------------------------------------ the anchor search
def _round(value: float) -> float:
    """Three significant digits (0.113, 28.7, 211.0): readable overrides."""
    return float(f"{value:.3g}")


def _scale_nested(values: Any, factor: float) -> Any:
    if isinstance(values, Sequence) and not isinstance(values, str):
        return [_scale_nested(v, factor) for v in values]
    return _round(float(values) * factor)


def scale_sizes(anchor_cfg: Mapping[str, Any], factor: float) -> dict[str, Any]:
    """The size keys of an anchor config scaled by ``factor`` (three significant digits).

    Args:
        anchor_cfg: the anchor generator's config as plain Python (``sizes`` for the book's
            anchors, ``min_sizes`` / ``max_sizes`` for SSD default boxes).
        factor: the scale; ``1.0`` returns ``{}`` (the current sizes, unrounded).

    Returns:
        ``{key: scaled nested list}`` for each of :data:`SIZE_KEYS` present.
    """
    if factor == 1.0:
        return {}
    return {k: _scale_nested(anchor_cfg[k], factor) for k in SIZE_KEYS if k in anchor_cfg}


def _ratio_key(anchor_cfg: Mapping[str, Any]) -> str | None:
    keys = [k for k in RATIO_KEYS if k in anchor_cfg]
    return keys[0] if keys else None


def ratio_options(
    anchor_cfg: Mapping[str, Any], boxes: Tensor, image_size: tuple[int, int]
) -> dict[str, dict[str, Any]]:
    """Ratio settings to try: the current one, common sets, and one read from the data.

    For the book's anchors (``ratios``: per level ``[r_0, r_1, ...]``, ``r_0`` paired with every
    size, widths/heights ``s sqrt(r)``, ``s / sqrt(r)``): ``1,2,1/2``, ``1,2,1/2,3,1/3`` and
    ``data`` = the median, 90th and 10th percentile of the boxes' width/height ratio at the
    network input. For SSD default boxes (``aspect_ratios``: each ``a`` adds ``a`` and ``1/a``):
    ``2``, ``2,3`` and ``data`` = the median and 90th percentile of ``max(r, 1/r)`` (values
    below 1.2, nearly square, dropped). Sets equal to the current one are left out.

    Args:
        anchor_cfg: the anchor generator's config as plain Python.
        boxes: ``Tensor[G, 4]`` xyxy normalised, the training boxes.
        image_size: ``(H, W)`` of the network input.

    Returns:
        ``{name: {ratio key: per-level lists}}``, ``"current": {}`` first.
    """
    key = _ratio_key(anchor_cfg)
    options: dict[str, dict[str, Any]] = {"current": {}}
    if key is None:
        return options
    levels = len(anchor_cfg[key])
    height, width = image_size
    wh = (boxes[:, 2:] - boxes[:, :2]).float() * torch.tensor([float(width), float(height)])
    keep = (wh > 0).all(dim=1)
    ratio = (wh[keep, 0] / wh[keep, 1]) if bool(keep.any()) else torch.ones(1)
    if key == "ratios":
        q = ratio.quantile(torch.tensor([0.5, 0.9, 0.1])).tolist()
        sets = {"1,2,1/2": [1.0, 2.0, 0.5], "1,2,1/2,3,1/3": [1.0, 2.0, 0.5, 3.0, 0.333]}
        data = [round(v, 2) for v in q]
        if len(set(data)) == len(data):
            sets["data"] = data
    else:
        elong = torch.maximum(ratio, 1.0 / ratio).quantile(torch.tensor([0.5, 0.9])).tolist()
        data = sorted({round(v, 1) for v in elong if v >= 1.2})
        sets = {"2": [2.0], "2,3": [2.0, 3.0]}
        if data:
            sets["data"] = data
    current = [[float(r) for r in level] for level in anchor_cfg[key]]
    for name, values in sets.items():
        per_level = [list(values) for _ in range(levels)]
        if per_level != current:
            options[name] = {key: per_level}
    return options


@dataclass(frozen=True)
class AnchorCandidate:
    """One anchor setting tried by :func:`search_anchors`.

    Attributes:
        scale: the factor applied to the size ladder (1.0: the current sizes).
        ratios: the name of the ratio set (``"current"``, ``"1,2,1/2"``, ``"data"``, ...).
        overrides: the anchor config keys that change, with their values (``{}``: current).
        covered: boxes whose best anchor reaches the threshold.
        total: boxes.
        num_anchors: anchors of the setting (more anchors cost head channels and time).
    """

    scale: float
    ratios: str
    overrides: dict[str, Any] = field(default_factory=dict)
    covered: int = 0
    total: int = 0
    num_anchors: int = 0

    @property
    def coverage(self) -> float:
        """Share of boxes covered (nan without boxes)."""
        return self.covered / self.total if self.total else math.nan

    @property
    def is_current(self) -> bool:
        """Whether this is the current setting."""
        return not self.overrides


def search_anchors(
    boxes: Tensor,
    anchor_cfg: Mapping[str, Any],
    build: Callable[[dict[str, Any]], Tensor],
    threshold: float,
    image_size: tuple[int, int],
    scales: Sequence[float] = DEFAULT_SCALES,
) -> list[AnchorCandidate]:
    """Try every size scale x ratio set and rank them by coverage.

    The current setting (scale 1, current ratios, ``build({})``) is always among the
    candidates, so the first one never covers fewer boxes than the current anchors.

    Args:
        boxes: ``Tensor[G, 4]`` xyxy normalised, the training boxes.
        anchor_cfg: the anchor generator's config as plain Python.
        build: ``overrides -> Tensor[A, 4]`` xyxy normalised anchors of the config with these
            keys replaced (``{}``: the current anchors).
        threshold: the target encoder's IoU threshold.
        image_size: ``(H, W)`` of the network input (for the data's ratios).
        scales: the factors applied to the size ladder; 1.0 is always added.

    Returns:
        The candidates, best first: most boxes covered, then fewest anchors, then the scale
        nearest 1, then the ratio sets in :func:`ratio_options`'s order.
    """
    factors = sorted({float(s) for s in scales} | {1.0})
    if min(factors) <= 0:
        raise ValueError(f"anchor search scales must be positive, got {list(scales)}")
    ratio_sets = ratio_options(anchor_cfg, boxes, image_size)
    candidates = []
    for factor in factors:
        sized = scale_sizes(anchor_cfg, factor)
        for name, ratios in ratio_sets.items():
            overrides = {**sized, **ratios}
            anchors = build(overrides)
            covered = int((best_anchor_iou(boxes, anchors) >= threshold).sum())
            candidates.append(
                AnchorCandidate(
                    factor, name, overrides, covered, int(boxes.shape[0]), int(anchors.shape[0])
                )
            )
    order = list(ratio_sets)
    return sorted(
        candidates,
        key=lambda c: (-c.covered, c.num_anchors, abs(math.log(c.scale)), order.index(c.ratios)),
    )


def _hydra_value(value: Any) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return f"{float(value):g}"


def format_overrides(overrides: Mapping[str, Any], prefix: str = "backbone.anchors") -> str:
    """Hydra command-line overrides, e.g. ``'backbone.anchors.sizes=[[0.08,0.113],...]'``.

    Args:
        overrides: anchor config keys and values (from :class:`AnchorCandidate`).
        prefix: the config node of the anchor generator.

    Returns:
        The overrides separated by spaces, each quoted for the shell ('' when empty).
    """
    return " ".join(f"'{prefix}.{k}={_hydra_value(v)}'" for k, v in overrides.items())


# ------------------------------------------------------------------ reading datasets and nets
class AnnotatedDataset(Protocol):
    """What :func:`dataset_boxes` reads (:class:`src.data.base.DetectionDataset` has it)."""

    def __len__(self) -> int: ...

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of image ``index``."""
        ...

    def pixel_annotations(self, index: int) -> dict[str, Tensor]:
        """``boxes`` ``Tensor[G, 4]`` pixel xyxy and ``labels`` ``Tensor[G]`` of image ``index``."""
        ...


def dataset_boxes(
    dataset: AnnotatedDataset, max_images: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Every annotated box of a dataset, normalised, without decoding an image.

    Args:
        dataset: see :class:`AnnotatedDataset`.
        max_images: read only the first ``max_images`` images (``None``: all).

    Returns:
        ``(boxes, labels, image_index)``: ``Tensor[G, 4]`` float32 xyxy normalised to
        ``[0, 1]`` of each image (the frame the network sees after resizing), ``Tensor[G]``
        int64 0-based classes, ``Tensor[G]`` int64 index of each box's image.
    """
    count = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    boxes, labels, sizes, counts = [], [], [], []
    for index in range(count):  # one call per image: the annotations live per image
        ann = dataset.pixel_annotations(index)
        boxes.append(torch.as_tensor(ann["boxes"], dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.as_tensor(ann["labels"], dtype=torch.int64).reshape(-1))
        sizes.append(dataset.image_size(index))
        counts.append(boxes[-1].shape[0])
    if not boxes:
        empty = torch.zeros(0, dtype=torch.int64)
        return torch.zeros(0, 4), empty, empty.clone()
    per_image = torch.tensor(counts, dtype=torch.int64)
    image_index = torch.repeat_interleave(torch.arange(count), per_image)
    hw = torch.tensor(sizes, dtype=torch.float32)[image_index]  # [G, 2] (H, W)
    scale = torch.stack((hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]), dim=1)
    return (torch.cat(boxes) / scale).clamp(0.0, 1.0), torch.cat(labels), image_index


def feature_sizes(backbone: nn.Module, image_size: tuple[int, int]) -> list[tuple[int, int]]:
    """The feature-map sizes ``(H_l, W_l)`` a backbone produces for an input size.

    The backbone runs on the ``meta`` device (shapes only, no arithmetic: 0.02 s for VGG16 at
    300 px instead of 1.8 s on a CPU) through :func:`torch.func.functional_call`, in eval mode,
    without touching its parameters or buffers; a backbone with an operation that has no meta
    kernel runs once on a zero image under ``torch.inference_mode`` instead. Its mode is
    restored.

    Args:
        backbone: a module mapping ``Tensor[1, 3, H, W]`` to a list of feature maps.
        image_size: ``(H, W)`` of the network input.

    Returns:
        One ``(H_l, W_l)`` per feature map.
    """
    training = backbone.training
    tensors = [*backbone.named_parameters(), *backbone.named_buffers()]
    dtype = next((t.dtype for _, t in tensors if t.is_floating_point()), torch.float32)
    try:
        backbone.eval()
        try:
            meta = {name: torch.empty_like(t, device="meta") for name, t in tensors}
            image = torch.empty(1, 3, *image_size, device="meta", dtype=dtype)
            features = functional_call(backbone, meta, (image,))
        except (NotImplementedError, RuntimeError):
            device = tensors[0][1].device if tensors else torch.device("cpu")
            with torch.inference_mode():
                features = backbone(torch.zeros(1, 3, *image_size, device=device, dtype=dtype))
    finally:
        backbone.train(training)
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
