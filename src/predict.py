"""Prediction entry point: ``python -m src.predict ckpt_path=PATH image=PATH_OR_DIR``.

``image`` is an image file or a folder, searched recursively. For every image ``sub/a.jpg`` it
writes ``sub/a_jpg_pred.png`` (the image with the boxes and scores above ``threshold``, like the
book's ``display``) and ``sub/a_jpg_pred.json`` (the boxes in pixels) under ``output_dir``; the
suffix is part of the name, so ``a.jpg`` and ``a.png`` give distinct outputs. For all images
together it writes ``detections.json`` (every detection above ``threshold`` in the COCO results
format: ``image_id``, original ``category_id``, ``bbox`` ``[x, y, w, h]`` pixels, ``score``) and
``images.json`` (``id``, ``file_name`` relative to ``image``, ``width``, ``height``: the COCO
``images`` entries those ids refer to). Images go through the network ``batch_size`` at a time;
the log gives images/s. A file that cannot be decoded is reported and skipped; the others are
processed, and the command exits non-zero at the end.

The score threshold (:func:`resolve_threshold`): ``threshold=T`` if given; else the F1-optimal
threshold stored in the checkpoint (``score_threshold``: the micro-F1-optimal threshold at IoU 0.5
of the validation that made the checkpoint, written by ``src.train``); else, for checkpoints
written before that or trained without the VOC metric, ``fallback_threshold`` (0.5) with a
warning. The log says which threshold is used and where it comes from, and for every image without
a detection above it, the highest score seen and a threshold that would show it.
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: see src/utils/malloc.py
    from src.utils.malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as F

from src.data.base import ImageReadError, read_image
from src.data.coco_results import coco_results, write_coco_results
from src.detection.box_ops import scale_boxes
from src.utils.checkpoint import load_module, load_run_config
from src.utils.config import set_project_root
from src.utils.errors import report_errors
from src.viz.boxes import draw_detections

log = logging.getLogger(__name__)

set_project_root()

__all__ = [
    "PredictionError",
    "list_images",
    "no_detection_message",
    "output_stem",
    "predict",
    "predict_batch",
    "resolve_threshold",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
#: images without detection named one by one in the log (the others are counted)
MAX_EMPTY_LISTED = 10


def list_images(path: str | Path) -> list[Path]:
    """The image files at ``path``: the file itself, or a folder's images (recursive, sorted)."""
    path = Path(path)
    if path.is_dir():
        images = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise FileNotFoundError(
                f"image={path} is a folder without images ({sorted(IMAGE_SUFFIXES)}, searched "
                "recursively)"
            )
        return images
    if not path.is_file():
        raise FileNotFoundError(f"image={path} does not exist; pass an image file or a folder")
    return [path]


class PredictionError(RuntimeError):
    """Some images could not be processed; the others were.

    Attributes:
        records: the records of the images that were processed.
        failed: ``(path, message)`` of each image that failed.
    """

    def __init__(self, records: list[dict[str, Any]], failed: list[tuple[str, str]]) -> None:
        lines = "; ".join(f"{path}: {message}" for path, message in failed)
        super().__init__(
            f"{len(failed)} of {len(failed) + len(records)} images could not be processed "
            f"(the others were written): {lines}"
        )
        self.records = records
        self.failed = failed


def output_stem(path: Path) -> str:
    """``a.jpg`` -> ``a_jpg``: names keep the suffix, so ``a.jpg`` and ``a.png`` differ."""
    suffix = path.suffix.lower().lstrip(".")
    return f"{path.stem}_{suffix}" if suffix else path.stem


@torch.no_grad()
def predict_batch(
    module: Any, images: list[torch.Tensor], threshold: float
) -> list[dict[str, torch.Tensor]]:
    """Detect objects in a batch of images of any sizes.

    Args:
        module: a trained ``SSDLitModule`` (its ``net.image_size`` gives the input size).
        images: ``Tensor[3, H_i, W_i]`` uint8 each.
        threshold: minimum score kept.

    Returns:
        One dict per image: ``boxes: Tensor[N, 4]`` xyxy in pixels of that image,
        ``scores: Tensor[N]``, ``labels: Tensor[N]`` 0-based, by decreasing score (CPU), and
        ``top_score`` / ``top_label`` (0-d tensors): the highest score of the post-processed
        detections before ``threshold`` and its label (nan and -1 when there is none).
    """
    size = list(module.net.image_size)
    device = next(module.parameters()).device
    batch = torch.stack(
        [F.resize(F.to_dtype(im, torch.float32, scale=True), size, antialias=True) for im in images]
    )
    out = module(batch.to(device))
    detections = module.postprocess(out.cls_logits, out.box_deltas, out.anchors)
    results = []
    for image, det in zip(images, detections, strict=True):
        height, width = image.shape[-2:]
        keep = det["scores"] >= threshold
        order = det["scores"][keep].argsort(descending=True)
        scores = det["scores"].float().cpu()
        top = int(scores.argmax()) if scores.numel() else -1
        results.append(
            {
                "boxes": scale_boxes(det["boxes"][keep][order].float().cpu(), width, height),
                "scores": det["scores"][keep][order].float().cpu(),
                "labels": det["labels"][keep][order].cpu(),
                "top_score": scores[top] if top >= 0 else torch.tensor(math.nan),
                "top_label": det["labels"][top].cpu() if top >= 0 else torch.tensor(-1),
            }
        )
    return results


def resolve_threshold(cfg: DictConfig, checkpoint: dict[str, Any]) -> tuple[float, str]:
    """The score threshold of a prediction run and where it comes from.

    Args:
        cfg: the composed ``conf/predict.yaml`` (``threshold``, ``fallback_threshold``).
        checkpoint: the checkpoint's dict; ``score_threshold`` holds the F1-optimal threshold of
            its validation (``value``, ``f1``, ``precision``, ``recall``, ``epoch``,
            ``iou_threshold``) in checkpoints written by ``src.train`` with the VOC metric.

    Returns:
        ``(threshold, source)``: ``source`` says where the value comes from, in words.

    Raises:
        ValueError: the threshold is outside ``[0, 1]``.
    """
    stored = checkpoint.get("score_threshold")
    if cfg.get("threshold") is not None:
        value, source = float(cfg.threshold), "given as threshold=" + str(cfg.threshold)
    elif isinstance(stored, dict) and stored.get("value") is not None:
        value = float(stored["value"])
        source = (
            "the F1-optimal threshold of the checkpoint's validation (epoch "
            f"{stored.get('epoch', '?')}: F1 {float(stored.get('f1', math.nan)):.3f}, precision "
            f"{float(stored.get('precision', math.nan)):.3f}, recall "
            f"{float(stored.get('recall', math.nan)):.3f} at IoU "
            f"{float(stored.get('iou_threshold', 0.5)):g}, all classes)"
        )
    else:
        value = float(cfg.get("fallback_threshold", 0.5))
        if isinstance(stored, dict):  # that validation gave no threshold
            why = (
                f"the checkpoint's validation (epoch {stored.get('epoch', '?')}) gave no "
                f"F1-optimal threshold: {stored.get('reason', 'no detection')}"
            )
        else:
            why = (
                "this checkpoint stores no F1-optimal threshold (written before src.train "
                "stored one, or trained without the VOC metric)"
            )
        source = f"the default fallback_threshold: {why}; pass threshold=T to choose one"
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {value} ({source})")
    return value, source


def no_detection_message(
    name: str, det: dict[str, torch.Tensor], threshold: float, names: list[str] | None
) -> str:
    """What to say about an image without a detection at or above ``threshold``.

    Args:
        name: the image, as shown to the user.
        det: its :func:`predict_batch` result (``top_score``, ``top_label``).
        threshold: the threshold used.
        names: class names indexed by label.

    Returns:
        E.g. ``a.jpg: no detection above 0.90; highest score 0.37 (banana): try threshold=0.3``
        (the suggestion: the highest score rounded down to one significant digit).
    """
    top = float(det["top_score"])
    if not math.isfinite(top):
        return (
            f"{name}: no detection at all (the post-processing's own score threshold removed "
            "every box): the model sees nothing here"
        )
    label = int(det["top_label"])
    cls = names[label] if names and 0 <= label < len(names) else str(label)
    exponent = math.floor(math.log10(top)) if top > 0 else 0
    digits = max(0, -exponent)
    suggestion = math.floor(top / 10.0**exponent) * 10.0**exponent if top > 0 else 0.0
    return (
        f"{name}: no detection above {threshold:.2f}; highest score {top:.2f} ({cls}): try "
        f"threshold={suggestion:.{digits}f}"
    )


def _write_image_outputs(
    path: Path, rel: Path, image: torch.Tensor, det: dict[str, torch.Tensor], threshold: float,
    names: list[str] | None, out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Write ``<stem>_pred.png`` and ``<stem>_pred.json`` of one image; return its record."""
    height, width = image.shape[-2:]
    norm = {**det, "boxes": scale_boxes(det["boxes"], 1.0 / width, 1.0 / height)}
    drawn = draw_detections(image, norm, class_names=names, score_threshold=threshold)
    folder = out_dir / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = output_stem(path)
    png = folder / f"{stem}_pred.png"
    write_png(drawn, str(png))
    detections = [
        {
            "label": int(label),
            "class_name": names[int(label)] if names else str(int(label)),
            "score": float(score),
            "box": [float(v) for v in box],
        }
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"], strict=True)
    ]
    js = folder / f"{stem}_pred.json"
    js.write_text(
        json.dumps(
            {
                "image": str(path),
                "width": int(width),
                "height": int(height),
                "box_format": "xyxy pixels",
                "threshold": threshold,
                "detections": detections,
            },
            indent=2,
        )
    )
    log.debug("%s: %d boxes -> %s, %s", path, len(detections), png, js)
    return {"image": str(path), "png": str(png), "json": str(js), "detections": detections}


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the checkpoint on every image and write the pictures, the JSONs and the COCO results.

    Args:
        cfg: the composed ``conf/predict.yaml``.

    Returns:
        One record per image: ``image``, ``png``, ``json`` paths and ``detections``.

    Raises:
        PredictionError: after all images were tried, if some could not be decoded.
    """
    if cfg.get("threshold") is not None and not 0.0 <= float(cfg.threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold}")
    batch_size = int(cfg.get("batch_size", 8))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(cfg.image)
    _, checkpoint = load_run_config(cfg.ckpt_path)
    threshold, source = resolve_threshold(cfg, checkpoint)
    module, run_config = load_module(cfg.ckpt_path, checkpoint=checkpoint)
    if source.startswith("the default"):
        log.warning("Score threshold %.3g, %s", threshold, source)
    else:
        log.info("Score threshold %.3g, %s", threshold, source)
    module.to(cfg.device)
    names = module.class_names
    count = int(module.net.num_classes)
    category_ids = OmegaConf.select(run_config, "category_ids", default=None)
    category_ids = list(category_ids) if category_ids else list(range(1, count + 1))
    root = Path(cfg.image) if Path(cfg.image).is_dir() else Path(cfg.image).parent
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
    empty = 0  # images without a detection at or above the threshold
    failed: list[tuple[str, str]] = []
    images_json: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    seconds = 0.0
    for start in range(0, len(paths), batch_size):
        batch: list[tuple[int, Path, torch.Tensor]] = []
        for image_id, path in enumerate(paths[start : start + batch_size], start=start + 1):
            try:
                batch.append((image_id, path, read_image(path)))
            except (ImageReadError, FileNotFoundError) as err:
                log.error("Skipping %s: %s", path, err)
                failed.append((str(path), str(err)))
        if not batch:
            continue
        tic = time.perf_counter()
        detections = predict_batch(module, [im for _, _, im in batch], threshold)
        seconds += time.perf_counter() - tic
        for (image_id, path, image), det in zip(batch, detections, strict=True):
            rel = path.relative_to(root)
            if not det["scores"].numel():
                empty += 1
                if empty <= MAX_EMPTY_LISTED:
                    log.warning("%s", no_detection_message(rel.as_posix(), det, threshold, names))
            records.append(_write_image_outputs(path, rel, image, det, threshold, names, out_dir))
            height, width = image.shape[-2:]
            images_json.append(
                {"id": image_id, "file_name": rel.as_posix(), "width": width, "height": height}
            )
        results += coco_results(detections, [i for i, _, _ in batch], category_ids)

    detections_path = write_coco_results(out_dir / "detections.json", results)
    (out_dir / "images.json").write_text(json.dumps(images_json, indent=2))
    if empty > MAX_EMPTY_LISTED:
        log.warning(
            "%d of %d images have no detection above %.2f (the first %d are listed above)",
            empty, len(records), threshold, MAX_EMPTY_LISTED,
        )  # fmt: skip
    if records:
        log.info(
            "%d images in %.2f s of network + post-processing: %.1f images/s (batch_size=%d, "
            "%s); pictures and JSON in %s, COCO results in %s",
            len(records), seconds, len(records) / max(seconds, 1e-9), batch_size, cfg.device,
            out_dir, detections_path,
        )  # fmt: skip
    if failed:
        raise PredictionError(records, failed)
    return records


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point; exits with status 1 if some images could not be processed."""
    try:
        predict(cfg)
    except PredictionError as err:
        log.error("%s", err)
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()
