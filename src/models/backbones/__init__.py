"""SSD backbones: each returns a list of feature maps and exposes ``out_channels``."""

from src.models.backbones.tiny import TinyBackbone
from src.models.backbones.vgg16 import L2Norm, PretrainedWeightsError, VGG16Backbone

__all__ = ["L2Norm", "PretrainedWeightsError", "TinyBackbone", "VGG16Backbone"]
