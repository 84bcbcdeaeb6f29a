"""Training-step time: ``SSDLitModule`` under the Lightning Trainer vs the book's training loop.

Both sides train TinySSD (the same architecture, 1 class) with SGD lr 0.2 / wd 5e-4 on the
same batch of 256x256 images with one box each; the book side is the book's loop body
(``benchmarks/d2l_reference.py``: forward with per-step anchors, per-image ``multibox_target``,
``calc_loss``, backward, step, ``cls_eval``/``bbox_eval``). Rounds alternate between the two so
that drift in machine load hits both; the medians and their ratio are printed.

    python benchmarks/train_step.py                 # CPU, batch 32
    python benchmarks/train_step.py --device cuda   # GPU
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


def make_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Random images in [0, 1] and one random box per image (normalised xyxy, label 0)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 256, 256, generator=g)
    xy = torch.rand(batch, 2, generator=g) * 0.6
    wh = 0.1 + torch.rand(batch, 2, generator=g) * 0.3
    boxes = torch.cat([xy, xy + wh], dim=1)
    targets = [
        {
            "boxes": boxes[i : i + 1],
            "labels": torch.zeros(1, dtype=torch.long),
            "orig_size": torch.tensor([256, 256]),
            "image_id": str(i),
        }
        for i in range(batch)
    ]
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


def build_module():  # noqa: ANN201
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train",
            overrides=[
                "experiment=d2l_banana",
                "paths.output_dir=/tmp/bench",
                "model.net.num_classes=1",
            ],
        )
    return instantiate(cfg.model, class_names=["banana"])


def time_module(module, batch, steps: int, device: torch.device) -> list[float]:  # noqa: ANN001
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
    )
    trainer.fit(module, train_dataloaders=loader)
    return timer.times


def time_book(net, opt, X, Y, steps: int, device: torch.device) -> list[float]:  # noqa: ANN001
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        d2l.train_step(net, opt, X, Y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per round")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps at the start of each round"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    images, targets = make_batch(args.batch)
    # The book feeds raw 0..255 pixels and (B, 1, 5) labels [class, xmin, ymin, xmax, ymax].
    X = (images * 255).to(device)
    Y = torch.cat(
        [torch.cat([t["labels"][:, None].float(), t["boxes"]], dim=1)[None] for t in targets]
    ).to(device)
    batch = (images, targets)

    book_net = d2l.TinySSD(num_classes=1).to(device)
    book_opt = torch.optim.SGD(book_net.parameters(), lr=0.2, weight_decay=5e-4)
    ours, book = [], []
    for _ in range(args.rounds):
        book += time_book(book_net, book_opt, X, Y, args.warmup + args.steps, device)[args.warmup :]
        module = build_module()
        ours += time_module(module, batch, args.warmup + args.steps, device)[args.warmup :]

    m_ours, m_book = statistics.median(ours), statistics.median(book)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device} ({name}); cpus: {os.cpu_count()}; "
        f"torch threads: {torch.get_num_threads()}; "
        f"torch {torch.__version__}"
    )
    print(
        f"batch {args.batch}, {args.rounds} rounds x {args.steps} timed steps "
        f"(+{args.warmup} warm-up)"
    )
    print(
        f"book loop     : median {m_book * 1e3:8.1f} ms/step  {args.batch / m_book:8.1f} examples/s"
    )
    print(
        f"SSDLitModule  : median {m_ours * 1e3:8.1f} ms/step  {args.batch / m_ours:8.1f} examples/s"
    )
    print(f"speed-up (book time / module time): {m_book / m_ours:.3f}")


if __name__ == "__main__":
    main()
