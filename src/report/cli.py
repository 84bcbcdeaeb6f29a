"""Command line of ``python -m src.report`` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from src.report.aggregate import DEFAULT_METRICS, Report, collect
from src.report.write import write_report
from src.utils.console import quiet_library_loggers

log = logging.getLogger(__name__)

__all__ = ["make_report", "main"]


def make_report(
    sweep_dir: str | Path,
    out_dir: str | Path | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    figures: bool = True,
) -> Report:
    """Read a sweep and write its report (see the package docstring).

    Args:
        sweep_dir: ``outputs/multirun/<date_time>`` (or one run's dir).
        out_dir: where to write; default ``sweep_dir``.
        metrics: TensorBoard scalar tags to report.
        figures: draw the figures too (``False``: ``report.md`` and the CSV files only).

    Returns:
        The :class:`~src.report.aggregate.Report`, with ``files`` set.

    Raises:
        FileNotFoundError: ``sweep_dir`` is missing or holds no run.
    """
    report = collect(sweep_dir, metrics)
    write_report(report, out_dir, figures=figures)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m src.report SWEEP_DIR [--out DIR] [--metrics M ...] [--no-figures]``.

    Returns:
        0; 2 for a bad sweep dir; 1 when every run of the sweep failed (each run's error is
        listed on stderr; the report is written all the same).
    """
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
    parser.add_argument(
        "--no-figures",
        action="store_true",
        help="write report.md and the CSV files only (no PNG/PDF figures)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_loggers()
    try:
        report = make_report(args.sweep_dir, args.out, args.metrics, not args.no_figures)
    except (FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    for kind in ("markdown", "csv", "png"):  # the others are logged by write_report
        if kind in report.files:
            sys.stdout.write(f"{report.files[kind]}\n")
    if report.all_failed:
        lines = "\n".join(f"  {line}" for line in report.failure_lines())
        log.error(
            "every run of %s failed (%d of %d); nothing to compare:\n%s",
            report.sweep_dir,
            len(report.runs),
            len(report.runs),
            lines,
        )
        return 1
    return 0
