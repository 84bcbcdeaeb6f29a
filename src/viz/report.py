"""Figures of a sweep report, drawn from plain values (``src.report`` reads the files).

* :class:`Panel`: one metric against one swept key (means, error bars, axis settings);
* :func:`sweep_figure` / :func:`panel_figure`: a grid of panels, or one panel half a page wide;
* :func:`history_figure`, :func:`importance_figure`: an Optuna study's objective per trial and
  its parameter importances.

Every figure is finished by :func:`finish_figure`: once the layout is fixed, tick labels that
would touch are thinned out, and each value label is put at the first of a few places around
its point where it stays inside its axes and touches no other label, tick label or point; a
label with no such place is left out and the caption says how many were. Points are never
joined; error bars of metrics that cannot be negative stop at 0 and the caption says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import (
    FixedLocator,
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    NullLocator,
)
from matplotlib.transforms import Bbox

from src.viz.style import HALF_PAGE_WIDTH_IN, paper_style

__all__ = [
    "Panel",
    "short_number",
    "draw_panel",
    "panel_figure",
    "sweep_figure",
    "history_figure",
    "importance_figure",
    "finish_figure",
    "overlaps",
    "texts_of",
]

#: the most distinct swept values that get a tick each (more: an ordinary axis).
MAX_VALUE_TICKS = 6
#: where a value label may go around its point: (dx, dy) in points, alignment.
_PLACES: tuple[tuple[float, float, str, str], ...] = (
    (0, 6, "center", "bottom"),
    (4, 4, "left", "bottom"),
    (-4, 4, "right", "bottom"),
    (0, -6, "center", "top"),
    (4, -4, "left", "top"),
    (-4, -4, "right", "top"),
    (7, 0, "left", "center"),
    (-7, 0, "right", "center"),
    (0, 16, "center", "bottom"),
    (0, -16, "center", "top"),
)
#: half the gap (pixels) two value labels keep; tick labels keep twice as much.
_PAD = 1.0
_TICK_PAD = 2.5


@dataclass
class Panel:
    """One metric against one swept key.

    Attributes:
        x: x positions (the swept values, or category indices when ``labels`` is set).
        y: the metric (the mean over seeds when ``err`` is set); finite values only.
        err: the standard deviation of each point (NaN: a single run, no bar).
        xlabel: the swept key.
        ylabel: the metric's name (and how it was aggregated).
        labels: tick labels of categorical values (``x`` are then ``0, 1, ...``).
        log: a logarithmic x axis.
        ticks_at_values: a tick at each swept value (grid sweeps with few values); ``False``
            for values sampled by a search (an ordinary axis with a few round ticks).
        nonnegative: the metric cannot be negative: y from 0, lower error bars clipped at 0.
    """

    x: list[float]
    y: list[float]
    err: list[float] = field(default_factory=list)
    xlabel: str = ""
    ylabel: str = ""
    labels: list[str] | None = None
    log: bool = False
    ticks_at_values: bool = True
    nonnegative: bool = False

    @property
    def has_bars(self) -> bool:
        """True when some point has an error bar."""
        return any(math.isfinite(e) for e in self.err)

    @property
    def clipped(self) -> bool:
        """True when a lower error bar was cut at 0."""
        return self.nonnegative and any(
            math.isfinite(e) and y - e < 0 for y, e in zip(self.y, self.err, strict=False)
        )


def short_number(value: float) -> str:
    """A tick or value label: 3 significant digits, at most 7 characters.

    ``0.5``, ``0.0123``, ``1.23e-4`` (never ``0.000123``), ``4.1e7``.
    """
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        mantissa, exponent = f"{value:.2e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        return f"{mantissa}e{int(exponent)}"
    if abs(value) >= 999.5:  # "1000", "12345": .3g would write 1e+03, 1.23e+04
        return f"{value:.0f}"
    return f"{value:.3g}"


def _value_label(y: float, e: float) -> str:
    """``0.22``, or ``0.22±0.01`` with a standard deviation (one significant digit)."""
    if not math.isfinite(e):
        return short_number(y)
    return f"{short_number(y)}±{short_number(float(f'{e:.1g}'))}"


# ----------------------------------------------------------------------------------- panels
def draw_panel(ax: Axes, panel: Panel) -> list[tuple[float, float, str]]:
    """Draw ``panel`` on ``ax``: points with error bars, never joined; axes and ticks set.

    Args:
        ax: an empty axes.
        panel: what to draw.

    Returns:
        The value labels to place, ``(x, y, text)`` per point (see :func:`finish_figure`).
    """
    xs, ys = panel.x, panel.y
    errs = list(panel.err) or [math.nan] * len(ys)
    labels: list[tuple[float, float, str]] = []
    if not xs:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        upper = [e if math.isfinite(e) else 0.0 for e in errs]
        lower = [min(u, y) if panel.nonnegative else u for u, y in zip(upper, ys, strict=True)]
        ax.errorbar(
            xs, ys, yerr=[lower, upper], fmt="o", capsize=3, elinewidth=1.2, ms=5, clip_on=False
        )
        labels = [(x, y, _value_label(y, e)) for x, y, e in zip(xs, ys, errs, strict=True)]
        low = min(y - b for y, b in zip(ys, lower, strict=True))
        high = max(y + b for y, b in zip(ys, upper, strict=True))
        if panel.nonnegative and low >= 0:  # from 0, so that tiny differences look tiny
            ax.set_ylim(0, high * 1.3 if high > 0 else 1.0)
        else:
            pad = (high - low) * 0.3 or abs(high) * 0.3 or 1.0
            ax.set_ylim(low - pad * 0.5, high + pad)
    _set_x_axis(ax, panel)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel(panel.xlabel + (" (log scale)" if panel.log and panel.labels is None else ""))
    ax.set_ylabel(panel.ylabel)
    return labels


def _set_x_axis(ax: Axes, panel: Panel) -> None:
    xs = panel.x
    short = FuncFormatter(lambda v, _pos: short_number(v))
    if panel.labels is not None:
        ax.set_xticks(range(len(panel.labels)), panel.labels, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(panel.labels) - 0.5)
        return
    if panel.log and xs and min(xs) > 0:
        ax.set_xscale("log")
        lo, hi = min(xs), max(xs)
        factor = 10 ** (0.15 * (math.log10(hi / lo) or 2.0))
        ax.set_xlim(lo / factor, hi * factor)
    elif xs:
        lo, hi = min(xs), max(xs)
        pad = (hi - lo) * 0.15 or (abs(lo) * 0.5 if lo else 1.0)
        ax.set_xlim(lo - pad, hi + pad)
    values = sorted(set(xs))
    if panel.ticks_at_values and 0 < len(values) <= MAX_VALUE_TICKS:
        ax.xaxis.set_major_locator(FixedLocator(values))
    elif ax.get_xscale() == "log":
        lo, hi = ax.get_xlim()
        subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) < 2 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs, numticks=8))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.xaxis.set_major_formatter(short)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


# ------------------------------------------------------------------------------- finishing
def overlaps(boxes: Sequence[Bbox], pad: float = 0.0) -> list[tuple[int, int]]:
    """Pairs of boxes that intersect (after growing each by ``pad`` pixels on every side)."""
    grown = [b.padded(pad) for b in boxes]
    pairs = []
    for i in range(len(grown)):
        for j in range(i + 1, len(grown)):
            a, b = grown[i], grown[j]
            if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1:
                pairs.append((i, j))
    return pairs


def _tick_boxes(ax: Axes, axis: Any, renderer: Any) -> list[Bbox]:
    texts = [*axis.get_majorticklabels(), *axis.get_minorticklabels()]
    return [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]


def _thin_ticks(ax: Axes, renderer: Any) -> None:
    """Halve the ticks of an axis until its tick labels do not touch."""
    for axis in (ax.xaxis, ax.yaxis):
        for _ in range(6):
            if not overlaps(_tick_boxes(ax, axis, renderer), _TICK_PAD):
                break
            low, high = sorted(axis.get_view_interval())
            ticks = [t for t in axis.get_majorticklocs() if low <= t <= high]
            if len(ticks) <= 2:
                axis.set_major_locator(FixedLocator(ticks[:1]))
                break
            keep = ticks[::2] if len(ticks) % 2 else ticks[1::2]
            axis.set_major_locator(FixedLocator(keep))


def _bar_boxes(ax: Axes, renderer: Any) -> list[Bbox]:
    """The error bars of ``ax`` (vertical segments), as boxes a label must not cover."""
    boxes = []
    for collection in ax.collections:
        if isinstance(collection, LineCollection):
            for segment in collection.get_segments():
                if len(segment) == 2:
                    (x0, y0), (x1, y1) = ax.transData.transform(segment)
                    boxes.append(
                        Bbox.from_extents(
                            min(x0, x1) - 1, min(y0, y1), max(x0, x1) + 1, max(y0, y1)
                        )
                    )
    return boxes


def _place_labels(
    ax: Axes,
    labels: Sequence[tuple[float, float, str]],
    renderer: Any,
    fontsize: float,
    places: Sequence[tuple[float, float, str, str]],
) -> int:
    """Put each value label where it fits (see the module docstring); return how many did not."""
    frame = ax.get_window_extent(renderer)
    half = 2.5 * ax.figure.dpi / 72  # the points' markers (5 pt wide) are not covered
    points = _bar_boxes(ax, renderer)
    for x, y, _ in labels:
        px, py = ax.transData.transform((x, y))
        points.append(Bbox.from_extents(px - half, py - half, px + half, py + half))
    taken: list[Bbox] = []
    dropped = 0
    for x, y, text in labels:
        placed = False
        for dx, dy, ha, va in places:
            artist = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                fontsize=fontsize,
            )  # fmt: skip
            box = artist.get_window_extent(renderer)
            inside = (
                box.x0 >= frame.x0 + _PAD
                and box.x1 <= frame.x1 - _PAD
                and box.y0 >= frame.y0 + _PAD
                and box.y1 <= frame.y1 - _PAD
            )
            if (
                inside
                and not any(overlaps([box, other], _PAD) for other in taken)
                and not any(overlaps([box, point]) for point in points)
            ):
                taken.append(box)
                placed = True
                break
            artist.remove()
        dropped += not placed
    return dropped


def finish_figure(
    fig: Figure,
    labels: dict[Axes, list[tuple[float, float, str]]],
    caption: str = "",
    fontsize: float = 8.0,
    places: Sequence[tuple[float, float, str, str]] = _PLACES,
) -> int:
    """Fix the layout, thin touching tick labels, place the value labels, write the caption.

    The layout is computed (constrained layout, with the caption's room) and then frozen, so
    that what is checked here is what is saved. When some labels find no room, the caption says
    how many, and the layout is computed once more for the longer caption.

    Args:
        fig: a figure whose axes are drawn (value labels not yet placed).
        labels: ``{axes: [(x, y, text), ...]}`` from :func:`draw_panel`.
        caption: text under the figure (``""``: none unless labels were left out).
        fontsize: size of the value labels.
        places: where a label may go around its point, in order of preference: ``(dx, dy)``
            in points and the text's horizontal and vertical alignment.

    Returns:
        How many value labels were left out.
    """
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    count = sum(len(items) for items in labels.values())
    note = fig.supxlabel(caption, fontsize=8) if caption else None
    dropped = 0
    for attempt in range(2):
        fig.set_layout_engine("constrained")
        fig.canvas.draw()
        fig.set_layout_engine("none")
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            if ax.get_visible():
                _thin_ticks(ax, renderer)
        for ax in labels:
            for artist in [t for t in ax.texts if isinstance(t, Annotation)]:
                artist.remove()  # an earlier attempt's labels
        dropped = sum(
            _place_labels(ax, items, renderer, fontsize, places) for ax, items in labels.items()
        )
        extra = f"{dropped} of {count} values not written (no room; all in report.md)"
        text = "\n".join(t for t in (caption, extra if dropped else "") if t)
        if note is not None:
            note.set_text(text)
        elif dropped:
            note = fig.supxlabel(text, fontsize=8)
        if not dropped or attempt:
            break
    fig.canvas.draw()
    return dropped


def _caption(panels: Sequence[Panel], seeds: str) -> str:
    parts = []
    if any(p.has_bars for p in panels):
        parts.append(f"error bars: ±1 sample std over {seeds or 'seeds'}")
        if any(p.clipped for p in panels):
            parts.append("lower bars cut at 0 (the metric is ≥ 0)")
    return ",\n".join(parts)


def panel_figure(panel: Panel, seeds: str = "") -> Figure:
    """One panel, half a page wide (3.4 in, every font >= 8 pt at that size).

    Args:
        panel: what to draw.
        seeds: how the bars were computed, for the caption (e.g. ``"3 seeds"``).

    Returns:
        The finished figure (value labels placed; see :func:`finish_figure`).
    """
    with paper_style():
        fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, 2.8))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        labels = draw_panel(ax, panel)
        finish_figure(fig, {ax: labels}, _caption([panel], seeds))
    return fig


def sweep_figure(
    cells: Sequence[tuple[int, int, Panel]],
    nrows: int,
    ncols: int,
    title: str,
    seeds: str = "",
) -> Figure:
    """A grid of panels (3.4 x 2.7 in each).

    Args:
        cells: ``(row, column, panel)``; cells without a panel are hidden.
        nrows: rows of the grid.
        ncols: columns of the grid.
        title: the figure's title.
        seeds: how the bars were computed, for the caption (e.g. ``"3 seeds"``).

    Returns:
        The finished figure.
    """
    with paper_style():
        fig = Figure(figsize=(3.4 * ncols, 2.7 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        used = {(i, j) for i, j, _ in cells}
        for i in range(nrows):
            for j in range(ncols):
                if (i, j) not in used:
                    axes[i][j].set_visible(False)
        labels = {axes[i][j]: draw_panel(axes[i][j], panel) for i, j, panel in cells}
        fig.suptitle(title)
        finish_figure(fig, labels, _caption([p for _, _, p in cells], seeds))
    return fig


# ------------------------------------------------------------------------------------ Optuna
def history_figure(
    numbers: Sequence[int],
    values: Sequence[float],
    others: dict[str, Sequence[int]],
    maximize: bool,
    ylabel: str,
    title: str,
    nonnegative: bool = False,
) -> Figure:
    """An Optuna study's objective per trial, with the best value so far.

    Args:
        numbers: numbers of the COMPLETE trials.
        values: their objective values.
        others: ``{state: trial numbers}`` of trials without a value (PRUNED, FAIL, ...),
            marked along the bottom.
        maximize: the study maximises (best so far = running maximum).
        ylabel: the objective's name.
        title: the figure's title.
        nonnegative: the objective cannot be negative (y axis from 0).

    Returns:
        The finished figure (5 x 3.4 in).
    """
    with paper_style():
        fig = Figure(figsize=(5.0, 3.4))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot(numbers, values, "o", ms=5, label="completed trial")
        best: list[float] = []
        for v in values:
            best.append(v if not best else (max if maximize else min)(best[-1], v))
        if numbers:
            ax.step(numbers, best, where="post", color="C1", lw=1.5, label="best so far")
        markers = {"PRUNED": ("v", "C2"), "FAIL": ("x", "C3")}
        for state, trial_numbers in others.items():
            if trial_numbers:
                marker, color = markers.get(state, ("s", "C7"))
                ax.plot(
                    trial_numbers, [0.03] * len(trial_numbers), marker, color=color, ms=6,
                    transform=ax.get_xaxis_transform(), label=f"{state.lower()} (no value)",
                )  # fmt: skip
        if nonnegative and values and min(values) >= 0:
            ax.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1.0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=8))
        ax.set_xlabel("trial number")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        fig.legend(loc="outside lower center", ncols=2, fontsize=8)
        finish_figure(fig, {})
    return fig


def importance_figure(importances: dict[str, float], title: str) -> Figure:
    """Parameter importances as horizontal bars, largest on top, each with its value.

    Args:
        importances: ``{parameter: importance}`` (normalised to sum to 1).
        title: the figure's title.

    Returns:
        The finished figure (5 in wide).
    """
    names = list(importances)[::-1]
    values = [importances[n] for n in names]
    with paper_style():
        fig = Figure(figsize=(5.0, 1.2 + 0.35 * len(names)))
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.barh(range(len(names)), values, color="C0", height=0.6)
        ax.set_yticks(range(len(names)), names)
        ax.set_xlim(0, max(max(values), 1e-9) * 1.25)
        ax.set_xlabel("importance (sums to 1)")
        ax.set_title(title)
        ax.grid(axis="y", visible=False)
        labels = [(v, float(i), f"{v:.2f}") for i, v in enumerate(values)]
        finish_figure(fig, {ax: labels}, places=((5, 0, "left", "center"),))
    return fig


def texts_of(ax: Axes) -> list[Text]:
    """The visible, non-empty tick labels and value labels of ``ax`` (what must not touch)."""
    items: list[Text] = [*ax.texts]
    for axis in (ax.xaxis, ax.yaxis):
        items += [*axis.get_majorticklabels(), *axis.get_minorticklabels()]
    return [t for t in items if t.get_visible() and t.get_text()]
