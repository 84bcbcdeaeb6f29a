"""The book's training metrics as torchmetrics ``Metric`` s.

*Dive into Deep Learning* (14.7) reports, per epoch, the anchor classification error
``1 - correct / total`` (``cls_eval``) and the mean absolute error of the masked offsets
(``bbox_eval``), both accumulated over all anchors of all images.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["ClassError", "BBoxMAE"]


class ClassError(Metric):
    """Fraction of anchors whose arg-max class differs from the target class (the book's cls_eval).

    ``update(cls_logits, cls_labels)``:
        cls_logits: ``Tensor[B, A, C+1]`` float (logits or probabilities; only the arg-max is used).
        cls_labels: ``Tensor[B, A]`` int64 targets, 0 = background.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, cls_logits: Tensor, cls_labels: Tensor) -> None:
        """Accumulate correct and total anchor counts."""
        pred = cls_logits.detach().argmax(dim=-1)
        self.correct += (pred == cls_labels).sum()
        self.total += cls_labels.numel()

    def compute(self) -> Tensor:
        """Return ``1 - correct / total`` as a float tensor."""
        return 1.0 - self.correct.double() / self.total.clamp(min=1).double()


class BBoxMAE(Metric):
    """Mean absolute error of the predicted offsets at positive anchors (the book's bbox_eval).

    The sum of ``|target - pred|`` over positive anchors' 4 offsets is divided by the number of
    *all* offsets ``B * A * 4``, exactly as the book does.

    ``update(box_deltas, box_offsets, pos_mask)``:
        box_deltas: ``Tensor[B, A, 4]`` predicted offsets.
        box_offsets: ``Tensor[B, A, 4]`` target offsets (encoded with the same variances).
        pos_mask: ``Tensor[B, A]`` bool, anchors assigned to an object.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.add_state(
            "abs_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, box_deltas: Tensor, box_offsets: Tensor, pos_mask: Tensor) -> None:
        """Accumulate the masked absolute error and the number of offsets."""
        mask = pos_mask.unsqueeze(-1).to(box_deltas.dtype)
        err = ((box_offsets - box_deltas.detach()) * mask).abs().sum()
        self.abs_sum += err.double()
        self.total += box_offsets.numel()

    def compute(self) -> Tensor:
        """Return the mean absolute error over all offsets."""
        return self.abs_sum / self.total.clamp(min=1).double()
