"""Seeing inside a trained SSD, one anchor at a time.

:func:`analyze_anchors` runs a net on one image and, for every *positive* anchor (one matched to a
ground-truth box by the target encoder), collects

* the anchor, its matched ground-truth box and the box predicted from it (decoded with
  :meth:`~src.detection.coder.BoxCoder.decode`: ``cx = cx_a + 0.1 * l_x * w_a``,
  ``w = w_a * exp(0.2 * l_w)``),
* ``J``: the Jaccard overlap (IoU) of the predicted box with its matched ground truth,
* ``L``: the anchor's localisation loss, the configured box loss summed over the 4 offsets
  (``MultiBoxLoss``'s ``per_anchor_box``),

and the *negatives* (background anchors) that hard negative mining keeps in the classification
term: the configured miner's choice, or, for a loss without mining, those a
``HardNegativeMiner(3)`` would keep.

:func:`anchor_panels_figure` draws one panel per positive anchor (sorted by decreasing ``L``,
capped) and :func:`negatives_figure` the kept negatives. Figures are matplotlib ``Figure`` objects
on the Agg canvas (no pyplot state), saved with ``fig.savefig`` or turned into an image tensor
with :func:`figure_to_tensor`.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from torch import Tensor, nn

from src.detection.box_ops import box_iou
from src.detection.coder import BoxCoder
from src.detection.losses import compute_loss
from src.detection.mining import HardNegativeMiner

log = logging.getLogger(__name__)

__all__ = [
    "AnchorAnalysis",
    "analyze_anchors",
    "analyze_module",
    "anchor_panels_figure",
    "negatives_figure",
    "crop_windows",
    "figure_to_tensor",
    "panels_summary",
]

GT_COLOR = "lime"
ANCHOR_COLOR = "deepskyblue"
PRED_COLOR = "red"
POS_COLOR = "cyan"


@dataclass
class AnchorAnalysis:
    """Per-anchor view of one image (all tensors on CPU; boxes normalised xyxy).

    Attributes:
        image: ``Tensor[3, H, W]`` float in [0, 1], the net's input.
        gt_boxes: ``Tensor[G, 4]`` ground-truth boxes.
        gt_labels: ``Tensor[G]`` int64, 0-based classes.
        anchor_index: ``Tensor[P]`` int64, indices (into the net's ``A`` anchors) of the
            positive anchors shown, sorted by decreasing ``box_loss``; ``P = min(#positives,
            max_panels)``.
        anchors: ``Tensor[P, 4]`` those anchors.
        pred_boxes: ``Tensor[P, 4]`` boxes decoded from each anchor's predicted offsets.
        matched_index: ``Tensor[P]`` int64, index of each anchor's ground truth in ``gt_boxes``.
        matched_boxes: ``Tensor[P, 4]`` each anchor's ground-truth box.
        iou: ``Tensor[P]`` float, ``J = IoU(pred_boxes[i], matched_boxes[i])``.
        box_loss: ``Tensor[P]`` float, ``L``: the box loss summed over the 4 offsets.
        cls_loss: ``Tensor[P]`` float, the anchor's classification loss.
        score: ``Tensor[P]`` float, the softmax probability of the matched class.
        num_positives: number of positive anchors in the image (before the cap).
        negative_index: ``Tensor[N]`` int64, the kept negatives, by decreasing ``cls_loss``.
        negative_anchors: ``Tensor[N, 4]`` their anchors.
        negative_cls_loss: ``Tensor[N]`` float, their classification loss.
        num_negatives: number of negative anchors in the image.
        mining_note: how the negatives were chosen, with the miner's ``repr`` (for records).
        box_loss_name: the box loss's ``repr`` (for records).
        mining_label: how the negatives were chosen, in a few words (for titles):
            ``kept by 3:1 mining``, or ``3:1 mining would keep`` for a loss without mining.
        mined: whether the loss mines its negatives (False: ``mining=none``, every negative
            counts and the figure shows those a miner would keep).
    """

    image: Tensor
    gt_boxes: Tensor
    gt_labels: Tensor
    anchor_index: Tensor
    anchors: Tensor
    pred_boxes: Tensor
    matched_index: Tensor
    matched_boxes: Tensor
    iou: Tensor
    box_loss: Tensor
    cls_loss: Tensor
    score: Tensor
    num_positives: int
    negative_index: Tensor
    negative_anchors: Tensor
    negative_cls_loss: Tensor
    num_negatives: int
    mining_note: str
    box_loss_name: str
    mining_label: str = ""
    mined: bool = True

    @property
    def num_panels(self) -> int:
        """Number of positive-anchor panels (``P``)."""
        return int(self.anchor_index.numel())


def _device_of(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    if param is None:
        param = next(net.buffers(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def analyze_anchors(
    net: nn.Module,
    target_encoder: Callable[..., Any],
    loss_fn: nn.Module,
    image: Tensor,
    target: Mapping[str, Any],
    max_panels: int | None = 16,
    miner: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> AnchorAnalysis:
    """Per-anchor predictions, overlaps and losses of one image.

    Args:
        net: an SSD net, ``net(images[B, 3, H, W]) -> SSDOutput(cls_logits, box_deltas,
            anchors)``; run as given (put it in eval mode first).
        target_encoder: a :class:`~src.detection.targets.TargetEncoder`; its ``coder`` decodes
            the predictions (a default :class:`BoxCoder` if it has none).
        loss_fn: a :class:`~src.detection.losses.MultiBoxLoss`.
        image: ``Tensor[3, H, W]`` float in [0, 1], already at the net's input size.
        target: ``boxes: Tensor[G, 4]`` normalised xyxy, ``labels: Tensor[G]`` int64 0-based.
        max_panels: the number of positive anchors kept (highest ``L`` first); ``None``: all.
        miner: negatives to show when ``loss_fn`` has no mining; default
            ``HardNegativeMiner(3.0)``.

    Returns:
        An :class:`AnchorAnalysis` (CPU tensors). Inputs are not modified.

    Raises:
        ValueError: on a bad ``max_panels`` or image shape.
    """
    if max_panels is not None and (isinstance(max_panels, bool) or int(max_panels) < 1):
        raise ValueError(f"max_panels must be an integer >= 1 or null, got {max_panels!r}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a Tensor[3, H, W], got shape {list(image.shape)}")
    device = _device_of(net)
    x = image.to(device=device, dtype=torch.float32).unsqueeze(0)
    boxes = torch.as_tensor(target["boxes"]).to(device=device, dtype=torch.float32).reshape(-1, 4)
    labels = torch.as_tensor(target["labels"]).to(device=device, dtype=torch.int64).reshape(-1)
    out = net(x)
    anchors = out.anchors.reshape(-1, 4)
    encoded, losses = compute_loss(
        loss_fn,
        target_encoder,
        out.cls_logits,
        out.box_deltas,
        anchors,
        [{"boxes": boxes, "labels": labels}],
    )

    pos = encoded.pos_mask[0]
    pos_idx = pos.nonzero().squeeze(1)
    order = torch.sort(losses.per_anchor_box[0, pos_idx], descending=True, stable=True).indices
    if max_panels is not None:
        order = order[: int(max_panels)]
    idx = pos_idx[order]
    coder = getattr(target_encoder, "coder", None) or BoxCoder()
    pred = coder.decode(out.box_deltas[0, idx], anchors[idx])
    matched = encoded.matched_idx[0, idx]
    matched_boxes = boxes[matched]
    iou = box_iou(pred, matched_boxes).diagonal() if idx.numel() else pred.new_zeros(0)
    probs = out.cls_logits[0, idx].float().softmax(dim=-1)
    score = probs.gather(1, encoded.cls_labels[0, idx].unsqueeze(1)).squeeze(1)

    configured = getattr(loss_fn, "mining", None)
    if configured is not None:
        kept = losses.cls_mask[0] & ~pos
        note = f"kept by hard negative mining, {configured!r}"
        label = f"kept by {_miner_label(configured)}"
    else:
        fallback = miner if miner is not None else HardNegativeMiner(3.0)
        kept = fallback(losses.per_anchor_cls, encoded.pos_mask)[0] & ~pos
        note = f"mining=none (every negative counts); shown: those {fallback!r} would keep"
        label = f"{_miner_label(fallback)} would keep"
    neg_idx = kept.nonzero().squeeze(1)
    neg_loss = losses.per_anchor_cls[0, neg_idx]
    neg_order = torch.sort(neg_loss, descending=True, stable=True).indices
    neg_idx = neg_idx[neg_order]

    def cpu(t: Tensor) -> Tensor:
        return t.detach().cpu()

    return AnchorAnalysis(
        image=cpu(image).float(),
        gt_boxes=cpu(boxes),
        gt_labels=cpu(labels),
        anchor_index=cpu(idx),
        anchors=cpu(anchors[idx]),
        pred_boxes=cpu(pred),
        matched_index=cpu(matched),
        matched_boxes=cpu(matched_boxes),
        iou=cpu(iou),
        box_loss=cpu(losses.per_anchor_box[0, idx]),
        cls_loss=cpu(losses.per_anchor_cls[0, idx]),
        score=cpu(score),
        num_positives=int(pos_idx.numel()),
        negative_index=cpu(neg_idx),
        negative_anchors=cpu(anchors[neg_idx]),
        negative_cls_loss=cpu(losses.per_anchor_cls[0, neg_idx]),
        num_negatives=int((~pos).sum()),
        mining_note=note,
        box_loss_name=repr(getattr(loss_fn, "box_loss", "box loss")),
        mining_label=label,
        mined=configured is not None,
    )


def _miner_label(miner: Any) -> str:
    """A miner in a few words: ``3:1 mining`` (its class name otherwise)."""
    ratio = getattr(miner, "neg_pos_ratio", None)
    if isinstance(ratio, int | float):
        return f"{ratio:g}:1 mining"
    return type(miner).__name__


def analyze_module(
    module: Any,
    image: Tensor,
    target: Mapping[str, Any],
    max_panels: int | None = 16,
    miner: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> AnchorAnalysis:
    """Run :func:`analyze_anchors` with the parts of an ``SSDLitModule``, in eval mode.

    Uses ``module.net``, ``module.target_encoder`` and ``module.loss_fn``; the module's
    training mode is restored afterwards.
    """
    was_training = module.training
    module.eval()
    try:
        return analyze_anchors(
            module.net, module.target_encoder, module.loss_fn, image, target, max_panels, miner
        )
    finally:
        module.train(was_training)


# ------------------------------------------------------------------------------------ drawing
def _show(ax: Any, image: Tensor) -> tuple[int, int]:
    height, width = image.shape[-2:]
    ax.imshow(image.clamp(0, 1).permute(1, 2, 0).numpy(), extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    return height, width


def _boxes(ax: Any, boxes: Tensor, size: tuple[int, int], **style: Any) -> None:
    """Draw normalised xyxy ``boxes[N, 4]`` as rectangle outlines (one collection, no loop).

    Boxes with a NaN or infinite coordinate (a diverged net's) are left out, with their entry
    of a per-box ``edgecolors`` array.
    """
    boxes = boxes.reshape(-1, 4)
    finite = torch.isfinite(boxes).all(dim=1)
    if not bool(finite.all()):
        boxes = boxes[finite]
        colors = style.get("edgecolors")
        if isinstance(colors, np.ndarray) and colors.ndim == 2 and len(colors) == len(finite):
            style = {**style, "edgecolors": colors[finite.numpy()]}
    if boxes.numel() == 0:
        return
    height, width = size
    px = boxes.float() * torch.tensor([width, height, width, height])
    x0, y0, x1, y1 = px.unbind(-1)
    verts = torch.stack(
        (
            torch.stack((x0, y0), -1),
            torch.stack((x1, y0), -1),
            torch.stack((x1, y1), -1),
            torch.stack((x0, y1), -1),
        ),
        dim=1,
    )  # [N, 4 corners, 2]
    ax.add_collection(PolyCollection(verts.numpy(), closed=True, facecolors="none", **style))


def crop_windows(boxes: Tensor, margin: float = 0.15, min_size: float = 0.3) -> Tensor:
    """Square windows around groups of boxes, for zoomed panels.

    Args:
        boxes: ``Tensor[P, K, 4]`` normalised xyxy; each window covers the ``K`` boxes of its row.
        margin: added on every side, as a fraction of the covered box's larger side.
        min_size: the smallest window side (fraction of the image).

    Returns:
        ``Tensor[P, 4]`` normalised xyxy windows, square where the image allows, inside
        ``[0, 1]`` (shifted, not cut, when they cross an edge). Boxes with a NaN or infinite
        coordinate are left out; a row without a finite box gets the whole image.
    """
    finite = torch.isfinite(boxes).all(dim=-1, keepdim=True)  # [P, K, 1]
    lo = torch.where(finite, boxes[..., :2], torch.inf).amin(dim=1)
    hi = torch.where(finite, boxes[..., 2:], -torch.inf).amax(dim=1)
    empty = ~finite.any(dim=1)  # [P, 1]
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 1.0, hi)
    center = (lo + hi) / 2
    side = (hi - lo).amax(dim=-1, keepdim=True) * (1 + 2 * margin)
    side = side.clamp(min=min_size, max=1.0)
    start = (center - side / 2).clamp(min=0.0)
    start = torch.minimum(start, 1.0 - side)
    return torch.cat((start, start + side), dim=-1)


def _legend(fig: Figure, entries: list[tuple[str, str, str]]) -> None:
    """One row of ``(label, colour, line style)`` entries under the figure."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, lw=2, ls=ls, label=label) for label, c, ls in entries]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=len(handles),
        fontsize=8,
        handlelength=1.5,
        columnspacing=1.0,
        frameon=False,
    )


def anchor_panels_figure(
    analysis: AnchorAnalysis,
    show_anchor: bool = True,
    ncols: int = 2,
    panel_size: float = 1.7,
    title: str | None = None,
    crop: bool = True,
) -> Figure:
    """One panel per positive anchor: ground truth, anchor, predicted box, ``J`` and ``L``.

    The default layout (2 columns of 1.7-inch panels, 9 pt titles) is 3.4 inches wide, also for
    a single panel: legible at half a page width and in a TensorBoard image card. The title holds
    two short lines, each panel one (``J``, ``L``, ``p``), the box colours are in a legend under
    the panels. Each panel is zoomed onto its boxes (``crop``).

    Args:
        analysis: from :func:`analyze_anchors`.
        show_anchor: draw the anchor itself (dashed).
        ncols: panels per row.
        panel_size: inches per panel.
        title: start of the title's first line (e.g. ``Image 0, epoch 2``).
        crop: zoom each panel onto its ground truth, anchor and predicted box (with a margin);
            false shows the whole image.

    Returns:
        A matplotlib ``Figure`` (Agg canvas attached).
    """
    from src.viz.style import PAPER_RC

    n = analysis.num_panels
    width = panel_size * max(ncols, 1)  # the same width for any number of panels
    ncols = max(1, min(ncols, n))  # a single panel fills the width
    nrows = (max(n, 1) + ncols - 1) // ncols
    side = width / ncols
    with matplotlib.rc_context(PAPER_RC | {"axes.grid": False}):
        fig = Figure(figsize=(width, (side + 0.3) * nrows + 0.9), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[max(n, 1) :]:
            ax.set_visible(False)
        if n == 0:
            ax = axes[0][0]
            size = _show(ax, analysis.image)
            _boxes(ax, analysis.gt_boxes, size, edgecolors=GT_COLOR, linewidths=2)
            ax.set_title("no positive anchor", fontsize=9)
        stacked = torch.stack((analysis.matched_boxes, analysis.anchors, analysis.pred_boxes), 1)
        # a non-finite coordinate (a diverged net's) stays non-finite: crop_windows skips it
        stacked = stacked.where(torch.isfinite(stacked), torch.nan)
        windows = crop_windows(stacked.clamp(0, 1)) if n else stacked.new_zeros(0, 4)
        for k in range(n):  # one axes per panel (matplotlib draws axes one by one)
            ax = axes.flat[k]
            size = _show(ax, analysis.image)
            _boxes(ax, analysis.matched_boxes[k : k + 1], size, edgecolors=GT_COLOR, linewidths=2)
            _boxes(ax, analysis.pred_boxes[k : k + 1], size, edgecolors=PRED_COLOR, linewidths=1.5)
            if show_anchor:  # dashed, on top: an untrained net predicts the anchor itself
                _boxes(
                    ax,
                    analysis.anchors[k : k + 1],
                    size,
                    edgecolors=ANCHOR_COLOR,
                    linewidths=1.5,
                    linestyles="--",
                )
            if crop:
                height, width_px = size
                x0, y0, x1, y1 = (windows[k] * torch.tensor([width_px, height] * 2)).tolist()
                ax.set_xlim(x0, x1)
                ax.set_ylim(y1, y0)
            ax.set_title(
                f"J={float(analysis.iou[k]):.2f} L={float(analysis.box_loss[k]):.3g} "
                f"p={float(analysis.score[k]):.2f}",
                fontsize=8,
            )
        shown = (
            f"{n} of {analysis.num_positives} positive anchors"
            if n < analysis.num_positives
            else f"{n} positive anchors"
        )
        first = f"{title}: {shown}" if title else f"{shown}, by box loss"
        fig.suptitle(
            _two_lines(first, "J: IoU(pred., truth), L: box loss, p: class prob.", width),
            fontsize=9,
        )
        entries = [("ground truth", GT_COLOR, "-")]
        if show_anchor:
            entries.append(("anchor", ANCHOR_COLOR, "--"))
        _legend(fig, [*entries, ("predicted", PRED_COLOR, "-")])
    return fig


def _two_lines(first: str, second: str, width_in: float) -> str:
    """Two title lines, each cut to what 9 pt text fits in ``width_in`` inches."""
    chars = max(int(width_in * 72 / (9 * 0.52)), 20)
    return "\n".join(textwrap.shorten(line, chars, placeholder="...") for line in (first, second))


def negatives_figure(
    analysis: AnchorAnalysis, size: float = 3.4, title: str | None = None
) -> Figure:
    """The negatives hard negative mining keeps (colour: classification loss), and the positives.

    Two short title lines (``title``; how many negatives are kept and by what), a colour bar
    for the classification loss and a legend for the other boxes.

    Args:
        analysis: from :func:`analyze_anchors`.
        size: figure width in inches (3.4: half a page).
        title: the first title line (default ``Hard negatives``).

    Returns:
        A matplotlib ``Figure`` (Agg canvas attached).
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    from src.viz.style import PAPER_RC

    with matplotlib.rc_context(PAPER_RC | {"axes.grid": False}):
        fig = Figure(figsize=(size, size + 0.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        shape = _show(ax, analysis.image)
        losses = analysis.negative_cls_loss
        cmap = colormaps["autumn_r"].with_extremes(bad="grey")  # bad: a nan loss
        finite = losses[torch.isfinite(losses)]  # a diverged net's nan/inf: the colour ends
        norm = Normalize(
            float(finite.min()) if finite.numel() else 0.0,
            float(finite.max()) if finite.numel() else 1.0,
        )
        # Weakest first so that the hardest negatives are drawn on top.
        colors = cmap(norm(losses.flip(0).numpy()))
        _boxes(ax, analysis.negative_anchors.flip(0), shape, edgecolors=colors, linewidths=1.0)
        _boxes(ax, analysis.anchors, shape, edgecolors=POS_COLOR, linewidths=1.0, linestyles="--")
        _boxes(ax, analysis.gt_boxes, shape, edgecolors=GT_COLOR, linewidths=2.0)
        if losses.numel():
            from matplotlib.cm import ScalarMappable

            fig.colorbar(
                ScalarMappable(norm=norm, cmap=cmap),
                ax=ax,
                shrink=0.8,
                label="negative's classification loss",
            )
        kept = f"{analysis.negative_index.numel()} of {analysis.num_negatives} negatives"
        first = (title or "Hard negatives") + ("" if analysis.mined else " (mining=none)")
        second = f"{kept} {analysis.mining_label or 'kept'}"
        fig.suptitle(_two_lines(first, second, size), fontsize=9)
        _legend(
            fig,
            [("ground truth", GT_COLOR, "-"), ("positive anchor", POS_COLOR, "--")],
        )
    return fig


def figure_to_tensor(fig: Figure) -> Tensor:
    """Render a figure to ``Tensor[3, H, W]`` uint8 (for ``SummaryWriter.add_image``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def panels_summary(analysis: AnchorAnalysis) -> list[dict[str, Any]]:
    """The panels as plain records (``anchor``, ``J``, ``L``, ``p``, boxes as lists)."""
    columns = zip(
        analysis.anchor_index.tolist(),
        analysis.iou.tolist(),
        analysis.box_loss.tolist(),
        analysis.score.tolist(),
        analysis.anchors.tolist(),
        analysis.pred_boxes.tolist(),
        analysis.matched_boxes.tolist(),
        strict=True,
    )
    keys = ("anchor", "J", "L", "p", "anchor_box", "pred_box", "gt_box")
    return [dict(zip(keys, values, strict=True)) for values in columns]
