"""ONNX export: the exported detector (network + NMS) gives PyTorch's detections in onnxruntime.

Skipped only where onnxruntime is not installed, never in CI (``CI=true``: it fails instead);
``make install`` installs it (the ``export`` extra is part of ``dev``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision.io import read_image
from torchvision.transforms.v2 import functional as F

from src.export import Detector, export, export_onnx, split_detections, verify_onnx
from tests.conftest import compose_config, shared_data

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
]  # fmt: skip


def _require(name: str):  # noqa: ANN202
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is missing in CI: `make install` must install the export extra")
        pytest.skip(f"{name} is not installed (pip install -e '.[export]')")


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A TinySSD for the 20 VOC classes (seeded random weights) and its run config."""
    cfg = compose_config(
        "train",
        ["model.net.num_classes=20", f"paths.output_dir={tmp_path_factory.mktemp('run')}"],
    )
    torch.manual_seed(0)
    module = instantiate(cfg.model, class_names=VOC_CLASSES).eval()
    return module, cfg


def voc_mini_images(count: int, size: list[int]) -> torch.Tensor:
    folder = shared_data("VOCdevkit-mini", "VOC2012", "JPEGImages")
    files = sorted(folder.glob("*.jpg"))[:count]
    return torch.stack(
        [F.resize(F.to_dtype(read_image(str(f)), torch.float32, scale=True), size) for f in files]
    )


def test_onnxruntime_equals_pytorch_on_voc_mini(tiny_voc, tmp_path: Path) -> None:
    onnx = _require("onnx")
    ort = _require("onnxruntime")
    module, _ = tiny_voc
    path = export_onnx(module, tmp_path / "tiny.onnx", VOC_CLASSES)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta["class_names"]) == VOC_CLASSES
    assert json.loads(meta["image_size"]) == [256, 256]
    assert json.loads(meta["detections"]) == ["image", "label", "score", "x1", "y1", "x2", "y2"]
    assert json.loads(meta["postprocess"])["nms_threshold"] == module.postprocess.nms_threshold

    images = voc_mini_images(5, [256, 256])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        out = module.net(images)
        ours = module.postprocess(out.cls_logits, out.box_deltas, out.anchors)
    for batch in (images, images[:1]):  # any batch size (exported at 2)
        (flat,) = session.run(None, {"images": batch.numpy()})
        per_image = split_detections(flat, batch.shape[0])
        assert sum(len(d["scores"]) for d in per_image) == flat.shape[0] > 0
        for got, expected in zip(per_image, ours, strict=False):
            assert got["labels"].tolist() == expected["labels"].tolist()
            torch.testing.assert_close(
                torch.from_numpy(got["boxes"]), expected["boxes"], atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                torch.from_numpy(got["scores"]), expected["scores"], atol=1e-4, rtol=0
            )
    assert verify_onnx(module, path, images) == sum(len(d["scores"]) for d in ours)


def test_detector_flat_rows_match_postprocess(tiny_voc) -> None:
    module, _ = tiny_voc
    images = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        flat = Detector(module)(images)
        out = module.net(images)
        per_image = module.postprocess(out.cls_logits, out.box_deltas, out.anchors)
    assert flat.shape[1] == 7
    assert flat[:, 0].tolist() == sorted(flat[:, 0].tolist())  # grouped by image
    for got, expected in zip(split_detections(flat, 3), per_image, strict=True):
        assert torch.equal(got["boxes"], expected["boxes"])
        assert torch.equal(got["scores"], expected["scores"])
        assert torch.equal(got["labels"], expected["labels"])


def test_export_entry_point_from_checkpoint(tiny_voc, tmp_path: Path) -> None:
    _require("onnxruntime")
    module, cfg = tiny_voc
    run_config = OmegaConf.to_container(cfg, resolve=True)
    run_config["model"]["class_names"] = VOC_CLASSES
    ckpt = tmp_path / "last.ckpt"
    torch.save({"run_config": run_config, "state_dict": module.state_dict(), "epoch": 3}, ckpt)
    export_cfg = compose_config(
        "export", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", "verify=true"]
    )
    path = export(export_cfg)
    assert path == tmp_path / "last.onnx" and path.stat().st_size > 1_000_000


def test_unknown_format_is_named(tmp_path: Path) -> None:
    cfg = compose_config(
        "export",
        [f"ckpt_path={tmp_path / 'x.ckpt'}", "format=tflite", f"paths.output_dir={tmp_path}"],
    )
    with pytest.raises(ValueError, match="format=tflite"):
        export(cfg)
