"""One figure style for everything the project draws: legible at half a page width.

A figure placed at half the text width of an A4/Letter paper (:data:`HALF_PAGE_WIDTH_IN`, 3.4
inches) shrinks by ``3.4 / figure width``; :func:`smallest_font_at` says how large its smallest
text then is, and the figures written by ``src.report``, ``src.visualize`` and the TensorBoard
callbacks keep it at :data:`MIN_FONT_PT` (8 pt) or more. :func:`save_figure` writes a PNG next to a
vector PDF.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure
from matplotlib.text import Text

__all__ = [
    "HALF_PAGE_WIDTH_IN",
    "MIN_FONT_PT",
    "PAPER_RC",
    "paper_style",
    "save_figure",
    "smallest_font_at",
]

#: half the text width of an A4 / Letter page with usual margins, in inches.
HALF_PAGE_WIDTH_IN = 3.4
#: the smallest font size (points) allowed once a figure is scaled to half a page width.
MIN_FONT_PT = 8.0

#: matplotlib settings of every figure (sizes in points at the figure's own size).
PAPER_RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.5,
    "lines.markersize": 5,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
    "pdf.fonttype": 42,  # TrueType in PDFs: editable, accepted by publishers
}


@contextmanager
def paper_style() -> Iterator[None]:
    """Apply :data:`PAPER_RC` while building (and saving) a figure."""
    with matplotlib.rc_context(PAPER_RC):
        yield


def save_figure(fig: Figure, path: str | Path, dpi: int = 200) -> dict[str, Path]:
    """Write ``<stem>.png`` (``dpi``) and a vector ``<stem>.pdf`` next to it.

    Args:
        fig: the figure.
        path: the PNG path (or any path; its suffix is replaced).
        dpi: PNG resolution.

    Returns:
        ``{"png": path, "pdf": path}``.
    """
    png = Path(path).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    pdf = png.with_suffix(".pdf")
    with paper_style():
        fig.savefig(png, dpi=dpi)
        fig.savefig(pdf)
    return {"png": png, "pdf": pdf}


def smallest_font_at(fig: Figure, width_in: float = HALF_PAGE_WIDTH_IN) -> float:
    """The smallest visible text size (points) once ``fig`` is scaled to ``width_in`` inches.

    Measured on the drawn figure (``savefig(bbox_inches="tight")`` may crop it a little, which
    only makes text larger).
    """
    fig.canvas.draw()
    sizes = [
        t.get_fontsize()
        for t in fig.findobj(Text)
        if t.get_visible()
        and t.get_text().strip()
        and t.get_figure() is not None
        and (t.axes is None or t.axes.get_visible())
    ]
    if not sizes:
        return float("inf")
    return min(sizes) * width_in / fig.get_figwidth()
