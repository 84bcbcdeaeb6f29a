"""Target assignment at SSD300 scale: ``TargetEncoder`` vs torchvision's SSD and the book.

The same batch (default 32 images with 1 to 10 random objects each, 21 classes) is labelled
against the 8732 SSD300 default boxes by

* ``TargetEncoder(rule="book")`` (the project default for the banana recipes) and
  ``TargetEncoder(rule="ssd")`` (``experiment=voc_ssd300``): IoU, matching, class labels and
  offsets for the whole batch at once;
* torchvision's SSD: what ``torchvision.models.detection.SSD`` does per image during training
  (``box_iou``, ``SSDMatcher(0.5)``, class targets and ``BoxCoder.encode_single`` of the
  foreground anchors), in its per-image loop;
* the book's ``multibox_target`` (``benchmarks/d2l_reference.py``, per image, greedy loop).

Rounds alternate between the sides so that load drift hits all of them; medians, minima and the
ratios of the medians (and of the minima) are printed. Before timing, the assignments are
checked: the ``ssd`` rule against torchvision's matches and the ``book`` rule against the book's
``multibox_target`` on every image (each image alone, so that the book sees no padding rows).

    python benchmarks/targets.py                      # CPU, batch 32
    python benchmarks/targets.py --batch 8 --rounds 30

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
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchvision.models.detection import _utils as tv_utils  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

from benchmarks import d2l_reference as d2l  # noqa: E402
from src.detection.anchors import SSDDefaultBoxGenerator  # noqa: E402
from src.detection.targets import TargetEncoder, pad_targets  # noqa: E402
from src.utils.malloc import reexec_with_malloc_tunables  # noqa: E402

SSD300_ANCHORS = SSDDefaultBoxGenerator(
    image_size=300,
    steps=[8, 16, 32, 64, 100, 300],
    min_sizes=[30, 60, 111, 162, 213, 264],
    max_sizes=[60, 111, 162, 213, 264, 315],
    aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
)
SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def ssd300_anchors() -> torch.Tensor:
    """The 8732 SSD300 default boxes, ``Tensor[8732, 4]`` normalised xyxy."""
    return SSD300_ANCHORS(SSD300_FEATURES, (300, 300))


def make_targets(
    batch: int, max_objects: int = 10, num_classes: int = 20, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``batch`` images with 1 to ``max_objects`` random boxes (normalised xyxy, 0-based labels)."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.8
        wh = 0.03 + torch.rand(n, 2, generator=g) * 0.6
        boxes = torch.cat((xy, (xy + wh).clamp(max=1.0)), dim=1)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


class TorchvisionSSDTargets:
    """torchvision's SSD training targets, per image, as ``SSD.forward`` + ``compute_loss``."""

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.matcher = tv_utils.SSDMatcher(iou_threshold)
        self.coder = tv_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))

    def __call__(self, anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]):  # noqa: ANN204
        out = []
        for target in targets:
            boxes = target["boxes"]
            if boxes.numel() == 0:
                matched = torch.full((anchors.shape[0],), -1, dtype=torch.int64)
            else:
                matched = self.matcher(box_iou(boxes, anchors))
            foreground = torch.where(matched >= 0)[0]
            fg_matched = matched[foreground]
            regression = self.coder.encode_single(boxes[fg_matched], anchors[foreground])
            classes = torch.zeros(anchors.shape[0], dtype=torch.int64)
            classes[foreground] = target["labels"][fg_matched] + 1
            out.append((matched, classes, regression))
        return out


def book_labels(targets: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """The book's padded ``(class, xmin, ymin, xmax, ymax)`` rows; padding rows are ``-1``."""
    return pad_targets(targets)


def check_equal(anchors: torch.Tensor, targets: list[dict[str, torch.Tensor]]) -> None:
    """Fail loudly if the assignments differ from the references."""
    ours_ssd = TargetEncoder(rule="ssd")(anchors, targets)
    tv = TorchvisionSSDTargets()(anchors, targets)
    ours_book = TargetEncoder(rule="book")(anchors, targets)
    for i, target in enumerate(targets):
        if not torch.equal(ours_ssd.matched_idx[i], tv[i][0]):
            raise SystemExit(f"image {i}: rule=ssd differs from torchvision's SSDMatcher")
        if not torch.equal(ours_ssd.cls_labels[i], tv[i][1]):
            raise SystemExit(f"image {i}: rule=ssd class targets differ from torchvision's")
        labels = torch.cat((target["labels"][:, None].float(), target["boxes"]), dim=1)[None]
        offsets, mask, classes = d2l.multibox_target(anchors[None], labels)
        if not torch.equal(ours_book.cls_labels[i], classes[0]):
            raise SystemExit(f"image {i}: rule=book differs from the book's multibox_target")
        if not torch.equal(ours_book.box_offsets[i].reshape(-1), offsets[0]):
            raise SystemExit(f"image {i}: rule=book offsets differ from the book's")


def time_rounds(
    sides: dict[str, Callable[[], object]], rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Alternate the sides ``rounds`` times, ``repeats`` timed calls each (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            fn()
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-objects", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per side per round")
    parser.add_argument("--no-book", action="store_true", help="skip the (slow) book reference")
    args = parser.parse_args()
    reexec_with_malloc_tunables()  # the allocator settings of `python -m src.train`

    anchors = ssd300_anchors()
    targets = make_targets(args.batch, args.max_objects)
    check_equal(anchors, targets)
    padded = book_labels(targets)
    book_enc, ssd_enc = TargetEncoder(rule="book"), TargetEncoder(rule="ssd")
    tv = TorchvisionSSDTargets()
    sides: dict[str, Callable[[], object]] = {
        "TargetEncoder(rule=book)": lambda: book_enc(anchors, targets),
        "TargetEncoder(rule=ssd)": lambda: ssd_enc(anchors, targets),
        "torchvision SSDMatcher + encode (per image)": lambda: tv(anchors, targets),
    }
    if not args.no_book:
        sides["the book's multibox_target"] = lambda: d2l.multibox_target(anchors[None], padded)
    times = time_rounds(sides, args.rounds, args.repeats)

    objects = sum(len(t["labels"]) for t in targets)
    print(
        f"cpu: {platform.processor() or platform.machine()}; cpus: {os.cpu_count()}; "
        f"torch threads: {torch.get_num_threads()}; torch {torch.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(
        f"batch {args.batch}, {objects} objects (1-{args.max_objects} per image), "
        f"{anchors.shape[0]} anchors; {args.rounds} alternating rounds x {args.repeats} calls; "
        "assignments checked equal (rule=ssd: torchvision, rule=book: the book)"
    )
    medians = {name: statistics.median(v) for name, v in times.items()}
    width = max(map(len, medians))
    for name, v in times.items():
        median, fastest = medians[name] * 1e3, min(v) * 1e3
        print(f"{name:<{width}} : median {median:8.2f} ms   min {fastest:8.2f} ms")
    minima = {name: min(v) for name, v in times.items()}
    for ours in ("TargetEncoder(rule=book)", "TargetEncoder(rule=ssd)"):
        for ref in list(medians)[2:]:
            print(
                f"{ref} / {ours}: {medians[ref] / medians[ours]:.1f}x "
                f"(minima: {minima[ref] / minima[ours]:.1f}x)"
            )


if __name__ == "__main__":
    main()
