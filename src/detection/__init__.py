"""Pure-tensor SSD machinery: anchors, box ops, encoding, matching, targets, post-processing.

The book's API (*Dive into Deep Learning*, 14.4) is available as
``from src.detection import multibox_prior, multibox_target, multibox_detection``.
No Lightning or Hydra imports here.
"""

from src.detection.anchors import (
    GridAnchorGenerator,
    SSDDefaultBoxGenerator,
    grid_anchors,
    multibox_prior,
    ssd_default_boxes,
)
from src.detection.box_ops import (
    box_center_to_corner,
    box_corner_to_center,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    scale_boxes,
)
from src.detection.coder import BoxCoder
from src.detection.compat import (
    assign_anchor_to_bbox,
    multibox_detection,
    multibox_target,
    nms,
    offset_boxes,
    offset_inverse,
)
from src.detection.matching import (
    match_anchors,
    match_anchors_batched,
    match_anchors_ssd,
    match_anchors_ssd_batched,
    pairwise_iou_batched,
)
from src.detection.postprocess import PostProcess
from src.detection.targets import MultiboxTargets, TargetEncoder, pad_targets

__all__ = [
    # anchors
    "GridAnchorGenerator",
    "SSDDefaultBoxGenerator",
    "grid_anchors",
    "multibox_prior",
    "ssd_default_boxes",
    # box ops
    "box_center_to_corner",
    "box_corner_to_center",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "scale_boxes",
    # general pieces
    "BoxCoder",
    "match_anchors",
    "match_anchors_batched",
    "match_anchors_ssd",
    "match_anchors_ssd_batched",
    "pairwise_iou_batched",
    "MultiboxTargets",
    "TargetEncoder",
    "pad_targets",
    "PostProcess",
    # the book's API
    "assign_anchor_to_bbox",
    "multibox_detection",
    "multibox_target",
    "nms",
    "offset_boxes",
    "offset_inverse",
]
