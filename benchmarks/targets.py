"""Target assignment at SSD300 scale: ``TargetEncoder`` vs torchvision's SSD and the book.

For each number of objects per image (default 1, 10, 30 and 100; ``a-b`` draws it per image
from ``a..b``), the same batch (default 32 images, 21 classes, random boxes) is labelled against
the 8732 SSD300 default boxes by

* ``TargetEncoder(rule="book")`` (the project default for the banana recipes) and
  ``TargetEncoder(rule="ssd")`` (``experiment=voc_ssd300``): IoU, matching, class labels and
  offsets for the whole batch at once;
* torchvision's SSD: what ``torchvision.models.detection.SSD`` does per image during training
  (``box_iou``, ``SSDMatcher(0.5)``, class targets and ``BoxCoder.encode_single`` of the
  foreground anchors), in its per-image loop;
* the book's ``multibox_target`` (``benchmarks/d2l_reference.py``, per image, one greedy round
  per object over the whole ``[A, G]`` matrix): slow on crowded images, so it is timed in at
  most ``--book-calls`` calls per count, spread over the rounds.

Before timing, the assignments are checked on every image: the ``ssd`` rule against
torchvision's matches and class targets, the ``book`` rule against the book's class targets
and offsets. Then the rounds alternate between the counts and, within a count, between the
sides, so that load drift hits all of them; one table of medians (and minima) and ratios
follows, with the growth of each side's cost from the smallest to the largest count.

    python benchmarks/targets.py                          # CPU, batch 32, 1/10/30/100 objects
    python benchmarks/targets.py --objects 1-10 --rounds 20
    python benchmarks/targets.py --objects 100 --no-book

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

BOOK_RULE, SSD_RULE = "TargetEncoder(rule=book)", "TargetEncoder(rule=ssd)"
TORCHVISION, THE_BOOK = "torchvision SSDMatcher + encode (per image)", "the book's multibox_target"


def ssd300_anchors() -> torch.Tensor:
    """The 8732 SSD300 default boxes, ``Tensor[8732, 4]`` normalised xyxy."""
    return SSD300_ANCHORS(SSD300_FEATURES, (300, 300))


def make_targets(
    batch: int,
    max_objects: int = 10,
    num_classes: int = 20,
    seed: int = 0,
    min_objects: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """``batch`` images with ``min_objects`` to ``max_objects`` random boxes each.

    Returns:
        One dict per image: ``boxes: Tensor[G_i, 4]`` float32, normalised xyxy (corners in
        ``[0, 0.8]``, sides 0.03 to 0.63, clipped at 1), ``labels: Tensor[G_i]`` int64 in
        ``[0, num_classes)``.

    """
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(min_objects, max_objects + 1, (1,), generator=g))
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
    """Fail loudly if the assignments differ from the references (every image)."""
    ours_ssd = TargetEncoder(rule="ssd")(anchors, targets)
    tv = TorchvisionSSDTargets()(anchors, targets)
    ours_book = TargetEncoder(rule="book")(anchors, targets)
    for i, target in enumerate(targets):
        if not torch.equal(ours_ssd.matched_idx[i], tv[i][0]):
            raise SystemExit(f"image {i}: rule=ssd differs from torchvision's SSDMatcher")
        if not torch.equal(ours_ssd.cls_labels[i], tv[i][1]):
            raise SystemExit(f"image {i}: rule=ssd class targets differ from torchvision's")
        # each image alone, so that the book sees no padding rows
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


def parse_counts(text: str) -> list[tuple[int, int]]:
    """``"1,10,1-10"`` -> ``[(1, 1), (10, 10), (1, 10)]`` (objects per image, min and max)."""
    counts = []
    for item in text.split(","):
        low, _, high = item.strip().partition("-")
        try:
            pair = (int(low), int(high or low))
        except ValueError:
            raise SystemExit(
                f"--objects: {item!r} is not a count or a range; write e.g. 1,10,30,100 or 1-10"
            ) from None
        if not 0 <= pair[0] <= pair[1]:
            raise SystemExit(f"--objects: {item!r} needs 0 <= min <= max")
        counts.append(pair)
    return counts


def label(count: tuple[int, int]) -> str:
    """``(1, 1)`` -> ``"1"``, ``(1, 10)`` -> ``"1-10"``."""
    return str(count[0]) if count[0] == count[1] else f"{count[0]}-{count[1]}"


def cpu_name() -> str:
    """The CPU's model name and whether it has AMX-BF16 (from ``/proc/cpuinfo`` on Linux)."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name in ("", platform.machine()):
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value
    except OSError:
        return name
    return f"{name}, {'with' if 'amx_bf16' in flags.split() else 'no'} amx_bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--objects", default="1,10,30,100", help="objects per image: counts or ranges a-b"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side per round")
    parser.add_argument(
        "--book-calls", type=int, default=3, help="timed calls of the book's code per count"
    )
    parser.add_argument("--no-book", action="store_true", help="skip the (slow) book reference")
    args = parser.parse_args()
    reexec_with_malloc_tunables()  # the allocator settings of `python -m src.train`

    anchors = ssd300_anchors()
    counts = parse_counts(args.objects)
    book_enc, ssd_enc = TargetEncoder(rule="book"), TargetEncoder(rule="ssd")
    tv = TorchvisionSSDTargets()
    sides: dict[tuple[int, int], dict[str, Callable[[], object]]] = {}
    for low, high in counts:
        targets = make_targets(args.batch, high, min_objects=low)
        check_equal(anchors, targets)
        padded = book_labels(targets)
        sides[low, high] = {
            BOOK_RULE: lambda t=targets: book_enc(anchors, t),
            SSD_RULE: lambda t=targets: ssd_enc(anchors, t),
            TORCHVISION: lambda t=targets: tv(anchors, t),
        }
        if not args.no_book:
            sides[low, high][THE_BOOK] = lambda p=padded: d2l.multibox_target(anchors[None], p)

    # rounds outermost, then counts, then sides; the book's calls spread over the rounds
    book_rounds = {round(i * args.rounds / args.book_calls) for i in range(args.book_calls)}
    times = {count: {name: [] for name in named} for count, named in sides.items()}
    for r in range(args.rounds):
        for count, named in sides.items():
            for name, fn in named.items():
                slow = name == THE_BOOK
                if slow and r not in book_rounds:
                    continue
                fn()  # warm-up
                for _ in range(1 if slow else args.repeats):
                    t0 = time.perf_counter()
                    fn()
                    times[count][name].append(time.perf_counter() - t0)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(
        f"cpu: {cpu_name()}; cpus: {os.cpu_count()}; load average {load}; "
        f"torch threads: {torch.get_num_threads()}; torch {torch.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(
        f"batch {args.batch}, {anchors.shape[0]} anchors; {args.rounds} alternating rounds x "
        f"{args.repeats} calls per side (the book's: {len(book_rounds)} calls); assignments "
        "checked equal on every image (rule=ssd: torchvision, rule=book: the book)"
    )
    medians = {c: {n: statistics.median(v) * 1e3 for n, v in t.items()} for c, t in times.items()}
    minima = {c: {n: min(v) * 1e3 for n, v in t.items()} for c, t in times.items()}
    names = list(next(iter(sides.values())))
    short = {BOOK_RULE: "rule=book", SSD_RULE: "rule=ssd", TORCHVISION: "torchvision"}
    short[THE_BOOK] = "the book"
    print("\nms per batch, median (min):")
    header = f"{'objects/image':>13} | " + " | ".join(f"{short[n]:>19}" for n in names)
    print(header)
    for count in counts:
        cells = [f"{medians[count][n]:9.2f} ({minima[count][n]:8.2f})" for n in names]
        print(f"{label(count):>13} | " + " | ".join(cells))
    ratios = [(TORCHVISION, SSD_RULE), (TORCHVISION, BOOK_RULE), (BOOK_RULE, SSD_RULE)]
    if not args.no_book:
        ratios += [(THE_BOOK, BOOK_RULE), (THE_BOOK, SSD_RULE)]
    print("\nratios of the medians (of the minima):")
    titles = [f"{short[a]} / {short[b]}" for a, b in ratios]
    print(f"{'objects/image':>13} | " + " | ".join(titles))
    for count in counts:
        cells = [
            f"{medians[count][a] / medians[count][b]:.2f}x "
            f"({minima[count][a] / minima[count][b]:.2f}x)".rjust(len(title))
            for (a, b), title in zip(ratios, titles, strict=True)
        ]
        print(f"{label(count):>13} | " + " | ".join(cells))
    if len(counts) > 1:
        first, last = counts[0], counts[-1]
        growth = ", ".join(f"{short[n]} {medians[last][n] / medians[first][n]:.1f}x" for n in names)
        print(
            f"\ncost growth from {label(first)} to {label(last)} objects per image (medians): "
            f"{growth}"
        )


if __name__ == "__main__":
    main()
