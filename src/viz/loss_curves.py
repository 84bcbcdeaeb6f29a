"""The book's loss figures (*Dive into Deep Learning*, 14.7 exercises), from the library losses.

* Smooth L1 for ``sigma = 10, 1, 0.5`` on ``x = pred - target`` in ``[-2, 2)``: large sigma is
  close to L1, small sigma is smoother (quadratic on ``|x| < 1 / sigma**2``).
* Focal loss ``-(1 - p)**gamma * log p`` for ``gamma = 0, 1, 5`` on ``p`` (the probability of the
  true class) in ``[0.01, 1)``: ``gamma = 0`` is cross-entropy; larger gamma down-weights
  well-classified examples.

The curves are computed with :class:`~src.detection.losses.SmoothL1Loss` and
:class:`~src.detection.losses.FocalLoss` themselves, so the figures show what training uses.
``python -m src.visualize figures=true`` writes both (PNG and PDF, half a page wide).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from src.detection.losses import FocalLoss, SmoothL1Loss
from src.viz.style import HALF_PAGE_WIDTH_IN, paper_style, save_figure

log = logging.getLogger(__name__)

__all__ = [
    "smooth_l1_curves",
    "focal_curves",
    "smooth_l1_figure",
    "focal_figure",
    "write_loss_figures",
]

LINE_STYLES = ("-", "--", "-.", ":")


def smooth_l1_curves(
    sigmas: Sequence[float] = (10.0, 1.0, 0.5), x: Tensor | None = None
) -> tuple[Tensor, dict[float, Tensor]]:
    """Smooth L1 of ``x`` (``pred - target``) for each sigma.

    Args:
        sigmas: values of ``loss.sigma`` (``> 0``).
        x: ``Tensor[N]`` float; default the book's ``torch.arange(-2, 2, 0.1)``.

    Returns:
        ``(x, {sigma: Tensor[N]})``.
    """
    x = torch.arange(-2.0, 2.0, 0.1) if x is None else x.float()
    zeros = torch.zeros_like(x)
    return x, {float(s): SmoothL1Loss(s)(x, zeros) for s in sigmas}


def focal_curves(
    gammas: Sequence[float] = (0.0, 1.0, 5.0), p: Tensor | None = None
) -> tuple[Tensor, dict[float, Tensor]]:
    """Focal loss ``-(1 - p)**gamma * log p`` of the true class's probability ``p``.

    ``p`` is turned into two-class logits ``log(1 - p), log(p)`` with the true class 1, so the
    softmax inside :class:`FocalLoss` gives back exactly ``p``.

    Args:
        gammas: values of ``loss.gamma`` (``>= 0``).
        p: ``Tensor[N]`` in ``(0, 1)``; default the book's ``torch.arange(0.01, 1, 0.01)``.

    Returns:
        ``(p, {gamma: Tensor[N]})``.
    """
    p = torch.arange(0.01, 1.0, 0.01) if p is None else p.float()
    logits = torch.stack((torch.log1p(-p), torch.log(p)), dim=-1).unsqueeze(0)  # [1, N, 2]
    labels = torch.ones(1, p.numel(), dtype=torch.int64)
    return p, {float(g): FocalLoss(gamma=g)(logits, labels)[0] for g in gammas}


def _figure(x: Tensor, curves: dict[float, Tensor], name: str, xlabel: str, title: str) -> Figure:
    """A half-page-wide (3.4 in) line figure, 8-9 pt text."""
    with paper_style():
        fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, 2.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for k, (value, y) in enumerate(curves.items()):
            style = LINE_STYLES[k % len(LINE_STYLES)]
            ax.plot(x.numpy(), y.numpy(), style, label=f"{name}={value:g}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
    return fig


def smooth_l1_figure(sigmas: Sequence[float] = (10.0, 1.0, 0.5)) -> Figure:
    """The book's smooth-L1 figure (``sigma = 10, 1, 0.5``)."""
    x, curves = smooth_l1_curves(sigmas)
    return _figure(x, curves, "sigma", "x = prediction - target", "smooth L1 (loss=smooth_l1)")


def focal_figure(gammas: Sequence[float] = (0.0, 1.0, 5.0)) -> Figure:
    """The book's focal-loss figure (``gamma = 0, 1, 5``)."""
    p, curves = focal_curves(gammas)
    return _figure(
        p, curves, "gamma", "p = probability of the true class", "focal loss (loss=focal)"
    )


def write_loss_figures(
    out_dir: str | Path,
    sigmas: Sequence[float] = (10.0, 1.0, 0.5),
    gammas: Sequence[float] = (0.0, 1.0, 5.0),
) -> dict[str, Path]:
    """Write ``smooth_l1.png`` and ``focal_loss.png`` (each with a vector PDF) into ``out_dir``.

    Returns:
        ``{"smooth_l1": path, "focal_loss": path}`` (the PNGs; the PDFs lie next to them).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"smooth_l1": out / "smooth_l1.png", "focal_loss": out / "focal_loss.png"}
    save_figure(smooth_l1_figure(sigmas), files["smooth_l1"], dpi=300)
    save_figure(focal_figure(gammas), files["focal_loss"], dpi=300)
    log.info("Wrote %s and %s", files["smooth_l1"], files["focal_loss"])
    return files
