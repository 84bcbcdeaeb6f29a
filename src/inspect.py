"""A look at the data before training: ``python -m src.inspect [training overrides]``.

Takes the same overrides as ``src.train`` (``conf/inspect.yaml`` composes ``conf/train.yaml``),
so ``python -m src.inspect data=voc_mini backbone=vgg16`` looks at exactly the boxes and anchors
that ``python -m src.train data=voc_mini backbone=vgg16`` would train on. Nothing is trained;
the run folder (``outputs/inspect/runs/<time>``) receives

* ``summary.md``: the tables below with every figure linked (PNG and PDF),
  ``summary.json``: the same numbers for programs;
* ``classes``: boxes per class and their anchor coverage; ``objects_per_image``;
* ``box_sizes``: histograms of box width, height and width/height ratio in network-input pixels
  (the image resized to ``backbone.image_size``) with the anchors' own drawn over them;
  ``box_shapes``: width against height, covered and missed boxes, anchor shapes;
* ``coverage``: the share of training boxes whose best anchor reaches the target encoder's IoU
  threshold, per COCO size (small / medium / large at the input), and the best-IoU histogram;
  the same share after the training transform (``inspect.augmented_images`` random images:
  the SSD zoom-out shrinks boxes by up to 4x) in the text;
* ``anchor_search``: the coverage of the size ladder scaled by ``inspect.scales`` under each
  ratio set, and the best settings as overrides to paste after ``python -m src.train``;
* ``samples``: training samples after the training transform (augmentation included), with the
  boxes the model is given.

The boxes are read from the annotations (no image decoded except the augmented ones); the
anchors come from the backbone and anchor generator of the config (``hydra.utils.instantiate``),
the backbone run once (on the meta device) for its feature-map sizes.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from src.data.transforms import parse_image_size
from src.detection.coverage import (
    SIZE_NAMES,
    AnchorCandidate,
    Coverage,
    anchor_coverage,
    anchor_shapes,
    dataset_boxes,
    feature_sizes,
    format_overrides,
    search_anchors,
)
from src.utils.config import set_project_root
from src.utils.console import task_overrides
from src.utils.errors import report_errors
from src.viz.data import (
    anchor_search_figure,
    box_shapes_figure,
    box_sizes_figure,
    classes_figure,
    coverage_figure,
    objects_per_image_figure,
    samples_figure,
)
from src.viz.style import save_figure

log = logging.getLogger(__name__)

set_project_root()

__all__ = ["inspect", "main"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _quantiles(values: torch.Tensor) -> list[float]:
    if values.numel() == 0:
        return [math.nan] * len(QUANTILES)
    return values.float().quantile(torch.tensor(QUANTILES)).tolist()


def _pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1%}"


def _candidate_row(rank: int, c: AnchorCandidate, current: AnchorCandidate) -> str:
    gain = c.coverage - current.coverage
    overrides = format_overrides(c.overrides) or "(the current anchors)"
    return (
        f"| {rank} | x{c.scale:g} | {c.ratios} | {c.num_anchors} | {_pct(c.coverage)} "
        f"({100 * gain:+.1f} pts) | `{overrides}` |"
    )


def _markdown(info: dict[str, Any], cov: Coverage, candidates: list[AnchorCandidate]) -> str:
    """The run's ``summary.md``."""
    names = info["classes"]
    current = next(c for c in candidates if c.is_current)
    best = candidates[0]
    lines = [
        f"# Data inspection: {info['data']}, backbone {info['backbone']}",
        "",
        f"`{info['command']}`",
        "",
        f"Training split: {info['images']} images, {info['boxes']} boxes, {len(names)} "
        f"class{'es' if len(names) != 1 else ''}. Network input {info['input']}, "
        f"{info['anchors']} anchors ({info['anchor_shapes']} distinct shapes); the target "
        f"encoder matches at IoU >= {cov.threshold:g}. Sizes are in pixels of the network input "
        "(each image resized to it, as the model sees it); the boxes are the annotations "
        "before augmentation.",
        "",
        "## Classes",
        "",
        "| class | boxes | images with one | covered by an anchor |",
        "|---|---:|---:|---:|",
    ]
    for k, name in enumerate(names):
        lines.append(
            f"| {name} | {info['class_boxes'][k]} | {info['class_images'][k]} | "
            f"{_pct(float(cov.per_class[k]))} |"
        )
    per_image = info["objects_per_image"]
    lines += [
        "",
        _figure_link("classes"),
        "",
        "## Objects per image",
        "",
        f"Mean {per_image['mean']:.2f}, median {per_image['median']:g}, max {per_image['max']}; "
        f"{per_image['empty']} image(s) without a box.",
        "",
        _figure_link("objects_per_image"),
        "",
        "## Box sizes at the network input",
        "",
        "| quantile | " + " | ".join(f"q{int(q * 100)}" for q in QUANTILES) + " |",
        "|---|" + "---:|" * len(QUANTILES),
    ]
    for key, label in (
        ("width_px", "width (px)"),
        ("height_px", "height (px)"),
        ("aspect", "width / height"),
    ):
        values = " | ".join(f"{v:.3g}" for v in info["box_quantiles"][key])
        lines.append(f"| {label} | {values} |")
    lines += [
        "",
        "Orange: the anchors' distinct widths, heights and ratios.",
        "",
        _figure_link("box_sizes"),
        "",
        _figure_link("box_shapes"),
        "",
        "## Anchor coverage",
        "",
        f"{_pct(cov.overall)} of the training boxes ({cov.num_covered} of {cov.total}) have an "
        f"anchor with IoU >= {cov.threshold:g}; the others get one anchor from the greedy step "
        "only, far from them, and are the first ones a detector misses. `src.train` warns below "
        f"{info['minimum']:.0%}.",
        "",
        "| size (COCO, input px) | boxes | covered |",
        "|---|---:|---:|",
    ]
    limits = ("area < 32^2", "32^2 <= area < 96^2", "area >= 96^2")
    for name, limit, n, share in zip(
        SIZE_NAMES, limits, cov.size_counts.tolist(), cov.per_size.tolist(), strict=True
    ):
        lines.append(f"| {name} ({limit}) | {n} | {_pct(share)} |")
    aug = info["augmented"]
    sizes = ", ".join(
        f"{name} {_pct(s)} of {n}"
        for name, s, n in zip(SIZE_NAMES, aug["size_coverage"], aug["size_boxes"], strict=True)
        if n
    )
    lines += [
        "",
        f"After the training transform (`data.augment={info['augment']}`, {aug['images']} "
        f"random training images, {aug['boxes']} boxes): "
        f"{_pct(aug['coverage'])} covered ({sizes}).",
        "",
        _figure_link("coverage"),
        "",
        "## Suggested anchors",
        "",
        f"The size ladder scaled by {', '.join(f'{s:g}' for s in info['scales'])} under each "
        "ratio set (`data`: ratios read from the boxes' width/height quantiles), best first "
        "(most boxes covered, then fewest anchors). More anchors per cell mean more head "
        "channels and a slower net."
        + (
            ""
            if info["searched_boxes"] == info["boxes"]
            else f" Coverage here is measured on {info['searched_boxes']} boxes drawn at random "
            f"from the {info['boxes']} (inspect.search_max_boxes)."
        ),
        "",
        "| rank | sizes | ratios | anchors | coverage (vs current) | overrides |",
        "|---:|---|---|---:|---|---|",
    ]
    shown = candidates[: info["top_k"]]
    for rank, c in enumerate(shown, 1):
        lines.append(_candidate_row(rank, c, current))
    if current not in shown:
        lines.append(_candidate_row(candidates.index(current) + 1, current, current))
    same = _best_with_as_many_anchors(candidates, current)
    if same not in shown:
        lines.append(_candidate_row(candidates.index(same) + 1, same, current))
    lines += [""]
    if best.covered == current.covered:
        lines.append("No setting tried covers more boxes than the current anchors.")
    else:
        for label, c in (("the best one", best), ("the best one with as many anchors", same)):
            if c.covered > current.covered and (c is best or c.num_anchors != best.num_anchors):
                command = " ".join(["python -m src.train", *info["train_overrides"]])
                lines += [
                    f"Train with {label}:",
                    "",
                    f"    {command} {format_overrides(c.overrides)}",
                    "",
                ]
    lines += [
        "",
        _figure_link("anchor_search"),
        "",
        "## Training samples",
        "",
        f"{info['samples']} training images after the training transform "
        f"(`data.augment={info['augment']}`), with the boxes the model is given.",
        "",
        _figure_link("samples"),
        "",
    ]
    return "\n".join(lines)


def _best_with_as_many_anchors(
    candidates: list[AnchorCandidate], current: AnchorCandidate
) -> AnchorCandidate:
    """The best candidate with no more anchors than the current setting (it may be current)."""
    return next(c for c in candidates if c.num_anchors <= current.num_anchors)


def _figure_link(name: str) -> str:
    return f"![{name}]({name}.png)\n\n[{name}.pdf]({name}.pdf)"


def _console_summary(info: dict[str, Any], cov: Coverage, candidates: list[AnchorCandidate]) -> str:
    q = info["box_quantiles"]
    sizes = ", ".join(
        f"{name} {_pct(s)} of {n}"
        for name, s, n in zip(
            SIZE_NAMES, cov.per_size.tolist(), cov.size_counts.tolist(), strict=True
        )
        if n
    )
    current = next(c for c in candidates if c.is_current)
    lines = []
    for label, c in (
        ("best setting tried", candidates[0]),
        ("best with as many anchors", _best_with_as_many_anchors(candidates, current)),
    ):
        if c.covered <= current.covered:
            lines.append(f"{label}: the current anchors")
            break
        lines.append(
            f"{label}: sizes x{c.scale:g}, ratios {c.ratios}, {c.num_anchors} anchors: "
            f"{_pct(c.coverage)}: {format_overrides(c.overrides)}"
        )
        if c.num_anchors <= current.num_anchors:
            break
    return "\n".join(
        [
            f"data: {info['data']} train split, {info['images']} images, {info['boxes']} boxes, "
            f"{len(info['classes'])} class(es); {info['objects_per_image']['mean']:.2f} boxes "
            "per image",
            f"input {info['input']}, backbone {info['backbone']}: {info['anchors']} anchors, "
            f"{info['anchor_shapes']} shapes",
            f"box width px  q5 {q['width_px'][0]:.3g}  q50 {q['width_px'][2]:.3g}  "
            f"q95 {q['width_px'][4]:.3g}",
            f"box height px q5 {q['height_px'][0]:.3g}  q50 {q['height_px'][2]:.3g}  "
            f"q95 {q['height_px'][4]:.3g}",
            f"anchor coverage (best IoU >= {cov.threshold:g}): {_pct(cov.overall)} ({sizes})",
            f"after the training transform (augment={info['augment']}, "
            f"{info['augmented']['images']} images, {info['augmented']['boxes']} boxes): "
            f"{_pct(info['augmented']['coverage'])}",
            *lines,
            f"summary and figures: {info['summary']}",
        ]
    )


def _data_name(datamodule: Any) -> str:
    """``data=<group>`` when Hydra runs the job, else the dataset format (``VOCDataset``)."""
    name = getattr(datamodule, "format_name", None) or type(datamodule).__name__
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"data={HydraConfig.get().runtime.choices['data']} ({name})"
    except (ValueError, KeyError):
        return name


def _build_backbone(cfg: DictConfig) -> torch.nn.Module:
    """The backbone of ``cfg``, without downloading weights (its feature sizes suffice)."""
    overrides = {"pretrained": None} if "pretrained" in cfg.backbone.net else {}
    return instantiate(cfg.backbone.net, **overrides)


def inspect(cfg: DictConfig) -> dict[str, Any]:
    """Look at the training split of ``cfg.data`` against the anchors of ``cfg.backbone``.

    Args:
        cfg: the composed ``conf/inspect.yaml`` (``conf/train.yaml`` plus ``inspect.*``).

    Returns:
        ``summary.json``'s content, with ``files`` (the paths written), ``coverage`` (the
        :class:`~src.detection.coverage.Coverage`) and ``candidates`` (the anchor search,
        best first) added.
    """
    options = cfg.inspect
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    minimum = float(options.min_coverage)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    dataset = datamodule.build_dataset("train")
    classes = list(datamodule.classes)
    max_images = options.get("max_images")
    boxes, labels, image_index = dataset_boxes(dataset, max_images)
    images = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if boxes.shape[0] == 0:
        raise ValueError(
            f"{_data_name(datamodule)}: the training split has no box in its first {images} "
            "image(s); check data.* (the annotations) or raise inspect.max_images"
        )

    raw_size = cfg.backbone.image_size
    raw_size = list(raw_size) if isinstance(raw_size, ListConfig) else int(raw_size)
    height, width = parse_image_size(raw_size, "backbone.image_size")
    size = (height, width)
    feats = feature_sizes(_build_backbone(cfg), size)
    anchor_cfg = OmegaConf.to_container(cfg.backbone.anchors, resolve=True)

    def build(overrides: dict[str, Any]) -> torch.Tensor:
        return instantiate({**anchor_cfg, **overrides})(feats, size)

    anchors = build({})
    threshold = float(cfg.model.target_encoder.iou_threshold)
    cov = anchor_coverage(boxes, labels, anchors, threshold, size, len(classes))
    # the search ranks the settings on at most search_max_boxes boxes (a seeded random subset)
    generator = torch.Generator().manual_seed(int(cfg.get("seed") or 0))
    limit = options.get("search_max_boxes")
    searched = boxes
    if limit is not None and boxes.shape[0] > int(limit):
        searched = boxes[torch.randperm(boxes.shape[0], generator=generator)[: int(limit)]]
    candidates = search_anchors(searched, anchor_cfg, build, threshold, size, list(options.scales))

    scale = torch.tensor([float(width), float(height)])
    box_wh = (boxes[:, 2:] - boxes[:, :2]) * scale
    shapes = anchor_shapes(anchors) * scale
    per_image = torch.bincount(image_index, minlength=images)
    class_images = torch.zeros(len(classes), dtype=torch.int64)
    pairs = torch.unique(torch.stack((labels, image_index), dim=1), dim=0)
    class_images += torch.bincount(pairs[:, 0], minlength=len(classes))[: len(classes)]

    # training samples through the training transform, as the training loader gives them: the
    # first num_samples are drawn, all augmented_images are measured (augmentation such as the
    # SSD zoom-out shrinks boxes: the coverage the matching meets in training)
    count = min(int(options.num_samples), len(dataset))
    measured = min(max(count, int(options.augmented_images)), len(dataset))
    picks = torch.randperm(len(dataset), generator=generator)[:measured].tolist()
    samples = [dataset[i] for i in picks]
    augment = getattr(datamodule, "augment", "?")
    aug_boxes = torch.cat([t["boxes"].reshape(-1, 4) for _, t in samples])
    aug_labels = torch.cat([t["labels"].reshape(-1) for _, t in samples])
    aug_cov = anchor_coverage(aug_boxes, aug_labels, anchors, threshold, size, len(classes))
    samples = samples[:count]

    overrides = task_overrides(str(out))
    keep = [o for o in overrides if not o.startswith(("inspect.", "paths.output_dir"))]
    info: dict[str, Any] = {
        "command": " ".join(["python -m src.inspect", *overrides]),
        "train_overrides": keep,
        "data": _data_name(datamodule),
        "backbone": str(cfg.backbone.get("anchor_set") or cfg.backbone.get("name", "?")),
        "classes": classes,
        "images": images,
        "boxes": int(boxes.shape[0]),
        "input": f"{width}x{height}",
        "anchors": int(anchors.shape[0]),
        "anchor_shapes": int(shapes.shape[0]),
        "iou_threshold": threshold,
        "minimum": minimum,
        "class_boxes": cov.class_counts.tolist(),
        "class_images": class_images.tolist(),
        "class_coverage": [None if v != v else v for v in cov.per_class.tolist()],
        "objects_per_image": {
            "mean": float(per_image.float().mean()),
            "median": float(per_image.float().median()),
            "max": int(per_image.max()),
            "empty": int((per_image == 0).sum()),
        },
        "box_quantiles": {
            "width_px": _quantiles(box_wh[:, 0]),
            "height_px": _quantiles(box_wh[:, 1]),
            "aspect": _quantiles(box_wh[:, 0] / box_wh[:, 1].clamp(min=1e-9)),
        },
        "current_coverage": cov.overall,
        "size_coverage": {
            name: {"boxes": int(n), "covered": None if s != s else s}
            for name, n, s in zip(
                SIZE_NAMES, cov.size_counts.tolist(), cov.per_size.tolist(), strict=True
            )
        },
        "scales": sorted({float(s) for s in options.scales} | {1.0}),
        "searched_boxes": int(searched.shape[0]),
        "top_k": int(options.top_k),
        "suggestions": [
            {
                "scale": c.scale,
                "ratios": c.ratios,
                "anchors": c.num_anchors,
                "coverage": c.coverage,
                "overrides": format_overrides(c.overrides),
            }
            for c in candidates[: int(options.top_k)]
        ],
        "samples": count,
        "augmented": {
            "images": measured,
            "boxes": aug_cov.total,
            "coverage": None if aug_cov.total == 0 else aug_cov.overall,
            "size_boxes": aug_cov.size_counts.tolist(),
            "size_coverage": [None if v != v else v for v in aug_cov.per_size.tolist()],
        },
        "augment": augment,
        "summary": str(out / "summary.md"),
    }

    figures = {
        "classes": classes_figure(classes, cov, minimum),
        "objects_per_image": objects_per_image_figure(per_image),
        "box_sizes": box_sizes_figure(box_wh, shapes, size),
        "box_shapes": box_shapes_figure(box_wh, shapes, size, cov.covered),
        "coverage": coverage_figure(cov, minimum),
        "anchor_search": anchor_search_figure(candidates),
        "samples": samples_figure(
            [image for image, _ in samples],
            [target for _, target in samples],
            classes,
            f"{count} training samples after the training transform (data.augment={augment});\n"
            "boxes as the model is given them, coloured by class",
        ),
    }
    files: dict[str, Path] = {}
    for name, fig in figures.items():
        written = save_figure(fig, out / f"{name}.png")
        files[name] = written["png"]
        files[f"{name}_pdf"] = written["pdf"]
    files["summary"] = out / "summary.md"
    files["summary_json"] = out / "summary.json"
    files["summary"].write_text(_markdown(info, cov, candidates))
    files["summary_json"].write_text(json.dumps(info, indent=2) + "\n")
    log.info("Data inspection:\n%s", _console_summary(info, cov, candidates))
    return {**info, "files": files, "coverage": cov, "candidates": candidates}


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point (the summary is logged at the end)."""
    inspect(cfg)


if __name__ == "__main__":
    main()
