"""Training-step time: ``SSDLitModule`` under the Lightning Trainer vs the book and torchvision.

``--model tiny`` (default): both sides train TinySSD (the same architecture, 1 class) with SGD
lr 0.2 / wd 5e-4 on the same batch of 256x256 images with one box each; the book side is the
book's loop body (``benchmarks/d2l_reference.py``: forward with per-step anchors, per-image
``multibox_target``, ``calc_loss``, backward, step, ``cls_eval``/``bbox_eval``).

``--model ssd300``: ``experiment=voc_ssd300``'s module (VGG16 SSD300, 20 classes, smooth-L1 + 3:1
hard negatives, ``rule=ssd``, SGD momentum 0.9) vs torchvision's ``ssd300_vgg16`` (same
architecture and loss; its own transform, per-image matching and loss) on the same batch of
300x300 images with 1 to 5 boxes each, SGD lr 1e-3 momentum 0.9 on both sides. Each side runs in
float32 and under bf16 autocast (ours: ``trainer.precision=bf16-mixed``; torchvision:
``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss); ``--precisions``
chooses.

Rounds alternate between the sides so that drift in machine load hits all of them; the medians
and their ratios are printed.

    python benchmarks/train_step.py                              # TinySSD vs the book, batch 32
    python benchmarks/train_step.py --model ssd300 --batch 4     # SSD300 vs torchvision
    python benchmarks/train_step.py --device cuda                # GPU

``--model tiny`` times the book's loop in float32 (its default) and under bf16 autocast, and
ours at ``--precisions`` (default ``32-true,bf16-mixed``; bf16-mixed is the project's default on
CPUs with native bf16). Like ``python -m src.train``, the script restarts itself once with the
glibc malloc tunables of :mod:`src.utils.malloc`, which both sides then share
(``SSD_MALLOC_TUNING=0`` times the untuned process).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from benchmarks import d2l_reference as d2l  # noqa: E402
from src.utils.config import register_resolvers  # noqa: E402
from src.utils.malloc import reexec_with_malloc_tunables  # noqa: E402


def make_batch(
    batch: int, seed: int = 0, size: int = 256, max_objects: int = 1, num_classes: int = 1
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random images in [0, 1] and 1..max_objects random boxes per image (normalised xyxy)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = []
    for i in range(batch):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 0.6
        wh = 0.1 + torch.rand(n, 2, generator=g) * 0.3
        targets.append(
            {
                "boxes": torch.cat([xy, xy + wh], dim=1),
                "labels": torch.randint(0, num_classes, (n,), generator=g),
                "orig_size": torch.tensor([size, size]),
                "image_id": str(i),
            }
        )
    return images, targets


class _Repeat(Dataset):
    """``steps`` copies of one ready-made batch."""

    def __init__(self, batch, steps: int) -> None:  # noqa: ANN001
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int):  # noqa: ANN204
        return self.batch


def _identity(x):  # noqa: ANN001, ANN202
    return x


class StepTimer(Callback):
    """Wall time of each training batch (forward, loss, backward, optimiser step, logging)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def build_module(model: str = "tiny", device: str = "cpu"):  # noqa: ANN201
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    register_resolvers()  # ${auto_channels_last:...} of the VGG16 backbones
    if model == "tiny":
        overrides, names = ["experiment=d2l_banana", "model.net.num_classes=1"], ["banana"]
    else:
        names = [f"class{i}" for i in range(20)]
        overrides = [
            "experiment=voc_ssd300",
            "backbone.pretrained=null",
            "model.net.num_classes=20",
            "model.scheduler=null",
            # experiment=voc_ssd300 selects trainer=gpu; the accelerator decides the memory format
            f"trainer.accelerator={'cpu' if device == 'cpu' else 'gpu'}",
        ]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*overrides, "paths.output_dir=/tmp/bench"])
    return instantiate(cfg.model, class_names=names)


def time_module(  # noqa: ANN001
    module, batch, steps: int, device: torch.device, precision: str = "32-true"
) -> list[float]:
    timer = StepTimer(device)
    # the same batch every step, already collated (batch_size=None: no re-collation)
    loader = DataLoader(_Repeat(batch, steps), batch_size=None, collate_fn=_identity)
    trainer = Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        precision=precision,
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def time_book(  # noqa: ANN001
    net, opt, X, Y, steps: int, device: torch.device, bf16: bool = False
) -> list[float]:
    """The book's loop body; under bf16 autocast (forward, targets and loss) when ``bf16``."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            d2l.train_step(net, opt, X, Y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def time_torchvision(  # noqa: ANN001
    model, opt, images, targets, steps: int, device: torch.device, bf16: bool
) -> list[float]:
    """torchvision's ``ssd300_vgg16`` training step: forward (transform, matching, loss),
    backward, SGD step; under bf16 autocast when ``bf16``."""
    times = []
    model.train()
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            losses = model(images, targets)
            loss = sum(losses.values())
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _header(device: torch.device, args: argparse.Namespace) -> None:
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device} ({name}); cpus: {os.cpu_count()}; "
        f"torch threads: {torch.get_num_threads()}; "
        f"torch {torch.__version__}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(
        f"model {args.model}, batch {args.batch}, {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warm-up)"
    )


def main_ssd300(args: argparse.Namespace, device: torch.device) -> None:
    """SSD300 (experiment=voc_ssd300) vs torchvision's ssd300_vgg16, float32 and bf16."""
    from torchvision.models.detection import ssd300_vgg16

    images, targets = make_batch(args.batch, size=300, max_objects=5, num_classes=20)
    batch = (images.to(device), [{k: v for k, v in t.items()} for t in targets])
    tv_images = [img.to(device) for img in images]
    tv_targets = [
        {"boxes": (t["boxes"] * 300).to(device), "labels": (t["labels"] + 1).to(device)}
        for t in targets
    ]
    tv_model = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).to(device)
    tv_opt = torch.optim.SGD(tv_model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    precisions = args.precisions.split(",")
    results: dict[str, list[float]] = {}
    n = args.warmup + args.steps
    for _ in range(args.rounds):
        for precision in precisions:
            bf16 = precision.startswith("bf16")
            tv_key = f"torchvision ssd300_vgg16 ({'bf16 autocast' if bf16 else 'float32'})"
            times = time_torchvision(tv_model, tv_opt, tv_images, tv_targets, n, device, bf16)
            results.setdefault(tv_key, []).extend(times[args.warmup :])
            module = build_module("ssd300", device.type)
            times = time_module(module, batch, n, device, precision)
            results.setdefault(f"SSDLitModule ({precision})", []).extend(times[args.warmup :])
    _header(device, args)
    medians = {k: statistics.median(v) for k, v in results.items()}
    width = max(map(len, medians))
    for key, m in medians.items():
        print(f"{key:<{width}} : median {m * 1e3:8.1f} ms/step  {args.batch / m:7.2f} examples/s")
    tv32 = medians.get("torchvision ssd300_vgg16 (float32)")
    tvbf = medians.get("torchvision ssd300_vgg16 (bf16 autocast)")
    for precision in precisions:
        ours = medians[f"SSDLitModule ({precision})"]
        if tv32 is not None:
            print(f"torchvision float32 / SSDLitModule {precision}: {tv32 / ours:.2f}x")
        bf16 = precision.startswith("bf16")
        same = tvbf if bf16 else tv32
        if same is not None:
            print(f"speed-up at equal precision ({precision}): {same / ours:.2f}x")


def main() -> None:
    reexec_with_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "ssd300"], default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 (tiny), 4 (ssd300)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps at the start of each round"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--precisions",
        default="32-true,bf16-mixed",
        help="comma-separated Lightning precisions of our side (32-true, bf16-mixed); the peer "
        "runs in float32 and under bf16 autocast to match",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tiny = args.model == "tiny"
    args.batch = args.batch or (32 if tiny else 4)
    args.steps = args.steps or (15 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if tiny else 2)
    args.rounds = args.rounds or (3 if tiny else 2)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if not tiny:
        main_ssd300(args, device)
        return

    images, targets = make_batch(args.batch)
    # The book feeds raw 0..255 pixels and (B, 1, 5) labels [class, xmin, ymin, xmax, ymax].
    X = (images * 255).to(device)
    Y = torch.cat(
        [torch.cat([t["labels"][:, None].float(), t["boxes"]], dim=1)[None] for t in targets]
    ).to(device)
    batch = (images, targets)

    book_net = d2l.TinySSD(num_classes=1).to(device)
    book_opt = torch.optim.SGD(book_net.parameters(), lr=0.2, weight_decay=5e-4)
    precisions = args.precisions.split(",")
    results: dict[str, list[float]] = {}
    n = args.warmup + args.steps
    for _ in range(args.rounds):
        for precision in precisions:
            bf16 = precision.startswith("bf16")
            book_key = f"book loop ({'bf16 autocast' if bf16 else 'float32'})"
            times = time_book(book_net, book_opt, X, Y, n, device, bf16)
            results.setdefault(book_key, []).extend(times[args.warmup :])
            times = time_module(build_module(), batch, n, device, precision)
            results.setdefault(f"SSDLitModule ({precision})", []).extend(times[args.warmup :])
    _header(device, args)
    medians = {k: statistics.median(v) for k, v in results.items()}
    width = max(map(len, medians))
    for key, m in medians.items():
        print(f"{key:<{width}} : median {m * 1e3:8.1f} ms/step  {args.batch / m:7.1f} examples/s")
    book32 = medians.get("book loop (float32)")
    for precision in precisions:
        ours = medians[f"SSDLitModule ({precision})"]
        if book32 is not None:
            print(f"book float32 (its default) / SSDLitModule {precision}: {book32 / ours:.2f}x")
        peer = "bf16 autocast" if precision.startswith("bf16") else "float32"
        same = medians[f"book loop ({peer})"]
        print(f"speed-up at equal precision ({precision}): {same / ours:.2f}x")


if __name__ == "__main__":
    main()
