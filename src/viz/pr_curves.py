"""Per-class precision/recall curves of the VOC metric, as a half-page figure."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from src.metrics.voc_map import voc_ap
from src.viz.style import HALF_PAGE_WIDTH_IN, PAPER_RC

__all__ = ["pr_curves_figure"]


def pr_curves_figure(
    curves: Sequence[tuple[Tensor, Tensor] | None],
    class_names: Sequence[str] | None = None,
    max_classes: int = 10,
    title: str | None = None,
    use_07_metric: bool = False,
) -> Figure:
    """Precision against recall for each class (the devkit's ranked curves).

    Args:
        curves: per class ``(recall[D], precision[D])`` or None (no ground truth), as returned by
            :meth:`~src.metrics.voc_map.VOCMeanAveragePrecision.pr_curves`.
        class_names: names indexed by class; default the class index.
        max_classes: the classes with the largest AP are drawn, at most this many.
        title: figure title.
        use_07_metric: AP in the legend with the VOC07 11-point rule.

    Returns:
        A 3.4-inch-wide matplotlib ``Figure`` (Agg canvas attached); each legend entry is the
        class name with its AP@0.5.
    """
    names = list(class_names or [])
    entries = []
    for c, curve in enumerate(curves):  # loop over classes only
        if curve is None:
            continue
        recall, precision = (t.detach().cpu().double() for t in curve)
        ap = float(voc_ap(recall, precision, use_07_metric)) if recall.numel() else 0.0
        name = names[c] if c < len(names) else str(c)
        entries.append((ap, name, recall, precision))
    entries.sort(key=lambda e: -e[0])
    shown = entries[:max_classes]
    with matplotlib.rc_context(PAPER_RC):
        fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, 3.0), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        for ap, name, recall, precision in shown:
            if recall.numel():
                ax.step(recall.numpy(), precision.numpy(), where="post", label=f"{name} {ap:.3f}")
            else:
                ax.plot([], [], label=f"{name} {ap:.3f} (no detection)")
        if not shown:
            ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        hidden = len(entries) - len(shown)
        ax.set_title(
            (title or "Precision/recall per class")
            + (f" ({hidden} more classes not shown)" if hidden else ""),
            fontsize=9,
            wrap=True,
        )
        if shown:
            ax.legend(title="class, AP@0.5", fontsize=8, title_fontsize=8, loc="lower left")
    return fig
