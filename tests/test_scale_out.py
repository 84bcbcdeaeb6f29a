"""Multi-process training launched by torchrun (2 CPU processes, gloo), as on a cluster node."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, train_overrides

# Until conf/trainer/ddp.yaml picks SyncBatchNorm by accelerator (issue 7), CPU runs turn it off.
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"]
QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.anchor_panels=null",
    "callbacks.detection_grid=null",
    "logger=csv",
]


def run(command: list[str], run_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (
        f"{' '.join(command)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def torchrun(*overrides: str) -> list[str]:
    # `torchrun --standalone --nproc_per_node=2 -m src.train ...` (a free rendezvous port)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "src.train",
        *overrides,
    ]


def logged_test_metrics(run_dir: Path) -> dict[str, float]:
    rows = list(csv.DictReader(next((run_dir / "csv").rglob("metrics.csv")).open()))
    values: dict[str, float] = {}
    for row in rows:
        values.update({k: float(v) for k, v in row.items() if k.startswith("test/") and v})
    return values


@pytest.mark.slow  # about 2 min on 2 cores: three launches, two of them with 2 processes
def test_torchrun_two_cpu_processes(tmp_path: Path, banana_data_dir: Path) -> None:
    # training: both ranks share one run dir (hydra.run.dir), rank 0 writes the checkpoints
    run_dir = tmp_path / "train"
    proc = run(
        torchrun(
            *train_overrides(run_dir, banana_data_dir, *DDP_CPU, *QUIET),
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            f"hydra.run.dir={run_dir}",
        ),
        run_dir,
    )
    log = proc.stdout + proc.stderr
    assert "distributed_backend=gloo" in log
    assert "All distributed processes registered. Starting with 2 processes" in log
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # evaluation of the same (seeded) weights: 2 processes, each on half of the 8 images, give
    # the metrics of 1 process on all of them
    results = {}
    for name, launch, devices in (
        ("one", [sys.executable, "-m", "src.train"], 1),
        ("two", None, 2),
    ):
        out = tmp_path / name
        overrides = [
            *train_overrides(out, banana_data_dir, *DDP_CPU, *QUIET),
            f"trainer.devices={devices}",
            "train=false",
            "test=true",
            f"hydra.run.dir={out}",
        ]
        run(launch + overrides if launch else torchrun(*overrides), out)
        results[name] = logged_test_metrics(out)
    assert {"test/mAP_50", "test/loss", "test/class_err"} <= set(results["one"])
    assert set(results["two"]) == set(results["one"])
    for key, value in results["one"].items():
        assert results["two"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
