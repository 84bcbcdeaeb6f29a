"""``src.report`` on hand-made sweep dirs (TensorBoard events written with SummaryWriter)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml
from torch.utils.tensorboard import SummaryWriter

from src.report import DEFAULT_METRICS, collect, main, make_report, swept_keys


def make_run(
    run_dir: Path, overrides: list[str], scalars: dict[str, list[tuple[int, float]]] | None
) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("task_name: train\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if scalars is not None:
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        for tag, values in scalars.items():
            for step, value in values:
                writer.add_scalar(tag, value, step)
        writer.close()
    return run_dir


def full_metrics(base: float) -> dict[str, list[tuple[int, float]]]:
    return {m: [(0, 9.0), (3, base + i / 10)] for i, m in enumerate(DEFAULT_METRICS)}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2024-01-01_00-00-00"
    for job, sigma in enumerate(["0.5", "1", "10"]):
        make_run(
            root / str(job),
            ["loss=smooth_l1", f"loss.sigma={sigma}", "data.batch_size=4"],
            full_metrics(job),
        )
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_table_csv_and_plot(sweep: Path) -> None:
    report = make_report(sweep)
    assert report.swept_keys == ["loss.sigma"]
    rows = report.rows()
    assert [r["loss.sigma"] for r in rows] == [0.5, 1, 10]
    for job, row in enumerate(rows):
        for i, metric in enumerate(DEFAULT_METRICS):
            assert row[metric] == pytest.approx(job + i / 10)  # the last step's value
    md = (sweep / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header + 3 runs
    assert "loss.sigma" in table[0] and "val/mAP_50" in table[0]
    assert "data.batch_size" not in md  # not swept
    with (sweep / "report.csv").open() as fh:
        records = list(csv.DictReader(fh))
    assert [r["loss.sigma"] for r in records] == ["0.5", "1", "10"]
    assert float(records[2]["val/loss"]) == pytest.approx(2 + 0.5)
    assert (sweep / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert report.files["markdown"] == sweep / "report.md"


def test_runs_without_events_are_reported_missing(sweep: Path, tmp_path: Path) -> None:
    make_run(sweep / "3", ["loss=smooth_l1", "loss.sigma=100", "data.batch_size=4"], None)
    partial = {"val/mAP_50": [(0, 0.5)]}
    make_run(sweep / "4", ["loss=smooth_l1", "loss.sigma=1000", "data.batch_size=4"], partial)
    report = make_report(sweep, out_dir=tmp_path / "out")
    status = {r.name: r.status for r in report.runs}
    assert status == {"0": "ok", "1": "ok", "2": "ok", "3": "no events", "4": "incomplete"}
    rows = report.rows()
    assert all(math.isnan(rows[3][m]) for m in DEFAULT_METRICS)
    assert rows[4]["val/mAP_50"] == 0.5 and math.isnan(rows[4]["val/loss"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "missing" in md and "no events" in md and str(sweep / "3") in md
    assert (tmp_path / "out" / "report.png").is_file()
    assert not (sweep / "report.md").exists()


def test_job_order_is_numeric_and_group_overrides_count(tmp_path: Path) -> None:
    for job in range(11):
        loss = "focal" if job % 2 else "l1"
        make_run(tmp_path / str(job), [f"loss={loss}", "+trainer.max_epochs=1"], None)
    report = collect(tmp_path)
    assert [r.name for r in report.runs] == [str(i) for i in range(11)]
    assert report.swept_keys == ["loss"]
    assert report.runs[0].overrides == {"loss": "l1", "trainer.max_epochs": "1"}


def test_swept_keys_include_keys_set_in_some_runs_only() -> None:
    runs = [{"a": "1", "b": "x"}, {"a": "1", "b": "y", "c": "2"}, {"a": "1", "b": "x"}]
    assert swept_keys(runs) == ["b", "c"]
    assert swept_keys([{"a": "1"}]) == []


def test_single_run_dir(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", ["loss=l1"], full_metrics(0))
    report = make_report(run, figures=False)
    assert len(report.runs) == 1 and report.swept_keys == []
    assert (run / "report.md").is_file()


def test_clear_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no runs found under .*empty"):
        make_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert [r.levelname for r in caplog.records if "no runs found" in r.getMessage()] == ["ERROR"]


def test_cli_prints_the_files(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(sweep), "--metrics", "val/mAP_50", "val/loss"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(sweep / f"report.{ext}") for ext in ("md", "csv", "png")]
    header = (sweep / "report.csv").read_text().splitlines()[0]
    assert header == "run,loss.sigma,val/mAP_50,val/loss,status"


def test_diverged_and_interrupted_runs_are_marked(sweep: Path) -> None:
    import json

    from src.utils.faults import write_status

    write_status(sweep / "0", "ok", metrics={"val/mAP_50": 0.5})
    write_status(sweep / "1", "diverged", message="training diverged at global step 7", step=7)
    (sweep / "2" / "status.json").write_text(
        json.dumps({"status": "interrupted", "signal": "SIGTERM"})
    )
    rows = {r["run"]: r["status"] for r in make_report(sweep, figures=False).rows()}
    assert rows == {"0": "ok", "1": "diverged at step 7", "2": "interrupted (SIGTERM)"}
    assert "diverged at step 7" in (sweep / "report.md").read_text()


# ------------------------------------------------------------------ seeds, best run, figures
def seeded_sweep(root: Path) -> Path:
    """2 sigmas x 3 seeds; val/mAP_50 = sigma_base + seed / 100, val/loss = 1 / seed."""
    job = 0
    for sigma, base in (("0.5", 0.2), ("10", 0.6)):
        for seed in (1, 2, 3):
            scalars = {
                "val/mAP_50": [(0, 0.0), (5, base + seed / 100)],
                "val/loss": [(5, 1 / seed)],
            }
            make_run(root / str(job), [f"seed={seed}", f"loss.sigma={sigma}"], scalars)
            job += 1
    return root


def test_seeds_are_aggregated_into_mean_and_sample_std(tmp_path: Path) -> None:
    root = seeded_sweep(tmp_path / "sweep")
    report = make_report(root, metrics=["val/mAP_50", "val/loss"])
    assert report.swept_keys == ["seed", "loss.sigma"] and report.group_keys == ["loss.sigma"]
    groups = report.groups()
    assert [g["loss.sigma"] for g in groups] == [0.5, 10]
    assert [g["n"] for g in groups] == [3, 3] and groups[0]["seeds"] == [1, 2, 3]
    # by hand: mean of 0.21, 0.22, 0.23 = 0.22; sample std = sqrt((1e-4 + 0 + 1e-4) / 2) = 0.01
    assert groups[0]["val/mAP_50"] == pytest.approx(0.22)
    assert groups[0]["val/mAP_50 std"] == pytest.approx(0.01)
    assert groups[1]["val/mAP_50"] == pytest.approx(0.62)
    # 1, 1/2, 1/3: mean 11/18; std = sqrt(((7/18)^2 + (1/9)^2 + (5/18)^2) / 2)
    assert groups[1]["val/loss"] == pytest.approx(11 / 18)
    expected = math.sqrt(((7 / 18) ** 2 + (2 / 18) ** 2 + (5 / 18) ** 2) / 2)
    assert groups[1]["val/loss std"] == pytest.approx(expected)
    md = (root / "report.md").read_text()
    assert "| **10** best | 3 | 0.62 ± 0.01 |" in md
    with report.files["mean_std_csv"].open() as fh:
        records = list(csv.DictReader(fh))
    assert float(records[0]["val/mAP_50 std"]) == pytest.approx(0.01)
    assert report.files["pdf"].read_bytes()[:4] == b"%PDF"


def test_best_run_is_marked_once(sweep: Path) -> None:
    make_report(sweep, figures=False)
    rows = [line for line in (sweep / "report.md").read_text().splitlines() if "best |" in line]
    assert rows == [rows[0]] and rows[0].startswith("| **2** best | 10 |")  # largest val/mAP_50


def test_figures_are_legible_at_half_a_page(tmp_path: Path) -> None:
    from src.report import metric_figure
    from src.viz.style import smallest_font_at

    report = make_report(seeded_sweep(tmp_path / "sweep"), metrics=["val/mAP_50", "val/loss"])
    fig = metric_figure(report, "val/mAP_50", "loss.sigma")
    assert smallest_font_at(fig) >= 8.0
    ax = fig.axes[0]
    # 0.5 and 10 span a factor of 20: a log axis
    assert ax.get_xlabel() == "loss.sigma (log scale)" and ax.get_xscale() == "log"
    assert ax.get_ylabel().startswith("val/mAP_50")
    assert ax.get_ylim()[0] == 0.0  # no auto-zoom onto tiny differences
    joined = [ln for ln in ax.get_lines() if ln.get_linestyle() not in ("None", "")]
    assert not [ln for ln in joined if len(ln.get_xdata()) > 1]  # points are not joined
    assert {t.get_text() for t in ax.texts} == {"0.22±0.01", "0.62±0.01"}
    for stem in ("val_mAP_50_vs_loss.sigma", "val_loss_vs_loss.sigma"):
        assert (tmp_path / "sweep" / "figures" / f"{stem}.pdf").is_file()


def test_optuna_study_gives_log_axis_and_optuna_plots(tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    root = tmp_path / "search"
    lrs = [1e-4, 1e-3, 1e-2]
    for number, lr in enumerate(lrs):
        scalars = {"val/mAP_50": [(1, 0.1 * (number + 1))]}
        make_run(root / str(number), [f"model.optimizer.lr={lr}", "loss.gamma=2"], scalars)
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{root / 'optuna.db'}", direction="maximize"
    )
    dist = {
        "model.optimizer.lr": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "loss.gamma": optuna.distributions.FloatDistribution(0.0, 5.0),
    }
    for number, lr in enumerate(lrs):
        trial = optuna.trial.create_trial(
            params={"model.optimizer.lr": lr, "loss.gamma": 1.0 + number},
            distributions=dist,
            value=0.1 * (number + 1),
        )
        study.add_trial(trial)
    report = make_report(root, metrics=["val/mAP_50"])
    assert report.log_keys == {"model.optimizer.lr"}
    from src.report import metric_figure

    fig = metric_figure(report, "val/mAP_50", "model.optimizer.lr")
    assert fig.axes[0].get_xscale() == "log"
    for name in ("optuna_history", "optuna_importance"):
        assert report.files[name].read_bytes()[:4] == b"\x89PNG"
        assert report.files[f"{name}_pdf"].is_file()


# ------------------------------------------------- quiet logs, ties, bars, overlaps, failures
def test_report_run_logs_no_library_lines(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The PDFs make fontTools subset fonts: at INFO it logged ~12 lines per font (436 of 444
    console lines of a report). The report holds such library loggers at WARNING."""
    import logging

    from src.utils.console import QUIET_LOGGERS

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh process
    caplog.set_level(logging.INFO)
    assert main([str(sweep), "--metrics", "val/mAP_50"]) == 0
    assert (sweep / "report.pdf").read_bytes()[:4] == b"%PDF"  # fonts were subset
    names = {r.name for r in caplog.records}
    assert not [n for n in names if n.split(".")[0] in QUIET_LOGGERS], names
    assert len(caplog.records) <= 5, [r.getMessage() for r in caplog.records]


def test_hydra_entry_points_keep_library_loggers_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """conf/hydra/default.yaml (every entry point, src.visualize included) sets the same levels;
    with them, saving a PDF logs nothing."""
    import logging

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from matplotlib.figure import Figure

    from src.utils.console import QUIET_LOGGERS
    from src.viz.style import save_figure
    from tests.conftest import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="visualize", return_hydra_config=True)
    loggers = cfg.hydra.job_logging.loggers
    assert {name: loggers[name].level for name in QUIET_LOGGERS} == dict.fromkeys(
        QUIET_LOGGERS, "WARNING"
    )
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(loggers[name].level)
    caplog.set_level(logging.INFO)
    fig = Figure()
    fig.subplots().set_title("subset me")
    save_figure(fig, tmp_path / "quiet_check.png")
    assert not [r for r in caplog.records if r.name.startswith("fontTools")]


def md_rows(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln.startswith("| ") and "---" not in ln]


def test_ties_are_never_broken_silently(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros"
    for job in range(3):
        make_run(zeros / str(job), [f"loss.sigma={job + 1}"], {"val/mAP_50": [(1, 0.0)]})
    report = make_report(zeros, metrics=["val/mAP_50"], figures=False)
    best = report.best_rows(report.rows())
    assert best.indices == () and best.all_equal and best.value == 0.0
    md = (zeros / "report.md").read_text()
    assert "All 3 runs have the same `val/mAP_50` (0): none is marked best." in md
    assert "best" not in "".join(md_rows(zeros / "report.md"))
    two = tmp_path / "two"
    for job, value in enumerate([0.5, 0.7, 0.7]):
        make_run(two / str(job), [f"loss.sigma={job + 1}"], {"val/mAP_50": [(1, value)]})
    report = make_report(two, metrics=["val/mAP_50"], figures=False)
    best = report.best_rows(report.rows())
    assert best.indices == (1, 2) and best.tie
    rows = md_rows(two / "report.md")[1:]
    assert [r.split("|")[1].strip() for r in rows] == ["0", "**1** tied best", "**2** tied best"]
    assert "2 runs tie for the largest `val/mAP_50` (0.7)" in (two / "report.md").read_text()


def test_error_bars_of_nonnegative_metrics_stop_at_zero(tmp_path: Path) -> None:
    """mAP 0.0, 0.01, 0.2 over three seeds: mean 0.07, std 0.11; the bar would reach -0.04."""
    from matplotlib.collections import LineCollection

    from src.report import metric_figure

    root = tmp_path / "sweep"
    job = 0
    for sigma, values in (("0.5", [0.0, 0.01, 0.2]), ("10", [0.3, 0.31, 0.32])):
        for seed, value in zip((1, 2, 3), values, strict=True):
            make_run(root / str(job), [f"seed={seed}", f"loss.sigma={sigma}"], {
                "val/mAP_50": [(1, value)]
            })  # fmt: skip
            job += 1
    report = collect(root, metrics=["val/mAP_50"])
    fig = metric_figure(report, "val/mAP_50", "loss.sigma")
    ax = fig.axes[0]
    (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    lows = sorted(min(seg[:, 1]) for seg in bars.get_segments())
    assert lows[0] == 0.0  # clipped, not 0.07 - 0.1054
    assert lows[1] == pytest.approx(0.31 - 0.01, abs=1e-6)  # not clipped
    assert ax.get_ylim()[0] == 0.0
    caption = fig.get_supxlabel()
    assert "±1 sample std over 3 seeds" in caption and "cut at 0" in caption


def optuna_sweep(root: Path, values: list[float], seed: int = 0) -> Path:
    """A 4-parameter Optuna search written by hand: a run dir and a COMPLETE trial per value,
    learning rates like 0.000123 (six digits after the point)."""
    import random

    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(seed)
    dist = {
        "loss.sigma": optuna.distributions.FloatDistribution(0.5, 10.0, log=True),
        "loss.gamma": optuna.distributions.FloatDistribution(0.0, 5.0),
        "loss.alpha": optuna.distributions.FloatDistribution(0.1, 1.0),
        "model.optimizer.lr": optuna.distributions.FloatDistribution(1e-4, 1e-3, log=True),
    }
    root.mkdir(parents=True)
    study = optuna.create_study(
        study_name="s", storage=f"sqlite:///{root / 'optuna.db'}", direction="maximize"
    )
    for number, value in enumerate(values):
        params = {
            "loss.sigma": round(0.5 * 20 ** rng.random(), 6),
            "loss.gamma": round(5 * rng.random(), 6),
            "loss.alpha": round(0.1 + 0.9 * rng.random(), 6),
            "model.optimizer.lr": round(1e-4 * 10 ** (0.7 * rng.random()), 6),
        }
        scalars = {"val/mAP_50": [(1, value)], "val/loss": [(1, 1 + rng.random())]}
        overrides = [f"{k}={v}" for k, v in params.items()] + [f"++optuna_trial.number={number}"]
        make_run(root / str(number), overrides, scalars)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=value))
    return root


def assert_no_overlaps(fig) -> int:  # noqa: ANN001
    """No two tick labels or value labels of one axes touch; returns how many were checked."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    checked = 0
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts = list(ax.texts)
        for axis in (ax.xaxis, ax.yaxis):
            texts += [*axis.get_majorticklabels(), *axis.get_minorticklabels()]
        texts = [t for t in texts if t.get_visible() and t.get_text()]
        boxes = [t.get_window_extent(renderer) for t in texts]
        for i, a in enumerate(boxes):
            for j in range(i + 1, len(boxes)):
                b = boxes[j]
                touch = a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1
                assert not touch, f"{texts[i].get_text()!r} overlaps {texts[j].get_text()!r}"
        checked += len(boxes)
    return checked


def test_four_parameter_search_figures_have_no_overlapping_labels(tmp_path: Path) -> None:
    from src.report import metric_figure, overview_figure, study_figures

    values = [0.42, 0.45, 0.43, 0.47, 0.44, 0.46, 0.41, 0.48]
    report = collect(optuna_sweep(tmp_path / "search", values), metrics=["val/mAP_50"])
    assert report.swept_keys == ["loss.sigma", "loss.gamma", "loss.alpha", "model.optimizer.lr"]
    fig = overview_figure(report)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4
    assert assert_no_overlaps(fig) > 4 * 3
    lr = metric_figure(report, "val/mAP_50", "model.optimizer.lr")
    assert assert_no_overlaps(lr) > 0
    ticks = [t.get_text() for t in lr.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and all(len(t) <= 7 for t in ticks), ticks  # 1e-4, 2e-4 ..., not 0.000123
    written = {t.get_text() for t in lr.axes[0].texts}
    assert written <= {f"{v:.3g}" for v in values} and len(written) >= 4  # 0.42, 0.45, ...
    figures = study_figures(report)
    assert set(figures) == {"optuna_history", "optuna_importance"}
    for figure in figures.values():
        assert_no_overlaps(figure)


def test_importances_only_when_defined(tmp_path: Path) -> None:
    from src.report import study_figures

    zeros = optuna_sweep(tmp_path / "zeros", [0.0] * 4)
    report = make_report(zeros, metrics=["val/mAP_50"], figures=False)
    assert report.study is not None and report.study.importances is None
    assert list(study_figures(report)) == ["optuna_history"]  # the history is still defined
    md = (tmp_path / "zeros" / "report.md").read_text()
    assert "Parameter importances not drawn: all 4 completed trials have the same value (0)" in md
    assert "Optuna's best trial is merely the first of them" in md
    one = make_report(optuna_sweep(tmp_path / "one", [0.3]), metrics=["val/mAP_50"], figures=False)
    assert list(study_figures(one)) == ["optuna_history"]
    assert (
        "Parameter importances not drawn: 1 completed trial(s)"
        in (tmp_path / "one" / "report.md").read_text()
    )


def test_every_run_failed_exits_nonzero_listing_each_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from src.utils.faults import write_status

    root = tmp_path / "sweep"
    for job in range(3):
        make_run(root / str(job), [f"loss.sigma={job + 1}"], None)
    write_status(root / "0", "failed", message="ValueError: loss.sigma must be > 0")
    write_status(root / "1", "diverged", message="training diverged", step=3)
    # no status.json (killed, or failed before src.train started): the job log says why
    (root / "2" / "train.log").write_text(
        "[12:00:00][INFO] Overrides: loss.sigma=3\nTraceback (most recent call last):\n"
        '  File "x.py", line 1\nRuntimeError: CUDA out of memory\n'
    )
    assert main([str(root), "--metrics", "val/mAP_50", "--no-figures"]) == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "every run of" in error
    assert f"run 0 ({root / '0'}): failed: ValueError: loss.sigma must be > 0" in error
    assert f"run 1 ({root / '1'}): diverged at step 3" in error
    assert "run 2" in error and "RuntimeError: CUDA out of memory (from the job log)" in error
    md = (root / "report.md").read_text()
    assert "**Every run failed** (3 of 3)" in md and "CUDA out of memory" in md
    # one run with metrics: a normal report
    make_run(root / "3", ["loss.sigma=4"], {"val/mAP_50": [(1, 0.5)]})
    assert main([str(root), "--metrics", "val/mAP_50", "--no-figures"]) == 0


def test_metrics_under_a_chart_group_tag_are_found(tmp_path: Path) -> None:
    """RunTensorBoardLogger writes the headline curves as mAP/val/mAP_50 and loss/val/loss."""
    from src.report.read import metric_values

    scalars = {"mAP/val/mAP_50": 0.5, "loss/val/loss": 2.0, "val/class_err": 0.1, "lr-SGD": 0.1}
    assert metric_values(scalars, ["val/mAP_50", "val/loss", "val/class_err", "val/bbox_mae"]) == {
        "val/mAP_50": 0.5,
        "val/loss": 2.0,
        "val/class_err": 0.1,
    }
    run = make_run(tmp_path / "run", ["loss=l1"], {"mAP/val/mAP_50": [(0, 0.1), (2, 0.3)]})
    (result,) = collect(run, metrics=["val/mAP_50"]).runs
    assert result.metrics == {"val/mAP_50": pytest.approx(0.3)} and result.status == "ok"
