"""Optuna search pieces: the search space, per-trial overrides, pruning, report states."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from src.callbacks.pruning import OptunaPruningCallback
from src.report import collect, trial_status
from src.search.space import override_value, search_space
from src.search.sweeper import OptunaSweeper, trial_overrides
from src.train import train
from tests.conftest import compose_config, train_overrides

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_hydra_sweep_syntax_becomes_optuna_distributions() -> None:
    params = {
        "loss.sigma": "tag(log, interval(0.5, 10.0))",
        "loss.gamma": "interval(0.0, 5.0)",
        "mining.neg_pos_ratio": "tag(log, int(interval(1, 8)))",
        "data.batch_size": "range(8, 40, 8)",
        "loss.normalize": "choice(anchors, positives)",
    }
    space, fixed = search_space(params, ["debug=fdr", "loss.alpha=0.25,0.5,1.0"])
    assert space["loss.sigma"] == FloatDistribution(0.5, 10.0, log=True)
    assert space["loss.gamma"] == FloatDistribution(0.0, 5.0)
    assert space["mining.neg_pos_ratio"] == IntDistribution(1, 8, log=True)
    # Python's exclusive stop: 8, 16, 24, 32
    assert space["data.batch_size"] == IntDistribution(8, 32, step=8)
    assert space["loss.normalize"] == CategoricalDistribution(["anchors", "positives"])
    # a command-line sweep is a dimension too; a plain override is passed to every trial
    assert space["loss.alpha"] == CategoricalDistribution([0.25, 0.5, 1.0])
    assert fixed == ["debug=fdr"]


def test_search_space_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"hydra.sweeper.params.loss.sigma=.*is not a sweep"):
        search_space({"loss.sigma": "0.5"})
    with pytest.raises(ValueError, match=r"loss.gamma=interval\(5.0, 1.0\).*low <= high"):
        search_space({"loss.gamma": "interval(5.0, 1.0)"})


def test_trial_overrides_carry_params_trial_and_job_dir() -> None:
    overrides = trial_overrides(
        7,
        {"loss.sigma": 0.5, "loss.normalize": "anchors", "flag": True, "x": None},
        ["debug=fdr"],
        "sqlite:////tmp/it's/optuna.db",
        "study",
    )
    assert overrides == [
        "debug=fdr",
        "loss.sigma=0.5",
        "loss.normalize=anchors",
        "flag=true",
        "x=null",
        "++optuna_trial.storage='sqlite:////tmp/it\\'s/optuna.db'",
        "++optuna_trial.study_name='study'",
        "++optuna_trial.number=7",
        "hydra.sweep.subdir=7",
    ]
    assert override_value(1e-4) == "0.0001" and override_value(3) == "3"
    # Hydra reads the quoted storage URL back unchanged
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([overrides[5]])
    assert parsed.value() == "sqlite:////tmp/it's/optuna.db"


def test_sweeper_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="hydra.sweeper.direction='up'"):
        OptunaSweeper(direction="up")
    with pytest.raises(ValueError, match="hydra.sweeper.n_trials=0"):
        OptunaSweeper(n_trials=0)


def test_pruning_callback_stops_a_clearly_worse_trial(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    """Three earlier trials reached mAP 0.95 at epoch 0; a fresh 1-epoch run cannot: pruned."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    lr = FloatDistribution(1e-3, 1.0, log=True)
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                params={"model.optimizer.lr": 0.1},
                distributions={"model.optimizer.lr": lr},
                value=0.95,
                intermediate_values={0: 0.95, 1: 0.95},
            )
        )
    trial = study.ask({"model.optimizer.lr": lr})
    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path / "run",
            banana_data_dir,
            "hparams_search=banana_optuna",
            "callbacks.optuna_pruning.pruner.n_warmup_steps=0",
            f"optuna_trial.storage={storage}",
            "optuna_trial.study_name=s",
            f"optuna_trial.number={trial.number}",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "callbacks.rich_progress_bar=null",
            "callbacks.model_summary=null",
            "callbacks.anchor_panels=null",
            "logger=csv",
        ),
    )
    with pytest.raises(optuna.TrialPruned, match=r"pruned at epoch 0: val/mAP_50="):
        train(cfg)
    frozen = study.get_trials()[trial.number]
    assert list(frozen.intermediate_values) == [0]  # reported epoch 0, then stopped
    assert 0.0 <= frozen.intermediate_values[0] < 0.95


def test_pruning_callback_is_off_outside_a_sweep() -> None:
    callback = OptunaPruningCallback(monitor="val/mAP_50")
    assert not callback.active
    with pytest.raises(ValueError, match="callbacks.optuna_pruning: storage is set"):
        OptunaPruningCallback(monitor="val/mAP_50", storage="sqlite:///x.db")


def test_report_marks_pruned_and_failed_trials(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    for number in range(3):
        run = root / str(number)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("task_name: train\n")
        overrides = [f"loss.gamma={number}", f"++optuna_trial.number={number}"]
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    trials = [
        {"number": 0, "state": "COMPLETE", "value": 0.5, "params": {"loss.gamma": 0}},
        {"number": 1, "state": "PRUNED", "last_step": 2, "params": {"loss.gamma": 1}},
        {"number": 2, "state": "FAIL", "reason": "ValueError: loss.alpha\nmust be", "params": {}},
    ]
    results = {"name": "s", "best_params": {"loss.gamma": 0}, "best_value": 0.5, "trials": trials}
    (root / "optimization_results.yaml").write_text(yaml.safe_dump(results))
    report = collect(root)
    assert report.swept_keys == ["loss.gamma"]  # optuna_trial.number is not a swept key
    assert [r.status for r in report.runs] == [
        "no events",
        "pruned at epoch 2",
        "failed: ValueError: loss.alpha must be",
    ]
    assert trial_status({"state": "RUNNING"}) == "running"
    assert trial_status({"state": "COMPLETE"}) is None


def test_a_fast_dev_run_trial_is_failed_not_complete(tmp_path: Path) -> None:
    """Under debug=fdr a job returns the val/mAP_50 of one batch (0.0): no trial value. The
    sweeper records FAIL with the reason, and src.report says the same for the run."""
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from src.report import main

    sweeper = OptunaSweeper(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    sweeper.sweep_dir = tmp_path
    study = optuna.create_study(study_name="sweep", storage=sweeper.storage_url())
    space = {"loss.gamma": FloatDistribution(0.0, 5.0)}
    for number, fast in enumerate((True, False)):
        study.ask(space)
        cfg = OmegaConf.create({"trainer": {"fast_dev_run": fast, "max_epochs": 1}})
        ret = JobReturn(cfg=cfg, status=JobStatus.COMPLETED, _return_value=0.0)
        sweeper._tell(study, number, ret)
        run = tmp_path / str(number)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("task_name: train\n")
        (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss.gamma={number}"]))
    smoke, real = study.get_trials()
    assert (smoke.state.name, smoke.value) == ("FAIL", None)
    assert "trainer.fast_dev_run=True (debug=fdr)" in smoke.user_attrs["fail_reason"]
    assert (real.state.name, real.value) == ("COMPLETE", 0.0)
    sweeper.write_results(study)
    report = collect(tmp_path)
    assert report.runs[0].status.startswith("failed: trainer.fast_dev_run=True (debug=fdr)")
    assert report.runs[1].status == "no events"
    # every trial under fdr: the report exits 1 and names each failure
    study.ask(space)
    cfg = OmegaConf.create({"trainer": {"fast_dev_run": 1}})
    sweeper._tell(study, 2, JobReturn(cfg=cfg, status=JobStatus.COMPLETED, _return_value=0.0))
    sweeper.write_results(study)
    shutil.rmtree(tmp_path / "1")
    shutil.copytree(tmp_path / "0", tmp_path / "2")
    assert main([str(tmp_path), "--no-figures"]) == 1
    assert collect(tmp_path).all_failed
