"""Prediction entry point: ``python -m src.predict ckpt_path=PATH image=PATH [threshold=0.9]``.

For every image ``a.jpg``, writes ``a_jpg_pred.png`` (the image with the boxes and scores above
the threshold, like the book's ``display``) and ``a_jpg_pred.json`` (the boxes in pixels); the
suffix is part of the name, so ``a.jpg`` and ``a.png`` in one folder give distinct outputs. A file
that cannot be decoded is reported and skipped; the others are processed, and the command exits
non-zero at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from torchvision.io import ImageReadMode, decode_image, write_png
from torchvision.transforms.v2 import functional as F

from src.detection.box_ops import scale_boxes
from src.utils.checkpoint import load_module
from src.utils.config import set_project_root
from src.viz.boxes import draw_detections

log = logging.getLogger(__name__)

set_project_root()

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def list_images(path: str | Path) -> list[Path]:
    """The image files at ``path`` (a file, or a directory searched non-recursively)."""
    path = Path(path)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(
                f"image={path} is a directory without images ({sorted(IMAGE_SUFFIXES)})"
            )
        return images
    if not path.is_file():
        raise FileNotFoundError(f"image={path} does not exist; pass an image file or a directory")
    return [path]


def read_image(path: Path) -> torch.Tensor:
    """Decode an image file to ``Tensor[3, H, W]`` uint8 RGB, with an error naming the file."""
    try:
        return decode_image(str(path), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err


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
def predict_image(module: Any, image: torch.Tensor, threshold: float) -> dict[str, torch.Tensor]:
    """Detect objects in one image.

    Args:
        module: a trained ``SSDLitModule`` (its ``net.image_size`` gives the input size).
        image: ``Tensor[3, H, W]`` uint8.
        threshold: minimum score kept.

    Returns:
        ``boxes: Tensor[N, 4]`` xyxy in pixels of ``image``, ``scores: Tensor[N]``,
        ``labels: Tensor[N]`` 0-based, sorted by decreasing score.
    """
    height, width = image.shape[-2:]
    size = list(module.net.image_size)
    device = next(module.parameters()).device
    x = F.resize(F.to_dtype(image, torch.float32, scale=True), size, antialias=True)
    out = module(x.unsqueeze(0).to(device))
    det = module.postprocess(out.cls_logits, out.box_deltas, out.anchors)[0]
    keep = det["scores"] >= threshold
    order = det["scores"][keep].argsort(descending=True)
    return {
        "boxes": scale_boxes(det["boxes"][keep][order].cpu(), width, height),
        "scores": det["scores"][keep][order].cpu(),
        "labels": det["labels"][keep][order].cpu(),
    }


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the checkpoint on every image and write the annotated image and the JSON of boxes.

    Args:
        cfg: the composed ``conf/predict.yaml``.

    Returns:
        One record per image: ``image``, ``png``, ``json`` paths and ``detections``.

    Raises:
        PredictionError: after all images were tried, if some could not be decoded.
    """
    if not 0.0 <= float(cfg.threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {cfg.threshold}")
    module, _ = load_module(cfg.ckpt_path)
    module.to(cfg.device)
    names = module.class_names
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    failed: list[tuple[str, str]] = []
    for path in list_images(cfg.image):
        try:
            image = read_image(path)
        except ValueError as err:
            log.error("Skipping %s: %s", path, err)
            failed.append((str(path), str(err)))
            continue
        det = predict_image(module, image, float(cfg.threshold))
        height, width = image.shape[-2:]
        norm = {**det, "boxes": scale_boxes(det["boxes"], 1.0 / width, 1.0 / height)}
        drawn = draw_detections(
            image, norm, class_names=names, score_threshold=float(cfg.threshold)
        )
        stem = output_stem(path)
        png = out_dir / f"{stem}_pred.png"
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
        js = out_dir / f"{stem}_pred.json"
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
        log.info("%s: %d boxes -> %s, %s", path, len(detections), png, js)
        records.append(
            {"image": str(path), "png": str(png), "json": str(js), "detections": detections}
        )
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
