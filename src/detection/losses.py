"""Multibox losses: per-anchor classification / box losses and their combination.

Per-anchor building blocks (all ``nn.Module`` without parameters, reduction ``"none"``):

* classification, ``(logits[B, A, C+1], labels[B, A] int64) -> Tensor[B, A]``, class 0 =
  background: :class:`CrossEntropyLoss` (the book's) and :class:`FocalLoss`, the book's
  ``-alpha * (1 - p_j)**gamma * log p_j`` on softmax probabilities (background included).
* box losses come in two spaces, named by their class attribute ``space``:

  - ``"offsets"``, ``(pred[B, A, 4], target[B, A, 4]) -> Tensor[B, A, 4]`` elementwise on the
    :class:`~src.detection.coder.BoxCoder` offsets: :class:`L1Loss` (the book's) and
    :class:`SmoothL1Loss`, the book's
    ``f(x) = (sigma*x)**2 / 2 if |x| < 1/sigma**2 else |x| - 0.5/sigma**2``;
  - ``"boxes"``, ``(pred_boxes[P, 4], gt_boxes[P, 4]) -> Tensor[P]`` on the positives' decoded
    boxes and matched ground truths (xyxy, normalised to ``[0, 1]``): :class:`IoUBoxLoss`,
    torchvision's GIoU, DIoU and CIoU losses.

:class:`MultiBoxLoss` combines them; :func:`compute_loss` encodes a batch's targets and calls it,
the one place where the training loss is computed (the Lightning module and the anchor pictures
both call it). With its defaults (cross-entropy, L1, weights 1,
``normalize="anchors"``, no mining) it reproduces exactly the book's training loss
(*Dive into Deep Learning*, 14.7 ``calc_loss(...).mean()``)::

    cls = CE(reduction="none")(cls_preds.reshape(-1, C + 1), cls_labels.reshape(-1))
    cls = cls.reshape(B, -1).mean(dim=1)
    bbox = L1(reduction="none")(bbox_preds * bbox_masks, bbox_labels * bbox_masks).mean(dim=1)
    loss = (cls + bbox).mean()

Hyper-parameters are validated at construction and a ValueError names the config key
(``loss.sigma``, ``loss.gamma``, ...) so that a bad Hydra override fails before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
)

from src.detection.coder import BoxCoder

__all__ = [
    "LossOutput",
    "CrossEntropyLoss",
    "FocalLoss",
    "L1Loss",
    "SmoothL1Loss",
    "IoUBoxLoss",
    "IOU_LOSSES",
    "build_box_loss",
    "MultiBoxLoss",
    "compute_loss",
]

NORMALIZE_CHOICES = ("anchors", "positives")
#: ``space`` of a box loss: what it compares (see the module docstring).
BOX_SPACES = ("offsets", "boxes")
#: ``IoUBoxLoss(kind=...)`` -> torchvision function ``(boxes1[N, 4], boxes2[N, 4], reduction,
#: eps) -> Tensor[N]`` on xyxy boxes.
IOU_LOSSES: dict[str, Callable[..., Tensor]] = {
    "giou": generalized_box_iou_loss,
    "diou": distance_box_iou_loss,
    "ciou": complete_box_iou_loss,
}


def _check_real(
    value: object,
    key: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """Validate a finite real hyper-parameter against bounds and return it as a float.

    Raises:
        ValueError: ``"<key> must be <range> (got <value>)"``.

    """
    parts = []
    if gt is not None:
        parts.append(f"> {gt}")
    if ge is not None:
        parts.append(f">= {ge}")
    if lt is not None:
        parts.append(f"< {lt}")
    if le is not None:
        parts.append(f"<= {le}")
    allowed = " and ".join(parts) if parts else "a finite number"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number {allowed} (got {value!r})")
    ok = (
        (gt is None or value > gt)
        and (ge is None or value >= ge)
        and (lt is None or value < lt)
        and (le is None or value <= le)
    )
    if not ok:
        raise ValueError(f"{key} must be {allowed} (got {value!r})")
    return float(value)


def _check_cls_inputs(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() < 2 or tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            "classification loss expects logits[B, A, C+1] and labels[B, A] "
            f"(got logits {tuple(logits.shape)}, labels {tuple(labels.shape)})"
        )


class LossOutput(NamedTuple):
    """Result of :class:`MultiBoxLoss`.

    Attributes:
        loss: scalar, ``cls_loss + box_loss`` (what to back-propagate).
        cls_loss: scalar, weighted classification term.
        box_loss: scalar, weighted box-regression term.
        per_anchor_cls: ``Tensor[B, A]`` detached, unweighted classification loss of every anchor
            (also those outside ``cls_mask``), for visualisation.
        per_anchor_box: ``Tensor[B, A]`` detached, unweighted box loss of every anchor (summed
            over the 4 offsets for an offset loss, the IoU-family value for a box loss), 0 at
            negatives, for visualisation.
        cls_mask: ``Tensor[B, A]`` bool, anchors that count in the classification term
            (all anchors without mining; positives and mined negatives with mining).

    """

    loss: Tensor
    cls_loss: Tensor
    box_loss: Tensor
    per_anchor_cls: Tensor
    per_anchor_box: Tensor
    cls_mask: Tensor


class CrossEntropyLoss(nn.Module):
    """Per-anchor softmax cross-entropy ``-log p_j`` (the book's ``nn.CrossEntropyLoss``)."""

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Compute the loss of every anchor.

        Args:
            logits: ``Tensor[B, A, C+1]`` float, class 0 = background.
            labels: ``Tensor[B, A]`` int64 in ``[0, C]``.

        Returns:
            ``Tensor[B, A]`` float.

        """
        _check_cls_inputs(logits, labels)
        num_outputs = logits.shape[-1]
        loss = F.cross_entropy(
            logits.reshape(-1, num_outputs), labels.reshape(-1), reduction="none"
        )
        return loss.reshape(labels.shape)


class FocalLoss(nn.Module):
    """Softmax focal loss ``-alpha * (1 - p_j)**gamma * log p_j`` (book 14.7, exercise; RetinaNet).

    ``p_j`` is the softmax probability of the target class ``j`` over all ``C + 1`` outputs,
    background included. ``log p_j`` comes from ``log_softmax`` and ``1 - p_j`` from
    ``-expm1(log p_j)``, so the loss and its gradient stay finite for saturated logits.
    ``gamma = 0, alpha = 1`` is exactly cross-entropy.

    ``alpha`` here is a single scalar applied to every class, as in the book's formula: it only
    rescales the classification term (like ``loss.cls_weight``). RetinaNet's ``alpha = 0.25``
    belongs to its per-class *sigmoid* formulation, where ``alpha`` weights the positive and
    ``1 - alpha`` the negative side of each binary problem; it has no such meaning here, hence
    the default ``alpha = 1``.

    Args:
        gamma: focusing parameter ``>= 0`` (config key ``loss.gamma``).
        alpha: scalar weight in ``(0, 1]`` (config key ``loss.alpha``).
        prior_pi: optional foreground prior in ``(0, 1)`` (config key ``loss.prior_pi``) used by
            :meth:`background_bias` to initialise the classifier as RetinaNet does; ``None``
            leaves the initialisation alone.

    Raises:
        ValueError: at construction, naming the config key, on invalid values.

    """

    def __init__(self, gamma: float = 2.0, alpha: float = 1.0, prior_pi: float | None = None):
        super().__init__()
        self.gamma = _check_real(gamma, "loss.gamma", ge=0)
        self.alpha = _check_real(alpha, "loss.alpha", gt=0, le=1)
        self.prior_pi = (
            None if prior_pi is None else _check_real(prior_pi, "loss.prior_pi", gt=0, lt=1)
        )

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Compute the loss of every anchor.

        Args:
            logits: ``Tensor[B, A, C+1]`` float, class 0 = background.
            labels: ``Tensor[B, A]`` int64 in ``[0, C]``.

        Returns:
            ``Tensor[B, A]`` float (float32 at least: computed in float32 for half inputs).

        """
        _check_cls_inputs(logits, labels)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        log_pt = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # log p_j <= 0
        loss = -log_pt
        if self.gamma != 0:
            # 1 - p_j computed without cancellation; the clamp keeps d/dx x**gamma finite at
            # x = 0 for gamma < 1 (the loss there is < eps anyway, and its true gradient is 0).
            one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(log_pt.dtype).eps)
            loss = one_minus_pt.pow(self.gamma) * loss
        if self.alpha != 1:
            loss = self.alpha * loss
        return loss

    def background_bias(self, num_classes: int) -> float | None:
        """Background logit bias giving ``p(background) = 1 - prior_pi`` at initialisation.

        With the ``C`` object logits at 0 and the background logit at
        ``b = log(C * (1 - pi) / pi)``, softmax gives ``p(bg) = 1 - pi`` and ``pi / C`` per
        object class (RetinaNet's prior initialisation, adapted to softmax).

        Args:
            num_classes: number of object classes ``C`` (background excluded), ``>= 1``.

        Returns:
            ``b`` as a float, or ``None`` when ``prior_pi`` is ``None``.

        """
        if self.prior_pi is None:
            return None
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an integer >= 1 (got {num_classes!r})")
        return math.log(num_classes * (1.0 - self.prior_pi) / self.prior_pi)

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"gamma={self.gamma}, alpha={self.alpha}, prior_pi={self.prior_pi}"


class L1Loss(nn.Module):
    """Elementwise ``|pred - target|`` (the book's ``nn.L1Loss(reduction="none")``)."""

    space = "offsets"

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of every offset.

        Args:
            pred: ``Tensor[B, A, 4]`` float, predicted offsets.
            target: ``Tensor[B, A, 4]`` float, target offsets.

        Returns:
            ``Tensor[B, A, 4]`` float.

        """
        return F.l1_loss(pred, target, reduction="none")


class SmoothL1Loss(nn.Module):
    """Elementwise smooth L1 of the book (14.7, exercise), as in Fast R-CNN.

    ``f(x) = (sigma * x)**2 / 2`` if ``|x| < 1 / sigma**2`` else ``|x| - 0.5 / sigma**2`` with
    ``x = pred - target``. This is exactly ``F.smooth_l1_loss(..., beta=1 / sigma**2)``
    (no extra factor): quadratic near 0, continuous with slope 1 at the breakpoint, within
    ``0.5 / sigma**2`` of L1 everywhere (large sigma -> L1; small sigma -> smoother).

    Args:
        sigma: ``> 0`` (config key ``loss.sigma``); 1 gives PyTorch's default smooth L1.

    Raises:
        ValueError: at construction if ``sigma <= 0``.

    """

    space = "offsets"

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.sigma = _check_real(sigma, "loss.sigma", gt=0)
        self.beta = 1.0 / (self.sigma * self.sigma)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Compute the loss of every offset.

        Args:
            pred: ``Tensor[B, A, 4]`` float, predicted offsets.
            target: ``Tensor[B, A, 4]`` float, target offsets.

        Returns:
            ``Tensor[B, A, 4]`` float.

        """
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"sigma={self.sigma}"


class IoUBoxLoss(nn.Module):
    """IoU-family loss of each predicted box with its matched ground truth (torchvision.ops).

    ``kind`` picks the torchvision function, all ``1 - IoU + penalty`` on xyxy boxes:

    * ``"giou"``: :func:`torchvision.ops.generalized_box_iou_loss`, penalty
      ``|C - (A u B)| / |C|`` with ``C`` the smallest enclosing box; in ``[0, 2)``.
    * ``"diou"``: :func:`torchvision.ops.distance_box_iou_loss`, penalty ``d**2 / c**2``, the
      squared centre distance over the squared diagonal of ``C``; in ``[0, 2)``.
    * ``"ciou"``: :func:`torchvision.ops.complete_box_iou_loss`, DIoU's penalty plus
      ``alpha * v`` for the aspect-ratio mismatch ``v``; in ``[0, 3)``.

    It works on boxes (``space = "boxes"``): :class:`MultiBoxLoss` decodes the positives'
    offsets with the target encoder's :class:`~src.detection.coder.BoxCoder` and passes the
    matched ground truths (``MultiboxTargets.matched_boxes``). The three are scale-invariant,
    so normalised coordinates give the values of pixel coordinates.

    Args:
        kind: ``"giou"``, ``"diou"`` or ``"ciou"`` (config key ``loss.module.box_loss.kind``).
        eps: ``> 0``, torchvision's guard against division by zero.

    Raises:
        ValueError: at construction, naming the config key, on invalid values.

    """

    space = "boxes"

    def __init__(self, kind: str = "giou", eps: float = 1e-7) -> None:
        super().__init__()
        if kind not in IOU_LOSSES:
            raise ValueError(
                f"loss.module.box_loss.kind must be one of {list(IOU_LOSSES)} (got {kind!r})"
            )
        self.kind = kind
        self.eps = _check_real(eps, "loss.module.box_loss.eps", gt=0)
        self._fn = IOU_LOSSES[kind]

    def forward(self, pred_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        """Compute the loss of every box pair.

        Args:
            pred_boxes: ``Tensor[..., 4]`` float, xyxy (normalised to ``[0, 1]`` or pixels),
                ``x1 <= x2`` and ``y1 <= y2``.
            target_boxes: ``Tensor[..., 4]`` float, xyxy in the same unit, same shape.

        Returns:
            ``Tensor[...]`` float (the leading shape; empty for empty inputs).

        """
        return self._fn(pred_boxes, target_boxes, reduction="none", eps=self.eps)

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"kind={self.kind!r}, eps={self.eps}"


def build_box_loss(name: str = "smooth_l1", sigma: float = 1.0) -> nn.Module:
    """Box loss by name, for configs that choose it with a knob (``loss.box_loss`` in focal).

    Args:
        name: ``"l1"`` or ``"smooth_l1"``.
        sigma: smooth-L1 ``sigma`` (ignored for ``"l1"``).

    Returns:
        :class:`L1Loss` or :class:`SmoothL1Loss`.

    """
    if name == "l1":
        return L1Loss()
    if name == "smooth_l1":
        return SmoothL1Loss(sigma)
    raise ValueError(
        f"loss.box_loss must be one of ['l1', 'smooth_l1'] (got {name!r}); for an IoU box loss "
        "with focal classification use loss=giou|diou|ciou "
        "loss.cls_loss._target_=src.detection.losses.FocalLoss (docs/losses.md)"
    )


class MultiBoxLoss(nn.Module):
    """Weighted sum of a classification and a box-regression term over all anchors.

    Box term, only at the positives (as the book's ``bbox_masks``), ``K`` values per anchor:

    * offset losses (``box_loss.space == "offsets"``, the default for a box loss without
      ``space``): ``box_loss(box_deltas * m, box_offsets * m)`` with ``m`` the positive mask,
      ``K = 4`` (one per offset);
    * box losses (``box_loss.space == "boxes"``, :class:`IoUBoxLoss`):
      ``box_loss(coder.decode(box_deltas, anchors), matched_boxes)`` on the positives only,
      ``K = 1``. ``forward`` then needs ``anchors`` (and the target encoder's ``coder``).

    Classification term: ``cls_loss`` of every anchor; with ``mining`` only positives and the
    negatives the miner keeps (``cls_mask``) count.

    Normalisation (``normalize``):

    * ``"anchors"`` (the book): per image, the classification sum over ``cls_mask`` divided by
      the number of anchors ``A`` and the box sum divided by ``K * A`` (a mean over all
      offsets, or over all anchors for a box loss); then the mean over the batch. With mining
      the classification sum still runs over the kept anchors only but is *still divided by A*
      (not by the number kept), so the term is smaller than without mining; raise
      ``loss.cls_weight`` to compensate if needed.
    * ``"positives"`` (SSD paper; RetinaNet for focal): both sums over the whole batch divided by
      the number of positives in the batch, clamped to >= 1 (box term summed over the ``K``
      values of each anchor, not averaged).

    ``loss = cls_weight * cls_term + box_weight * box_term``.

    Args:
        cls_loss: per-anchor classification loss, e.g. :class:`CrossEntropyLoss`.
        box_loss: box loss, on offsets (e.g. :class:`L1Loss`) or on boxes
            (:class:`IoUBoxLoss`); see its ``space``.
        cls_weight: ``>= 0`` (``loss.cls_weight``).
        box_weight: ``>= 0`` (``loss.box_weight``).
        normalize: ``"anchors"`` or ``"positives"`` (``loss.normalize``).
        mining: optional ``(cls_loss[B, A], pos_mask[B, A]) -> negatives_kept[B, A] bool``,
            e.g. :class:`src.detection.mining.HardNegativeMiner`; ``None`` uses all anchors.

    Raises:
        ValueError: at construction, naming the config key, on invalid values.

    """

    def __init__(
        self,
        cls_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        box_loss: Callable[[Tensor, Tensor], Tensor] | None = None,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
        normalize: str = "anchors",
        mining: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.cls_loss = cls_loss if cls_loss is not None else CrossEntropyLoss()
        self.box_loss = box_loss if box_loss is not None else L1Loss()
        if not callable(self.cls_loss) or not callable(self.box_loss):
            raise ValueError("loss.module.cls_loss and loss.module.box_loss must be callables")
        self.box_space = getattr(self.box_loss, "space", "offsets")
        if self.box_space not in BOX_SPACES:
            raise ValueError(
                f"loss.module.box_loss.space must be one of {list(BOX_SPACES)} "
                f"(got {self.box_space!r} on {self.box_loss!r})"
            )
        if mining is not None and not callable(mining):
            raise ValueError(f"mining.module must be a callable miner or null (got {mining!r})")
        self.cls_weight = _check_real(cls_weight, "loss.cls_weight", ge=0)
        self.box_weight = _check_real(box_weight, "loss.box_weight", ge=0)
        if normalize not in NORMALIZE_CHOICES:
            raise ValueError(
                f"loss.normalize must be one of {list(NORMALIZE_CHOICES)} (got {normalize!r})"
            )
        self.normalize = normalize
        self.mining = mining

    def background_bias(self, num_classes: int) -> float | None:
        """Return the initial background logit from the classification loss's prior, or ``None``.

        Delegates to ``cls_loss.background_bias`` (:meth:`FocalLoss.background_bias`) when the
        classification loss has one; ``None`` otherwise (cross-entropy, or focal without
        ``prior_pi``).

        Args:
            num_classes: number of object classes (background excluded).

        """
        fn: Any = getattr(self.cls_loss, "background_bias", None)
        return None if fn is None else fn(num_classes)

    def forward(
        self,
        cls_logits: Tensor,
        box_deltas: Tensor,
        targets: Any,
        anchors: Tensor | None = None,
        coder: BoxCoder | None = None,
    ) -> LossOutput:
        """Compute the loss.

        Args:
            cls_logits: ``Tensor[B, A, C+1]`` float, class 0 = background.
            box_deltas: ``Tensor[B, A, 4]`` float, predicted offsets (encoder space).
            targets: any object with ``cls_labels[B, A]`` int64 (0 = background),
                ``box_offsets[B, A, 4]`` float (0 at negatives) and ``pos_mask[B, A]`` bool,
                e.g. :class:`src.detection.targets.MultiboxTargets`; a box-space loss also
                reads ``matched_boxes[B, A, 4]`` (xyxy, normalised).
            anchors: ``Tensor[A, 4]`` (or ``[1, A, 4]``) float, xyxy normalised, the anchors the
                targets were encoded against; required by a box-space loss, unused otherwise.
            coder: the :class:`~src.detection.coder.BoxCoder` that encoded the targets; decodes
                ``box_deltas`` for a box-space loss. Default ``BoxCoder()``.

        Returns:
            :class:`LossOutput`.

        Raises:
            ValueError: on inconsistent shapes, or a box-space loss without ``anchors`` or
                ``targets.matched_boxes``.

        """
        labels = targets.cls_labels
        offsets = targets.box_offsets
        pos_mask = targets.pos_mask
        if cls_logits.dim() != 3:
            raise ValueError(f"cls_logits must be [B, A, C+1] (got {tuple(cls_logits.shape)})")
        batch, num_anchors = cls_logits.shape[:2]
        expected = {
            "box_deltas": (box_deltas, (batch, num_anchors, 4)),
            "targets.cls_labels": (labels, (batch, num_anchors)),
            "targets.box_offsets": (offsets, (batch, num_anchors, 4)),
            "targets.pos_mask": (pos_mask, (batch, num_anchors)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {list(shape)} to match cls_logits "
                    f"{list(cls_logits.shape)} (got {list(tensor.shape)}); "
                    "are the anchors, the head and the target encoder consistent?"
                )
        pos_mask = pos_mask.bool()

        per_cls = self.cls_loss(cls_logits, labels)  # [B, A]
        if self.mining is None:
            cls_mask = torch.ones_like(pos_mask)
        else:
            cls_mask = pos_mask | self.mining(per_cls.detach(), pos_mask)
        cls_terms = torch.where(cls_mask, per_cls, torch.zeros_like(per_cls))

        if self.box_space == "boxes":
            per_box = self._box_space_loss(box_deltas, targets, pos_mask, anchors, coder)
        else:
            box_mask = pos_mask.unsqueeze(-1)
            mask_f = box_mask.to(box_deltas.dtype)
            per_box = self.box_loss(box_deltas * mask_f, offsets * mask_f.to(offsets.dtype))
            per_box = torch.where(box_mask, per_box, torch.zeros_like(per_box))  # [B, A, 4]

        if self.normalize == "anchors":
            cls_img = cls_terms.mean(dim=1)  # sum over cls_mask / A
            box_img = per_box.reshape(batch, -1).mean(dim=1)  # sum / (4 A)
            cls_img = self.cls_weight * cls_img
            box_img = self.box_weight * box_img
            # (cls + box).mean() as the book, so that the default is bit-for-bit its value.
            loss = (cls_img + box_img).mean()
            cls_term, box_term = cls_img.mean(), box_img.mean()
        else:
            num_pos = pos_mask.sum().clamp_min(1).to(per_cls.dtype)
            cls_term = self.cls_weight * cls_terms.sum() / num_pos
            box_term = self.box_weight * per_box.sum() / num_pos.to(per_box.dtype)
            loss = cls_term + box_term

        return LossOutput(
            loss=loss,
            cls_loss=cls_term,
            box_loss=box_term,
            per_anchor_cls=per_cls.detach(),
            per_anchor_box=per_box.detach().sum(dim=-1),
            cls_mask=cls_mask,
        )

    def _box_space_loss(
        self,
        box_deltas: Tensor,
        targets: Any,
        pos_mask: Tensor,
        anchors: Tensor | None,
        coder: BoxCoder | None,
    ) -> Tensor:
        """Box-space loss of the positives, scattered into ``Tensor[B, A, 1]`` (0 elsewhere).

        Only the ``P`` positives are decoded and compared: background anchors have no matched
        box (``matched_boxes`` is 0 there, a degenerate box).
        """
        batch, num_anchors = pos_mask.shape
        name = type(self.box_loss).__name__
        if anchors is None:
            raise ValueError(
                f"the box loss {name} works on boxes: call the loss with anchors= and coder= "
                "(src.detection.losses.compute_loss does)"
            )
        matched_boxes = getattr(targets, "matched_boxes", None)
        if matched_boxes is None:
            raise ValueError(
                f"the box loss {name} works on boxes: targets need matched_boxes[B, A, 4] "
                "(src.detection.targets.TargetEncoder gives them)"
            )
        if anchors.dim() == 3 and anchors.shape[0] == 1:
            anchors = anchors[0]
        for key, tensor, shape in (
            ("anchors", anchors, (num_anchors, 4)),
            ("targets.matched_boxes", matched_boxes, (batch, num_anchors, 4)),
        ):
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"{key} must have shape {list(shape)} to match box_deltas "
                    f"{list(box_deltas.shape)} (got {list(tensor.shape)})"
                )
        coder = coder if coder is not None else BoxCoder()
        b_idx, a_idx = pos_mask.nonzero(as_tuple=True)  # [P], [P]
        deltas = box_deltas[b_idx, a_idx]  # [P, 4]
        # decode caps the sizes at exp(size_clip) times the anchor; the floor exp(-size_clip)
        # keeps every box from underflowing to zero width or height, where it has no aspect
        # ratio (CIoU's atan(w / h) is nan at 0 / 0, its gradient at w / 0).
        min_log_size = -coder.size_clip / coder.variances[1]
        deltas = torch.cat((deltas[:, :2], deltas[:, 2:].clamp_min(min_log_size)), dim=-1)
        pred = coder.decode(deltas, anchors[a_idx].to(box_deltas.dtype))
        per_pos = self.box_loss(pred, matched_boxes[b_idx, a_idx].to(pred.dtype))  # [P]
        per_box = pred.new_zeros(batch, num_anchors).index_put((b_idx, a_idx), per_pos)
        return per_box.unsqueeze(-1)  # [B, A, 1]

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return (
            f"cls_weight={self.cls_weight}, box_weight={self.box_weight}, "
            f"normalize={self.normalize!r}, mining={self.mining!r}"
        )


def compute_loss(
    loss_fn: Callable[..., LossOutput],
    target_encoder: Callable[..., Any],
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    targets: Sequence[Mapping[str, Any]],
) -> tuple[Any, LossOutput]:
    """Encode a batch's targets against the anchors and compute the loss.

    The one place where the training loss is computed: ``SSDLitModule.model_step`` and the
    anchor pictures (:func:`src.viz.anchors.analyze_anchors`) both call it, so the pictures
    show the loss that is trained. The targets are encoded without gradients; the loss gets
    the anchors and the encoder's coder, so that a box-space loss (:class:`IoUBoxLoss`)
    decodes the predictions exactly as the targets were encoded.

    Args:
        loss_fn: a :class:`MultiBoxLoss` (or any callable with its signature).
        target_encoder: a :class:`~src.detection.targets.TargetEncoder`,
            ``(anchors, targets) -> MultiboxTargets``; its ``coder`` (if any) is passed on.
        cls_logits: ``Tensor[B, A, C+1]`` float, class 0 = background.
        box_deltas: ``Tensor[B, A, 4]`` float, predicted offsets.
        anchors: ``Tensor[A, 4]`` (or ``[1, A, 4]``) float, xyxy normalised to ``[0, 1]``.
        targets: ``B`` dicts with ``boxes: Tensor[G_i, 4]`` normalised xyxy and
            ``labels: Tensor[G_i]`` int64 0-based.

    Returns:
        ``(encoded, losses)``: the :class:`~src.detection.targets.MultiboxTargets` and the
        :class:`LossOutput`.

    """
    with torch.no_grad():
        encoded = target_encoder(anchors, targets)
    losses = loss_fn(
        cls_logits,
        box_deltas,
        encoded,
        anchors=anchors,
        coder=getattr(target_encoder, "coder", None),
    )
    return encoded, losses
