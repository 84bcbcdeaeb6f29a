"""SSDLitModule pieces: book metrics, initial weights, schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks import d2l_reference as d2l
from src.detection import TargetEncoder
from src.metrics.book import BBoxMAE, ClassError
from src.models.ssd_module import load_initial_weights
from src.utils.schedulers import warmup_multistep
from tests.models.test_convert import build_ssd, our_ssd300


def test_book_metrics_equal_cls_eval_and_bbox_eval() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = d2l.multibox_prior(torch.zeros(1, 3, 8, 8), sizes=[0.2, 0.4], ratios=[1, 2, 0.5])
    labels = torch.tensor([[[0, 0.1, 0.1, 0.5, 0.6]], [[0, 0.4, 0.3, 0.9, 0.8]]])
    a = anchors.shape[1]
    cls_preds = torch.randn(2, a, 2, generator=g)
    bbox_preds = torch.randn(2, a * 4, generator=g)
    bbox_labels, bbox_masks, cls_labels = d2l.multibox_target(anchors, labels)
    expected_err = 1 - d2l.cls_eval(cls_preds, cls_labels) / cls_labels.numel()
    expected_mae = d2l.bbox_eval(bbox_preds, bbox_labels, bbox_masks) / bbox_labels.numel()

    targets = [{"boxes": labels[i, :, 1:], "labels": labels[i, :, 0].long()} for i in range(2)]
    enc = TargetEncoder()(anchors[0], targets)
    err, mae = ClassError(), BBoxMAE()
    # two updates (one image each) accumulate like the book's Accumulator
    for i in range(2):
        err.update(cls_preds[i : i + 1], enc.cls_labels[i : i + 1])
        mae.update(
            bbox_preds[i : i + 1].reshape(1, a, 4),
            enc.box_offsets[i : i + 1],
            enc.pos_mask[i : i + 1],
        )
    assert float(err.compute()) == pytest.approx(expected_err, abs=1e-12)
    assert float(mae.compute()) == pytest.approx(expected_mae, rel=1e-6)


def test_warmup_multistep_factors() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_multistep(
        opt, milestones=[10, 20], gamma=0.1, warmup_iters=4, warmup_factor=0.25
    )
    lrs = []
    for _ in range(25):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.25)
    assert lrs[2] == pytest.approx(0.25 * 0.5 + 0.5)  # halfway through the warm-up
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="milestones"):
        warmup_multistep(opt, milestones=[20, 10])


def test_init_from_ssd_pytorch_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = build_ssd(300, 21)  # 20 VOC classes + background
    path = tmp_path / "ssd300_voc.pth"
    torch.save(reference.state_dict(), path)
    net = our_ssd300(num_classes=20)
    load_initial_weights(net, str(path))
    assert torch.equal(net.head.box_predictors[0].weight, reference.loc[0].weight)
    assert torch.equal(net.head.cls_predictors[5].bias, reference.conf[5].bias)


def test_init_from_train_checkpoint_and_bad_files(tmp_path: Path) -> None:
    src_net, dst_net = our_ssd300(), our_ssd300()
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in src_net.state_dict().items()}}, ckpt)
    load_initial_weights(dst_net, str(ckpt))
    for (k, v), w in zip(src_net.state_dict().items(), dst_net.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    with pytest.raises(FileNotFoundError, match="model.init_from"):
        load_initial_weights(dst_net, str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="neither"):
        load_initial_weights(dst_net, str(bad))


def test_one_box_coder_shared_and_metrics_keyed_by_stage(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from tests.conftest import compose_config

    cfg = compose_config(
        "train",
        [f"paths.output_dir={tmp_path}", "model.net.num_classes=1", "model.box_coder.size_clip=3"],
    )
    module = instantiate(cfg.model)
    assert module.box_coder is module.target_encoder.coder is module.postprocess.coder
    assert module.box_coder.size_clip == 3.0
    assert set(module.metrics_of("val")) == {"book", "loss", "map", "voc"}
    assert set(module.metrics_of("train")) == {"book", "loss"}
    assert module.metrics_of("val") is not module.metrics_of("test")


def test_warmup_cosine_factors_and_total_steps_from_the_trainer() -> None:
    import math

    from src.utils.schedulers import warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, total_steps=12, warmup_steps=2, warmup_factor=0.1, min_factor=0.0)
    factors = []
    for _ in range(12):
        factors.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert factors[0] == pytest.approx(0.1) and factors[1] == pytest.approx(0.55)
    assert factors[2] == pytest.approx(1.0)
    assert factors[7] == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(opt, total_steps=5, warmup_steps=-1)
    short = warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1, 100)
    assert short.get_last_lr() == [pytest.approx(1.0)]  # one step: no room for a warm-up
