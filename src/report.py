"""Summarise a Hydra sweep: ``python -m src.report outputs/multirun/<date_time> [--out DIR]``.

Every run of the sweep (a job dir with ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and
TensorBoard events under ``tensorboard/``) becomes one row. The *swept keys* are the override
keys whose values differ across runs (``loss.sigma`` for ``loss.sigma=0.5,1,10``; every Optuna
parameter for ``hparams_search=banana_optuna``). The final value of each metric is the last value
logged to TensorBoard (largest step, then latest write). Three files are written into the sweep
dir (or ``--out``):

* ``report.md``: a Markdown table, one row per run, the swept values and the final metrics, the
  best run (by ``--best``, default the largest ``val/mAP_50``) marked; when the runs differ in
  ``seed`` as well (``-m seed=1,2,3 loss.sigma=0.5,1,10``), a second table with the mean and the
  sample standard deviation (``n - 1``) of each metric over the seeds of each setting;
* ``report.csv``: the per-run table (empty cells for missing values), and
  ``report_mean_std.csv`` with the seed aggregates;
* ``report.png`` / ``report.pdf``: each metric against each swept value (mean with a standard
  deviation error bar over seeds, values written next to the points; points are not joined; a
  log axis for a parameter searched on a log scale; the y axis starts at 0 for non-negative
  metrics so that tiny differences do not look steep), and one half-page-wide figure per metric
  under ``figures/`` (PNG + PDF, fonts of at least 8 pt at 3.4 inches wide);
* for an Optuna search (``optuna.db`` in the sweep dir): Optuna's optimization-history and
  parameter-importance plots, ``optuna_history.png`` / ``optuna_importance.png`` (+ PDF).

Runs without events (crashed, ``fast_dev_run``, or no TensorBoard logger) are listed with their
metrics marked ``missing``; they do not stop the report. For an Optuna search
(``hparams_search=...``) the trial states in the sweeper's ``optimization_results.yaml`` set the
status of each trial's run: ``pruned at epoch N`` or ``failed: <reason>``; the per-trial
``optuna_trial.*`` overrides are not swept keys.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS",
    "RunResult",
    "Report",
    "find_runs",
    "read_overrides",
    "read_last_scalars",
    "swept_keys",
    "collect",
    "write_report",
    "make_report",
    "metric_figure",
    "trial_status",
    "main",
]

#: metrics reported by default (their last logged value).
DEFAULT_METRICS: tuple[str, ...] = (
    "val/mAP_50",
    "val/class_err",
    "val/bbox_mae",
    "train/class_err",
    "train/bbox_mae",
    "val/loss",
)

MISSING = "missing"
#: the key whose values are aggregated into mean and standard deviation.
SEED_KEY = "seed"
#: per-trial overrides of the Optuna sweeper (``src.search.TRIAL_NODE``), never swept keys.
TRIAL_PREFIX = "optuna_trial."


@dataclass
class RunResult:
    """One run of a sweep.

    Attributes:
        name: the run's dir relative to the sweep dir (the Hydra job number, e.g. ``"3"``).
        path: the run's dir.
        overrides: ``{key: value}`` of the run's command-line overrides (values as written).
        metrics: ``{metric: last logged value}``; metrics never logged are absent.
        status: ``"ok"``, ``"no events"`` (no TensorBoard events under ``tensorboard/``),
            ``"unreadable events: ..."`` or ``"incomplete"`` (some metrics never logged); for
            Optuna trials ``"pruned at epoch N"``, ``"failed: <reason>"`` or ``"running"``
            (interrupted, or still running).
    """

    name: str
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    status: str = "ok"


@dataclass
class Report:
    """A sweep's summary (see :func:`make_report`).

    Attributes:
        sweep_dir: the sweep dir read.
        runs: the runs, in job order.
        swept_keys: override keys whose values differ across runs, in first-seen order.
        metrics: the reported metric names.
        files: ``{"markdown" | "csv" | "png": path}`` once written.
        best: the Optuna sweeper's ``optimization_results.yaml`` content, if any.
    """

    sweep_dir: Path
    runs: list[RunResult]
    swept_keys: list[str]
    metrics: tuple[str, ...] = DEFAULT_METRICS
    files: dict[str, Path] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    log_keys: set[str] = field(default_factory=set)
    best_metric: str = "val/mAP_50"
    best_mode: str = "max"

    @property
    def group_keys(self) -> list[str]:
        """The swept keys other than ``seed``: the settings compared."""
        return [k for k in self.swept_keys if k != SEED_KEY]

    @property
    def seeded(self) -> bool:
        """True when runs differ in ``seed``: metrics are aggregated over seeds."""
        return SEED_KEY in self.swept_keys

    def groups(self) -> list[dict[str, Any]]:
        """Runs that differ only in ``seed``, aggregated.

        Returns:
            One dict per setting, in first-seen order: the group keys' values, ``n`` (runs with
            the metric), ``seeds``, and per metric ``<metric>`` (mean over the runs that logged
            it, NaN if none) and ``<metric> std`` (sample standard deviation, ``n - 1`` in the
            denominator; NaN for fewer than 2 values).
        """
        order: list[tuple[Any, ...]] = []
        members: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for row in self.rows():
            key = tuple(row[k] for k in self.group_keys)
            if key not in members:
                order.append(key)
                members[key] = []
            members[key].append(row)
        groups = []
        for key in order:
            rows = members[key]
            group: dict[str, Any] = dict(zip(self.group_keys, key, strict=True))
            group["seeds"] = [r.get(SEED_KEY) for r in rows]
            group["n"] = len(rows)
            for metric in self.metrics:
                values = [float(r[metric]) for r in rows if math.isfinite(float(r[metric]))]
                group[metric] = sum(values) / len(values) if values else math.nan
                group[f"{metric} std"] = _sample_std(values)
                group[f"{metric} n"] = len(values)
            groups.append(group)
        return groups

    def best_index(self, rows: list[dict[str, Any]]) -> int | None:
        """Index of the best row by :attr:`best_metric` (``max`` or ``min``), if any is finite."""
        scored = [
            (float(r[self.best_metric]), i)
            for i, r in enumerate(rows)
            if self.best_metric in r and math.isfinite(float(r[self.best_metric]))
        ]
        if not scored:
            return None
        pick = max if self.best_mode == "max" else min
        return pick(scored, key=lambda item: (item[0], -item[1]))[1]

    @property
    def missing(self) -> list[RunResult]:
        """Runs lacking at least one reported metric."""
        return [r for r in self.runs if any(m not in r.metrics for m in self.metrics)]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per run: ``run``, the swept keys (parsed values), metrics (NaN if missing)."""
        rows = []
        for run in self.runs:
            row: dict[str, Any] = {"run": run.name}
            for key in self.swept_keys:
                row[key] = parse_value(run.overrides.get(key))
            for metric in self.metrics:
                row[metric] = run.metrics.get(metric, math.nan)
            row["status"] = run.status
            rows.append(row)
        return rows


def _sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1``); NaN for fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ------------------------------------------------------------------------------------ reading
def _natural_key(text: str) -> list[Any]:
    """Sort key putting ``"10"`` after ``"9"`` (job numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def parse_value(value: str | None) -> Any:
    """An override value as an int, a float, or the string itself (``None`` stays ``None``)."""
    if value is None:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs under ``sweep_dir`` (those with ``.hydra/config.yaml``), in job order.

    ``sweep_dir`` may itself be a single run.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or holds no run.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep dir {root} does not exist; pass the dir a multirun wrote, such as "
            "outputs/multirun/<date_time>"
        )
    if (root / ".hydra" / "config.yaml").is_file():
        return [root]
    runs = sorted(
        {p.parent.parent for p in root.rglob(".hydra/config.yaml")},
        key=lambda p: _natural_key(p.relative_to(root).as_posix()),
    )
    if not runs:
        raise FileNotFoundError(
            f"no runs found under {root}: expected job dirs holding .hydra/config.yaml, as "
            "written by `python -m src.train -m key=v1,v2` (outputs/multirun/<date_time>/<job>)"
        )
    return runs


def read_overrides(run_dir: str | Path) -> dict[str, str]:
    """``{key: value}`` from a run's ``.hydra/overrides.yaml`` (``+``/``++``/``~`` stripped).

    ``hydra.*`` overrides are left out. A missing file gives ``{}`` (with a warning).
    """
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        log.warning("%s is missing; the run's swept values are unknown", path)
        return {}
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path} must hold a list of 'key=value' strings, got {type(items)}")
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra.") or key == "hydra":
            continue
        overrides[key] = value
    return overrides


def read_last_scalars(log_dir: str | Path) -> dict[str, float] | None:
    """The last logged value of every scalar under ``log_dir`` (searched recursively).

    Args:
        log_dir: a dir with TensorBoard event files (``events.out.tfevents.*``), possibly in
            version sub-dirs.

    Returns:
        ``{tag: value}`` (the event with the largest step, ties broken by wall time, across all
        event files), or ``None`` when there is no event file.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    root = Path(log_dir)
    if not root.is_dir():
        return None
    dirs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not dirs:
        return None
    guidance = {
        ea.SCALARS: 0,
        ea.IMAGES: 1,
        ea.HISTOGRAMS: 1,
        ea.TENSORS: 1,
        ea.AUDIO: 1,
        ea.COMPRESSED_HISTOGRAMS: 1,
    }
    last: dict[str, tuple[int, float, float]] = {}
    for directory in dirs:
        acc = ea.EventAccumulator(str(directory), size_guidance=guidance)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                key = (event.step, event.wall_time)
                if tag not in last or key >= last[tag][:2]:
                    last[tag] = (event.step, event.wall_time, float(event.value))
    return {tag: value for tag, (_, _, value) in last.items()}


def swept_keys(overrides: Sequence[dict[str, str]]) -> list[str]:
    """Override keys whose values differ across runs (absent counts as a value), in order."""
    keys: list[str] = []
    for item in overrides:
        keys.extend(k for k in item if k not in keys)
    return [k for k in keys if len({item.get(k) for item in overrides}) > 1]


def collect(sweep_dir: str | Path, metrics: Sequence[str] = DEFAULT_METRICS) -> Report:
    """Read every run of a sweep (no files written).

    Args:
        sweep_dir: a multirun dir (or a single run's dir).
        metrics: metric names (TensorBoard scalar tags) to report.

    Returns:
        A :class:`Report` without files.
    """
    root = Path(sweep_dir)
    runs: list[RunResult] = []
    for run_dir in find_runs(root):
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        overrides = read_overrides(run_dir)
        try:
            scalars = read_last_scalars(run_dir / "tensorboard")
        except Exception as err:  # noqa: BLE001 - a broken file must not stop the report
            log.warning("run %s: cannot read its TensorBoard events: %s", run_dir, err)
            runs.append(RunResult(name, run_dir, overrides, {}, f"unreadable events: {err}"))
            continue
        if scalars is None:
            log.warning(
                "run %s has no TensorBoard events under %s (crashed, fast_dev_run, or no "
                "tensorboard logger); its metrics are reported as missing",
                run_dir,
                run_dir / "tensorboard",
            )
            runs.append(RunResult(name, run_dir, overrides, {}, "no events"))
            continue
        found = {m: scalars[m] for m in metrics if m in scalars}
        status = "ok" if len(found) == len(metrics) else "incomplete"
        if status != "ok":
            log.warning("run %s never logged %s", run_dir, [m for m in metrics if m not in scalars])
        runs.append(RunResult(name, run_dir, overrides, found, run_status(run_dir) or status))
    best = None
    results = root / "optimization_results.yaml"
    if results.is_file():
        best = yaml.safe_load(results.read_text()) or {}
        _apply_trial_states(runs, best.get("trials") or [])
    keys = [k for k in swept_keys([r.overrides for r in runs]) if not k.startswith(TRIAL_PREFIX)]
    return Report(root, runs, keys, tuple(metrics), best=best, log_keys=_log_scale_keys(root))


def _load_study(sweep_dir: Path) -> Any | None:
    """The Optuna study in ``<sweep_dir>/optuna.db``, or None (no file, or Optuna missing)."""
    db = sweep_dir / "optuna.db"
    if not db.is_file():
        return None
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    names = optuna.get_all_study_names(storage=storage)
    if not names:
        return None
    return optuna.load_study(study_name=names[0], storage=storage)


def _log_scale_keys(sweep_dir: Path) -> set[str]:
    """Parameters an Optuna study in the sweep dir searched on a log scale."""
    try:
        study = _load_study(sweep_dir)
    except Exception as err:  # noqa: BLE001 - a broken study must not stop the report
        log.warning("cannot read %s: %s", sweep_dir / "optuna.db", err)
        return set()
    if study is None:
        return set()
    keys: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        keys |= {k for k, d in trial.distributions.items() if getattr(d, "log", False)}
    return keys


def run_status(run_dir: Path) -> str | None:
    """The outcome ``src.train`` wrote to ``<run>/status.json`` when it was not ``ok``.

    Returns:
        ``"diverged at step N"``, ``"interrupted (SIGTERM)"``, ``"failed: <reason>"``, or
        ``None`` for a run that ended normally or wrote no status.
    """
    path = run_dir / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable status.json: {err}"
    state = status.get("status")
    if state == "diverged":
        step = status.get("step")
        return "diverged" if step is None else f"diverged at step {step}"
    if state == "interrupted":
        return f"interrupted ({status.get('signal', 'signal')})"
    if state == "failed":
        reason = " ".join(str(status.get("message") or "unknown reason").split())
        return f"failed: {reason[:200]}"
    return None


def trial_status(trial: dict[str, Any]) -> str | None:
    """A run status for an Optuna trial of ``optimization_results.yaml`` (``None``: COMPLETE).

    Args:
        trial: one entry of its ``trials`` list (``number``, ``state``, optional ``last_step``
            and ``reason``).
    """
    state = str(trial.get("state", "")).upper()
    if state == "PRUNED":
        step = trial.get("last_step")
        return "pruned" if step is None else f"pruned at epoch {step}"
    if state == "FAIL":
        reason = " ".join(str(trial.get("reason") or "unknown reason").split())
        return f"failed: {reason[:200]}"
    if state in ("RUNNING", "WAITING"):
        return "running"
    return None


def _apply_trial_states(runs: list[RunResult], trials: Sequence[dict[str, Any]]) -> None:
    """Set the status of each run whose dir name is a trial number that did not complete."""
    by_number = {str(t.get("number")): t for t in trials if isinstance(t, dict)}
    for run in runs:
        trial = by_number.get(run.path.name)
        status = trial_status(trial) if trial is not None else None
        if status is not None:
            run.status = status


# ------------------------------------------------------------------------------------ writing
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return MISSING if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _table_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _markdown(report: Report) -> str:
    keys = report.swept_keys
    header = ["run", *keys, *report.metrics, "status"]
    rows = report.rows()
    best = report.best_index(rows)
    lines = [
        f"# Sweep report: {report.sweep_dir}",
        "",
        f"{len(report.runs)} runs; swept: "
        + (", ".join(f"`{k}`" for k in keys) if keys else "nothing (all runs alike)")
        + ". Metrics: the last value logged to TensorBoard."
        + (
            f" **best** marks the run with the "
            f"{'largest' if report.best_mode == 'max' else 'smallest'} `{report.best_metric}`."
            if best is not None
            else ""
        ),
        "",
        _table_line(header),
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    for i, row in enumerate(rows):
        cells = [_fmt(row[h]) for h in header]
        if i == best:
            cells[0] = f"**{cells[0]}** best"
        lines.append(_table_line(cells))
    if report.seeded:
        groups = report.groups()
        top = report.best_index(groups)
        gkeys = report.group_keys
        lines += [
            "",
            f"## Mean ± standard deviation over seeds ({SEED_KEY} = "
            + ", ".join(str(s) for s in groups[0]["seeds"])
            + " in the first setting; sample std, n - 1)",
            "",
            _table_line([*gkeys, "n", *report.metrics])
            if gkeys
            else _table_line(["n", *report.metrics]),
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
            if i == top:
                cells[0] = f"**{cells[0]}** best"
            lines.append(_table_line(cells))
    missing = report.missing
    if missing:
        lines += ["", "Runs with missing metrics:", ""]
        lines += [f"- `{r.path}`: {r.status}" for r in missing]
    if report.best:
        summary = {k: v for k, v in report.best.items() if k != "trials"}
        states: dict[str, int] = {}
        for trial in report.best.get("trials") or []:
            state = str(trial.get("state"))
            states[state] = states.get(state, 0) + 1
        if states:
            summary["trial_states"] = states
        lines += ["", "Optuna (`optimization_results.yaml`):", "", "```yaml"]
        lines += [yaml.safe_dump(summary, sort_keys=False).rstrip(), "```"]
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


def _axis_values(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """X positions of the values, and tick labels when they are not all numbers."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels: list[str] = []
    for v in values:
        if str(v) not in labels:
            labels.append(str(v))
    return [float(labels.index(str(v))) for v in values], labels


def _series(report: Report, key: str, metric: str) -> dict[str, Any]:
    """The points of one panel: x values, means, standard deviations (NaN: one run), labels."""
    items = report.groups() if report.seeded else report.rows()
    raw = [item["run"] if key == "run" else item.get(key) for item in items]
    xs, labels = _axis_values(raw)
    ys = [float(item[metric]) for item in items]
    errs = [float(item.get(f"{metric} std", math.nan)) for item in items]
    keep = [i for i, y in enumerate(ys) if math.isfinite(y)]
    return {
        "x": [xs[i] for i in keep],
        "y": [ys[i] for i in keep],
        "err": [errs[i] for i in keep],
        "labels": labels,
        "log": key in report.log_keys
        or (labels is None and bool(xs) and min(xs) > 0 and max(xs) / min(xs) >= 20),
    }


def _draw_panel(ax: Any, report: Report, key: str, metric: str) -> None:
    """One metric against one swept key: points with error bars and their values, not joined."""
    data = _series(report, key, metric)
    xs, ys, errs = data["x"], data["y"], data["err"]
    if not xs:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    else:
        bars = [0.0 if math.isnan(e) else e for e in errs]
        ax.errorbar(xs, ys, yerr=bars, fmt="o", capsize=3, elinewidth=1.2, markersize=5)
        for x, y, e in zip(xs, ys, errs, strict=True):
            text = f"{y:.3g}" if math.isnan(e) else f"{y:.3g}±{e:.1g}"
            ax.annotate(
                text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8, clip_on=False
            )
        low = min(y - b for y, b in zip(ys, bars, strict=True))
        high = max(y + b for y, b in zip(ys, bars, strict=True))
        if low >= 0:  # non-negative metric: from 0, so that tiny differences look tiny
            ax.set_ylim(0, high * 1.25 if high > 0 else 1.0)
    if data["labels"] is not None:
        ax.set_xticks(range(len(data["labels"])), data["labels"], rotation=20, ha="right")
        ax.set_xlim(-0.5, len(data["labels"]) - 0.5)
    else:
        if data["log"]:
            ax.set_xscale("log")
        elif len(xs) == 1:
            ax.set_xlim(xs[0] - 1, xs[0] + 1)
        if 0 < len(set(xs)) <= 8:  # ticks at the swept values themselves
            ticks = sorted(set(xs))
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel(key + (" (log scale)" if data["log"] and data["labels"] is None else ""))
    seeds = " (mean ± std over seeds)" if report.seeded else ""
    ax.set_ylabel(metric + ("\n" + seeds.strip(" ()") if seeds else ""))
    ax.margins(x=0.15)


def metric_figure(report: Report, metric: str, key: str) -> Any:
    """One metric against one swept key, half a page wide (3.4 in): a matplotlib ``Figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from src.viz.style import HALF_PAGE_WIDTH_IN, paper_style

    with paper_style():
        fig = Figure(figsize=(HALF_PAGE_WIDTH_IN, 2.6), layout="constrained")
        FigureCanvasAgg(fig)
        _draw_panel(fig.subplots(), report, key, metric)
    return fig


def _panels(report: Report) -> list[tuple[str, str]]:
    keys = report.group_keys or ["run"]
    return [(m, k) for m in report.metrics for k in keys]


def _plot(report: Report, path: Path) -> dict[str, Path]:
    """The overview figure (``report.png`` + ``.pdf``) and one half-page figure per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from src.viz.style import paper_style, save_figure

    panels = _panels(report)
    keys = report.group_keys or ["run"]
    if len(keys) == 1:
        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        cells = [(m, k, divmod(i, ncols)) for i, (m, k) in enumerate(panels)]
    else:
        ncols, nrows = len(keys), len(report.metrics)
        cells = [(m, k, (i, j)) for i, m in enumerate(report.metrics) for j, k in enumerate(keys)]
    files: dict[str, Path] = {}
    with paper_style():
        fig = Figure(figsize=(3.4 * ncols, 2.7 * nrows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat[len(cells) :]:
            ax.set_visible(False)
        for metric, key, (i, j) in cells:
            _draw_panel(axes[i][j], report, key, metric)
        fig.suptitle(f"{report.sweep_dir.name}: final metrics vs {', '.join(keys)}")
        written = save_figure(fig, path, dpi=150)
        files["png"], files["pdf"] = written["png"], written["pdf"]
        for metric, key in panels:
            single = metric_figure(report, metric, key)
            stem = f"{metric}_vs_{key}".replace("/", "_")
            out = save_figure(single, path.parent / "figures" / f"{stem}.png", dpi=300)
            files[f"figure:{stem}"] = out["png"]
    return files


def _optuna_plots(report: Report, out: Path) -> dict[str, Path]:
    """Optuna's optimization-history and parameter-importance plots of the sweep's study."""
    import warnings

    try:
        study = _load_study(report.sweep_dir)
    except Exception as err:  # noqa: BLE001 - a broken study must not stop the report
        log.warning("cannot read %s: %s", report.sweep_dir / "optuna.db", err)
        return {}
    if study is None:
        return {}
    import optuna
    from matplotlib import pyplot as plt

    from src.viz.style import paper_style, save_figure

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    files: dict[str, Path] = {}
    plots = {
        "optuna_history": optuna.visualization.matplotlib.plot_optimization_history,
        "optuna_importance": optuna.visualization.matplotlib.plot_param_importances,
    }
    for name, plot in plots.items():
        if not complete or (name == "optuna_importance" and len(complete) < 2):
            log.info(
                "%s: not enough complete trials (%d) for %s", study.study_name, len(complete), name
            )
            continue
        with warnings.catch_warnings(), paper_style():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                ax = plot(study)
            except Exception as err:  # noqa: BLE001 - e.g. a search space of one value
                log.warning("Optuna's %s plot failed: %s", name, err)
                continue
            fig = ax.get_figure()
            fig.set_size_inches(5.0, 3.4)
            ax.set_title(ax.get_title(), fontsize=9)
            written = save_figure(fig, out / f"{name}.png", dpi=200)
            plt.close(fig)
        files[name] = written["png"]
        files[f"{name}_pdf"] = written["pdf"]
    return files


def write_report(report: Report, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (default: the sweep dir); see the module docstring.

    Returns:
        ``{"markdown", "csv", "png", "pdf", ...: path}`` (also stored in ``report.files``):
        ``mean_std_csv`` for seeded sweeps, ``figure:<metric>_vs_<key>`` per panel, and
        ``optuna_history`` / ``optuna_importance`` for an Optuna search.
    """
    out = Path(out_dir) if out_dir is not None else report.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    files = {"markdown": out / "report.md", "csv": out / "report.csv"}
    files["markdown"].write_text(_markdown(report))
    _write_csv(report, files["csv"])
    if report.seeded:
        files["mean_std_csv"] = out / "report_mean_std.csv"
        _write_mean_std_csv(report, files["mean_std_csv"])
    files.update(_plot(report, out / "report.png"))
    files.update(_optuna_plots(report, out))
    report.files = files
    log.info("Wrote %s", ", ".join(str(p) for p in files.values()))
    return files


def make_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
) -> Report:
    """Read a sweep and write its report (see the module docstring).

    Args:
        sweep_dir: ``outputs/multirun/<date_time>`` (or one run's dir).
        out_dir: where to write; default ``sweep_dir``.
        metrics: TensorBoard scalar tags to report.

    Returns:
        The :class:`Report`, with ``files`` set.

    Raises:
        FileNotFoundError: ``sweep_dir`` is missing or holds no run.
    """
    report = collect(sweep_dir, metrics)
    write_report(report, out_dir)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m src.report SWEEP_DIR [--out DIR] [--metrics M ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m src.report",
        description="Tabulate and plot the final metrics of a Hydra sweep against its swept "
        "values (report.md, report.csv, report.png).",
    )
    parser.add_argument("sweep_dir", help="a multirun dir, e.g. outputs/multirun/<date_time>")
    parser.add_argument("--out", default=None, help="output dir (default: the sweep dir)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=list(DEFAULT_METRICS),
        help="TensorBoard scalar tags to report (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    try:
        report = make_report(args.sweep_dir, args.out, args.metrics)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for kind in ("markdown", "csv", "png"):  # the others are logged by write_report
        print(report.files[kind])
    return 0


if __name__ == "__main__":
    sys.exit(main())
