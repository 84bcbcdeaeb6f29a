"""`data=coco` end to end: fast_dev_run of train for both backbones, eval of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png, write_file

from src.eval import evaluate
from src.train import train
from tests.conftest import compose_config

W, H = 96, 72
# non-contiguous category ids listed out of order: labels follow the sorted ids
CATEGORIES = [{"id": 9, "name": "bar"}, {"id": 4, "name": "square"}]


def _write_split(root: Path, name: str, n_images: int, seed: int) -> Path:
    """PNG images with a bright square (id 4) and a dark bar (id 9); the last one is empty."""
    gen = torch.Generator().manual_seed(seed)
    images, annotations = [], []
    for i in range(n_images):
        image = torch.full((3, H, W), 128, dtype=torch.uint8)
        file_name = f"{name}_{i}.png"
        images.append({"id": 100 + i, "file_name": file_name, "width": W, "height": H})
        if i < n_images - 1:
            x, y = (int(v) for v in torch.randint(0, 40, (2,), generator=gen))
            image[:, y : y + 24, x : x + 24] = 250
            image[:, 60:68, 10:90] = 10
            annotations += [
                {"id": 2 * i + 1, "image_id": 100 + i, "category_id": 4, "bbox": [x, y, 24, 24]},
                {"id": 2 * i + 2, "image_id": 100 + i, "category_id": 9, "bbox": [10, 60, 80, 8]},
            ]
        write_file(str(root / "images" / file_name), encode_png(image))
    annotations[0]["iscrowd"] = 1  # one crowd region: out of training, ignored by evaluation
    path = root / f"{name}.json"
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    _write_split(root, "train", 6, seed=0)
    _write_split(root, "val", 4, seed=1)
    return root


def coco_overrides(root: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        f"paths.output_dir={output_dir}",
        "data=coco",
        f"data.train_json={root / 'train.json'}",
        f"data.train_images={root / 'images'}",
        f"data.val_json={root / 'val.json'}",
        f"data.val_images={root / 'images'}",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.pin_memory=false",
        "trainer.accelerator=cpu",
        *extra,
    ]


@pytest.mark.parametrize(
    "backbone", [["backbone=tiny", "backbone.image_size=128"], ["backbone=vgg16"]], ids=str
)
def test_train_fast_dev_run_on_coco(coco_dir: Path, tmp_path: Path, backbone: list[str]) -> None:
    cfg = compose_config("train", coco_overrides(coco_dir, tmp_path, *backbone, "debug=fdr"))
    metrics, objects = train(cfg)
    model, datamodule = objects["model"], objects["datamodule"]
    assert model.net.num_classes == 2  # from the JSON's categories, nobody set it
    assert model.class_names == ["square", "bar"] and datamodule.category_ids == [4, 9]
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert 0.0 <= metrics["val/mAP_50"] <= 1.0


def test_eval_of_a_coco_checkpoint(coco_dir: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        "train",
        coco_overrides(
            coco_dir,
            tmp_path / "train",
            "backbone=tiny",
            "backbone.image_size=128",
            "trainer.max_epochs=1",
            "callbacks.rich_progress_bar=null",
        ),
    )
    train(cfg)
    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            f"paths.output_dir={tmp_path / 'eval'}",
            "trainer.accelerator=cpu",
            "report=false",
        ],
    )
    metrics, objects = evaluate(eval_cfg)
    assert objects["datamodule"].classes == ["square", "bar"]
    for key in ("val/loss", "val/mAP", "val/mAP_50"):
        assert key in metrics and metrics[key] == metrics[key]  # logged, not nan
    # detections.json: COCO results with the JSON's own ids; COCOeval on it = the logged mAP
    from src.data.coco_results import coco_evaluate

    path = objects["detections_json"]
    assert path == tmp_path / "eval" / "detections.json"
    results = json.loads(path.read_text())
    assert results and {r["category_id"] for r in results} <= {4, 9}
    assert {r["image_id"] for r in results} <= {100, 101, 102, 103}
    assert all(len(r["bbox"]) == 4 and r["bbox"][2] >= 0 for r in results)
    stats = coco_evaluate(coco_dir / "val.json", path)
    assert stats["map"] == pytest.approx(metrics["val/mAP"], abs=1e-4)
    assert stats["map_50"] == pytest.approx(metrics["val/mAP_50"], abs=1e-4)
