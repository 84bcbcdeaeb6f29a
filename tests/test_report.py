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
    report = make_report(run)
    assert len(report.runs) == 1 and report.swept_keys == []
    assert (run / "report.md").is_file()


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no runs found under .*empty"):
        make_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert "no runs found" in capsys.readouterr().err


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
    rows = {r["run"]: r["status"] for r in make_report(sweep).rows()}
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
    make_report(sweep)
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
