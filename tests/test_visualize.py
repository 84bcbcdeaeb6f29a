"""``src.visualize`` on a trained checkpoint: per-anchor panels, J and L, hard negatives."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from src.detection.box_ops import box_iou
from src.detection.coder import BoxCoder
from src.detection.losses import SmoothL1Loss
from src.detection.targets import TargetEncoder
from src.train import train
from src.utils.checkpoint import load_module
from src.visualize import visualize
from tests.conftest import ROOT, compose_config, train_overrides

SIGMA = 2.0


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> Path:
    """One short real run (smooth L1, sigma 2, no mining) with the TensorBoard logger."""
    out = tmp_path_factory.mktemp("vis_run")
    cfg = compose_config(
        "train",
        train_overrides(
            out,
            banana_data_dir,
            "loss=smooth_l1",
            f"loss.sigma={SIGMA}",
            "mining=none",
            "++trainer.max_epochs=1",
            "++trainer.limit_train_batches=1",
            "++trainer.limit_val_batches=1",
            "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null",
        ),
    )
    train(cfg)
    path = out / "checkpoints" / "last.ckpt"
    assert path.is_file()
    return path


def _val_example(ckpt: Path, index: int):
    module, run_config = load_module(ckpt)
    datamodule = instantiate(run_config.data)
    datamodule.prepare_data()
    datamodule.setup("validate")
    dataset = datamodule.val_dataloader().dataset
    image, target = dataset[index]
    return module, dataset, image, target


def _expected(module, image, target):
    """J and L of every positive anchor, recomputed from the library functions."""
    with torch.no_grad():
        out = module.net(image[None])
    enc = TargetEncoder()(out.anchors, [target])
    pos = enc.pos_mask[0]
    deltas = out.box_deltas[0]
    per_box = SmoothL1Loss(SIGMA)(deltas, enc.box_offsets[0]).sum(-1)
    pred = BoxCoder().decode(deltas, out.anchors)
    gt = target["boxes"][enc.matched_idx[0].clamp(min=0)]
    return pos, per_box, pred, gt


def _check(result, module, image, target, cap: int) -> None:
    pos, per_box, pred, gt = _expected(module, image, target)
    num_pos = int(pos.sum())
    assert num_pos > 0
    assert result["num_positives"] == num_pos
    assert result["num_panels"] == min(num_pos, cap) == len(result["iou"]) == len(result["loss"])
    idx = result["analysis"].anchor_index
    assert pos[idx].all()
    # the panels are the positives with the highest L, in decreasing order
    top = torch.sort(per_box[pos], descending=True).values[: result["num_panels"]]
    torch.testing.assert_close(torch.tensor(result["loss"]), top)
    torch.testing.assert_close(torch.tensor(result["loss"]), per_box[idx])
    iou = box_iou(pred[idx], gt[idx]).diagonal()
    torch.testing.assert_close(torch.tensor(result["iou"]), iou)
    assert all(0.0 <= j <= 1.0 for j in result["iou"])
    # mining=none: the negatives a 3:1 miner would keep
    assert result["num_negatives_kept"] == 3 * num_pos
    assert "mining=none" in result["analysis"].mining_note


def test_val_index_panels_match_library(ckpt: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "visualize", [f"ckpt_path={ckpt}", "image=1", f"output_dir={tmp_path}", "max_panels=16"]
    )
    result = visualize(cfg)
    module, _, image, target = _val_example(ckpt, 1)
    _check(result, module, image, target, cap=16)
    for name in ("anchors", "negatives"):
        assert result["files"][name].read_bytes()[:4] == b"\x89PNG"
    assert result["files"]["anchors"].name == "val_0001_anchors.png"
    assert [p["J"] for p in result["panels"]] == result["iou"]


def test_cap_and_image_file_with_boxes(ckpt: Path, banana_data_dir: Path, tmp_path: Path) -> None:
    module, dataset, image, target = _val_example(ckpt, 2)
    path = dataset.image_paths[2]
    rows = list(csv.DictReader((path.parent.parent / "label.csv").open()))
    row = next(r for r in rows if r["img_name"] == path.name)
    box = [int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
    cfg = compose_config(
        "visualize",
        [
            f"ckpt_path={ckpt}",
            f"image={path}",
            f"boxes=[{box}]",
            "labels=[0]",
            f"output_dir={tmp_path}",
            "max_panels=2",
            "show_anchor=false",
        ],
    )
    result = visualize(cfg)
    # the file route gives the same image and boxes as the validation set (256x256, no resize)
    _check(result, module, image, target, cap=2)
    assert result["files"]["anchors"].name == f"{path.stem}_anchors.png"


def test_figures_only(tmp_path: Path) -> None:
    cfg = compose_config("visualize", ["figures=true", f"output_dir={tmp_path}"])
    result = visualize(cfg)
    assert set(result["files"]) == {"smooth_l1", "focal_loss"}
    assert all(p.is_file() for p in result["files"].values())


def test_clear_errors(ckpt: Path, banana_data_dir: Path, tmp_path: Path) -> None:
    base = [f"output_dir={tmp_path}"]
    with pytest.raises(ValueError, match="ckpt_path"):
        visualize(compose_config("visualize", base))
    with pytest.raises(IndexError, match="outside the validation set of 8 images"):
        visualize(compose_config("visualize", [*base, f"ckpt_path={ckpt}", "image=8"]))
    image = next((banana_data_dir / "banana-synthetic" / "bananas_val" / "images").glob("*.png"))
    with pytest.raises(ValueError, match="boxes="):
        visualize(compose_config("visualize", [*base, f"ckpt_path={ckpt}", f"image={image}"]))
    with pytest.raises(ValueError, match="inside the 256x256 image"):
        visualize(
            compose_config(
                "visualize",
                [*base, f"ckpt_path={ckpt}", f"image={image}", "boxes=[[10,10,300,50]]"],
            )
        )
    with pytest.raises(FileNotFoundError, match="nope.png"):
        visualize(
            compose_config(
                "visualize", [*base, f"ckpt_path={ckpt}", f"image={tmp_path / 'nope.png'}"]
            )
        )


def test_callback_logged_anchor_pictures(ckpt: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for ev in (ckpt.parent.parent / "tensorboard").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {f"val_images/{k}/{i}" for k in ("anchors", "negatives") for i in (0, 1)} <= tags


def test_command_line(ckpt: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "src.visualize",
            f"ckpt_path={ckpt}",
            "image=0",
            "figures=true",
            f"output_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {Path(line).name for line in proc.stdout.split()}
    assert {"val_0000_anchors.png", "val_0000_negatives.png", "val_0000_anchors.json"} <= names
    assert {"smooth_l1.png", "focal_loss.png"} <= names
