"""How well a config's anchors cover its training boxes: the recall ceiling of the matching.

For every ground-truth box of the training split, the best IoU over the network's anchors is
computed; the script prints the fraction of boxes whose best anchor reaches the matching
threshold (``model.target_encoder.iou_threshold``, 0.5), with quantiles of the box sides and of
the best IoU. A box below the threshold still gets one anchor from the greedy step, but only one,
and its offsets must bridge a large gap: such boxes are the first ones a detector misses.

    python benchmarks/anchor_coverage.py                          # the default recipe (bananas)
    python benchmarks/anchor_coverage.py experiment=d2l_banana    # the book's anchors
    python benchmarks/anchor_coverage.py 'backbone.anchors.sizes=[[0.1,0.141],...]'

Arguments are Hydra overrides of ``conf/train.yaml``. No image is decoded: the boxes come from
the dataset's annotations. The computation is :mod:`src.detection.coverage`'s, the one behind
``python -m src.inspect`` (figures, per-class and per-size coverage, suggested anchors) and the
WARNING ``src.train`` logs below 90%.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, ListConfig  # noqa: E402

from src.data.transforms import parse_image_size  # noqa: E402
from src.detection.coverage import (  # noqa: E402
    anchor_coverage,
    dataset_boxes,
    feature_sizes,
)
from src.utils.config import set_project_root  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def network_anchors(cfg: DictConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """The anchors of ``cfg.backbone`` at its input size: ``(Tensor[A, 4] xyxy, (H, W))``."""
    raw = cfg.backbone.image_size
    size = parse_image_size(list(raw) if isinstance(raw, ListConfig) else int(raw))
    kwargs = {"pretrained": None} if "pretrained" in cfg.backbone.net else {}
    backbone = instantiate(cfg.backbone.net, **kwargs)  # weights do not change the map sizes
    return instantiate(cfg.backbone.anchors)(feature_sizes(backbone, size), size), size


def fmt(values: torch.Tensor) -> str:
    """Quantiles of ``values`` as a compact string."""
    q = values.float().quantile(torch.tensor(QUANTILES))
    return "  ".join(f"q{int(p * 100)}={v:.3f}" for p, v in zip(QUANTILES, q.tolist(), strict=True))


def main(overrides: list[str]) -> None:
    set_project_root()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    boxes, labels, _ = dataset_boxes(datamodule.build_dataset("train"))
    anchors, size = network_anchors(cfg)
    threshold = float(cfg.model.target_encoder.iou_threshold)
    cov = anchor_coverage(boxes, labels, anchors, threshold, size, datamodule.num_classes)
    sides_w, sides_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    print(f"overrides: {' '.join(overrides) or '(none)'}")
    print(f"anchors: {anchors.shape[0]}  sizes: {list(cfg.backbone.anchors.get('sizes', []))}")
    print(f"training boxes: {boxes.shape[0]}")
    print(f"box width  {fmt(sides_w)}")
    print(f"box height {fmt(sides_h)}")
    print(f"best anchor IoU {fmt(cov.best_iou)}")
    print(f"boxes whose best anchor has IoU >= {threshold}: {cov.overall:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
