"""Post-processing at SSD300 scale: ``PostProcess`` vs torchvision's SSD and the book.

The same raw outputs (default batch 4, 8732 SSD300 default boxes, 21 classes; background logits
around +8 so that a realistic few thousand scores per image pass 0.01) are turned into
detections by

* ``PostProcess`` at the project's defaults (``conf/model/ssd.yaml``: score 0.01, NMS 0.45,
  400 candidates per class, 100 detections) and at torchvision's (200 detections);
* torchvision's ``SSD.postprocess_detections`` at ``ssd300_vgg16``'s defaults (score 0.01,
  NMS 0.45, 400 candidates per class, 200 detections; pixel anchors), per image and per class;
* the book's ``multibox_detection`` (``benchmarks/d2l_reference.py``: class-agnostic NMS 0.5
  with its Python loop).

Rounds alternate between the sides; medians, minima and ratios of medians are printed.

    python benchmarks/postprocess.py
    python benchmarks/postprocess.py --batch 8 --no-book

Like ``python -m src.train``, the script restarts itself once with the glibc malloc tunables of
:mod:`src.utils.malloc`, which every side then shares (``SSD_MALLOC_TUNING=0`` times the untuned
process).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchvision.models.detection import _utils as tv_utils  # noqa: E402
from torchvision.models.detection.ssd import SSD  # noqa: E402

from benchmarks import d2l_reference as d2l  # noqa: E402
from benchmarks.targets import ssd300_anchors, time_rounds  # noqa: E402
from src.detection.postprocess import PostProcess  # noqa: E402
from src.utils.malloc import reexec_with_malloc_tunables  # noqa: E402


def make_outputs(
    batch: int, num_anchors: int, num_classes: int = 20, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cls_logits[B, A, C+1]`` (background column around +8) and ``box_deltas[B, A, 4]``."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_anchors, num_classes + 1, generator=g) * 1.5
    logits[..., 0] += 8.0
    deltas = torch.randn(batch, num_anchors, 4, generator=g) * 0.5
    return logits, deltas


def torchvision_postprocess(image_size: int = 300) -> Callable:
    """``SSD.postprocess_detections`` with ``ssd300_vgg16``'s settings, on pixel anchors."""
    settings = SimpleNamespace(
        box_coder=tv_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)),
        score_thresh=0.01,
        nms_thresh=0.45,
        detections_per_img=200,
        topk_candidates=400,
    )

    def run(logits: torch.Tensor, deltas: torch.Tensor, anchors: torch.Tensor):  # noqa: ANN202
        pixel_anchors = anchors * image_size
        head = {"cls_logits": logits, "bbox_regression": deltas}
        shapes = [(image_size, image_size)] * logits.shape[0]
        return SSD.postprocess_detections(settings, head, [pixel_anchors] * len(shapes), shapes)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side per round")
    parser.add_argument("--no-book", action="store_true", help="skip the (slow) book reference")
    args = parser.parse_args()
    reexec_with_malloc_tunables()  # the allocator settings of `python -m src.train`

    anchors = ssd300_anchors()
    logits, deltas = make_outputs(args.batch, anchors.shape[0])
    ours = PostProcess()  # conf/model/ssd.yaml's values
    ours_tv = PostProcess(detections_per_image=200)  # torchvision's values
    tv = torchvision_postprocess()
    sides: dict[str, Callable[[], object]] = {
        "PostProcess (project defaults)": lambda: ours(logits, deltas, anchors),
        "PostProcess (torchvision's settings)": lambda: ours_tv(logits, deltas, anchors),
        "torchvision postprocess_detections": lambda: tv(logits, deltas, anchors),
    }
    if not args.no_book:
        probs = logits.softmax(dim=-1).permute(0, 2, 1)  # the book's [B, C+1, A]
        flat = deltas.reshape(args.batch, -1)
        sides["the book's multibox_detection"] = lambda: d2l.multibox_detection(
            probs, flat, anchors[None]
        )
    times = time_rounds(sides, args.rounds, args.repeats)

    kept = [len(d["scores"]) for d in ours_tv(logits, deltas, anchors)]
    kept_tv = [len(d["scores"]) for d in tv(logits, deltas, anchors)]
    candidates = int((logits.softmax(-1)[..., 1:] > 0.01).sum())
    print(
        f"cpu: {platform.processor() or platform.machine()}; cpus: {os.cpu_count()}; "
        f"torch threads: {torch.get_num_threads()}; torch {torch.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(
        f"batch {args.batch}, {anchors.shape[0]} anchors, {logits.shape[-1]} classes; "
        f"{candidates} (anchor, class) scores > 0.01; detections kept per image: ours {kept}, "
        f"torchvision {kept_tv}; {args.rounds} alternating rounds x {args.repeats} calls"
    )
    medians = {name: statistics.median(v) for name, v in times.items()}
    width = max(map(len, medians))
    for name, v in times.items():
        median, fastest = medians[name] * 1e3, min(v) * 1e3
        print(f"{name:<{width}} : median {median:8.2f} ms   min {fastest:8.2f} ms")
    base = medians["PostProcess (torchvision's settings)"]
    for ref in list(medians)[2:]:
        print(f"{ref} / PostProcess (torchvision's settings): {medians[ref] / base:.1f}x")


if __name__ == "__main__":
    main()
