"""Seeing inside a trained SSD: ``python -m src.visualize ckpt_path=PATH image=INDEX_OR_FILE``.

For one image (an index into the validation set, with its true boxes; or an image file with its
true boxes given as ``boxes=[[xmin,ymin,xmax,ymax],...]`` in pixels) this writes

* ``<name>_anchors.png``: one panel per positive anchor (capped by ``max_panels``, highest box
  loss first) with the ground-truth box (green), the anchor (dashed blue, ``show_anchor``) and
  the box decoded from the anchor's predicted offsets (red), titled with ``J`` (IoU of the
  predicted box with its ground truth) and ``L`` (the anchor's box loss, the configured loss
  summed over the 4 offsets);
* ``<name>_negatives.png``: the negatives that hard negative mining keeps (with ``mining=none``
  those a ``HardNegativeMiner(3)`` would keep, as the title says);
* ``<name>_anchors.json``: the panels' ``J``, ``L``, class probability and boxes.

The figures are half a page wide (3.4 inches, 8-9 pt text), each PNG with a vector PDF next to it.

``figures=true`` also writes the book's loss figures (``smooth_l1.png``, ``focal_loss.png``);
without ``ckpt_path`` only those are written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchvision.transforms.v2 import functional as F

from src.data.base import read_image
from src.utils.checkpoint import load_module
from src.utils.config import data_config, set_project_root
from src.utils.errors import report_errors
from src.viz.anchors import (
    AnchorAnalysis,
    analyze_module,
    anchor_panels_figure,
    negatives_figure,
    panels_summary,
)
from src.viz.loss_curves import write_loss_figures
from src.viz.style import save_figure

log = logging.getLogger(__name__)

set_project_root()

__all__ = ["load_example", "visualize", "main"]


def _as_index(image: Any) -> int | None:
    if isinstance(image, bool):
        return None
    if isinstance(image, int):
        return image
    if isinstance(image, str) and image.strip().lstrip("-").isdigit():
        return int(image.strip())
    return None


def _file_example(
    cfg: DictConfig, path: Path, image_size: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An image file resized to the net's input, with its true boxes normalised."""
    if not path.is_file():
        raise FileNotFoundError(
            f"image={path} is neither an index into the validation set nor an existing file"
        )
    if cfg.get("boxes") is None:
        raise ValueError(
            f"image={path} needs its true boxes to find the positive anchors: pass "
            "boxes='[[xmin,ymin,xmax,ymax]]' in pixels of the file (and labels='[0]'), or use "
            "image=INDEX for a validation image"
        )
    raw = OmegaConf.to_container(cfg.boxes) if isinstance(cfg.boxes, ListConfig) else cfg.boxes
    try:
        boxes = torch.tensor(raw, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"boxes must be a list of [xmin, ymin, xmax, ymax] in pixels, got {raw!r}"
        ) from err
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.dim() == 1 and boxes.numel() == 4:
        boxes = boxes.unsqueeze(0)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be a list of [xmin, ymin, xmax, ymax] in pixels, got {raw!r}")
    if cfg.get("labels") is None:
        labels = torch.zeros(boxes.shape[0], dtype=torch.int64)
    else:
        labels = torch.tensor(list(cfg.labels), dtype=torch.int64).reshape(-1)
        if labels.numel() != boxes.shape[0]:
            raise ValueError(
                f"labels has {labels.numel()} entries but boxes has {boxes.shape[0]} boxes"
            )
    picture = read_image(path)
    height, width = picture.shape[-2:]
    bad = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    bad |= (
        (boxes < 0).any(1) | (boxes[:, [0, 2]] > width).any(1) | (boxes[:, [1, 3]] > height).any(1)
    )
    if bad.any():
        raise ValueError(
            f"boxes {boxes[bad].tolist()} are not xmin < xmax, ymin < ymax inside the "
            f"{width}x{height} image {path} (pixels)"
        )
    image = F.resize(
        F.to_dtype(picture, torch.float32, scale=True), list(image_size), antialias=True
    )
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return image, {"boxes": boxes / scale, "labels": labels}


def load_example(
    cfg: DictConfig, run_config: DictConfig, image_size: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, torch.Tensor], str]:
    """The image to analyse, its target and a file-name stem.

    Args:
        cfg: the composed ``conf/visualize.yaml`` (``image``, ``boxes``, ``labels``, ``data``).
        run_config: the checkpoint's run config (its ``data`` node builds the validation set).
        image_size: the net's input ``(H, W)``.

    Returns:
        ``(image[3, H, W] float in [0, 1], {"boxes": [G, 4] normalised xyxy, "labels": [G]},
        stem)``.
    """
    index = _as_index(cfg.image)
    if index is None:
        path = Path(str(cfg.image))
        image, target = _file_example(cfg, path, image_size)
        return image, target, path.stem
    datamodule = instantiate(data_config(cfg, run_config))
    datamodule.prepare_data()
    datamodule.setup("validate")
    dataset = datamodule.val_dataloader().dataset
    if not 0 <= index < len(dataset):
        raise IndexError(
            f"image={index} is outside the validation set of {len(dataset)} images "
            f"(use 0..{len(dataset) - 1}, or an image file with boxes=...)"
        )
    image, target = dataset[index]
    return image, {"boxes": target["boxes"], "labels": target["labels"]}, f"val_{index:04d}"


def visualize(cfg: DictConfig) -> dict[str, Any]:
    """Draw the per-anchor views of one image (and/or the book's loss figures).

    Args:
        cfg: the composed ``conf/visualize.yaml``.

    Returns:
        ``files`` (name -> path of everything written) and, with a checkpoint, ``analysis``
        (:class:`~src.viz.anchors.AnchorAnalysis`), ``num_panels``, ``num_positives``,
        ``iou`` (``J`` per panel), ``loss`` (``L`` per panel), ``num_negatives_kept`` and
        ``panels`` (records with ``anchor``, ``J``, ``L``, ``p`` and boxes).
    """
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"files": {}}
    if cfg.get("figures"):
        result["files"].update(write_loss_figures(out_dir))
    if cfg.get("ckpt_path") is None:
        if not cfg.get("figures"):
            raise ValueError(
                "nothing to do: pass ckpt_path=PATH (a .ckpt written by `python -m src.train`) "
                "to draw a trained model's anchors, and/or figures=true for the loss figures"
            )
        return result
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, verbose=False)
    module, run_config = load_module(cfg.ckpt_path)
    module.to(cfg.get("device", "cpu"))
    image_size = tuple(int(v) for v in module.net.image_size)
    image, target, stem = load_example(cfg, run_config, image_size)
    analysis: AnchorAnalysis = analyze_module(
        module, image, target, max_panels=cfg.get("max_panels")
    )
    panels = anchor_panels_figure(
        analysis, show_anchor=bool(cfg.get("show_anchor", True)), title=f"{stem}: positive anchors"
    )
    files = {
        "anchors": out_dir / f"{stem}_anchors.png",
        "negatives": out_dir / f"{stem}_negatives.png",
        "json": out_dir / f"{stem}_anchors.json",
    }
    # PNG (300 dpi) with a vector PDF next to each; half a page wide
    save_figure(panels, files["anchors"], dpi=300)
    save_figure(
        negatives_figure(analysis, title=f"{stem}: hard negatives"), files["negatives"], dpi=300
    )
    records = panels_summary(analysis)
    files["json"].write_text(
        json.dumps(
            {
                "ckpt_path": str(cfg.ckpt_path),
                "image": str(cfg.image),
                "box_format": "xyxy normalised to [0, 1]",
                "num_positives": analysis.num_positives,
                "num_negatives": analysis.num_negatives,
                "num_negatives_kept": int(analysis.negative_index.numel()),
                "mining": analysis.mining_note,
                "box_loss": analysis.box_loss_name,
                "panels": records,
            },
            indent=2,
        )
    )
    for path in files.values():
        log.info("Wrote %s", path)
    result["files"].update(files)
    result.update(
        analysis=analysis,
        num_panels=analysis.num_panels,
        num_positives=analysis.num_positives,
        iou=analysis.iou.tolist(),
        loss=analysis.box_loss.tolist(),
        num_negatives_kept=int(analysis.negative_index.numel()),
        panels=records,
    )
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize.yaml")
@report_errors
def main(cfg: DictConfig) -> None:
    """Hydra entry point; prints the written files."""
    result = visualize(cfg)
    for path in result["files"].values():
        print(path)


if __name__ == "__main__":
    main()
