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
"""

from __future__ import annotations

if __name__ == "__main__":  # before torch is imported: see src/utils/malloc.py
    from src.utils.malloc import reexec_with_malloc_tunables

    reexec_with_malloc_tunables()

import json
import logging
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
from src.utils.checkpoint import load_module
from src.utils.config import set_project_root
from src.viz.boxes import draw_detections

log = logging.getLogger(__name__)

set_project_root()

__all__ = ["PredictionError", "list_images", "output_stem", "predict", "predict_batch"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


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
        ``scores: Tensor[N]``, ``labels: Tensor[N]`` 0-based, by decreasing score (CPU).
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
        results.append(
            {
                "boxes": scale_boxes(det["boxes"][keep][order].float().cpu(), width, height),
                "scores": det["scores"][keep][order].float().cpu(),
                "labels": det["labels"][keep][order].cpu(),
            }
        )
    return results


def _write_image_outputs(
    path: Path, rel: Path, image: torch.Tensor, det: dict[str, torch.Tensor], cfg: DictConfig,
    names: list[str] | None, out_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Write ``<stem>_pred.png`` and ``<stem>_pred.json`` of one image; return its record."""
    height, width = image.shape[-2:]
    norm = {**det, "boxes": scale_boxes(det["boxes"], 1.0 / width, 1.0 / height)}
    drawn = draw_detections(image, norm, class_names=names, score_threshold=float(cfg.threshold))
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
                "threshold": float(cfg.threshold),
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
    if not 0.0 <= float(cfg.threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold}")
    batch_size = int(cfg.get("batch_size", 8))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    paths = list_images(cfg.image)
    module, run_config = load_module(cfg.ckpt_path)
    module.to(cfg.device)
    names = module.class_names
    count = int(module.net.num_classes)
    category_ids = OmegaConf.select(run_config, "category_ids", default=None)
    category_ids = list(category_ids) if category_ids else list(range(1, count + 1))
    root = Path(cfg.image) if Path(cfg.image).is_dir() else Path(cfg.image).parent
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    records: list[dict[str, Any]] = []
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
        detections = predict_batch(module, [im for _, _, im in batch], float(cfg.threshold))
        seconds += time.perf_counter() - tic
        for (image_id, path, image), det in zip(batch, detections, strict=True):
            rel = path.relative_to(root)
            records.append(_write_image_outputs(path, rel, image, det, cfg, names, out_dir))
            height, width = image.shape[-2:]
            images_json.append(
                {"id": image_id, "file_name": rel.as_posix(), "width": width, "height": height}
            )
        results += coco_results(detections, [i for i, _, _ in batch], category_ids)

    detections_path = write_coco_results(out_dir / "detections.json", results)
    (out_dir / "images.json").write_text(json.dumps(images_json, indent=2))
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
def main(cfg: DictConfig) -> None:
    """Hydra entry point; exits with status 1 if some images could not be processed."""
    try:
        predict(cfg)
    except PredictionError as err:
        log.error("%s", err)
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()
