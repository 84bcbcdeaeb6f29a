"""bf16 mixed precision on CPU and the automatic precision choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from src.train import train
from src.utils.config import auto_precision, cpu_has_native_bf16
from tests.conftest import compose_config, train_overrides


@pytest.mark.parametrize("backbone", ["tiny", "vgg16"])
def test_bf16_mixed_training_step_on_cpu(
    backbone: str, tmp_path: Path, banana_data_dir: Path
) -> None:
    # VGG16 takes one image: CPUs without native bf16 emulate it (AMD EPYC AVX2: 59 s, 70 s for 2)
    batch = 2 if backbone == "tiny" else 1
    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path, banana_data_dir, f"backbone={backbone}", "trainer.precision=bf16-mixed",
            "debug=fdr", f"data.batch_size={batch}",
        ),
    )  # fmt: skip
    seen: dict[str, torch.dtype] = {}
    metrics, objects = train(cfg)
    model = objects["model"]

    def record(module: torch.nn.Module, inputs: object, output: object) -> None:
        seen["logits"] = output.cls_logits.dtype

    model.net.register_forward_hook(record)
    images, targets = next(iter(objects["datamodule"].train_dataloader()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, encoded, losses = model.model_step((images[:batch], targets[:batch]))
    assert seen["logits"] == torch.bfloat16  # the network ran in bfloat16 ...
    assert out.cls_logits.dtype == torch.float32  # ... the loss and targets in float32
    assert losses.loss.dtype == torch.float32 and encoded.box_offsets.dtype == torch.float32
    assert torch.isfinite(losses.loss)
    assert objects["trainer"].precision == "bf16-mixed"
    assert all(v == v for v in metrics.values())  # finite, not NaN


def test_auto_precision_follows_the_hardware() -> None:
    expected = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert auto_precision("cpu") == expected
    if not torch.cuda.is_available():
        assert auto_precision("auto") == expected
        assert auto_precision("gpu") == "32-true"


@pytest.mark.parametrize(
    ("capability", "accelerator", "precision", "expected"),
    [
        ("AVX512", "cpu", "32-true", True),
        ("AVX2", "cpu", "32-true", False),
        ("AVX2", "cpu", 32, False),
        ("DEFAULT", "cpu", "32-true", False),
        ("AVX2", "cpu", "bf16-mixed", True),
        ("AVX2", "gpu", "32-true", True),
    ],
)
def test_auto_channels_last_follows_the_cpu_and_precision(
    capability: str,
    accelerator: str,
    precision: object,
    expected: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from src.utils.config import auto_channels_last

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    assert auto_channels_last(accelerator, precision) is expected


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_memory_format_is_the_backbones_choice(
    capability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from src.utils.config import register_resolvers

    register_resolvers()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    wide = capability == "AVX512"
    for backbone, expected in (("tiny", True), ("vgg16", wide), ("vgg16_512", wide)):
        overrides = [f"backbone={backbone}", "trainer.accelerator=cpu"]
        cfg = compose_config("train", [*overrides, "trainer.precision=32-true"])
        assert cfg.model.channels_last is expected, backbone
        cfg = compose_config("train", [*overrides, "trainer.precision=bf16-mixed"])
        assert cfg.model.channels_last is True, backbone
        cfg = compose_config("train", [*overrides, "model.channels_last=true"])
        assert cfg.model.channels_last is True  # the user's choice wins
    # a backbone option without the key keeps the old default
    cfg = compose_config("train", ["trainer.accelerator=cpu"])
    del cfg.backbone.channels_last
    assert cfg.model.channels_last is True
    cfg = compose_config(
        "train",
        [
            "backbone=vgg16",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "model.net.num_classes=2",
        ],
    )
    module = instantiate(OmegaConf.to_container(cfg.model, resolve=True), class_names=None)
    conv = next(m for m in module.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) is wide


def test_cpu_workers_never_exceeds_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from src.utils.config import cpu_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert [cpu_workers(n) for n in (0, 1, 2, 4, "8")] == [0, 1, 2, 2, 2]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert cpu_workers(4) == 4
