"""ssd.pytorch (amdegroot) state dicts -> our SSD300: identical outputs on a faithful replica."""

from __future__ import annotations

import logging
from itertools import product
from math import sqrt

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init

from src.detection.anchors import SSDDefaultBoxGenerator
from src.models.backbones.vgg16 import VGG16Backbone
from src.models.convert import (
    SSD_PYTORCH_PIXEL_MEAN,
    SSD_PYTORCH_PIXEL_STD,
    convert_ssd_pytorch_state_dict,
    load_ssd_pytorch_state_dict,
)
from src.models.ssd import SSD

# ---------------------------------------------------------------------------------------------
# Minimal replica of ssd.pytorch's ssd.py / layers (github.com/amdegroot/ssd.pytorch), phase
# "train" output. Kept as written there (list construction, index-based forward).
# ---------------------------------------------------------------------------------------------


class L2NormRef(nn.Module):
    def __init__(self, n_channels, scale):
        super().__init__()
        self.n_channels = n_channels
        self.gamma = scale or None
        self.eps = 1e-10
        self.weight = nn.Parameter(torch.Tensor(self.n_channels))
        self.reset_parameters()

    def reset_parameters(self):
        init.constant_(self.weight, self.gamma)

    def forward(self, x):
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps
        x = torch.div(x, norm)
        out = self.weight.unsqueeze(0).unsqueeze(2).unsqueeze(3).expand_as(x) * x
        return out


def vgg(cfg, i, batch_norm=False):
    layers = []
    in_channels = i
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        elif v == "C":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)]
        else:
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    conv6 = nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6)
    conv7 = nn.Conv2d(1024, 1024, kernel_size=1)
    layers += [pool5, conv6, nn.ReLU(inplace=True), conv7, nn.ReLU(inplace=True)]
    return layers


def add_extras(cfg, i, batch_norm=False):
    layers = []
    in_channels = i
    flag = False
    for k, v in enumerate(cfg):
        if in_channels != "S":
            if v == "S":
                layers += [
                    nn.Conv2d(
                        in_channels, cfg[k + 1], kernel_size=(1, 3)[flag], stride=2, padding=1
                    )
                ]
            else:
                layers += [nn.Conv2d(in_channels, v, kernel_size=(1, 3)[flag])]
            flag = not flag
        in_channels = v
    return layers


def multibox(vgg, extra_layers, cfg, num_classes):
    loc_layers = []
    conf_layers = []
    vgg_source = [21, -2]
    for k, v in enumerate(vgg_source):
        loc_layers += [nn.Conv2d(vgg[v].out_channels, cfg[k] * 4, kernel_size=3, padding=1)]
        conf_layers += [
            nn.Conv2d(vgg[v].out_channels, cfg[k] * num_classes, kernel_size=3, padding=1)
        ]
    for k, v in enumerate(extra_layers[1::2], 2):
        loc_layers += [nn.Conv2d(v.out_channels, cfg[k] * 4, kernel_size=3, padding=1)]
        conf_layers += [nn.Conv2d(v.out_channels, cfg[k] * num_classes, kernel_size=3, padding=1)]
    return vgg, extra_layers, (loc_layers, conf_layers)


base = {"300": [64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512]}
extras = {"300": [256, "S", 512, 128, "S", 256, 128, 256, 128, 256]}
mbox = {"300": [4, 6, 6, 6, 4, 4]}
voc = {
    "feature_maps": [38, 19, 10, 5, 3, 1],
    "min_dim": 300,
    "steps": [8, 16, 32, 64, 100, 300],
    "min_sizes": [30, 60, 111, 162, 213, 264],
    "max_sizes": [60, 111, 162, 213, 264, 315],
    "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
    "clip": True,
}
MEANS_BGR = (104, 117, 123)


def prior_box(cfg):
    """ssd.pytorch's PriorBox.forward (cx, cy, w, h)."""
    mean = []
    for k, f in enumerate(cfg["feature_maps"]):
        for i, j in product(range(f), repeat=2):
            f_k = cfg["min_dim"] / cfg["steps"][k]
            cx = (j + 0.5) / f_k
            cy = (i + 0.5) / f_k
            s_k = cfg["min_sizes"][k] / cfg["min_dim"]
            mean += [cx, cy, s_k, s_k]
            s_k_prime = sqrt(s_k * (cfg["max_sizes"][k] / cfg["min_dim"]))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in cfg["aspect_ratios"][k]:
                mean += [cx, cy, s_k * sqrt(ar), s_k / sqrt(ar)]
                mean += [cx, cy, s_k / sqrt(ar), s_k * sqrt(ar)]
    output = torch.Tensor(mean).view(-1, 4)
    if cfg["clip"]:
        output.clamp_(max=1, min=0)
    return output


class SSDRef(nn.Module):
    def __init__(self, size, base, extras, head, num_classes):
        super().__init__()
        self.num_classes = num_classes
        self.size = size
        self.vgg = nn.ModuleList(base)
        self.L2Norm = L2NormRef(512, 20)
        self.extras = nn.ModuleList(extras)
        self.loc = nn.ModuleList(head[0])
        self.conf = nn.ModuleList(head[1])

    def forward(self, x):
        sources = list()
        loc = list()
        conf = list()
        for k in range(23):
            x = self.vgg[k](x)
        s = self.L2Norm(x)
        sources.append(s)
        for k in range(23, len(self.vgg)):
            x = self.vgg[k](x)
        sources.append(x)
        for k, v in enumerate(self.extras):
            x = F.relu(v(x), inplace=True)
            if k % 2 == 1:
                sources.append(x)
        for x, l, c in zip(sources, self.loc, self.conf, strict=True):  # noqa: E741
            loc.append(l(x).permute(0, 2, 3, 1).contiguous())
            conf.append(c(x).permute(0, 2, 3, 1).contiguous())
        loc = torch.cat([o.view(o.size(0), -1) for o in loc], 1)
        conf = torch.cat([o.view(o.size(0), -1) for o in conf], 1)
        return loc.view(loc.size(0), -1, 4), conf.view(conf.size(0), -1, self.num_classes)


def build_ssd(size=300, num_classes=21):
    base_, extras_, head_ = multibox(
        vgg(base[str(size)], 3), add_extras(extras[str(size)], 1024), mbox[str(size)], num_classes
    )
    return SSDRef(size, base_, extras_, head_, num_classes)


# ---------------------------------------------------------------------------------------------

NUM_CLASSES = 3  # object classes; ssd.pytorch counts the background: 4


def our_ssd300(num_classes: int = NUM_CLASSES) -> SSD:
    return SSD(
        VGG16Backbone(),
        SSDDefaultBoxGenerator(
            300,
            voc["steps"],
            voc["min_sizes"],
            voc["max_sizes"],
            voc["aspect_ratios"],
            clip="cxcywh",
        ),
        num_classes=num_classes,
        image_size=300,
        pixel_mean=SSD_PYTORCH_PIXEL_MEAN,
        pixel_std=SSD_PYTORCH_PIXEL_STD,
    )


@pytest.fixture(scope="module")
def reference() -> SSDRef:
    torch.manual_seed(0)
    ref = build_ssd(300, NUM_CLASSES + 1)
    with torch.no_grad():
        # He-style weights keep activations alive through 15+ layers; random L2Norm scales
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
        ref.L2Norm.weight.uniform_(10, 30)
    return ref.eval()


@pytest.fixture(scope="module")
def ours() -> SSD:
    return our_ssd300().eval()


def test_key_layout(reference: SSDRef) -> None:
    sd = reference.state_dict()
    converted = convert_ssd_pytorch_state_dict(sd, bgr_to_rgb=False)
    assert len(converted) == len(sd) == 15 * 2 + 1 + 8 * 2 + 6 * 2 * 2
    assert converted["backbone.l2norm.weight"] is sd["L2Norm.weight"]
    assert converted["backbone.to_conv4_3.conv4_3.weight"] is sd["vgg.21.weight"]
    assert converted["backbone.to_fc7.conv5_1.weight"] is sd["vgg.24.weight"]
    assert converted["backbone.to_fc7.fc6.weight"] is sd["vgg.31.weight"]
    assert converted["backbone.to_fc7.fc7.bias"] is sd["vgg.33.bias"]
    assert converted["backbone.extras.0.conv8_1.weight"] is sd["extras.0.weight"]
    assert converted["backbone.extras.3.conv11_2.weight"] is sd["extras.7.weight"]
    assert converted["head.box_predictors.5.weight"] is sd["loc.5.weight"]
    assert converted["head.cls_predictors.0.bias"] is sd["conf.0.bias"]
    assert converted["backbone.to_conv4_3.conv1_1.weight"] is sd["vgg.0.weight"]
    flipped = convert_ssd_pytorch_state_dict(sd)  # bgr_to_rgb=True
    assert torch.equal(
        flipped["backbone.to_conv4_3.conv1_1.weight"], sd["vgg.0.weight"][:, [2, 1, 0]]
    )
    # DataParallel prefix
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert convert_ssd_pytorch_state_dict(prefixed, bgr_to_rgb=False).keys() == converted.keys()


def test_identical_outputs_to_ssd_pytorch(reference: SSDRef, ours: SSD) -> None:
    load_ssd_pytorch_state_dict(ours, reference.state_dict())  # BGR -> RGB
    torch.manual_seed(1)
    images = torch.rand(1, 3, 300, 300)  # ours: RGB in [0, 1]
    # ssd.pytorch's BaseTransform: BGR, 0..255, minus its means
    bgr = images.flip(1) * 255 - torch.tensor(MEANS_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    with torch.no_grad():
        loc, conf = reference(bgr)
        out = ours(images)
    assert conf.shape == (1, 8732, NUM_CLASSES + 1) and conf.std() > 1e-3
    torch.testing.assert_close(out.box_deltas, loc, rtol=1e-4, atol=1e-4 * loc.abs().max().item())
    torch.testing.assert_close(out.cls_logits, conf, rtol=1e-4, atol=1e-4 * conf.abs().max().item())
    # ssd.pytorch's priors are ours (cx, cy, w, h -> corners)
    priors = prior_box(voc)
    corners = torch.cat((priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2), 1)
    torch.testing.assert_close(out.anchors, corners)


def test_missing_and_unexpected_keys_are_listed(reference: SSDRef, ours: SSD) -> None:
    sd = dict(reference.state_dict())
    del sd["conf.2.weight"]
    with pytest.raises(ValueError, match=r"missing.*head\.cls_predictors\.2\.weight"):
        load_ssd_pytorch_state_dict(ours, sd)
    sd = dict(reference.state_dict())
    sd["vgg.1.weight"] = torch.zeros(1)  # a ReLU position has no weights
    sd["priors"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys \['priors', 'vgg\.1\.weight'\]"):
        convert_ssd_pytorch_state_dict(sd)
    sd = dict(reference.state_dict())
    sd["extras.8.weight"] = torch.zeros(1)  # an SSD512-style extra the SSD300 lacks
    with pytest.raises(ValueError, match=r"extras\.8\.weight -> backbone\.extras\.4\.conv12_1"):
        load_ssd_pytorch_state_dict(ours, sd)


def test_class_count_mismatch_points_to_num_classes(reference: SSDRef) -> None:
    model = our_ssd300(num_classes=20)
    with pytest.raises(ValueError, match=r"conf\.0\.weight \(16, 512, 3, 3\).*data\.num_classes"):
        load_ssd_pytorch_state_dict(model, reference.state_dict())


def test_pixel_statistics_warning(reference: SSDRef, caplog: pytest.LogCaptureFixture) -> None:
    model = our_ssd300()
    model.pixel_mean.zero_()
    with caplog.at_level(logging.WARNING, logger="src.models.convert"):
        load_ssd_pytorch_state_dict(model, reference.state_dict())
    assert "backbone.pixel_mean" in caplog.text
