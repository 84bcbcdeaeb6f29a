"""Closed-form tests of src.detection.losses and the conf/loss configs."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from src.detection.losses import (
    CrossEntropyLoss,
    FocalLoss,
    L1Loss,
    LossOutput,
    MultiBoxLoss,
    SmoothL1Loss,
    build_box_loss,
)
from src.detection.mining import HardNegativeMiner, hard_negative_mask

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"


class Targets(NamedTuple):
    """Local stand-in for src.detection.targets.MultiboxTargets (duck typing)."""

    cls_labels: Tensor
    box_offsets: Tensor
    pos_mask: Tensor
    matched_idx: Tensor


def make_batch(batch: int = 3, anchors: int = 40, classes: int = 2, seed: int = 0, pos_p=0.2):
    g = torch.Generator().manual_seed(seed)
    cls_logits = torch.randn(batch, anchors, classes + 1, generator=g)
    box_deltas = torch.randn(batch, anchors, 4, generator=g)
    pos = torch.rand(batch, anchors, generator=g) < pos_p
    labels = torch.randint(1, classes + 1, (batch, anchors), generator=g) * pos
    offsets = torch.randn(batch, anchors, 4, generator=g) * pos.unsqueeze(-1)
    matched = torch.where(pos, torch.zeros_like(labels), torch.full_like(labels, -1))
    return cls_logits, box_deltas, Targets(labels, offsets, pos, matched)


def book_loss(cls_logits: Tensor, box_deltas: Tensor, t: Targets) -> Tensor:
    """The book's calc_loss(...).mean() (D2L 14.7), on its [B, A*4] layouts."""
    batch, _, num_outputs = cls_logits.shape
    bbox_preds = box_deltas.reshape(batch, -1)
    bbox_labels = t.box_offsets.reshape(batch, -1)
    bbox_masks = t.pos_mask.float().unsqueeze(-1).repeat(1, 1, 4).reshape(batch, -1)
    ce = nn.CrossEntropyLoss(reduction="none")
    l1 = nn.L1Loss(reduction="none")
    cls = ce(cls_logits.reshape(-1, num_outputs), t.cls_labels.reshape(-1))
    cls = cls.reshape(batch, -1).mean(dim=1)
    bbox = l1(bbox_preds * bbox_masks, bbox_labels * bbox_masks).mean(dim=1)
    return (cls + bbox).mean()


def book_smooth_l1(data: Tensor, scalar: float) -> Tensor:
    """The book's exercise code (D2L 14.7), element by element."""
    out = []
    for i in data.tolist():
        if abs(i) < 1 / (scalar**2):
            out.append(((scalar * i) ** 2) / 2)
        else:
            out.append(abs(i) - 0.5 / (scalar**2))
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- smooth L1 / L1


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0, 10.0])
def test_smooth_l1_matches_book_and_torch_with_factor_one(sigma):
    x = torch.linspace(-3, 3, 601, dtype=torch.float64)
    ours = SmoothL1Loss(sigma)(x, torch.zeros_like(x))
    torch.testing.assert_close(ours, book_smooth_l1(x, sigma))
    # The book's f is F.smooth_l1_loss with beta = 1/sigma^2 times a factor of exactly 1
    # (0.5 x^2 / beta = (sigma x)^2 / 2 and |x| - beta / 2 = |x| - 0.5 / sigma^2).
    ref = F.smooth_l1_loss(x, torch.zeros_like(x), beta=1 / sigma**2, reduction="none")
    torch.testing.assert_close(ours, ref * 1.0)
    # ... and not times sigma^2 (unless sigma == 1).
    if sigma != 1.0:
        assert not torch.allclose(ours, ref * sigma**2)


def test_smooth_l1_hand_values():
    loss = SmoothL1Loss(sigma=2.0)  # breakpoint 1/4
    x = torch.tensor([0.1, -0.2, 0.25, 1.0, -3.0], dtype=torch.float64)
    expected = torch.tensor(
        [(2 * 0.1) ** 2 / 2, (2 * 0.2) ** 2 / 2, 0.25 - 0.125, 1.0 - 0.125, 3.0 - 0.125],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss(x, torch.zeros_like(x)), expected)
    # Elementwise in pred - target, shape [B, A, 4] kept.
    pred = torch.randn(2, 5, 4)
    target = torch.randn(2, 5, 4)
    out = loss(pred, target)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out, loss(pred - target, torch.zeros_like(pred)))


@pytest.mark.parametrize("sigma", [1.0, 3.0, 10.0, 100.0])
def test_smooth_l1_approaches_l1(sigma):
    x = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    zero = torch.zeros_like(x)
    diff = L1Loss()(x, zero) - SmoothL1Loss(sigma)(x, zero)
    assert diff.min() >= 0
    assert diff.max() <= 0.5 / sigma**2 + 1e-12
    # The bound is attained at x = 0 and far from 0 (|x| >= 1/sigma^2).
    torch.testing.assert_close(
        diff[x.abs() >= 1 / sigma**2], torch.full_like(x, 0.5 / sigma**2)[x.abs() >= 1 / sigma**2]
    )


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 7.0])
def test_smooth_l1_continuous_at_breakpoint(sigma):
    b = 1.0 / sigma**2
    eps = 1e-9
    x = torch.tensor([b - eps, b, b + eps, -b + eps, -b, -b - eps], dtype=torch.float64)
    x.requires_grad_(True)
    y = SmoothL1Loss(sigma)(x, torch.zeros_like(x))
    torch.testing.assert_close(y, torch.full_like(y, 0.5 / sigma**2), atol=1e-8, rtol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g.abs(), torch.ones_like(g), atol=1e-6, rtol=0)  # slope 1


def test_l1_is_book_l1():
    pred, target = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    assert torch.equal(L1Loss()(pred, target), nn.L1Loss(reduction="none")(pred, target))


def test_build_box_loss():
    assert isinstance(build_box_loss("l1"), L1Loss)
    sl1 = build_box_loss("smooth_l1", sigma=3.0)
    assert isinstance(sl1, SmoothL1Loss) and sl1.sigma == 3.0
    with pytest.raises(ValueError, match="loss.box_loss"):
        build_box_loss("huber")


# ---------------------------------------------------------------- focal / CE


def test_cross_entropy_is_book_ce():
    logits, _, t = make_batch()
    out = CrossEntropyLoss()(logits, t.cls_labels)
    ref = nn.CrossEntropyLoss(reduction="none")(logits.reshape(-1, 3), t.cls_labels.reshape(-1))
    assert out.shape == t.cls_labels.shape
    assert torch.equal(out, ref.reshape(t.cls_labels.shape))


def test_focal_gamma0_alpha1_is_cross_entropy():
    logits, _, t = make_batch(classes=5)
    torch.testing.assert_close(
        FocalLoss(gamma=0.0, alpha=1.0)(logits, t.cls_labels),
        CrossEntropyLoss()(logits, t.cls_labels),
    )


def test_focal_hand_computed_downweights_easy_examples():
    # Two outputs (bg, 1 class); logits (0, log 3): p(class 1) = 3/4, p(bg) = 1/4.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]], dtype=torch.float64)
    labels = torch.tensor([[1, 0]])  # easy (p = 3/4), hard (p = 1/4)
    ce = CrossEntropyLoss()(logits, labels)
    torch.testing.assert_close(ce, torch.tensor([[-math.log(0.75), math.log(4.0)]]).double())
    focal = FocalLoss(gamma=2.0, alpha=1.0)(logits, labels)
    expected = torch.tensor([[0.25**2 * -math.log(0.75), 0.75**2 * math.log(4.0)]]).double()
    torch.testing.assert_close(focal, expected)
    torch.testing.assert_close(
        focal[0, 0], torch.tensor(0.017980, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # The easy example is down-weighted 16x, the hard one only 16/9x.
    torch.testing.assert_close(ce / focal, torch.tensor([[16.0, 16.0 / 9.0]]).double())
    # alpha is a plain scale.
    torch.testing.assert_close(FocalLoss(gamma=2.0, alpha=0.25)(logits, labels), 0.25 * expected)
    # Larger gamma -> smaller loss (for p < 1).
    assert (FocalLoss(gamma=5.0)(logits, labels) < focal).all()


@pytest.mark.parametrize("gamma", [0.0, 0.01, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_finite_gradients_at_saturation(gamma, dtype):
    # Rows: target logit +100 (p -> 1), target logit -100 (p -> 0), mixed.
    logits = torch.tensor(
        [[[100.0, -100.0, 0.0], [-100.0, 100.0, -100.0], [0.0, 100.0, -100.0]]], dtype=dtype
    ).requires_grad_(True)
    labels = torch.tensor([[0, 0, 2]])
    loss = FocalLoss(gamma=gamma, alpha=0.5)(logits, labels)
    assert torch.isfinite(loss).all()
    values = loss.detach()
    assert values[0, 0] >= 0 and values[0, 0] < 1e-6
    assert values[0, 1].item() == pytest.approx(0.5 * 200.0, rel=1e-4)  # -log p ~ 200, (1-p)^g ~ 1
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_focal_half_precision_input():
    logits, _, t = make_batch()
    out = FocalLoss()(logits.half(), t.cls_labels)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_background_bias_gives_prior():
    for num_classes, pi in [(1, 0.01), (20, 0.01), (5, 0.3)]:
        loss = MultiBoxLoss(FocalLoss(prior_pi=pi), L1Loss())
        b = loss.background_bias(num_classes)
        assert b == pytest.approx(math.log(num_classes * (1 - pi) / pi))
        logits = torch.zeros(num_classes + 1, dtype=torch.float64)
        logits[0] = b
        p = logits.softmax(0)
        assert p[0].item() == pytest.approx(1 - pi)
        torch.testing.assert_close(p[1:], torch.full((num_classes,), pi / num_classes).double())
    assert MultiBoxLoss(FocalLoss(), L1Loss()).background_bias(20) is None
    assert MultiBoxLoss(CrossEntropyLoss(), L1Loss()).background_bias(20) is None


# ---------------------------------------------------------------- MultiBoxLoss


@pytest.mark.parametrize(
    ("seed", "batch", "anchors", "classes"), [(0, 4, 97, 3), (1, 2, 10, 20), (2, 8, 5444, 1)]
)
def test_default_equals_book_exactly(seed, batch, anchors, classes):
    cls_logits, box_deltas, t = make_batch(batch, anchors, classes, seed=seed, pos_p=0.05)
    out = MultiBoxLoss(CrossEntropyLoss(), L1Loss())(cls_logits, box_deltas, t)
    assert isinstance(out, LossOutput)
    ref = book_loss(cls_logits, box_deltas, t)
    assert torch.equal(out.loss, ref), (out.loss.item(), ref.item())
    # Defaults of the constructor are the book's too.
    assert torch.equal(MultiBoxLoss()(cls_logits, box_deltas, t).loss, ref)
    torch.testing.assert_close(out.cls_loss + out.box_loss, out.loss)
    assert out.cls_mask.all()


def test_output_fields_and_gradients():
    cls_logits, box_deltas, t = make_batch(batch=2, anchors=30)
    cls_logits.requires_grad_(True)
    box_deltas.requires_grad_(True)
    out = MultiBoxLoss(CrossEntropyLoss(), SmoothL1Loss(2.0))(cls_logits, box_deltas, t)
    assert out.loss.dim() == 0 and out.cls_loss.dim() == 0 and out.box_loss.dim() == 0
    assert out.per_anchor_cls.shape == (2, 30) and out.per_anchor_box.shape == (2, 30)
    assert out.cls_mask.shape == (2, 30) and out.cls_mask.dtype == torch.bool
    assert not out.per_anchor_cls.requires_grad and not out.per_anchor_box.requires_grad
    assert (out.per_anchor_box[~t.pos_mask] == 0).all()
    expected_box = SmoothL1Loss(2.0)(box_deltas, t.box_offsets).sum(-1)
    torch.testing.assert_close(out.per_anchor_box[t.pos_mask], expected_box[t.pos_mask].detach())
    torch.testing.assert_close(out.per_anchor_cls, CrossEntropyLoss()(cls_logits, t.cls_labels))
    out.loss.backward()
    assert (box_deltas.grad[~t.pos_mask] == 0).all()  # negatives get no box gradient
    assert torch.isfinite(cls_logits.grad).all()


def test_normalize_positives_hand_formula():
    cls_logits, box_deltas, t = make_batch(batch=3, anchors=50, seed=5)
    out = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), normalize="positives")(
        cls_logits, box_deltas, t
    )
    n = t.pos_mask.sum().item()
    assert n > 0
    ce = F.cross_entropy(cls_logits.reshape(-1, 3), t.cls_labels.reshape(-1), reduction="sum")
    l1 = (box_deltas - t.box_offsets).abs()[t.pos_mask].sum()
    torch.testing.assert_close(out.cls_loss, ce / n)
    torch.testing.assert_close(out.box_loss, l1 / n)
    torch.testing.assert_close(out.loss, (ce + l1) / n)


def test_normalize_positives_without_positives_clamps_to_one():
    cls_logits, box_deltas, t = make_batch(batch=2, anchors=20, pos_p=0.0)
    assert not t.pos_mask.any()
    out = MultiBoxLoss(normalize="positives")(cls_logits, box_deltas, t)
    ce = F.cross_entropy(cls_logits.reshape(-1, 3), t.cls_labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, ce)
    assert out.box_loss == 0


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
def test_weights_scale_terms(normalize):
    cls_logits, box_deltas, t = make_batch(seed=3)
    base = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), normalize=normalize)(
        cls_logits, box_deltas, t
    )
    out = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), 0.5, 3.0, normalize)(cls_logits, box_deltas, t)
    torch.testing.assert_close(out.cls_loss, 0.5 * base.cls_loss)
    torch.testing.assert_close(out.box_loss, 3.0 * base.box_loss)
    torch.testing.assert_close(out.loss, 0.5 * base.cls_loss + 3.0 * base.box_loss)
    zero = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), 0.0, 1.0, normalize)(
        cls_logits, box_deltas, t
    )
    torch.testing.assert_close(zero.loss, base.box_loss)


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
def test_mining_restricts_cls_term(normalize):
    cls_logits, box_deltas, t = make_batch(batch=3, anchors=60, seed=7, pos_p=0.1)
    miner = HardNegativeMiner(neg_pos_ratio=2.0, min_negatives=5)
    out = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), normalize=normalize, mining=miner)(
        cls_logits, box_deltas, t
    )
    ce = CrossEntropyLoss()(cls_logits, t.cls_labels)
    neg = hard_negative_mask(ce, t.pos_mask, 2.0, 5)
    assert torch.equal(out.cls_mask, t.pos_mask | neg)
    kept = torch.where(out.cls_mask, ce, torch.zeros_like(ce))
    box = (box_deltas - t.box_offsets).abs() * t.pos_mask.unsqueeze(-1)
    if normalize == "anchors":
        # Sum over positives + mined negatives, still divided by the number of anchors.
        torch.testing.assert_close(out.cls_loss, (kept.sum(1) / 60).mean())
        torch.testing.assert_close(out.box_loss, (box.sum((1, 2)) / 240).mean())
    else:
        n = t.pos_mask.sum()
        torch.testing.assert_close(out.cls_loss, kept.sum() / n)
        torch.testing.assert_close(out.box_loss, box.sum() / n)
    # The box term does not depend on mining.
    plain = MultiBoxLoss(CrossEntropyLoss(), L1Loss(), normalize=normalize)(
        cls_logits, box_deltas, t
    )
    torch.testing.assert_close(out.box_loss, plain.box_loss)
    assert out.cls_loss < plain.cls_loss


def test_inputs_not_modified():
    cls_logits, box_deltas, t = make_batch()
    copies = [x.clone() for x in (cls_logits, box_deltas, *t)]
    MultiBoxLoss(FocalLoss(), SmoothL1Loss(), mining=HardNegativeMiner())(cls_logits, box_deltas, t)
    for a, b in zip(copies, (cls_logits, box_deltas, *t), strict=True):
        assert torch.equal(a, b)


def test_shape_mismatch_is_explained():
    cls_logits, box_deltas, t = make_batch(anchors=40)
    with pytest.raises(ValueError, match="box_deltas"):
        MultiBoxLoss()(cls_logits, box_deltas[:, :39], t)
    with pytest.raises(ValueError, match="targets.pos_mask"):
        MultiBoxLoss()(cls_logits, box_deltas, t._replace(pos_mask=t.pos_mask[:, :39]))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("factory", "key"),
    [
        (lambda: SmoothL1Loss(sigma=-1.0), "loss.sigma"),
        (lambda: SmoothL1Loss(sigma=0), "loss.sigma"),
        (lambda: SmoothL1Loss(sigma=float("nan")), "loss.sigma"),
        (lambda: FocalLoss(gamma=-0.5), "loss.gamma"),
        (lambda: FocalLoss(alpha=0.0), "loss.alpha"),
        (lambda: FocalLoss(alpha=1.5), "loss.alpha"),
        (lambda: FocalLoss(prior_pi=0.0), "loss.prior_pi"),
        (lambda: FocalLoss(prior_pi=1.0), "loss.prior_pi"),
        (lambda: FocalLoss(gamma="two"), "loss.gamma"),
        (lambda: MultiBoxLoss(normalize="batch"), "loss.normalize"),
        (lambda: MultiBoxLoss(cls_weight=-1.0), "loss.cls_weight"),
        (lambda: MultiBoxLoss(box_weight=-0.1), "loss.box_weight"),
    ],
)
def test_invalid_hyper_parameters_raise(factory, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        factory()
    assert "got" in str(info.value)


def test_error_message_format():
    with pytest.raises(ValueError) as info:
        SmoothL1Loss(sigma=-1.0)
    assert str(info.value) == "loss.sigma must be > 0 (got -1.0)"
    with pytest.raises(ValueError) as info:
        FocalLoss(alpha=2)
    assert str(info.value) == "loss.alpha must be > 0 and <= 1 (got 2)"


def test_valid_edge_values_accepted():
    FocalLoss(gamma=0, alpha=1, prior_pi=0.5)
    MultiBoxLoss(cls_weight=0, box_weight=0, normalize="positives")
    SmoothL1Loss(sigma=1e-3)


# ---------------------------------------------------------------- configs


def compose(loss: str, mining: str = "none", **loss_overrides) -> OmegaConf:
    cfg = OmegaConf.create(
        {
            "loss": OmegaConf.load(CONF / "loss" / f"{loss}.yaml"),
            "mining": OmegaConf.load(CONF / "mining" / f"{mining}.yaml"),
        }
    )
    for key, value in loss_overrides.items():
        OmegaConf.update(cfg, f"loss.{key}", value)
    return cfg


def test_config_l1_is_book_default():
    cfg = compose("l1")
    assert cfg.loss.name == "l1" and "sigma" not in cfg.loss
    module = instantiate(cfg.loss.module)
    assert isinstance(module, MultiBoxLoss)
    assert isinstance(module.cls_loss, CrossEntropyLoss) and isinstance(module.box_loss, L1Loss)
    assert module.mining is None and module.normalize == "anchors"
    cls_logits, box_deltas, t = make_batch()
    assert torch.equal(module(cls_logits, box_deltas, t).loss, book_loss(cls_logits, box_deltas, t))


def test_config_smooth_l1_overrides():
    cfg = compose("smooth_l1", sigma=0.5, box_weight=2.0, normalize="positives")
    module = instantiate(cfg.loss.module)
    assert isinstance(module.box_loss, SmoothL1Loss) and module.box_loss.sigma == 0.5
    assert module.box_weight == 2.0 and module.normalize == "positives"
    assert compose("smooth_l1").loss.sigma == 1.0


def test_config_focal():
    cfg = compose("focal", gamma=2, prior_pi=0.01)
    assert cfg.loss.alpha == 1.0 and cfg.loss.sigma == 1.0
    module = instantiate(cfg.loss.module)
    assert isinstance(module.cls_loss, FocalLoss)
    assert module.cls_loss.gamma == 2.0 and module.cls_loss.alpha == 1.0
    assert isinstance(module.box_loss, SmoothL1Loss)
    assert module.background_bias(20) == pytest.approx(math.log(20 * 0.99 / 0.01))
    assert instantiate(compose("focal").loss.module).background_bias(20) is None
    l1 = instantiate(compose("focal", box_loss="l1").loss.module)
    assert isinstance(l1.box_loss, L1Loss)


def test_config_mining():
    cfg = compose("smooth_l1", mining="hard_negative")
    module = instantiate(cfg.loss.module)
    assert isinstance(module.mining, HardNegativeMiner)
    assert module.mining.neg_pos_ratio == 3.0 and module.mining.min_negatives == 100
    cls_logits, box_deltas, t = make_batch(batch=2, anchors=200)
    out = module(cls_logits, box_deltas, t)
    assert torch.isfinite(out.loss) and not out.cls_mask.all()
    none = OmegaConf.load(CONF / "mining" / "none.yaml")
    assert none.module is None and none.name == "none"


@pytest.mark.parametrize(
    ("loss", "key", "value"),
    [
        ("smooth_l1", "sigma", -1.0),
        ("focal", "gamma", -2),
        ("focal", "alpha", 0),
        ("l1", "normalize", "images"),
        ("focal", "prior_pi", 1.0),
    ],
)
def test_config_invalid_values_fail_at_instantiation(loss, key, value):
    cfg = compose(loss, **{key: value})
    with pytest.raises(Exception, match=rf"loss\.{key}") as info:
        instantiate(cfg.loss.module)
    # Hydra wraps the ValueError; the original is chained.
    err = info.value
    while not isinstance(err, ValueError) and err.__cause__ is not None:
        err = err.__cause__
    assert isinstance(err, ValueError)


def test_config_invalid_mining_fails():
    cfg = compose("l1", mining="hard_negative")
    cfg.mining.neg_pos_ratio = 0
    with pytest.raises(Exception, match=r"mining\.neg_pos_ratio"):
        instantiate(cfg.loss.module)


def test_hydra_group_overrides(tmp_path):
    """`loss=smooth_l1 loss.sigma=0.5` etc. through Hydra's compose API (no @package header)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    shutil.copytree(CONF / "loss", tmp_path / "loss")
    shutil.copytree(CONF / "mining", tmp_path / "mining")
    (tmp_path / "config.yaml").write_text("defaults:\n  - loss: l1\n  - mining: none\n  - _self_\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["loss=smooth_l1", "loss.sigma=0.5"])
        module = instantiate(cfg.loss.module)
        assert isinstance(module.box_loss, SmoothL1Loss) and module.box_loss.sigma == 0.5
        cfg = hydra_compose(
            "config", overrides=["loss=focal", "loss.gamma=2", "mining=hard_negative"]
        )
        module = instantiate(cfg.loss.module)
        assert isinstance(module.cls_loss, FocalLoss) and module.cls_loss.gamma == 2.0
        assert isinstance(module.mining, HardNegativeMiner)
        cfg = hydra_compose("config")
        assert isinstance(instantiate(cfg.loss.module).box_loss, L1Loss)


# ---------------------------------------------------------------- box-space losses


class BoxL1(nn.Module):
    """A box-space loss for the contract tests: L1 of the xyxy corners, summed."""

    space = "boxes"

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return (pred - target).abs().sum(-1)


# 4 anchors (xyxy), 2 images: image 0 has two objects, image 1 none.
ANCHORS = torch.tensor(
    [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.3, 0.3, 0.7, 0.7], [0.4, 0.0, 1.0, 0.4]]
)
GTS = [
    {
        "boxes": torch.tensor([[0.05, 0.0, 0.5, 0.55], [0.5, 0.45, 0.95, 1.0]]),
        "labels": torch.tensor([0, 1]),
    },
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
]


def encoded_batch(seed: int = 0):
    from src.detection.targets import TargetEncoder

    g = torch.Generator().manual_seed(seed)
    t = TargetEncoder()(ANCHORS, GTS)
    cls_logits = torch.randn(2, 4, 3, generator=g)
    box_deltas = torch.randn(2, 4, 4, generator=g)
    return cls_logits, box_deltas, t


def test_targets_carry_matched_boxes():
    from src.detection.coder import BoxCoder

    _, _, t = encoded_batch()
    # by hand: anchor 0 -> gt 0 and anchor 1 -> gt 1 (IoU 0.826); anchors 2, 3 below 0.15
    assert t.pos_mask.tolist() == [[True, True, False, False], [False, False, False, False]]
    assert torch.equal(t.matched_boxes[0, :2], GTS[0]["boxes"])
    assert (t.matched_boxes[~t.pos_mask] == 0).all()
    assert t.matched_boxes.dtype == t.box_offsets.dtype and t.matched_boxes.shape == (2, 4, 4)
    # the offsets encode exactly the matched boxes
    assert torch.equal(BoxCoder().encode(t.matched_boxes[0, :2], ANCHORS[:2]), t.box_offsets[0, :2])


@pytest.mark.parametrize("normalize", ["anchors", "positives"])
def test_box_space_loss_decodes_positives(normalize):
    from src.detection.coder import BoxCoder

    cls_logits, box_deltas, t = encoded_batch()
    coder = BoxCoder(variances=(0.2, 0.3))
    out = MultiBoxLoss(CrossEntropyLoss(), BoxL1(), 1.0, 2.0, normalize)(
        cls_logits, box_deltas, t, anchors=ANCHORS, coder=coder
    )
    # by hand: anchors 0 and 1 of image 0 are the positives
    pred = coder.decode(box_deltas[0, :2], ANCHORS[:2])
    per_pos = (pred - GTS[0]["boxes"]).abs().sum(-1)  # [2]
    # anchors: image 0's sum / A (one value per anchor), image 1 has none; mean over 2 images
    expected = per_pos.sum() / 4 / 2 if normalize == "anchors" else per_pos.sum() / 2
    torch.testing.assert_close(out.box_loss, 2.0 * expected)
    torch.testing.assert_close(out.per_anchor_box[0, :2], per_pos)
    assert (out.per_anchor_box[t.pos_mask.logical_not()] == 0).all()
    # the coder matters: the default one decodes other boxes
    default = MultiBoxLoss(CrossEntropyLoss(), BoxL1(), 1.0, 2.0, normalize)(
        cls_logits, box_deltas, t, anchors=ANCHORS
    )
    assert not torch.allclose(default.box_loss, out.box_loss)


def test_box_space_loss_gradients_only_at_positives():
    cls_logits, box_deltas, t = encoded_batch()
    box_deltas.requires_grad_(True)
    out = MultiBoxLoss(box_loss=BoxL1())(cls_logits, box_deltas, t, anchors=ANCHORS[None])
    out.loss.backward()
    assert (box_deltas.grad[~t.pos_mask] == 0).all()
    assert (box_deltas.grad[t.pos_mask] != 0).any()


def test_box_space_loss_needs_anchors_and_matched_boxes():
    cls_logits, box_deltas, t = encoded_batch()
    loss = MultiBoxLoss(box_loss=BoxL1())
    with pytest.raises(ValueError, match="BoxL1 works on boxes: call the loss with anchors="):
        loss(cls_logits, box_deltas, t)
    old_style = Targets(t.cls_labels, t.box_offsets, t.pos_mask, t.matched_idx)
    with pytest.raises(ValueError, match="targets need matched_boxes"):
        loss(cls_logits, box_deltas, old_style, anchors=ANCHORS)
    with pytest.raises(ValueError, match=r"anchors must have shape \[4, 4\]"):
        loss(cls_logits, box_deltas, t, anchors=ANCHORS[:3])
    # offset losses ignore anchors and matched_boxes: the book's 4-field targets still work
    MultiBoxLoss()(cls_logits, box_deltas, old_style)


def test_unknown_box_space_is_rejected():
    class Odd(BoxL1):
        space = "pixels"

    with pytest.raises(ValueError, match=r"loss\.module\.box_loss\.space must be one of"):
        MultiBoxLoss(box_loss=Odd())


@pytest.mark.parametrize("box_loss", [L1Loss(), BoxL1()])
def test_compute_loss_is_encoder_then_loss(box_loss):
    from src.detection.coder import BoxCoder
    from src.detection.losses import compute_loss
    from src.detection.targets import TargetEncoder

    encoder = TargetEncoder(coder=BoxCoder(variances=(0.2, 0.3)))
    cls_logits, box_deltas, _ = encoded_batch()
    loss_fn = MultiBoxLoss(box_loss=box_loss, mining=HardNegativeMiner(1.0, 1))
    encoded, out = compute_loss(loss_fn, encoder, cls_logits, box_deltas, ANCHORS, GTS)
    expected_targets = encoder(ANCHORS, GTS)
    for a, b in zip(encoded, expected_targets, strict=True):
        assert torch.equal(a, b)
    expected = loss_fn(
        cls_logits, box_deltas, expected_targets, anchors=ANCHORS, coder=encoder.coder
    )
    for a, b in zip(out, expected, strict=True):
        assert torch.equal(a, b)
