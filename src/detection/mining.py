"""Hard negative mining (SSD, Liu et al. 2016, section 2.2 "Hard negative mining").

After matching, most anchors are negatives (background). Instead of using all of them in the
classification term, SSD keeps every positive and only the negatives with the highest
classification loss, at most ``neg_pos_ratio`` negatives per positive (3:1 in the paper).

The selection here is vectorised over the batch with the "sort twice" rank trick: sorting the
losses gives an order, sorting the order gives every anchor's rank in its image, and an anchor
is kept when its rank is below that image's negative count. No Python loop over images or
anchors; no gradient flows through the selection.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

__all__ = ["hard_negative_mask", "HardNegativeMiner"]


def _check_ratio(value: object, key: str) -> float:
    """Return ``value`` as a float if it is a finite real number ``> 0``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number > 0 (got {value!r})")
    if not value > 0:
        raise ValueError(f"{key} must be > 0 (got {value!r})")
    return float(value)


def _check_count(value: object, key: str) -> int:
    """Return ``value`` as an int if it is an integer ``>= 0``, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, Real) or not float(value).is_integer():
        raise ValueError(f"{key} must be an integer >= 0 (got {value!r})")
    if value < 0:
        raise ValueError(f"{key} must be an integer >= 0 (got {value!r})")
    return int(value)


def hard_negative_mask(
    cls_loss: Tensor,
    pos_mask: Tensor,
    neg_pos_ratio: float = 3.0,
    min_negatives: int = 0,
) -> Tensor:
    """Select the hardest negatives of every image (positives are *not* in the returned mask).

    Per image with ``P`` positives and ``A - P`` negatives the number of kept negatives is

    * ``min(floor(neg_pos_ratio * P), A - P)`` when ``P > 0``;
    * ``min(min_negatives, A)`` when ``P == 0`` (an image without any matched object would
      otherwise contribute nothing to the classification term).

    The kept negatives are those with the largest ``cls_loss``. Ties are broken by anchor index
    (stable sort). A NaN loss at a negative ranks as the largest so it is kept and the problem
    shows in the loss rather than being silently dropped.

    Args:
        cls_loss: ``Tensor[B, A]`` float, per-anchor classification loss (any float dtype).
            Only used for ranking; it is never modified and no gradient flows through it.
        pos_mask: ``Tensor[B, A]`` bool, anchors matched to a ground-truth box.
        neg_pos_ratio: negatives kept per positive, ``> 0``.
        min_negatives: negatives kept in an image without positives, integer ``>= 0``.

    Returns:
        ``Tensor[B, A]`` bool on ``cls_loss.device``, a new tensor: ``True`` at the kept
        negatives, ``False`` at positives and at the other negatives.

    Raises:
        ValueError: on invalid hyper-parameters or mismatched shapes.

    """
    neg_pos_ratio = _check_ratio(neg_pos_ratio, "mining.neg_pos_ratio")
    min_negatives = _check_count(min_negatives, "mining.min_negatives")
    if cls_loss.dim() != 2 or tuple(pos_mask.shape) != tuple(cls_loss.shape):
        raise ValueError(
            "hard_negative_mask expects cls_loss[B, A] and pos_mask[B, A] of the same shape "
            f"(got cls_loss {tuple(cls_loss.shape)}, pos_mask {tuple(pos_mask.shape)})"
        )
    with torch.no_grad():
        pos = pos_mask.to(device=cls_loss.device, dtype=torch.bool)
        num_anchors = cls_loss.shape[1]
        num_pos = pos.sum(dim=1)  # [B] int64
        # floor(ratio * P) in double precision so that e.g. 3.0 * 7 is exactly 21 (MPS: float32).
        wide = torch.float32 if cls_loss.device.type == "mps" else torch.float64
        from_ratio = torch.floor(num_pos.to(wide) * neg_pos_ratio).to(torch.int64)
        num_neg = torch.where(num_pos > 0, from_ratio, torch.full_like(num_pos, min_negatives))
        num_neg = torch.minimum(num_neg, num_anchors - num_pos)  # [B]

        # Ranking key: every negative strictly above every positive (-inf); NaN counts as largest.
        key = cls_loss.detach()
        if not key.is_floating_point() or key.dtype in (torch.float16, torch.bfloat16):
            key = key.float()
        finfo = torch.finfo(key.dtype)
        key = torch.nan_to_num(key, nan=finfo.max, posinf=finfo.max, neginf=finfo.min)
        key = key.masked_fill(pos, float("-inf"))  # out of place: a new tensor
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        rank = torch.argsort(order, dim=1)  # rank[b, a] = position of anchor a in image b
        return (rank < num_neg.unsqueeze(1)) & ~pos


class HardNegativeMiner:
    """Callable wrapper of :func:`hard_negative_mask` with validated hyper-parameters.

    Used as ``MultiBoxLoss(mining=HardNegativeMiner(...))`` (Hydra: ``mining=hard_negative``).

    Args:
        neg_pos_ratio: negatives kept per positive, ``> 0`` (config key ``mining.neg_pos_ratio``;
            3 in the SSD paper).
        min_negatives: negatives kept in an image without positives, integer ``>= 0`` (config key
            ``mining.min_negatives``). Images with positives are governed by the ratio only.

    Raises:
        ValueError: at construction, naming the config key, on invalid values.

    """

    def __init__(self, neg_pos_ratio: float = 3.0, min_negatives: int = 100) -> None:
        self.neg_pos_ratio = _check_ratio(neg_pos_ratio, "mining.neg_pos_ratio")
        self.min_negatives = _check_count(min_negatives, "mining.min_negatives")

    def __call__(self, cls_loss: Tensor, pos_mask: Tensor) -> Tensor:
        """Return the kept negatives, ``Tensor[B, A]`` bool (see :func:`hard_negative_mask`)."""
        return hard_negative_mask(cls_loss, pos_mask, self.neg_pos_ratio, self.min_negatives)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(neg_pos_ratio={self.neg_pos_ratio}, "
            f"min_negatives={self.min_negatives})"
        )
