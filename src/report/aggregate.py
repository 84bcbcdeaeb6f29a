"""A sweep's runs as one :class:`Report`: swept keys, seed aggregates, the best run and ties.

:func:`collect` reads a sweep (through :mod:`src.report.read`) into a :class:`Report`; nothing
here writes or draws. Ties are never broken silently: :meth:`Report.best` returns every row that
shares the best value, and an all-equal column has no best at all.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from src.report.read import (
    TRIAL_PREFIX,
    RunResult,
    StudyInfo,
    find_runs,
    job_error,
    metric_values,
    parse_value,
    read_last_scalars,
    read_overrides,
    read_results,
    read_study,
    run_status,
    swept_keys,
    trial_status,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS",
    "SEED_KEY",
    "Best",
    "Report",
    "collect",
    "is_nonnegative",
    "sample_std",
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

#: the key whose values are aggregated into mean and standard deviation.
SEED_KEY = "seed"

#: metric names that can never be negative (AP, mAP, recall, losses, error rates, MAE, IoU).
_NONNEGATIVE = re.compile(r"(^|[/_])(m?AP|AR|recall|precision|loss|.*_loss|.*err|.*mae|iou)", re.I)

#: statuses of runs that failed (a pruned run, or one without TensorBoard events, did not).
_FAILED_PREFIXES = ("failed", "diverged", "interrupted", "unreadable")


def sample_std(values: Sequence[float]) -> float:
    """Sample standard deviation (``n - 1`` in the denominator); NaN for fewer than 2 values."""
    if len(values) < 2:
        return math.nan
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def is_nonnegative(metric: str) -> bool:
    """True for metrics that cannot be negative by definition (``val/mAP_50``, ``val/loss``...).

    Their plots start the y axis at 0 and clip the lower error bar at 0.
    """
    return bool(_NONNEGATIVE.search(metric.rsplit("/", 1)[-1]))


@dataclass(frozen=True)
class Best:
    """The best rows of a table by one metric.

    Attributes:
        indices: the rows sharing the best value (several: a tie); empty when no row has a
            finite value or when every row has the same value (nothing is best).
        value: the best value (NaN when no row has a finite value).
        compared: how many rows had a finite value.
    """

    indices: tuple[int, ...]
    value: float
    compared: int

    @property
    def tie(self) -> bool:
        """Several rows share the best value (not all of them)."""
        return len(self.indices) > 1

    @property
    def all_equal(self) -> bool:
        """Two or more rows were compared and all have the same value: no best."""
        return self.compared > 1 and not self.indices and math.isfinite(self.value)

    def mark(self, index: int) -> str | None:
        """``"best"``, ``"tied best"`` or ``None`` for row ``index``."""
        if index not in self.indices:
            return None
        return "tied best" if self.tie else "best"


@dataclass
class Report:
    """A sweep's summary (see :func:`collect`).

    Attributes:
        sweep_dir: the sweep dir read.
        runs: the runs, in job order.
        swept_keys: override keys whose values differ across runs, in first-seen order.
        metrics: the reported metric names.
        files: ``{"markdown" | "csv" | "png" | ...: path}`` once written.
        best: the Optuna sweeper's ``optimization_results.yaml`` content, if any.
        log_keys: parameters an Optuna study searched on a log scale.
        best_metric: the metric that picks the best run.
        best_mode: ``"max"`` or ``"min"``.
        study: the Optuna study (``optuna.db``) as plain values, if any.
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
    study: StudyInfo | None = None

    @property
    def group_keys(self) -> list[str]:
        """The swept keys other than ``seed``: the settings compared."""
        return [k for k in self.swept_keys if k != SEED_KEY]

    @property
    def seeded(self) -> bool:
        """True when runs differ in ``seed``: metrics are aggregated over seeds."""
        return SEED_KEY in self.swept_keys

    @property
    def optuna_keys(self) -> set[str]:
        """Parameters an Optuna study sampled (continuous values: no ticks at the values)."""
        if self.study is None:
            return set()
        return {p for t in self.study.trials for p in t.params}

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

    def groups(self) -> list[dict[str, Any]]:
        """Runs that differ only in ``seed``, aggregated.

        Returns:
            One dict per setting, in first-seen order: the group keys' values, ``n`` (runs),
            ``seeds``, and per metric ``<metric>`` (mean over the runs that logged it, NaN if
            none), ``<metric> std`` (sample standard deviation, ``n - 1`` in the denominator;
            NaN for fewer than 2 values) and ``<metric> n`` (runs that logged it).
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
                group[f"{metric} std"] = sample_std(values)
                group[f"{metric} n"] = len(values)
            groups.append(group)
        return groups

    def best_rows(self, rows: list[dict[str, Any]]) -> Best:
        """The rows with the best :attr:`best_metric` (``max`` or ``min``); ties kept.

        Args:
            rows: :meth:`rows` or :meth:`groups`.

        Returns:
            A :class:`Best`: every row equal to the best value (several on a tie), none when
            all compared rows are equal or none has a finite value.
        """
        scored = [
            (float(r[self.best_metric]), i)
            for i, r in enumerate(rows)
            if self.best_metric in r and math.isfinite(float(r[self.best_metric]))
        ]
        if not scored:
            return Best((), math.nan, 0)
        values = [v for v, _ in scored]
        top = max(values) if self.best_mode == "max" else min(values)
        tied = tuple(i for v, i in scored if v == top)
        if len(scored) > 1 and len(tied) == len(scored):
            return Best((), top, len(scored))
        return Best(tied, top, len(scored))

    @property
    def missing(self) -> list[RunResult]:
        """Runs lacking at least one reported metric."""
        return [r for r in self.runs if any(m not in r.metrics for m in self.metrics)]

    @property
    def failed(self) -> list[RunResult]:
        """Runs that failed, diverged, were interrupted or whose events cannot be read."""
        return [r for r in self.runs if r.status.startswith(_FAILED_PREFIXES)]

    @property
    def all_failed(self) -> bool:
        """True when every run of the sweep failed (see :attr:`failed`)."""
        return bool(self.runs) and len(self.failed) == len(self.runs)

    def failure_lines(self) -> list[str]:
        """One line per failed run: ``run 3 (<path>): failed: ValueError: ...``."""
        return [f"run {run.name} ({run.path}): {run.status}" for run in self.failed]


def _trial_states(results: dict[str, Any] | None) -> dict[str, str]:
    """``{trial number: run status}`` of the trials that did not complete (``{}``: none)."""
    states: dict[str, str] = {}
    for trial in (results or {}).get("trials") or []:
        status = trial_status(trial) if isinstance(trial, dict) else None
        if status is not None:
            states[str(trial.get("number"))] = status
    return states


def collect(sweep_dir: str | Path, metrics: Sequence[str] = DEFAULT_METRICS) -> Report:
    """Read every run of a sweep (no files written).

    Args:
        sweep_dir: a multirun dir (or a single run's dir).
        metrics: metric names (TensorBoard scalar tags) to report.

    Returns:
        A :class:`Report` without files.

    Raises:
        FileNotFoundError: ``sweep_dir`` is missing or holds no run.
    """
    root = Path(sweep_dir)
    best = read_results(root)
    trials = _trial_states(best)  # Optuna's word on a trial comes first
    runs: list[RunResult] = []
    for run_dir in find_runs(root):
        name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
        overrides = read_overrides(run_dir)
        ended = trials.get(run_dir.name) or run_status(run_dir)
        try:
            scalars = read_last_scalars(run_dir / "tensorboard")
        except Exception as err:  # noqa: BLE001 - a broken file must not stop the report
            log.warning("run %s: cannot read its TensorBoard events: %s", run_dir, err)
            runs.append(
                RunResult(name, run_dir, overrides, {}, ended or f"unreadable events: {err}")
            )
            continue
        if scalars is None and ended is None:
            error = job_error(run_dir)  # no status.json: killed, or failed before src.train
            ended = f"failed: {error} (from the job log)" if error else None
        if scalars is None:
            if ended is None:
                log.warning(
                    "run %s has no TensorBoard events under %s (crashed, fast_dev_run, or no "
                    "tensorboard logger); its metrics are reported as missing",
                    run_dir,
                    run_dir / "tensorboard",
                )
            runs.append(RunResult(name, run_dir, overrides, {}, ended or "no events"))
            continue
        found = metric_values(scalars, metrics)
        status = "ok" if len(found) == len(metrics) else "incomplete"
        if status != "ok" and ended is None:
            log.warning("run %s never logged %s", run_dir, [m for m in metrics if m not in found])
        runs.append(RunResult(name, run_dir, overrides, found, ended or status))
    study = read_study(root)
    keys = [k for k in swept_keys([r.overrides for r in runs]) if not k.startswith(TRIAL_PREFIX)]
    return Report(
        root,
        runs,
        keys,
        tuple(metrics),
        best=best,
        log_keys=set(study.log_keys) if study is not None else set(),
        study=study,
    )
