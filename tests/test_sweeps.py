"""Sweeps from the command line: a 3-value multirun + its report, an Optuna search, bad values.

The multirun and the Optuna search run ``python -m src.train -m ...`` in a subprocess, exactly as
a user would, on the tiny synthetic banana set.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate

from src.detection.losses import FocalLoss, L1Loss, MultiBoxLoss, SmoothL1Loss
from src.detection.mining import HardNegativeMiner
from src.train import train
from tests.conftest import ROOT, compose_config, train_overrides

SIGMAS = ("0.5", "1", "10")


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def data_overrides(data_dir: Path) -> list[str]:
    """The tiny-data overrides, without paths.output_dir (each job gets its own dir)."""
    return [o for o in train_overrides(Path(), data_dir) if not o.startswith("paths.output_dir=")]


@pytest.fixture(scope="module")
def sigma_sweep(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> Path:
    """``loss=smooth_l1 loss.sigma=0.5,1,10 debug=limit``: three short runs (1 epoch of 4 training
    and 2 validation batches) that write TensorBoard events."""
    sweep_dir = tmp_path_factory.mktemp("multirun")
    run_cli(
        "-m",
        "src.train",
        "-m",
        "loss=smooth_l1",
        f"loss.sigma={','.join(SIGMAS)}",
        f"hydra.sweep.dir={sweep_dir}",
        *data_overrides(banana_data_dir),
        # fast_dev_run would disable the loggers: a short real run instead (debug=limit: whole
        # batch counts; its old fractions left 0 of the 2 validation batches and crashed)
        "debug=limit",
        "trainer.max_epochs=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.anchor_panels.num_images=1",
    )
    return sweep_dir


def _accumulators(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    assert dirs, f"no TensorBoard events under {run_dir / 'tensorboard'}"
    accs = []
    for d in sorted(dirs):
        acc = EventAccumulator(str(d))
        acc.Reload()
        accs.append(acc)
    return accs


def test_debug_limit_on_the_default_data(tmp_path: Path, banana_data_dir: Path) -> None:
    """`python -m src.train debug=limit` on the banana data (4 training, 2 validation batches of
    4 images): whole batch counts, where 0.1 and 0.2 of them rounded down to 0 and crashed."""
    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path,
            banana_data_dir,
            "debug=limit",
            "trainer.max_epochs=1",
            "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.anchor_panels=null",
            "callbacks.detection_grid=null",
        ),
    )
    assert cfg.trainer.limit_train_batches == 4 and cfg.trainer.limit_val_batches == 2
    metrics, objects = train(cfg)
    trainer = objects["trainer"]
    assert trainer.num_training_batches == 4 and trainer.num_val_batches == [2]
    assert trainer.global_step == 4 and math.isfinite(metrics["val/mAP_50"])


def test_multirun_writes_one_dir_per_value(sigma_sweep: Path) -> None:
    jobs = sorted(p.name for p in sigma_sweep.iterdir() if (p / ".hydra").is_dir())
    assert jobs == ["0", "1", "2"]
    for job, sigma in zip(jobs, SIGMAS, strict=True):
        overrides = yaml.safe_load((sigma_sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert f"loss.sigma={sigma}" in overrides
        config = yaml.safe_load((sigma_sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["loss"]["name"] == "smooth_l1"
        assert float(config["loss"]["sigma"]) == float(sigma)


def test_hparams_tab_has_swept_key_and_final_metrics(sigma_sweep: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for job, sigma in enumerate(SIGMAS):
        hparams: dict = {}
        metric_tags: set[str] = set()
        scalars: dict[str, float] = {}
        image_tags: set[str] = set()
        for acc in _accumulators(sigma_sweep / str(job)):
            for content in acc.PluginTagToContent("hparams").values():
                data = plugin_data_pb2.HParamsPluginData.FromString(content)
                if data.HasField("session_start_info"):
                    hparams.update(data.session_start_info.hparams)
                if data.HasField("experiment"):
                    metric_tags |= {m.name.tag for m in data.experiment.metric_infos}
            for tag in acc.Tags()["scalars"]:
                scalars[tag] = acc.Scalars(tag)[-1].value
            image_tags |= set(acc.Tags()["images"])
        assert "loss.sigma" in hparams, sorted(hparams)
        assert hparams["loss.sigma"].number_value == pytest.approx(float(sigma))
        # the HParams column reads the curve itself (src/callbacks/hparams.py)
        assert "mAP/val/mAP_50" in metric_tags
        assert math.isfinite(scalars["mAP/val/mAP_50"])
        # the per-anchor pictures of the AnchorPanelsCallback (callbacks/default.yaml)
        assert {"val_images/anchors/0", "val_images/negatives/0"} <= image_tags


def test_report_command_on_the_sweep(sigma_sweep: Path) -> None:
    proc = run_cli("-m", "src.report", str(sigma_sweep), timeout=120)
    assert str(sigma_sweep / "report.md") in proc.stdout
    md = (sigma_sweep / "report.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    assert len(rows) == 3
    assert header[:2] == ["run", "loss.sigma"]
    assert [r[1] for r in rows] == list(SIGMAS)
    metric_cols = ["val/mAP_50", "val/class_err", "val/bbox_mae", "train/class_err"]
    metric_cols += ["train/bbox_mae", "val/loss"]
    for name in metric_cols:
        col = header.index(name)
        assert all(math.isfinite(float(r[col])) for r in rows), (name, rows)
    assert all(r[-1] == "ok" for r in rows)
    assert (sigma_sweep / "report.csv").is_file() and (sigma_sweep / "report.png").is_file()


OPTUNA_PARAMS = ("loss.sigma", "loss.gamma", "loss.alpha", "model.optimizer.lr")


def optuna_space() -> dict:
    from optuna.distributions import FloatDistribution

    return {
        "loss.sigma": FloatDistribution(0.5, 10.0, log=True),
        "loss.gamma": FloatDistribution(0.0, 5.0),
        "loss.alpha": FloatDistribution(0.1, 1.0),
        "model.optimizer.lr": FloatDistribution(0.001, 0.5, log=True),
    }


def test_optuna_search_resumes_prunes_and_records_failures(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    """A stored study holds a finished trial 0 and an interrupted (RUNNING) trial 1; trial 2's
    parameters are queued with an invalid loss.alpha. Running the search again on that sweep dir
    reruns trial 1 (pruned: far below trial 0 at epoch 0), runs trial 2 (fails) and goes on."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="banana_optuna", storage=storage, direction="maximize")
    good = {"loss.sigma": 1.0, "loss.gamma": 2.0, "loss.alpha": 0.5, "model.optimizer.lr": 0.1}
    study.add_trial(
        optuna.trial.create_trial(
            params=good, distributions=optuna_space(), value=0.95, intermediate_values={0: 0.95}
        )
    )
    interrupted = study.ask(optuna_space())  # left RUNNING, as by a killed sweep
    study.enqueue_trial({"loss.alpha": 1.5})
    run_cli(
        "-m",
        "src.train",
        "-m",
        "hparams_search=banana_optuna",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={tmp_path}",
        "debug=fdr",
        *data_overrides(banana_data_dir),
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.optuna_pruning.pruner.n_startup_trials=1",
        "callbacks.optuna_pruning.pruner.n_warmup_steps=0",
    )
    trials = optuna.load_study(study_name="banana_optuna", storage=storage).get_trials()
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[1].params == interrupted.params  # rerun with its own parameters
    assert 0.0 <= trials[1].intermediate_values[0] < 0.95
    assert "loss.alpha must be > 0 and <= 1" in trials[2].user_attrs["fail_reason"]
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["optuna.db"]
    # each trial ran in <sweep dir>/<trial number> with its parameters
    for number in (1, 2):
        config = yaml.safe_load((tmp_path / str(number) / ".hydra" / "config.yaml").read_text())
        assert config["loss"]["name"] == "focal"
        assert config["optuna_trial"]["number"] == number
        assert config["loss"]["alpha"] == pytest.approx(trials[number].params["loss.alpha"])
    assert not (tmp_path / "0").exists()  # trial 0 was not run again
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert results["best_params"] == good and results["best_value"] == 0.95
    assert [t["state"] for t in results["trials"]] == states
    # the report marks the pruned and the failed trial
    proc = run_cli("-m", "src.report", str(tmp_path), timeout=120)
    assert str(tmp_path / "report.md") in proc.stdout
    md = (tmp_path / "report.md").read_text()
    assert "| pruned at epoch 0 |" in md
    assert re.search(r"\| failed: ValueError: .*loss.alpha must be > 0 and <= 1", md), md


@pytest.mark.slow  # about 75 s on 2 cores: three 2-epoch trials, a kill and a restart
def test_optuna_search_killed_after_first_trial_resumes(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    """A 3-trial, 2-epoch search is killed (SIGKILL) once its first trial has finished; the same
    command with hydra.sweep.dir=<that dir> completes the study: 3 finished or pruned trials,
    numbers 0, 1, 2, one SQLite file."""
    import signal
    import time

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = [
        "-m",
        "src.train",
        "-m",
        "hparams_search=banana_optuna",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={tmp_path}",
        *data_overrides(banana_data_dir),
        "++trainer.max_epochs=2",
        "++trainer.limit_train_batches=2",
        "++trainer.limit_val_batches=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.anchor_panels=null",
        "callbacks.detection_grid=null",
    ]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def finished() -> list[optuna.trial.FrozenTrial]:
        try:
            study = optuna.load_study(study_name="banana_optuna", storage=storage)
        except KeyError:  # not created yet
            return []
        return [t for t in study.get_trials() if t.state.is_finished()]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not finished() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, "the search ended before it could be interrupted"
        assert len(finished()) == 1, "the first trial did not finish in 300 s"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert len(finished()) == 1
    run_cli(*args, timeout=400)
    study = optuna.load_study(study_name="banana_optuna", storage=storage)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), trials
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["optuna.db"]
    for number in (0, 1, 2):
        assert (tmp_path / str(number) / ".hydra" / "config.yaml").is_file()
    report = run_cli("-m", "src.report", str(tmp_path), timeout=120)
    assert str(tmp_path / "report.md") in report.stdout


@pytest.mark.slow  # about 40 s on 2 cores: three processes import torch
def test_submitit_local_sweep_runs_jobs_in_separate_processes(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    """`hydra/launcher=submitit_local`: two jobs, each in its own process; then src.report."""
    run_cli(
        "-m",
        "src.train",
        "-m",
        "hydra/launcher=submitit_local",
        "loss=smooth_l1",
        "loss.sigma=0.5,1",
        f"hydra.sweep.dir={tmp_path}",
        *data_overrides(banana_data_dir),
        "++trainer.max_epochs=1",
        "++trainer.limit_train_batches=1",
        "++trainer.limit_val_batches=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.anchor_panels=null",
        "callbacks.detection_grid=null",
    )
    job_ids = []
    for job in ("0", "1"):
        hydra_cfg = yaml.safe_load((tmp_path / job / ".hydra" / "hydra.yaml").read_text())
        job_ids.append(str(hydra_cfg["hydra"]["job"]["id"]))
    # submitit's local job id is the job process's pid: two jobs, two processes
    assert len(set(job_ids)) == 2 and all(i.isdigit() for i in job_ids), job_ids
    assert str(os.getpid()) not in job_ids
    # each job's submitit log folder is named by its job id
    assert set(job_ids) <= {p.name for p in (tmp_path / ".submitit").iterdir()}
    report = run_cli("-m", "src.report", str(tmp_path), timeout=120)
    assert str(tmp_path / "report.md") in report.stdout
    rows = [
        line
        for line in (tmp_path / "report.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith("| run")
    ]
    assert len(rows) == 2 and all(row.rstrip().endswith("| ok |") for row in rows), rows


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["loss=smooth_l1", "loss.sigma=-1"], "loss.sigma must be > 0"),
        (["loss=focal", "loss.sigma=0"], "loss.sigma must be > 0"),
        (["loss=focal", "loss.gamma=-1"], "loss.gamma must be >= 0"),
        (["loss=focal", "loss.alpha=0"], "loss.alpha must be > 0 and <= 1"),
        (["loss=focal", "loss.alpha=1.5"], "loss.alpha must be > 0 and <= 1"),
        (["mining=hard_negative", "mining.neg_pos_ratio=0"], "mining.neg_pos_ratio must be > 0"),
        (["mining=hard_negative", "mining.neg_pos_ratio=-3"], "mining.neg_pos_ratio must be > 0"),
    ],
)
def test_bad_values_fail_before_training(
    bad: list[str],
    message: str,
    tmp_path: Path,
    banana_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lightning.pytorch import Trainer

    def no_fit(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("training started despite an invalid hyper-parameter")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    cfg = compose_config("train", train_overrides(tmp_path, banana_data_dir, *bad))
    with pytest.raises(Exception) as err:
        train(cfg)
    assert re.search(re.escape(message), str(err.value)), str(err.value)
    chain, cause = [], err.value
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__
    assert any(isinstance(e, ValueError) for e in chain)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("gamma", ["0", "1", "2", "5"])
def test_focal_gamma_sweep_values_build(gamma: str, tmp_path: Path) -> None:
    cfg = compose_config(
        "train", [f"paths.output_dir={tmp_path}", "loss=focal", f"loss.gamma={gamma}"]
    )
    loss = instantiate(cfg.loss.module)
    assert isinstance(loss.cls_loss, FocalLoss) and loss.cls_loss.gamma == float(gamma)


@pytest.mark.parametrize(
    ("experiment", "cls_loss", "box_loss", "mined"),
    [
        ("banana_l1", "CrossEntropyLoss", L1Loss, False),
        ("banana_smooth_l1", "CrossEntropyLoss", SmoothL1Loss, False),
        ("banana_focal", "FocalLoss", L1Loss, False),
        ("banana_l1_hnm", "CrossEntropyLoss", L1Loss, True),
    ],
)
def test_loss_exercise_experiments(
    experiment: str, cls_loss: str, box_loss: type, mined: bool, tmp_path: Path
) -> None:
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", f"experiment={experiment}"])
    assert cfg.task_name == experiment
    assert "loss_exercise" in cfg.tags
    # the d2l_banana recipe underneath
    assert cfg.trainer.max_epochs == 20 and cfg.model.optimizer.lr == 0.2
    assert cfg.model.postprocess.class_agnostic and cfg.data.batch_size == 32
    loss = instantiate(cfg.loss.module)
    assert isinstance(loss, MultiBoxLoss)
    assert type(loss.cls_loss).__name__ == cls_loss
    assert isinstance(loss.box_loss, box_loss)
    assert isinstance(loss.mining, HardNegativeMiner) if mined else loss.mining is None
    # command-line overrides still apply on top of an experiment
    cfg = compose_config(
        "train", [f"paths.output_dir={tmp_path}", f"experiment={experiment}", "loss.cls_weight=2"]
    )
    assert cfg.loss.cls_weight == 2


def test_default_recipe_uses_smaller_anchors_and_the_book_recipe_keeps_its_own(
    tmp_path: Path,
) -> None:
    """`python -m src.train` is experiment=banana: the book's size ladder one level down."""
    default = compose_config("train", [f"paths.output_dir={tmp_path}"])
    book = compose_config("train", [f"paths.output_dir={tmp_path}", "experiment=d2l_banana"])
    assert [list(s) for s in default.backbone.anchors.sizes] == [
        [0.1, 0.141], [0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79]
    ]  # fmt: skip
    assert [list(s) for s in book.backbone.anchors.sizes] == [
        [0.2, 0.272], [0.37, 0.447], [0.54, 0.619], [0.71, 0.79], [0.88, 0.961]
    ]  # fmt: skip
    for cfg in (default, book):
        net = instantiate(cfg.model.net, num_classes=1)
        out = net.eval()(torch.zeros(1, 3, 256, 256))
        assert out.anchors.reshape(-1, 4).shape == (5444, 4)
    # the ladder's second size per level is the book's sqrt(s_l * s_l+1)
    ladder = [0.1, 0.2, 0.37, 0.54, 0.71, 0.88]
    for level, sizes in enumerate(default.backbone.anchors.sizes):
        assert sizes[0] == ladder[level]
        assert sizes[1] == pytest.approx(math.sqrt(ladder[level] * ladder[level + 1]), abs=1e-3)
    # the smaller anchors belong to backbone=tiny_small_anchors, not to the experiment: another
    # backbone on the default recipe's command line gets its own anchors untouched
    assert default.backbone.name == "tiny"
    book_tiny = compose_config("train", [f"paths.output_dir={tmp_path}", "backbone=tiny"])
    assert book_tiny.backbone.anchors == book.backbone.anchors
    for name, sides, count in (
        ("vgg16", [38, 19, 10, 5, 3, 1], 8732),
        ("vgg16_512", [64, 32, 16, 8, 4, 2, 1], 24564),
    ):
        other = compose_config("train", [f"paths.output_dir={tmp_path}", f"backbone={name}"])
        assert "sizes" not in other.backbone.anchors
        generator = instantiate(other.backbone.anchors)  # raised TypeError on `sizes` before
        size = other.backbone.image_size
        assert generator([(s, s) for s in sides], (size, size)).shape == (count, 4)
