"""Runs you can trust: exact resume, safe checkpoints, divergence, signals, run folders, DDP."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from src.train import train
from src.utils.checkpoint import CheckpointMismatchError, load_checkpoint
from src.utils.faults import (
    DivergedError,
    check_finite_grads,
    check_finite_loss,
    check_finite_state,
    resume_command,
)
from tests.conftest import ROOT, compose_config, train_overrides

QUIET = [
    "callbacks.rich_progress_bar=null",
    "callbacks.anchor_panels=null",
    "callbacks.detection_grid=null",
    "callbacks.model_summary=null",
    "logger=csv",
]


def run_cli(module: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_parallel(*commands: list[str], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Run ``python -m MODULE OVERRIDES...`` commands at the same time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PROJECT_ROOT": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", *cmd],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    results = []
    for cmd, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def cli_overrides(run_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        *train_overrides(run_dir, data_dir, *QUIET, *extra),
        f"hydra.run.dir={run_dir}",
    ]


# ---------------------------------------------------------------- exact resume, signals


RESUME = [
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "trainer.limit_val_batches=1",
    "data.augment=ssd",  # random per-sample augmentation: its seeds must be restored too
    # the default recipe: SGD momentum (optimiser state), warm-up + cosine stepped every batch
    # (scheduler state, and a configure_optimizers that reads estimated_stepping_batches),
    # hard negative mining, bf16 where the CPU has it
]


def final_state(run_dir: Path) -> dict:
    """The final ``last.ckpt`` and metrics of a run folder."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["metrics"] = json.loads((run_dir / "status.json").read_text())["metrics"]
    return ckpt


def assert_same_run(a: dict, b: dict) -> None:
    """Two final states are bit-identical: weights, momentum, schedule, progress, metrics."""
    assert a["epoch"] == b["epoch"] == 2  # last.ckpt is the final epoch
    assert a["global_step"] == b["global_step"] == 12  # 3 epochs of 4 batches
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key  # bit-exact
    assert a["optimizer_states"][0]["state"].keys() == b["optimizer_states"][0]["state"].keys()
    for key, state in a["optimizer_states"][0]["state"].items():  # AdamW's moments and step
        other = b["optimizer_states"][0]["state"][key]
        assert state.keys() == other.keys() and {"exp_avg", "exp_avg_sq"} <= state.keys()
        for name, value in state.items():
            assert torch.equal(value, other[name]), (key, name)  # bit-exact
    assert a["lr_schedulers"] == b["lr_schedulers"] and a["lr_schedulers"][0]["last_epoch"] == 12
    for name in ("val/mAP_50", "val/mAP", "val/loss", "train/loss_epoch"):
        assert a["metrics"][name] == b["metrics"][name], name  # exactly equal


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> dict:
    """The reference: 3 epochs without a stop, loaded with ``data.num_workers=0``."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cli("src.train", *cli_overrides(run_dir, banana_data_dir, *RESUME))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_state(run_dir)


@pytest.mark.parametrize(
    ("signame", "workers", "kill", "stopped_at"),
    [
        # mid-epoch: after batch 1 of epoch 1 (6 steps done), SIGTERM, in-process loading
        ("SIGTERM", 0, ["SignalAfterBatch", "epoch=1", "batch=1"],
         "1 completed epochs and 2 of 4 batches of epoch 1 (global step 6)"),
        # mid-epoch Ctrl+C with 2 DataLoader workers (their augmentation is seeded per sample)
        ("SIGINT", 2, ["SignalAfterBatch", "epoch=1", "batch=2", "signum=2"],
         "1 completed epochs and 3 of 4 batches of epoch 1 (global step 7)"),
        # at the end of epoch 0, 2 workers (the loader's test covers the end-of-epoch state)
        pytest.param("SIGTERM", 2, ["SignalAfterEpoch", "epoch=0"],
                     "1 completed epochs (global step 4)", marks=pytest.mark.slow),
    ],
)  # fmt: skip
def test_signal_then_resume_equals_uninterrupted_run(
    signame: str,
    workers: int,
    kill: list[str],
    stopped_at: str,
    uninterrupted: dict,
    tmp_path: Path,
    banana_data_dir: Path,
) -> None:
    """A run stopped by a real signal and resumed with the printed command ends bit-identical to
    the uninterrupted run (which loaded its data with 0 workers)."""
    callback = [f"+callbacks.kill._target_=tests.callbacks.{kill[0]}"]
    callback += [f"+callbacks.kill.{arg}" for arg in kill[1:]]
    args = [*RESUME, f"data.num_workers={workers}"]
    killed = run_cli("src.train", *cli_overrides(tmp_path / "killed", banana_data_dir, *args,
                                                 *callback))  # fmt: skip
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert killed.returncode == {"SIGTERM": 143, "SIGINT": 130}[signame], killed.stderr[-3000:]
    log = killed.stdout + killed.stderr
    assert f"{signame} received after {stopped_at}: saved {last}" in log, log[-3000:]
    status = json.loads((tmp_path / "killed" / "status.json").read_text())
    assert status == {"status": "interrupted", "signal": signame, "checkpoint": str(last)}
    saved = load_checkpoint(last)
    step = int(stopped_at.rsplit("global step ", 1)[1].rstrip(")"))
    assert saved["global_step"] == step
    loader = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    epoch = (step - 1) // 4  # the epoch it stopped in, and the batches trained in it
    assert loader == [{"epoch": epoch, "batches": step - 4 * epoch, "seed": 42, "samples": 16}]

    # the printed command, with the resumed run's folder instead of the killed one
    command = shlex.split(log.split("Resume the run with: ", 1)[1].splitlines()[0])
    assert command[:3] == ["python", "-m", "src.train"] and command[-1] == f"ckpt_path={last}"
    overrides = [a if a.startswith("ckpt_path=") else
                 a.replace(str(tmp_path / "killed"), str(tmp_path / "resumed"))
                 for a in command[3:]]  # fmt: skip
    resumed = run_cli("src.train", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stdout + resumed.stderr
    assert_same_run(uninterrupted, final_state(tmp_path / "resumed"))


def test_nan_loss_stops_with_message_and_no_bad_checkpoint(tmp_path: Path, banana_data_dir: Path):
    proc = run_cli(
        "src.train",
        *cli_overrides(tmp_path / "nan", banana_data_dir, "model.optimizer.lr=1e6",
                       "trainer.max_epochs=2"),
    )  # fmt: skip
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "training diverged at global step" in text and "model.optimizer.lr" in text
    status = json.loads((tmp_path / "nan" / "status.json").read_text())
    assert status["status"] == "diverged" and status["step"] >= 1
    for ckpt in (tmp_path / "nan" / "checkpoints").glob("*.ckpt"):
        state = load_checkpoint(ckpt)["state_dict"]
        check_finite_state(state)  # raises if any weight is NaN/inf


def test_check_finite_helpers() -> None:
    check_finite_loss({"loss": torch.tensor(1.0), "box_loss": torch.tensor(0.5)}, step=3)
    with pytest.raises(DivergedError, match=r"global step 7: loss=nan, box_loss=0\.5") as info:
        check_finite_loss({"loss": torch.tensor(float("nan")), "box_loss": torch.tensor(0.5)}, 7)
    assert info.value.step == 7 and info.value.terms["box_loss"] == 0.5
    with pytest.raises(DivergedError, match="net.w.*the checkpoint was not written"):
        state = {"net.w": torch.tensor([1.0, float("inf")]), "n": torch.tensor(1)}
        check_finite_state(state, step=2, saving=True)
    with pytest.raises(DivergedError, match="non-finite gradients .b."):
        check_finite_grads({"a": torch.ones(2), "b": torch.tensor([float("nan")])}, step=1)


def test_resume_command_keeps_overrides() -> None:
    cmd = resume_command("/r/last.ckpt", ["loss=focal", "ckpt_path=/old.ckpt", "seed=3"])
    assert cmd == "python -m src.train loss=focal seed=3 ckpt_path=/r/last.ckpt"


def test_concurrent_runs_get_their_own_folders_and_test_only_exits_zero(
    tmp_path: Path, banana_data_dir: Path
) -> None:
    args = [
        *train_overrides(tmp_path / "unused", banana_data_dir, *QUIET),
        "train=false",
        "test=true",
        f"paths.log_dir={tmp_path / 'outputs'}",
    ]
    args = [a for a in args if not a.startswith("paths.output_dir=")]
    for proc in run_cli_parallel(["src.train", *args], ["src.train", *args]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "train" / "runs").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        assert (run / ".hydra" / "config.yaml").is_file()
        assert json.loads((run / "status.json").read_text())["status"] == "ok"


# ------------------------------------------------------------------- wrong settings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mining=none", "mining.neg_pos_ratio=3"], "mining=hard_negative"),
        (["loss=l1", "+loss.sigma=5"], "loss=focal or loss=smooth_l1"),
        (["loss=l1", "++loss.sigma=5"], "loss.sigma=5 is ignored by loss=l1"),
    ],
)
def test_setting_ignored_by_group_fails(
    overrides: list[str], message: str, tmp_path: Path, banana_data_dir: Path
) -> None:
    cfg = compose_config("train", train_overrides(tmp_path, banana_data_dir, *overrides))
    with pytest.raises(ValueError, match=message):
        train(cfg)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    cfg = compose_config(
        "train",
        train_overrides(
            out, banana_data_dir, *QUIET, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
        ),
    )  # fmt: skip
    train(cfg)
    return out / "checkpoints" / "last.ckpt"


def test_every_checkpoint_kind_loads_weights_only(tiny_ckpt: Path) -> None:
    for path in tiny_ckpt.parent.glob("*.ckpt"):
        blob = torch.load(path, weights_only=True)
        assert {"state_dict", "optimizer_states", "loops", "callbacks", "run_config"} <= set(blob)
        assert blob["run_config"]["backbone"]["name"] == "tiny"


def test_resume_with_other_backbone_names_both_sides(
    tiny_ckpt: Path, tmp_path: Path, banana_data_dir: Path
) -> None:
    cfg = compose_config(
        "train",
        train_overrides(tmp_path, banana_data_dir, "backbone=vgg16", f"ckpt_path={tiny_ckpt}"),
    )
    with pytest.raises(CheckpointMismatchError) as info:
        train(cfg)
    text = str(info.value)
    assert "checkpoint: backbone=tiny, 1 class (banana), input 256" in text
    assert "this run: backbone=vgg16, 1 class (banana), input 300" in text


def test_init_from_other_backbone_names_both_sides(
    tiny_ckpt: Path, tmp_path: Path, banana_data_dir: Path
) -> None:
    cfg = compose_config(
        "train",
        train_overrides(
            tmp_path, banana_data_dir, "backbone=vgg16", f"model.init_from={tiny_ckpt}"
        ),
    )
    with pytest.raises(Exception, match=r"checkpoint: backbone=tiny, 1 class .*this run: "
                       r"backbone=vgg16, 1 class, input 300"):  # fmt: skip
        train(cfg)


def test_eval_backbone_must_match_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> None:
    from src.eval import evaluate

    cfg = compose_config(
        "eval", [f"ckpt_path={tiny_ckpt}", "backbone=vgg16", f"paths.output_dir={tmp_path}"]
    )
    with pytest.raises(CheckpointMismatchError, match="backbone=vgg16 does not match"):
        evaluate(cfg)


def test_eval_banana_checkpoint_on_voc_says_why_not(tiny_ckpt: Path, tmp_path: Path) -> None:
    from src.eval import evaluate
    from tests.conftest import shared_data

    root = shared_data("VOCdevkit-mini")
    cfg = compose_config(
        "eval",
        [f"ckpt_path={tiny_ckpt}", "data=voc_mini", f"data.root={root}",
         f"paths.output_dir={tmp_path}"],
    )  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=r"1 class \(banana\).*data: 20 classes"):
        evaluate(cfg)


def test_text_file_and_pickled_object_as_checkpoint(tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes.ckpt is not a checkpoint written by src.train"):
        load_checkpoint(text)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, pickled)  # a pickled class, not a value
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        load_checkpoint(pickled)


def test_slurm_requeue_signal_is_deferred_to_the_end_of_the_batch(tmp_path: Path) -> None:
    """Lightning's SLURM handler (``hpc_ckpt_*.ckpt`` and requeue) runs at the next batch end,
    not in the middle of a step; the handlers are put back at teardown."""
    import signal
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from src.callbacks.faults import InterruptCallback

    calls: list[int] = []

    def lightning_handler(signum, frame) -> None:  # noqa: ANN001
        calls.append(signum)

    previous_int = signal.getsignal(signal.SIGINT)
    previous_usr1 = signal.signal(signal.SIGUSR1, lightning_handler)
    try:
        env = SLURMEnvironment(auto_requeue=True)
        trainer = SimpleNamespace(_accelerator_connector=SimpleNamespace(cluster_environment=env))
        callback = InterruptCallback(tmp_path)
        callback.on_train_start(trainer, None)
        assert signal.getsignal(signal.SIGINT) == callback._on_sigint
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == []  # deferred
        callback.on_train_batch_end(trainer, None, None, None, 0)
        assert calls == [signal.SIGUSR1]
        callback.on_train_batch_end(trainer, None, None, None, 1)
        assert calls == [signal.SIGUSR1]  # once
        callback.teardown(trainer, None, "fit")
        assert signal.getsignal(signal.SIGUSR1) == lightning_handler
        assert signal.getsignal(signal.SIGINT) == previous_int
    finally:
        signal.signal(signal.SIGUSR1, previous_usr1)
        signal.signal(signal.SIGINT, previous_int)
