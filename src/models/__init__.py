"""Networks: the SSD detector, its head and backbones, the book's TinySSD, weight converters."""

from src.models.tiny_ssd import TinySSD  # noqa: I001 (before backbones, which import it)
from src.models.backbones import L2Norm, PretrainedWeightsError, TinyBackbone, VGG16Backbone
from src.models.heads import SSDHead
from src.models.ssd import SSD, SSDOutput

__all__ = [
    "L2Norm",
    "PretrainedWeightsError",
    "SSD",
    "SSDHead",
    "SSDOutput",
    "TinyBackbone",
    "TinySSD",
    "VGG16Backbone",
]
