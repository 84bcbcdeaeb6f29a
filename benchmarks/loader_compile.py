"""DataLoader workers and ``torch.compile`` for the default recipe: time per training step.

Each variant trains the default config (``python -m src.train``: TinySSD, bananas, batch 32,
flips, bf16 where native) for ``--steps`` optimiser steps under the Lightning Trainer, with real
data loading, and records the period between consecutive batch starts (loading, forward, targets,
loss, backward, step). The first ``--warmup`` periods (worker start-up, compilation) are left out
of the median and reported separately. Variants run in turn, ``--rounds`` times, so that drift in
machine load hits all of them.

    python benchmarks/loader_compile.py                       # workers 0/1/2, compile off/on
    python benchmarks/loader_compile.py --variants w0,w2 --steps 20

Variants: ``w<N>`` = ``data.num_workers=N``; ``c`` = ``model.compile=true`` with 0 workers.
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

from src.train import fill_from_datamodule  # noqa: E402
from src.utils.malloc import reexec_with_malloc_tunables  # noqa: E402


class PeriodTimer(Callback):
    """Seconds between consecutive ``on_train_batch_start`` calls (the whole step period)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.starts.append(time.perf_counter())

    @property
    def periods(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def overrides_of(variant: str) -> list[str]:
    if variant == "c":
        return ["model.compile=true", "data.num_workers=0"]
    if variant.startswith("w"):
        return [f"data.num_workers={int(variant[1:])}"]
    raise SystemExit(f"unknown variant {variant!r}: use w<N> or c")


def run(variant: str, steps: int) -> list[float]:
    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train", overrides=[*overrides_of(variant), "paths.output_dir=/tmp/bench_loader"]
        )
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    module = instantiate(cfg.model)
    timer = PeriodTimer()
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps + 1,
        max_epochs=1,
        precision=cfg.trainer.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.periods


def main() -> None:
    reexec_with_malloc_tunables()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="w0,w1,w2,c")
    parser.add_argument("--steps", type=int, default=12, help="timed step periods per run")
    parser.add_argument("--warmup", type=int, default=3, help="periods left out of the median")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    variants = args.variants.split(",")
    results: dict[str, list[float]] = {v: [] for v in variants}
    first: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            periods = run(variant, args.warmup + args.steps)
            first[variant].append(sum(periods[: args.warmup]))
            results[variant].extend(periods[args.warmup :])
    print(
        f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
        f"threads {torch.get_num_threads()}; torch {torch.__version__}; GLIBC_TUNABLES="
        f"{os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    print(f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up), batch 32")
    base = statistics.median(results[variants[0]])
    for variant in variants:
        m = statistics.median(results[variant])
        print(
            f"{variant:>3} ({' '.join(overrides_of(variant))}): median {m * 1e3:7.1f} ms/step, "
            f"{base / m:.2f}x vs {variants[0]}; first {args.warmup} steps "
            f"{statistics.median(first[variant]):.1f} s"
        )


if __name__ == "__main__":
    main()
