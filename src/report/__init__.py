"""Summarise a Hydra sweep: ``python -m src.report outputs/multirun/<date_time> [--out DIR]``.

Every run of the sweep (a job dir with ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and
TensorBoard events under ``tensorboard/``) becomes one row. The *swept keys* are the override
keys whose values differ across runs (``loss.sigma`` for ``loss.sigma=0.5,1,10``; every Optuna
parameter for ``hparams_search=banana_optuna``). The final value of each metric is the last value
logged to TensorBoard (largest step, then latest write). Written into the sweep dir (or
``--out``):

* ``report.md``: a Markdown table, one row per run, the swept values and the final metrics, the
  best run (the largest ``val/mAP_50``) marked **best**; runs that tie for the best value are
  all marked **tied best**, and when every run has the same value none is marked (the text
  says so). When the runs differ in ``seed`` as well (``-m seed=1,2,3 loss.sigma=0.5,1,10``), a
  second table with the mean and the sample standard deviation (``n - 1``) of each metric over
  the seeds of each setting;
* ``report.csv``: the per-run table (empty cells for missing values), and
  ``report_mean_std.csv`` with the seed aggregates;
* ``report.png`` / ``report.pdf``: each metric against each swept value (mean with a standard
  deviation error bar over seeds, cut at 0 for metrics that cannot be negative, as the caption
  says; values written next to the points where they fit; points are not joined; a log axis for
  a parameter searched on a log scale; the y axis starts at 0 for non-negative metrics so that
  tiny differences do not look steep), and one half-page-wide figure per metric under
  ``figures/`` (PNG + PDF, fonts of at least 8 pt at 3.4 inches wide);
* for an Optuna search (``optuna.db`` in the sweep dir): ``optuna_history.png`` (the objective
  of every completed trial and the best so far; pruned and failed trials marked) and
  ``optuna_importance.png`` (+ PDF; parameter importances, only when they are defined: at least
  two completed trials whose values differ; otherwise ``report.md`` says why in one line).

Runs without events (crashed, ``fast_dev_run``, or no TensorBoard logger) are listed with their
metrics marked ``missing``; they do not stop the report. The status column says how each run
ended: ``status.json`` (``diverged at step N``, ``interrupted (SIGTERM)``, ``failed: <reason>``)
and, for an Optuna search, the trial states in the sweeper's ``optimization_results.yaml``
(``pruned at epoch N``, ``failed: <reason>``); the per-trial ``optuna_trial.*`` overrides are not
swept keys. When no run logged any reported metric (every job failed), the report is written, each
run's error is listed on stderr and the command exits with status 1.

Modules: :mod:`src.report.read` (files to plain values), :mod:`src.report.aggregate` (the
:class:`Report`, seed aggregates, best run and ties), :mod:`src.report.write` (Markdown, CSV,
figures drawn by :mod:`src.viz.report`), :mod:`src.report.cli` (the command line).
"""

from src.report.aggregate import DEFAULT_METRICS, SEED_KEY, Best, Report, collect
from src.report.cli import main, make_report
from src.report.read import (
    RunResult,
    StudyInfo,
    TrialInfo,
    find_runs,
    job_error,
    parse_value,
    read_last_scalars,
    read_overrides,
    read_study,
    run_status,
    swept_keys,
    trial_status,
)
from src.report.write import (
    metric_figure,
    overview_figure,
    panel_of,
    study_figures,
    write_report,
)

__all__ = [
    "DEFAULT_METRICS",
    "SEED_KEY",
    "Best",
    "RunResult",
    "Report",
    "StudyInfo",
    "TrialInfo",
    "find_runs",
    "job_error",
    "parse_value",
    "read_overrides",
    "read_last_scalars",
    "read_study",
    "run_status",
    "swept_keys",
    "collect",
    "write_report",
    "make_report",
    "metric_figure",
    "overview_figure",
    "panel_of",
    "study_figures",
    "trial_status",
    "main",
]
