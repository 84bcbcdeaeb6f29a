"""From raw network outputs to final detections (softmax, decode, threshold, top-k, NMS).

Fully vectorised over the batch: candidates of all images go through one
``torchvision.ops.batched_nms`` call whose groups are ``(image, class)`` (per-class NMS, the SSD
paper / torchvision ``SSD``) or ``image`` (class-agnostic NMS, as the book's
``multibox_detection``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from src.detection.coder import BoxCoder

__all__ = ["PostProcess"]


class PostProcess:
    """Turn ``(cls_logits, box_deltas, anchors)`` into per-image detections.

    Per image:

    1. class probabilities ``softmax(cls_logits)``; column 0 (background) is dropped;
    2. boxes decoded with ``coder`` and clipped to ``[0, 1]``;
    3. candidates: per-class mode (``class_agnostic=False``): every ``(anchor, class)`` pair;
       for each class the ``topk_candidates`` highest scores are kept. Class-agnostic mode:
       each anchor's best object class (the book's ``max`` over classes; ties -> lowest class)
       and the ``topk_candidates`` highest of those. Then only scores ``> score_threshold``;
    4. NMS at IoU ``> nms_threshold`` (per class, or across classes when ``class_agnostic``);
    5. the ``detections_per_image`` highest-scoring survivors, sorted by score (descending).

    Args:
        coder: decodes ``box_deltas``; default ``BoxCoder()`` (variances 0.1/0.2).
        score_threshold: minimum class probability (strictly greater), in ``[0, 1)``.
        nms_threshold: IoU above which a lower-scoring box is suppressed, in ``(0, 1]``
            (1 disables suppression).
        topk_candidates: candidates kept before NMS, per class (per image when class-agnostic),
            an integer >= 1.
        detections_per_image: detections kept after NMS, an integer >= 1.
        class_agnostic: one NMS over all classes instead of one per class.

    Raises:
        ValueError: on an out-of-range argument (the message names it).

    """

    def __init__(
        self,
        coder: BoxCoder | None = None,
        score_threshold: float = 0.01,
        nms_threshold: float = 0.45,
        topk_candidates: int = 400,
        detections_per_image: int = 100,
        class_agnostic: bool = False,
    ) -> None:
        score_threshold = float(score_threshold)
        if not (math.isfinite(score_threshold) and 0.0 <= score_threshold < 1.0):
            raise ValueError(
                f"postprocess.score_threshold must be in [0, 1), got {score_threshold}"
            )
        nms_threshold = float(nms_threshold)
        if not (math.isfinite(nms_threshold) and 0.0 < nms_threshold <= 1.0):
            raise ValueError(
                f"postprocess.nms_threshold must be in (0, 1], got {nms_threshold} "
                "(SSD uses 0.45, the book 0.5)"
            )
        for name, value in (
            ("topk_candidates", topk_candidates),
            ("detections_per_image", detections_per_image),
        ):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"postprocess.{name} must be an integer >= 1, got {value!r}")
        self.coder = coder if coder is not None else BoxCoder()
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.topk_candidates = int(topk_candidates)
        self.detections_per_image = int(detections_per_image)
        self.class_agnostic = bool(class_agnostic)

    def __call__(
        self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor
    ) -> list[dict[str, Tensor]]:
        """Compute the detections of a batch.

        Args:
            cls_logits: ``Tensor[B, A, C+1]`` float logits, column 0 = background.
            box_deltas: ``Tensor[B, A, 4]`` float offsets (see :class:`BoxCoder`).
            anchors: ``Tensor[A, 4]`` (or ``[1, A, 4]``) float, normalised xyxy.

        Returns:
            ``B`` dicts with ``boxes: Tensor[N, 4]`` float normalised xyxy clipped to ``[0, 1]``,
            ``scores: Tensor[N]`` float (class probability, descending) and ``labels: Tensor[N]``
            int64 0-based object classes; ``N <= detections_per_image`` may be 0.

        """
        if anchors.dim() == 3 and anchors.shape[0] == 1:
            anchors = anchors[0]
        if cls_logits.dim() != 3 or cls_logits.shape[-1] < 2:
            raise ValueError(
                "cls_logits must have shape [B, A, C+1] with at least one object class, got "
                f"{list(cls_logits.shape)}"
            )
        batch, num_anchors, _ = cls_logits.shape
        if box_deltas.shape != (batch, num_anchors, 4):
            raise ValueError(
                f"box_deltas must have shape [B, A, 4] = {[batch, num_anchors, 4]}, got "
                f"{list(box_deltas.shape)}"
            )
        if anchors.shape != (num_anchors, 4):
            raise ValueError(
                f"anchors must have shape [A, 4] = {[num_anchors, 4]}, got {list(anchors.shape)}"
            )
        with torch.no_grad():
            flat = self.flat(cls_logits, box_deltas, anchors)
        counts = torch.bincount(flat[:, 0].long(), minlength=batch)
        parts = flat.split(counts.tolist())
        return [
            {"boxes": part[:, 3:], "scores": part[:, 2], "labels": part[:, 1].long()}
            for part in parts
        ]

    def flat(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor) -> Tensor:
        """The detections of a batch in one tensor, image by image (traceable for ONNX export).

        Args:
            cls_logits: ``Tensor[B, A, C+1]`` float logits, column 0 = background.
            box_deltas: ``Tensor[B, A, 4]`` float offsets.
            anchors: ``Tensor[A, 4]`` float, normalised xyxy.

        Returns:
            ``Tensor[N, 7]`` float rows ``(image, label, score, x1, y1, x2, y2)``: image index,
            0-based class, class probability, normalised xyxy box clipped to ``[0, 1]``; sorted
            by image, then by score (descending); at most ``detections_per_image`` per image.
            ``__call__`` is this, split per image.

        """
        batch, num_anchors, num_cols = cls_logits.shape
        num_classes = num_cols - 1
        device = cls_logits.device
        # Half/bfloat16 inputs are computed in float32; float64 stays float64.
        dtype = torch.promote_types(cls_logits.dtype, torch.float32)
        probs = torch.softmax(cls_logits.to(dtype), dim=-1)[..., 1:]  # [B, A, C]
        boxes = self.coder.decode(box_deltas.to(dtype), anchors.to(dtype)).clamp(0.0, 1.0)

        k = min(self.topk_candidates, num_anchors)
        images = torch.arange(batch, device=device)
        if self.class_agnostic:
            scores, labels = probs.max(dim=-1)  # [B, A]
            top_scores, anchor_idx = scores.topk(k, dim=1)  # [B, k]
            top_labels = labels.gather(1, anchor_idx)
            image_idx = images[:, None].expand(-1, k)
        else:
            top_scores, anchor_idx = probs.transpose(1, 2).topk(k, dim=2)  # [B, C, k]
            classes = torch.arange(num_classes, device=device)
            top_labels = classes[None, :, None].expand(batch, -1, k).reshape(batch, -1)
            image_idx = images[:, None, None].expand(-1, num_classes, k).reshape(batch, -1)
            anchor_idx = anchor_idx.reshape(batch, -1)
            top_scores = top_scores.reshape(batch, -1)

        keep = top_scores > self.score_threshold  # [B, K]
        cand_scores = top_scores[keep]
        cand_labels = top_labels[keep]
        cand_images = image_idx[keep]
        cand_boxes = boxes.gather(1, anchor_idx[..., None].expand(-1, -1, 4))[keep]
        groups = cand_images if self.class_agnostic else cand_images * num_classes + cand_labels
        kept = batched_nms(cand_boxes, cand_scores, groups, self.nms_threshold)
        # `kept` is sorted by score (descending); regroup per image keeping that order (unique
        # integer keys: no reliance on a stable sort), then keep the first ones of each image.
        kept_images = cand_images[kept]
        position = torch.arange(kept.shape[0], device=device)
        order = (kept_images * kept.shape[0] + position).argsort()
        kept, kept_images = kept[order], kept_images[order]
        counts = (kept_images[:, None] == images[None, :]).sum(dim=0)  # [B]
        starts = counts.cumsum(0) - counts
        sel = position - starts[kept_images] < self.detections_per_image
        kept, kept_images = kept[sel], kept_images[sel]
        return torch.cat(
            (
                kept_images[:, None].to(dtype),
                cand_labels[kept][:, None].to(dtype),
                cand_scores[kept][:, None],
                cand_boxes[kept],
            ),
            dim=1,
        )

    def __repr__(self) -> str:
        return (
            f"PostProcess(coder={self.coder!r}, score_threshold={self.score_threshold}, "
            f"nms_threshold={self.nms_threshold}, topk_candidates={self.topk_candidates}, "
            f"detections_per_image={self.detections_per_image}, "
            f"class_agnostic={self.class_agnostic})"
        )
