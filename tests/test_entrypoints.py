"""End to end: train (fast_dev_run, 1-epoch run), eval its checkpoint, predict on an image."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from torchvision.io import decode_image

from src.eval import evaluate
from src.predict import predict
from src.train import train
from tests.conftest import compose_config, train_overrides


def test_train_fast_dev_run(tmp_path: Path, banana_data_dir: Path) -> None:
    cfg = compose_config("train", train_overrides(tmp_path, banana_data_dir, "debug=fdr"))
    metrics, objects = train(cfg)
    assert "train/loss_epoch" in metrics
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert 0.0 <= metrics["val/mAP_50"] <= 1.0
    assert objects["datamodule"].hparams["resolved_source"] == "synthetic"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("run")
    cfg = compose_config(
        "train",
        train_overrides(
            out,
            banana_data_dir,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=2",
            "callbacks.rich_progress_bar=null",
        ),
    )
    metrics, _ = train(cfg)
    assert {"train/class_err", "train/bbox_mae", "val/class_err", "val/bbox_mae", "val/mAP"} <= set(
        metrics
    )
    return out


def test_train_writes_checkpoints_and_tensorboard(trained_run: Path) -> None:
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["best.ckpt", "last.ckpt"]
    for name in ckpts:  # plain tensors and values only: loads without unpickling code
        blob = torch.load(trained_run / "checkpoints" / name, weights_only=True)
        assert blob["epoch"] == 0 and isinstance(blob["run_config"], dict)
    events = list((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard events written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    image_tags: set[str] = set()
    for ev in events:
        acc = EventAccumulator(str(ev.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
        image_tags |= set(acc.Tags()["images"])
    for tag in (  # the headline curves under loss/ and mAP/ (src/callbacks/hparams.py)
        "loss/train/loss_epoch",
        "train/class_err",
        "train/bbox_mae",
        "loss/val/loss",
        "val/class_err",
        "val/bbox_mae",
        "mAP/val/mAP_50",
        "mAP/val/mAP",
    ):
        assert tag in tags, f"{tag} not logged; have {sorted(tags)}"
    assert "val_images/detections/0" in image_tags


def test_eval_on_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        "eval",
        # report.md: tests/test_eval_report.py
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path}",
            "trainer.accelerator=cpu",
            "report=false",
        ],
    )
    metrics, _ = evaluate(cfg)
    for key in ("val/loss", "val/class_err", "val/bbox_mae", "val/mAP_50", "val/mAP"):
        assert key in metrics
    assert 0.0 <= metrics["val/class_err"] <= 1.0


def test_predict_on_image(trained_run: Path, banana_data_dir: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    image = next((banana_data_dir / "banana-synthetic" / "bananas_val" / "images").glob("*.png"))
    cfg = compose_config(
        "predict",
        [f"ckpt_path={ckpt}", f"image={image}", "threshold=0.0", f"output_dir={tmp_path}"],
    )
    records = predict(cfg)
    assert len(records) == 1
    png = Path(records[0]["png"])
    drawn = decode_image(str(png))
    assert drawn.shape == decode_image(str(image)).shape[:1] + drawn.shape[1:]
    data = json.loads(Path(records[0]["json"]).read_text())
    assert data["box_format"] == "xyxy pixels"
    assert len(data["detections"]) > 0  # threshold 0 keeps the post-processed boxes
    for det in data["detections"]:
        x0, y0, x1, y1 = det["box"]
        assert 0 <= x0 <= x1 <= data["width"] and 0 <= y0 <= y1 <= data["height"]
        assert det["class_name"] == "banana"


def test_predict_missing_image_names_path(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cfg = compose_config(
        "predict", [f"ckpt_path={ckpt}", f"image={tmp_path / 'nope.png'}", f"output_dir={tmp_path}"]
    )
    with pytest.raises(FileNotFoundError, match="nope.png"):
        predict(cfg)


def test_predict_folder_same_stem_and_undecodable_file(
    trained_run: Path, banana_data_dir: Path, tmp_path: Path
) -> None:
    """`a.jpg` and `a.png` give two outputs; a broken file is reported, the rest processed."""
    import os
    import subprocess
    import sys

    from torchvision.io import write_jpeg

    from src.predict import PredictionError
    from tests.conftest import ROOT

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    source = next((banana_data_dir / "banana-synthetic" / "bananas_val" / "images").glob("*.png"))
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(source.read_bytes())
    write_jpeg(decode_image(str(source)), str(folder / "a.jpg"))
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(source.read_bytes())
    out = tmp_path / "out"
    cfg = compose_config(
        "predict",
        [f"ckpt_path={ckpt}", f"image={folder}", "threshold=0.0", f"output_dir={out}",
         "batch_size=2"],
    )  # fmt: skip
    with pytest.raises(PredictionError, match="1 of 4 images could not be processed.*broken.jpg"):
        predict(cfg)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == [
        "a_jpg_pred.json", "a_jpg_pred.png", "a_png_pred.json", "a_png_pred.png",
        "detections.json", "images.json", "sub/b_png_pred.json", "sub/b_png_pred.png",
    ]  # fmt: skip
    # one COCO results file for the whole folder; its image ids refer to images.json
    images = json.loads((out / "images.json").read_text())
    assert [im["file_name"] for im in images] == ["a.jpg", "a.png", "sub/b.png"]
    results = json.loads((out / "detections.json").read_text())
    assert results and {r["image_id"] for r in results} <= {im["id"] for im in images}
    assert {r["category_id"] for r in results} == {1}  # banana: category id 1
    per_image = json.loads((out / "sub" / "b_png_pred.json").read_text())["detections"]
    b_id = next(im["id"] for im in images if im["file_name"] == "sub/b.png")
    assert len(per_image) == sum(r["image_id"] == b_id for r in results)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "src.predict", f"ckpt_path={ckpt}", f"image={folder}",
         f"output_dir={tmp_path / 'cli'}", f"hydra.run.dir={tmp_path / 'cli'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "broken.jpg" in proc.stdout + proc.stderr
    assert (tmp_path / "cli" / "a_jpg_pred.png").is_file()


def test_eval_missing_checkpoint_names_path(tmp_path: Path) -> None:
    cfg = compose_config(
        "eval", [f"ckpt_path={tmp_path / 'missing.ckpt'}", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        evaluate(cfg)


def test_unknown_group_option_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train", [f"paths.output_dir={tmp_path}", "loss=nonexistent"])
    message = str(err.value)
    assert "nonexistent" in message and "l1" in message and "smooth_l1" in message


def test_train_fast_dev_run_on_real_voc_mini(tmp_path: Path) -> None:
    from tests.conftest import shared_data

    root = shared_data("VOCdevkit-mini")
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path}",
            "data=voc_mini",
            f"data.root={root}",
            "data.batch_size=2",
            "backbone=vgg16",
            "loss=smooth_l1",
            "mining=hard_negative",
            "loss.normalize=positives",
            "debug=fdr",
        ],
    )
    metrics, objects = train(cfg)
    assert objects["model"].net.num_classes == 20
    assert objects["model"].class_names[0] == "aeroplane"
    for key in ("val/loss", "val/mAP_50", "val/voc_mAP_50"):
        assert key in metrics and metrics[key] == metrics[key]  # logged and not nan


def test_unknown_override_key_names_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="data.not_a_key"):
        compose_config("train", [f"paths.output_dir={tmp_path}", "data.not_a_key=1"])


def test_voc_ssd300_experiment_composes(tmp_path: Path) -> None:
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", "experiment=voc_ssd300"])
    assert cfg.backbone.name == "vgg16" and cfg.model.optimizer.lr == pytest.approx(1e-3)
    assert cfg.model.scheduler.milestones == [80000, 100000] and cfg.trainer.max_steps == 120000
    assert cfg.mining.neg_pos_ratio == 3 and cfg.loss.normalize == "positives"
    assert cfg.model.voc_metric.use_07_metric is True


def test_eval_prints_per_class_voc_table(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import shared_data

    root = shared_data("VOCdevkit-mini")
    common = [f"data.root={root}", "data.batch_size=4", "data.augment=none"]
    cfg = compose_config(
        "train",
        [
            f"paths.output_dir={tmp_path / 'train'}",
            "data=voc_mini",
            *common,
            "backbone=tiny",
            "backbone.image_size=128",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.accelerator=cpu",
            "callbacks.rich_progress_bar=null",
            "callbacks.detection_grid.num_images=0",
        ],
    )
    train(cfg)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path / 'eval'}",
            "trainer.accelerator=cpu",
            "trainer.limit_val_batches=2",
            "report=false",
        ],
    )
    with caplog.at_level("INFO"):
        metrics, objects = evaluate(eval_cfg)
    table = objects["per_class_table"]
    assert table.splitlines()[0] == "| class | AP@0.5 |"
    assert "| aeroplane |" in table and "| tvmonitor |" in table and "**mean**" in table
    assert "Per-class VOC AP@0.5" in caplog.text
    assert 0.0 <= metrics["val/voc_mAP_50"] <= 1.0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = {p.parent for p in (tmp_path / "eval").rglob("events.out.tfevents.*")}
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags().get("tensors", []))
    assert any("per_class_AP50" in t for t in tags), tags


def test_ddp_two_cpu_processes_equal_one_process(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`trainer=ddp` on 2 CPU processes (gloo, no SyncBatchNorm on CPU) through the real CLI.

    The validation set has 7 images (not a multiple of the world size): the DDP validation
    metrics equal a single-process evaluation of the same weights, so no image was counted
    twice.
    """
    import csv
    import os
    import subprocess
    import sys

    from src.data.synthetic import generate_banana_dataset
    from src.eval import evaluate
    from tests.conftest import ROOT

    data_dir = tmp_path_factory.mktemp("data7")
    generate_banana_dataset(data_dir / "banana-synthetic", num_train=16, num_val=7, seed=0)
    overrides = [
        # normalize=anchors: a per-image loss, so val/loss does not depend on how the images
        # are grouped into batches (positives-normalised loss divides by each batch's positives);
        # float32: bf16 convolutions round differently for other batch compositions (~1e-5)
        *train_overrides(
            tmp_path / "run",
            data_dir,
            "data.num_synthetic_val=7",
            "loss.normalize=anchors",
            "trainer.precision=32-true",
        ),  # fmt: skip
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.anchor_panels=null",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    with next((tmp_path / "run" / "csv").rglob("metrics.csv")).open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/mAP_50")]
    ddp = rows[-1]

    cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path / 'eval'}",
            f"paths.data_dir={data_dir}",
            "trainer.precision=32-true",
            "~logger",
            "report=false",
        ],
    )
    single, objects = evaluate(cfg)
    assert len(objects["datamodule"].val_dataloader().dataset) == 7
    for name in ("val/mAP_50", "val/mAP", "val/loss", "val/class_err", "val/bbox_mae"):
        assert float(ddp[name]) == pytest.approx(single[name], abs=1e-6), name
