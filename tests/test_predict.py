"""src.predict's score threshold: the checkpoint's F1-optimal one, a fallback, and empty images.

The checkpoints here are written by hand from an untrained module (no training: fast); the
round trip through a real training run is in tests/test_tensorboard.py.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from src.predict import no_detection_message, predict, resolve_threshold
from src.utils.config import config_to_container
from tests.conftest import compose_config, train_overrides

STORED = {
    "value": 0.4137,
    "f1": 0.8,
    "precision": 0.75,
    "recall": 0.857,
    "iou_threshold": 0.5,
    "epoch": 3,
    "global_step": 40,
}


def _checkpoint(path: Path, data_dir: Path, score_threshold: dict | None) -> Path:
    """A checkpoint as src.train writes it (run config, weights), without training."""
    cfg = compose_config(
        "train",
        train_overrides(
            path.parent, data_dir, "model.net.num_classes=1", "model.class_names=[banana]"
        ),
    )
    module = instantiate(cfg.model)
    blob = {"state_dict": module.state_dict(), "run_config": config_to_container(cfg), "epoch": 3}
    if score_threshold is not None:
        blob["score_threshold"] = score_threshold
    torch.save(blob, path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> dict:
    folder = tmp_path_factory.mktemp("predict_ckpts")
    return {
        "new": _checkpoint(folder / "new.ckpt", banana_data_dir, STORED),
        "old": _checkpoint(folder / "old.ckpt", banana_data_dir, None),
    }


@pytest.fixture(scope="module")
def image(banana_data_dir: Path) -> Path:
    return sorted(banana_data_dir.rglob("*.png"))[0]


def _run(ckpt: Path, image: Path, out: Path, *extra: str) -> tuple[list[dict], dict]:
    cfg = compose_config(
        "predict", [f"ckpt_path={ckpt}", f"image={image}", f"output_dir={out}", *extra]
    )
    records = predict(cfg)
    return records, json.loads(Path(records[0]["json"]).read_text())


def _said(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_resolve_threshold_by_hand() -> None:
    cfg = OmegaConf.create({"threshold": None, "fallback_threshold": 0.5})
    value, source = resolve_threshold(cfg, {"score_threshold": STORED})
    assert value == 0.4137
    assert source == (
        "the F1-optimal threshold of the checkpoint's validation (epoch 3: F1 0.800, precision "
        "0.750, recall 0.857 at IoU 0.5, all classes)"
    )
    value, source = resolve_threshold(cfg, {})
    assert value == 0.5 and source == (
        "the default fallback_threshold: this checkpoint stores no F1-optimal threshold (written "
        "before src.train stored one, or trained without the VOC metric); pass threshold=T to "
        "choose one"
    )
    # the checkpoint's validation had no detection: no threshold, and the reason
    none = {
        "value": None,
        "epoch": 0,
        "reason": "the validation had no detection or no ground truth",
    }
    value, source = resolve_threshold(cfg, {"score_threshold": none})
    assert value == 0.5 and source == (
        "the default fallback_threshold: the checkpoint's validation (epoch 0) gave no F1-optimal "
        "threshold: the validation had no detection or no ground truth; pass threshold=T to "
        "choose one"
    )
    given = OmegaConf.create({"threshold": 0.25, "fallback_threshold": 0.5})
    assert resolve_threshold(given, {"score_threshold": STORED}) == (
        0.25,
        "given as threshold=0.25",
    )
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        resolve_threshold(OmegaConf.create({"threshold": None, "fallback_threshold": 1.5}), {})


def test_no_detection_message_by_hand() -> None:
    det = {"top_score": torch.tensor(0.37), "top_label": torch.tensor(1)}
    assert no_detection_message("a.jpg", det, 0.9, ["apple", "banana"]) == (
        "a.jpg: no detection above 0.90; highest score 0.37 (banana): try threshold=0.3"
    )
    det = {"top_score": torch.tensor(0.072), "top_label": torch.tensor(0)}
    assert no_detection_message("b.png", det, 0.5, None).endswith(
        "highest score 0.07 (0): try threshold=0.07"
    )
    none = {"top_score": torch.tensor(math.nan), "top_label": torch.tensor(-1)}
    assert no_detection_message("c.png", none, 0.5, ["banana"]).startswith(
        "c.png: no detection at all"
    )


def test_predict_uses_the_stored_threshold(
    checkpoints: dict, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="src.predict"):
        _, written = _run(checkpoints["new"], image, tmp_path)
    (record,) = _said(caplog, "Score threshold")
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith(
        "Score threshold 0.414, the F1-optimal threshold of the checkpoint's validation (epoch 3"
    )
    assert written["threshold"] == pytest.approx(0.4137)
    assert all(d["score"] >= 0.4137 for d in written["detections"])


def test_old_checkpoint_falls_back_with_a_warning(
    checkpoints: dict, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="src.predict"):
        _, written = _run(checkpoints["old"], image, tmp_path)
    (record,) = _said(caplog, "Score threshold")
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("Score threshold 0.5, the default fallback_threshold")
    assert written["threshold"] == 0.5
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="src.predict"):
        _, written = _run(checkpoints["old"], image, tmp_path, "threshold=0.2")
    (record,) = _said(caplog, "Score threshold")
    assert record.getMessage() == "Score threshold 0.2, given as threshold=0.2"
    assert record.levelno == logging.INFO and written["threshold"] == 0.2


def test_an_image_without_detection_says_the_highest_score(
    checkpoints: dict, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="src.predict"):
        _, written = _run(checkpoints["new"], image, tmp_path, "threshold=1.0")
    assert written["detections"] == []
    (record,) = _said(caplog, "no detection above")
    assert record.levelno == logging.WARNING
    match = re.fullmatch(
        rf"{image.name}: no detection above 1\.00; highest score (0\.\d\d) \(banana\): "
        r"try threshold=(0\.\d+)",
        record.getMessage(),
    )
    assert match, record.getMessage()
    assert float(match[2]) <= float(match[1])
    # the suggested threshold shows at least that detection
    _, written = _run(checkpoints["new"], image, tmp_path, f"threshold={match[2]}")
    assert len(written["detections"]) >= 1
    assert max(d["score"] for d in written["detections"]) == pytest.approx(
        float(match[1]), abs=0.005
    )


def test_many_images_without_detection_are_counted(
    checkpoints: dict, image: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.png").write_bytes(image.read_bytes())
    with caplog.at_level(logging.INFO, logger="src.predict"):
        records = predict(
            compose_config(
                "predict",
                [f"ckpt_path={checkpoints['new']}", f"image={folder}", f"output_dir={tmp_path}",
                 "threshold=1.0"],
            )
        )  # fmt: skip
    assert len(records) == 12
    named = _said(caplog, "highest score")
    assert [r.getMessage().split(":")[0] for r in named] == [f"{i:02d}.png" for i in range(10)]
    (summary,) = _said(caplog, "images have no detection")
    assert summary.getMessage() == (
        "12 of 12 images have no detection above 1.00 (the first 10 are listed above)"
    )


def test_a_validation_without_detection_keeps_a_record_without_threshold(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    from types import SimpleNamespace

    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path, banana_data_dir, "model.net.num_classes=1", "model.class_names=[banana]"
        ),
    )
    module = instantiate(cfg.model)
    module.trainer = SimpleNamespace(sanity_checking=False, current_epoch=2, global_step=7)
    voc = module.metrics_of("val")["voc"]
    none = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
    voc.update([none], [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([0])}])
    module._log_f1_threshold("val", voc)
    assert module.score_threshold == {
        "value": None,
        "f1": 0.0,
        "precision": None,
        "recall": 0.0,
        "iou_threshold": 0.5,
        "epoch": 2,
        "global_step": 7,
        "reason": "the validation had no detection or no ground truth",
    }
    saved: dict = {"state_dict": {}, "global_step": 7}
    module.on_save_checkpoint(saved)
    assert saved["score_threshold"]["value"] is None
    # the pictures then fall back to their own threshold
    from src.callbacks.pictures import DetectionGridCallback

    assert DetectionGridCallback().threshold(module) == (0.3, "")
