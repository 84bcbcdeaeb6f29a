"""Sweeps that resume: a multirun or an Optuna search stopped by a signal, resumed as printed.

The printed command is the sweep's own command plus ``hydra.sweep.dir=<dir>``; run again it
skips the finished jobs, resumes the interrupted one from its own ``last.ckpt`` (bit-exact) and
runs the others (``src.train.resume_in_place``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from src.train import resume_in_place
from src.utils.faults import sweep_resume_command, write_status
from tests.conftest import ROOT, train_overrides

QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.anchor_panels=null",
    "callbacks.detection_grid=null",
    "logger=csv",
]
# 2 epochs of 4 batches, deterministic, random augmentation
SHORT = ["trainer.deterministic=true", "trainer.max_epochs=2", "trainer.limit_val_batches=1",
         "data.augment=ssd"]  # fmt: skip
RESUME_LINE = "Resume the whole sweep with: "


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}


def run(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """``python ARGS`` in the repository, as a user types it."""
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def data_overrides(data_dir: Path) -> list[str]:
    return [o for o in train_overrides(Path(), data_dir) if not o.startswith("paths.output_dir=")]


def kill_once(marker: Path, epoch: int, batch: int) -> list[str]:
    """A real SIGTERM after training batch ``batch`` of epoch ``epoch``, once per sweep."""
    return [
        "+callbacks.kill._target_=tests.callbacks.SignalAfterBatch",
        f"+callbacks.kill.epoch={epoch}",
        f"+callbacks.kill.batch={batch}",
        f"+callbacks.kill.once_file={marker}",
    ]


def printed_command(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The one resume command the stopped sweep printed, as ``python`` arguments."""
    text = proc.stdout + proc.stderr
    lines = [line for line in text.splitlines() if RESUME_LINE in line]
    assert len(lines) == 1, text[-4000:]
    command = shlex.split(lines[0].split(RESUME_LINE, 1)[1])
    assert command[:4] == ["python", "-m", "src.train", "-m"], command
    assert not any(a.startswith("ckpt_path=") for a in command), command
    return command[1:]


# ----------------------------------------------------------------------- fast pieces


def test_sweep_resume_command_is_the_sweeps_own_command(tmp_path: Path) -> None:
    OmegaConf.save(
        {"hydra": {"overrides": {
            "hydra": ["hydra/launcher=submitit_local", "hydra.mode=MULTIRUN",
                      f"hydra.sweep.dir={tmp_path}"],
            "task": ["seed=1,2", "loss=focal", "hydra.sweeper.params={lr: interval(0.1, 1)}"],
        }}},
        tmp_path / "multirun.yaml",
    )  # fmt: skip
    assert sweep_resume_command(tmp_path) == (
        "python -m src.train -m hydra/launcher=submitit_local seed=1,2 loss=focal "
        f"'hydra.sweeper.params={{lr: interval(0.1, 1)}}' hydra.sweep.dir={tmp_path}"
    )
    # without multirun.yaml: the command line (the job runs in the sweep's process)
    other = tmp_path / "other"
    argv = ["-m", "seed=1,2", "ckpt_path=/x/0/checkpoints/last.ckpt", f"hydra.sweep.dir={other}"]
    assert (
        sweep_resume_command(other, argv)
        == f"python -m src.train -m seed=1,2 hydra.sweep.dir={other}"
    )


def test_resume_in_place_skips_finished_and_resumes_interrupted(tmp_path: Path) -> None:
    def cfg(**keys):  # noqa: ANN003, ANN202
        return OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "ckpt_path": None, **keys})

    fresh = cfg()
    assert resume_in_place(fresh) is None and fresh.ckpt_path is None  # nothing there yet
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    write_status(tmp_path, "interrupted", signal="SIGTERM", checkpoint=str(last))
    interrupted = cfg()
    assert resume_in_place(interrupted) is None and interrupted.ckpt_path == str(last)
    given = cfg(ckpt_path="/other/last.ckpt")  # a ckpt_path given by hand wins
    assert resume_in_place(given) is None and given.ckpt_path == "/other/last.ckpt"
    write_status(tmp_path, "ok", metrics={"val/mAP_50": 0.25, "val/loss": float("nan")})
    done = resume_in_place(cfg())
    assert done is not None and done["val/mAP_50"] == 0.25 and done["val/loss"] != done["val/loss"]
    assert resume_in_place(cfg(train=False)) is None  # test-only runs are never skipped


def test_resumed_search_samples_new_parameters(tmp_path: Path) -> None:
    """The sweeper as Hydra builds it (its sampler already instantiated, TPE seed 1234):
    seeded again with its configured seed, the resumed study's sampler would repeat trial 0;
    seeded with seed + the trials the study holds, it draws new parameters."""
    import optuna
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import setup_globals
    from hydra.types import HydraContext

    from tests.conftest import CONF_DIR

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    setup_globals()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(
            "train",
            ["hparams_search=banana_optuna", f"hydra.sweep.dir={tmp_path}"],
            return_hydra_config=True,
        )

    def build_sweeper():  # noqa: ANN202 - as in a new sweep process
        return Plugins.instance().instantiate_sweeper(
            hydra_context=HydraContext(config_loader=None, callbacks=None),  # type: ignore[arg-type]
            task_function=lambda cfg: None,
            config=cfg,
        )

    space = {
        "lr": optuna.distributions.FloatDistribution(0.01, 0.5, log=True),
        "gamma": optuna.distributions.FloatDistribution(0.0, 5.0),
    }
    study = optuna.create_study(sampler=build_sweeper()._sampler(), direction="maximize")
    first = [study.ask(space) for _ in range(2)]
    for trial in first:
        study.tell(trial, 0.5)
    resumed = build_sweeper()
    study.sampler = resumed._sampler()  # the configured seed again: trial 0 once more
    assert study.ask(space).params == first[0].params
    study.sampler = resumed._sampler(len(study.trials))  # what a resumed search does
    new = study.ask(space).params
    assert all(new != t.params for t in first)


# ------------------------------------------------------------- real sweeps, real signals


@pytest.mark.slow  # 200 s on 2 cores at load 20: a sweep stopped, resumed twice, a reference
def test_multirun_sigterm_mid_epoch_resumes_whole_sweep(tmp_path: Path, banana_data_dir: Path):
    sweep = tmp_path / "sweep"
    common = [*data_overrides(banana_data_dir), *QUIET, *SHORT]
    args = ["-m", "src.train", "-m", "seed=1,2", f"hydra.sweep.dir={sweep}", *common,
            *kill_once(tmp_path / "killed", epoch=1, batch=1)]  # fmt: skip
    # the uninterrupted single run with job 0's seed, beside the sweep (2 cores)
    reference = subprocess.Popen(
        [sys.executable, "-m", "src.train", "seed=1", *common,
         f"paths.output_dir={tmp_path / 'single'}", f"hydra.run.dir={tmp_path / 'single'}"],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stopped = run(args)
    out, err = reference.communicate(timeout=400)
    assert reference.returncode == 0, err[-3000:]
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    status = json.loads((sweep / "0" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert not (sweep / "1").exists()  # job 1 never started
    command = printed_command(stopped)
    assert command[-1] == f"hydra.sweep.dir={sweep}"
    assert "seed=1,2" in command and "+callbacks.kill.epoch=1" in command

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    text = resumed.stdout + resumed.stderr
    assert f"resuming from {sweep / '0' / 'checkpoints' / 'last.ckpt'}" in text
    for job in ("0", "1"):
        assert json.loads((sweep / job / "status.json").read_text())["status"] == "ok"
    a = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", weights_only=True)
    c = torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == c["global_step"] == 8
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # job 0: bit-exact
    assert not all(torch.equal(v, c["state_dict"][k]) for k, v in a["state_dict"].items())
    assert c["run_config"]["seed"] == 2  # job 1 trained from scratch with its own seed
    single = json.loads((tmp_path / "single" / "status.json").read_text())["metrics"]
    job0 = json.loads((sweep / "0" / "status.json").read_text())["metrics"]
    assert single["val/mAP_50"] == job0["val/mAP_50"] and single["val/loss"] == job0["val/loss"]

    # the same command once more: both jobs are finished, nothing is trained
    again = run(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("not training it again") == 2
    assert (
        torch.load(sweep / "1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    )


@pytest.mark.slow  # 120 s on 2 cores at load 17: three 2-epoch trials, a stop and a restart
def test_optuna_search_sigterm_mid_trial_resumes(tmp_path: Path, banana_data_dir: Path) -> None:
    """A 3-trial search stopped by SIGTERM in the middle of trial 1's second epoch, resumed with
    the printed command: trial 0 is not run again, trial 1 goes on from its own checkpoint with
    its own parameters, trial 2 gets new ones; three distinct parameter sets, one optuna.db."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = ["-m", "src.train", "-m", "hparams_search=banana_optuna", "hydra.sweeper.n_trials=3",
            f"hydra.sweep.dir={tmp_path}", *data_overrides(banana_data_dir), *QUIET,
            "++trainer.max_epochs=2", "++trainer.limit_train_batches=2",
            "++trainer.limit_val_batches=1", "trainer.deterministic=true",
            *kill_once(tmp_path / "killed", epoch=1, batch=0),
            f"+callbacks.kill.only_dir={tmp_path / '1'}"]  # fmt: skip
    stopped = run(args)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def trials() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="banana_optuna", storage=storage).get_trials()

    before = trials()
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    last = tmp_path / "1" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # epoch 0 and 1 batch
    command = printed_command(stopped)
    assert command[-1] == f"hydra.sweep.dir={tmp_path}"
    assert "hparams_search=banana_optuna" in command

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last}" in resumed.stdout + resumed.stderr
    after = trials()
    assert [t.number for t in after] == [0, 1, 2]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in after), after
    assert after[0].params == before[0].params and after[1].params == before[1].params
    params = [tuple(sorted(t.params.items())) for t in after]
    assert len(set(params)) == 3, params  # trial 2 does not repeat trial 0
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["optuna.db"]
    assert torch.load(last, weights_only=True)["global_step"] == 4  # trial 1 finished in place
    config = yaml.safe_load((tmp_path / "2" / ".hydra" / "config.yaml").read_text())
    assert config["optuna_trial"]["number"] == 2


@pytest.mark.slow  # 190 s on 2 busy cores: 2 jobs in parallel processes, a stop, a restart
def test_submitit_local_sweep_resumes_its_interrupted_job(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    """`hydra/launcher=submitit_local`: job 0 stopped by SIGTERM mid-epoch in its own process
    while job 1 finishes; the command in job 0's log resumes job 0 and skips job 1."""
    sweep = tmp_path / "sweep"
    args = ["-m", "src.train", "-m", "hydra/launcher=submitit_local", "seed=1,2",
            f"hydra.sweep.dir={sweep}", *data_overrides(banana_data_dir), *QUIET, *SHORT,
            *kill_once(tmp_path / "killed", epoch=1, batch=1),
            f"+callbacks.kill.only_dir={sweep / '0'}"]  # fmt: skip
    stopped = run(args)
    assert stopped.returncode != 0  # submitit reports job 0's exit status 143 as a failure
    assert json.loads((sweep / "0" / "status.json").read_text())["status"] == "interrupted"
    assert json.loads((sweep / "1" / "status.json").read_text())["status"] == "ok"
    job1 = (sweep / "1" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    log0 = (sweep / "0" / "train.log").read_text()
    command = printed_command(subprocess.CompletedProcess(args, 143, log0, ""))
    assert "hydra/launcher=submitit_local" in command and command[-1] == f"hydra.sweep.dir={sweep}"

    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = sweep / "0" / "checkpoints" / "last.ckpt"
    assert f"resuming from {last}" in (sweep / "0" / "train.log").read_text()
    assert "not training it again" in (sweep / "1" / "train.log").read_text()
    for job in ("0", "1"):
        assert json.loads((sweep / job / "status.json").read_text())["status"] == "ok"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    assert (sweep / "1" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == job1  # untouched
