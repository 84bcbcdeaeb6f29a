"""Writing a :class:`~src.report.aggregate.Report`: Markdown, CSV and figures.

The figures are drawn by :mod:`src.viz.report` from plain values built here
(:func:`panel_of`); this module saves them (PNG + PDF, ``src.viz.style.save_figure``).
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from src.report.aggregate import SEED_KEY, Best, Report, is_nonnegative

log = logging.getLogger(__name__)

__all__ = [
    "MISSING",
    "markdown",
    "panel_of",
    "metric_figure",
    "overview_figure",
    "study_figures",
    "write_report",
]

MISSING = "missing"


# ----------------------------------------------------------------------------------- tables
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _best_sentence(report: Report, best: Best, what: str) -> str:
    """How the best row was chosen, ties and all-equal columns said in words."""
    metric = f"`{report.best_metric}`"
    extreme = "largest" if report.best_mode == "max" else "smallest"
    if best.all_equal:
        every = "Both" if best.compared == 2 else f"All {best.compared}"
        return f" {every} {what}s have the same {metric} ({best.value:.4g}): none is marked best."
    if best.tie:
        return (
            f" {len(best.indices)} {what}s tie for the {extreme} {metric} ({best.value:.4g}): "
            "each is marked **tied best**."
        )
    if best.indices:
        return f" **best** marks the {what} with the {extreme} {metric}."
    return ""


def _mark(cells: list[str], best: Best, index: int) -> None:
    mark = best.mark(index)
    if mark is not None:
        cells[0] = f"**{cells[0]}** {mark}"


def _optuna_section(report: Report) -> list[str]:
    """The sweeper's ``optimization_results.yaml`` summary and notes on the study."""
    lines: list[str] = []
    if report.best:
        summary = {k: v for k, v in report.best.items() if k != "trials"}
        states: dict[str, int] = {}
        for trial in report.best.get("trials") or []:
            if isinstance(trial, dict):
                state = str(trial.get("state"))
                states[state] = states.get(state, 0) + 1
        if states:
            summary["trial_states"] = states
        lines += ["", "Optuna (`optimization_results.yaml`):", "", "```yaml"]
        lines += [yaml.safe_dump(summary, sort_keys=False).rstrip(), "```"]
    study = report.study
    if study is None:
        return lines
    values = [(float(t.value), t.number) for t in study.complete if t.value is not None]
    if len(values) > 1:
        top = (max if study.direction == "maximize" else min)(v for v, _ in values)
        tied = [n for v, n in values if v == top]
        if len(tied) == len(values):
            lines += [
                "",
                f"All {len(values)} completed trials of study `{study.name}` have the same "
                f"value ({top:.4g}): Optuna's best trial is merely the first of them.",
            ]
        elif len(tied) > 1:
            lines += [
                "",
                f"Trials {', '.join(str(n) for n in tied)} tie at the best value ({top:.4g}); "
                "Optuna's best trial is merely the first of them.",
            ]
    if study.importances is None and study.importance_note:
        lines += ["", f"Parameter importances not drawn: {study.importance_note}."]
    return lines


def markdown(report: Report) -> str:
    """The Markdown report (see the package docstring)."""
    keys = report.swept_keys
    header = ["run", *keys, *report.metrics, "status"]
    rows = report.rows()
    best = report.best_rows(rows)
    lines = [
        f"# Sweep report: {report.sweep_dir}",
        "",
        f"{len(report.runs)} runs; swept: "
        + (", ".join(f"`{k}`" for k in keys) if keys else "nothing (all runs alike)")
        + ". Metrics: the last value logged to TensorBoard."
        + _best_sentence(report, best, "run"),
        "",
        _table_line(header),
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    for i, row in enumerate(rows):
        cells = [_fmt(row[h]) for h in header]
        _mark(cells, best, i)
        lines.append(_table_line(cells))
    if report.seeded:
        groups = report.groups()
        top = report.best_rows(groups)
        gkeys = report.group_keys
        lines += [
            "",
            f"## Mean ± standard deviation over seeds ({SEED_KEY} = "
            + ", ".join(str(s) for s in groups[0]["seeds"])
            + " in the first setting; sample std, n - 1)",
            "",
        ]
        sentence = _best_sentence(report, top, "setting").strip()
        if sentence:
            lines += [sentence, ""]
        lines += [
            _table_line([*gkeys, "n", *report.metrics]),
            "|"
            + "|".join(
                "---" if i < len(gkeys) else "---:"
                for i in range(len(gkeys) + 1 + len(report.metrics))
            )
            + "|",
        ]
        for i, group in enumerate(groups):
            cells = [_fmt(group[k]) for k in gkeys] + [str(group["n"])]
            for metric in report.metrics:
                mean, std = group[metric], group[f"{metric} std"]
                text = MISSING if math.isnan(mean) else f"{mean:.4g}"
                if not math.isnan(std):
                    text += f" ± {std:.2g}"
                cells.append(text)
            _mark(cells, top, i)
            lines.append(_table_line(cells))
    missing = report.missing
    if missing and not report.all_failed:
        lines += ["", "Runs with missing metrics:", ""]
        lines += [f"- `{r.path}`: {r.status}" for r in missing]
    if report.all_failed:
        lines += ["", f"**Every run failed** ({len(report.runs)} of {len(report.runs)}):", ""]
        lines += [f"- {line}" for line in report.failure_lines()]
    lines += _optuna_section(report)
    return "\n".join(lines) + "\n"


def _write_mean_std_csv(report: Report, path: Path) -> None:
    header = [*report.group_keys, "n"]
    for metric in report.metrics:
        header += [f"{metric} mean", f"{metric} std"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for group in report.groups():
            cells = [str(group[k]) for k in report.group_keys] + [str(group["n"])]
            for metric in report.metrics:
                for value in (group[metric], group[f"{metric} std"]):
                    cells.append("" if math.isnan(value) else repr(float(value)))
            writer.writerow(cells)


def _write_csv(report: Report, path: Path) -> None:
    header = ["run", *report.swept_keys, *report.metrics, "status"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for row in report.rows():
            cells = []
            for h in header:
                value = row[h]
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    cells.append("")
                else:
                    cells.append(repr(value) if isinstance(value, float) else str(value))
            writer.writerow(cells)


# ---------------------------------------------------------------------------------- figures
def _axis_values(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """X positions of the values, and tick labels when they are not all numbers."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels: list[str] = []
    for v in values:
        if str(v) not in labels:
            labels.append(str(v))
    return [float(labels.index(str(v))) for v in values], labels


def _seeds(report: Report) -> str:
    if not report.seeded:
        return ""
    counts = sorted({g["n"] for g in report.groups()})
    return f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds"


def panel_of(report: Report, metric: str, key: str) -> Any:
    """The :class:`src.viz.report.Panel` of one metric against one swept key (``"run"``: none).

    Means and sample standard deviations over seeds when the runs differ in ``seed``; a log
    axis for a parameter an Optuna study searched on a log scale, or a grid-swept one whose
    values span a factor of 20 or more; ticks at the values for a grid sweep, ordinary ticks
    for values an Optuna study sampled.
    """
    from src.viz.report import Panel

    items = report.groups() if report.seeded else report.rows()
    raw = [item["run"] if key == "run" else item.get(key) for item in items]
    xs, labels = _axis_values(raw)
    ys = [float(item[metric]) for item in items]
    errs = [float(item.get(f"{metric} std", math.nan)) for item in items]
    keep = [i for i, y in enumerate(ys) if math.isfinite(y)]
    sampled = key in report.optuna_keys  # the study's own scale decides
    log_axis = key in report.log_keys or (
        not sampled and labels is None and bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20
    )
    return Panel(
        x=[xs[i] for i in keep],
        y=[ys[i] for i in keep],
        err=[errs[i] for i in keep],
        xlabel=key,
        ylabel=metric + ("\nmean ± std over seeds" if report.seeded else ""),
        labels=labels,
        log=log_axis,
        ticks_at_values=not sampled,
        nonnegative=is_nonnegative(metric),
    )


def metric_figure(report: Report, metric: str, key: str) -> Any:
    """One metric against one swept key, half a page wide (3.4 in): a matplotlib ``Figure``."""
    from src.viz.report import panel_figure

    return panel_figure(panel_of(report, metric, key), _seeds(report))


def _panels(report: Report) -> list[tuple[str, str]]:
    keys = report.group_keys or ["run"]
    return [(m, k) for m in report.metrics for k in keys]


def overview_figure(report: Report) -> Any:
    """Every metric against every swept key (``report.png``): a matplotlib ``Figure``.

    One row per metric and one column per swept key; with a single swept key, up to three
    panels a row.
    """
    from src.viz.report import sweep_figure

    panels = _panels(report)
    keys = report.group_keys or ["run"]
    if len(keys) == 1:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        cells = [(*divmod(i, ncols), panel_of(report, m, k)) for i, (m, k) in enumerate(panels)]
    else:
        ncols, nrows = len(keys), len(report.metrics)
        cells = [
            (i, j, panel_of(report, m, k))
            for i, m in enumerate(report.metrics)
            for j, k in enumerate(keys)
        ]
    title = f"{report.sweep_dir.name}: final metrics vs {', '.join(keys)}"
    return sweep_figure(cells, nrows, ncols, title, _seeds(report))


def _plot(report: Report, path: Path) -> dict[str, Path]:
    """The overview figure (``report.png`` + ``.pdf``) and one half-page figure per panel."""
    from src.viz.style import save_figure

    files: dict[str, Path] = {}
    written = save_figure(overview_figure(report), path, dpi=150)
    files["png"], files["pdf"] = written["png"], written["pdf"]
    for metric, key in _panels(report):
        stem = f"{metric}_vs_{key}".replace("/", "_")
        out = save_figure(
            metric_figure(report, metric, key), path.parent / "figures" / f"{stem}.png", dpi=300
        )
        files[f"figure:{stem}"] = out["png"]
    return files


def study_figures(report: Report) -> dict[str, Any]:
    """The Optuna study's figures: ``{"optuna_history" | "optuna_importance": Figure}``.

    The history needs a completed trial; the importances need to be defined
    (:attr:`src.report.read.StudyInfo.importances`). Empty without a study.
    """
    study = report.study
    if study is None:
        return {}
    from src.viz.report import history_figure, importance_figure

    figures: dict[str, Any] = {}
    complete = study.complete
    objective = report.best_metric
    if complete:
        others: dict[str, list[int]] = {}
        for trial in study.trials:
            if trial not in complete:
                others.setdefault(trial.state, []).append(trial.number)
        counts = ", ".join(f"{len(v)} {k.lower()}" for k, v in others.items())
        figures["optuna_history"] = history_figure(
            [t.number for t in complete],
            [float(t.value) for t in complete if t.value is not None],
            others,
            maximize=study.direction == "maximize",
            ylabel=objective,
            title=f"{study.name}: {len(complete)} completed" + (f", {counts}" if counts else ""),
            nonnegative=is_nonnegative(objective),
        )
    else:
        log.info("%s: no completed trial: no optimisation-history plot", study.name)
    if study.importances is not None:
        figures["optuna_importance"] = importance_figure(
            study.importances,
            f"{study.name}: parameter importance (PED-ANOVA, {len(complete)} trials)",
        )
    else:
        log.info("%s: parameter importances not drawn: %s", study.name, study.importance_note)
    return figures


def _optuna_plots(report: Report, out: Path) -> dict[str, Path]:
    """Save :func:`study_figures` as ``<name>.png`` + ``.pdf``."""
    from src.viz.style import save_figure

    files: dict[str, Path] = {}
    for name, fig in study_figures(report).items():
        written = save_figure(fig, out / f"{name}.png", dpi=200)
        files[name], files[f"{name}_pdf"] = written["png"], written["pdf"]
    return files


def write_report(
    report: Report, out_dir: str | Path | None = None, figures: bool = True
) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (default: the sweep dir).

    Args:
        report: from :func:`~src.report.aggregate.collect`.
        out_dir: where to write; default ``report.sweep_dir``.
        figures: draw the figures too (``False``: ``report.md`` and the CSV files only); none
            are drawn when no run logged any of the metrics.

    Returns:
        ``{"markdown", "csv", "png", "pdf", ...: path}`` (also stored in ``report.files``):
        ``mean_std_csv`` for seeded sweeps, ``figure:<metric>_vs_<key>`` per panel, and
        ``optuna_history`` / ``optuna_importance`` for an Optuna search (the latter only when
        importances are defined).
    """
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    files["markdown"].write_text(markdown(report))
    _write_csv(report, files["csv"])
    if report.seeded:
        files["mean_std_csv"] = out / "report_mean_std.csv"
        _write_mean_std_csv(report, files["mean_std_csv"])
    if figures and not any(run.metrics for run in report.runs):
        log.info("no run logged any of %s: no figures", ", ".join(report.metrics))
    elif figures:
        files.update(_plot(report, out / "report.png"))
        for stale in ("optuna_history", "optuna_importance"):  # from an earlier report
            for suffix in (".png", ".pdf"):
                (out / f"{stale}{suffix}").unlink(missing_ok=True)
        files.update(_optuna_plots(report, out))
    report.files = files
    figures = sum(k.startswith("figure:") for k in files)
    log.info(
        "Wrote %s%s",
        ", ".join(p.name for k, p in files.items() if not k.startswith("figure:")),
        f" and {figures} half-page figures under {out / 'figures'}" if figures else f" in {out}",
    )
    return files
