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
the dataset's annotations.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from src.train import fill_from_datamodule  # noqa: E402

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def training_boxes(datamodule) -> torch.Tensor:  # noqa: ANN001
    """All training boxes, ``Tensor[G, 4]`` xyxy normalised to [0, 1]."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = datamodule.build_dataset("train")
    boxes = []
    for index in range(len(dataset)):
        height, width = dataset.image_size(index)
        pixel = torch.as_tensor(dataset.pixel_annotations(index)["boxes"], dtype=torch.float32)
        boxes.append(pixel.reshape(-1, 4) / torch.tensor([width, height, width, height]))
    return torch.cat(boxes)


def network_anchors(cfg) -> torch.Tensor:  # noqa: ANN001
    """The anchors of ``cfg.model.net`` at its input size, ``Tensor[A, 4]`` normalised xyxy."""
    net = instantiate(cfg.model.net)
    size = net.image_size if hasattr(net, "image_size") else cfg.backbone.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    with torch.no_grad():
        return net.eval()(torch.zeros(1, 3, height, width)).anchors.reshape(-1, 4).float()


def fmt(values: torch.Tensor) -> str:
    """Quantiles of ``values`` as a compact string."""
    q = values.float().quantile(torch.tensor(QUANTILES))
    return "  ".join(f"q{int(p * 100)}={v:.3f}" for p, v in zip(QUANTILES, q.tolist(), strict=True))


def main(overrides: list[str]) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule = instantiate(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    boxes = training_boxes(datamodule)
    anchors = network_anchors(cfg)
    threshold = float(cfg.model.target_encoder.iou_threshold)
    best = torch.cat([box_iou(chunk, anchors).amax(dim=1) for chunk in boxes.split(4096)])
    covered = float((best >= threshold).float().mean())
    sides_w, sides_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    print(f"overrides: {' '.join(overrides) or '(none)'}")
    print(f"anchors: {anchors.shape[0]}  sizes: {list(cfg.backbone.anchors.get('sizes', []))}")
    print(f"training boxes: {boxes.shape[0]}")
    print(f"box width  {fmt(sides_w)}")
    print(f"box height {fmt(sides_h)}")
    print(f"best anchor IoU {fmt(best)}")
    print(f"boxes whose best anchor has IoU >= {threshold}: {covered:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
