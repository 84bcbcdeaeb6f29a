"""What a run writes to TensorBoard: HParams, Text, no NaN, eval/ at the checkpoint step."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.eval import evaluate
from src.train import train
from src.utils.faults import RunInterruptedError
from src.utils.hparams import FINAL_METRICS, run_name, user_hparams
from tests.conftest import compose_config, train_overrides

USER_OVERRIDES = ["loss=smooth_l1", "loss.sigma=0.5", "trainer.max_epochs=2"]
SHORT = ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]


def _accumulators(run_dir: Path) -> list[EventAccumulator]:
    dirs = sorted({p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")})
    assert dirs, f"no events under {run_dir / 'tensorboard'}"
    accs = []
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        accs.append(acc)
    return accs


def _scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for acc in _accumulators(run_dir):
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def _texts(run_dir: Path) -> dict[str, str]:
    out = {}
    for acc in _accumulators(run_dir):
        for tag in acc.Tags()["tensors"]:
            event = acc.Tensors(tag)[-1]
            if event.tensor_proto.string_val:
                out[tag] = event.tensor_proto.string_val[0].decode()
    return out


def _start(out: Path, data_dir: Path, *extra: str) -> list[str]:
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(USER_OVERRIDES))
    return train_overrides(out, data_dir, *USER_OVERRIDES, *SHORT, *extra)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, banana_data_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tb_finished")
    train(compose_config("train", _start(out, banana_data_dir)))
    return out


def test_hparams_list_the_overrides_and_knobs(finished: Path) -> None:
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams: dict = {}
    columns: list[str] = []
    differs: set[str] = set()
    for acc in _accumulators(finished):
        for content in acc.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams.update(data.session_start_info.hparams)
            if data.HasField("experiment"):
                columns += [m.name.tag for m in data.experiment.metric_infos]
                differs |= {h.name for h in data.experiment.hparam_infos if h.differs}
    # the overridden keys are flagged, so TensorBoard lists and shows them first
    assert differs == {"run", "loss.name", "loss.sigma", "trainer.max_epochs"}
    assert hparams["run"].string_value == "loss=smooth_l1 loss.sigma=0.5 trainer.max_epochs=2"
    assert hparams["loss.sigma"].number_value == 0.5
    assert hparams["loss.name"].string_value == "smooth_l1"
    assert hparams["trainer.max_epochs"].number_value == 2
    assert hparams["datamodule.resolved_source"].string_value == "synthetic"
    for knob in ("mining.name", "model.optimizer.lr", "data.batch_size", "data.augment", "seed"):
        assert knob in hparams, sorted(hparams)
    # constants nobody varied (anchor geometry, pixel statistics) stay out of the table
    assert not [k for k in hparams if k.startswith(("backbone.anchors", "backbone.pixel"))]
    assert columns == ["final/" + m.replace("/", "_") for m in FINAL_METRICS]


def test_run_folder_is_named_by_the_overrides(finished: Path) -> None:
    dirs = {p.parent for p in (finished / "tensorboard").rglob("events.out.tfevents.*")}
    name = "loss=smooth_l1,loss.sigma=0.5,trainer.max_epochs=2"
    assert dirs == {finished / "tensorboard" / name}


def test_finished_run_writes_no_nan_and_final_equals_last(finished: Path) -> None:
    scalars = _scalars(finished)
    assert "epoch" not in scalars and "val/mAP_50" in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for _, v in values), tag
    last_map = max(scalars["val/mAP_50"])[1]
    assert scalars["final/val_mAP_50"] == [(4, pytest.approx(last_map))]  # 2 epochs x 2 batches
    assert not any(tag.startswith("hp_metric") for tag in scalars)


def test_text_tab_holds_overrides_and_per_class_table(finished: Path) -> None:
    texts = _texts(finished)
    overrides = texts["run/overrides/text_summary"]
    assert "loss=smooth_l1 loss.sigma=0.5 trainer.max_epochs=2" in overrides
    table = texts["val/per_class_AP50/text_summary"]
    assert table.splitlines()[0] == "| class | AP@0.5 |"
    assert "| banana |" in table and "**mean**" in table


def test_interrupted_run_writes_no_nan_and_no_final(tmp_path: Path, banana_data_dir: Path) -> None:
    out = tmp_path / "killed"
    overrides = _start(
        out,
        banana_data_dir,
        "+callbacks.kill._target_=tests.callbacks.SignalAfterEpoch",
        f"+callbacks.kill.signum={int(signal.SIGTERM)}",
    )
    with pytest.raises(RunInterruptedError):
        train(compose_config("train", overrides))
    scalars = _scalars(out)
    assert "val/mAP_50" in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for _, v in values), tag
    assert not [t for t in scalars if t.startswith("final/")]


def test_eval_logs_under_eval_at_the_checkpoint_step(finished: Path, tmp_path: Path) -> None:
    ckpt = finished / "checkpoints" / "last.ckpt"
    step = torch.load(ckpt, weights_only=True)["global_step"]
    cfg = compose_config(
        "eval", [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"]
    )
    metrics, _ = evaluate(cfg)
    scalars = _scalars(tmp_path)
    assert scalars, "src.eval logged no scalar"
    assert all(tag.startswith("eval/") for tag in scalars), sorted(scalars)
    assert scalars["eval/mAP_50"] == [(step, pytest.approx(metrics["val/mAP_50"]))]
    assert "eval/run/text_summary" in _texts(tmp_path)


def test_user_hparams_and_run_name_by_hand() -> None:
    container = {
        "seed": 1,
        "loss": {"name": "focal", "gamma": 2.0, "module": {"_target_": "x", "gamma": 2.0}},
        "backbone": {"name": "tiny", "anchors": {"sizes": [[0.2, 0.27]]}},
        "data": {"batch_size": 8, "root": "/data", "image_size": 256},
        "paths": {"output_dir": "/x"},
    }
    params = user_hparams(container, ["loss=focal", "data.image_size=256", "paths.output_dir=/x"])
    assert params == {
        "run": "loss=focal data.image_size=256",
        "seed": 1,
        "loss.name": "focal",
        "loss.gamma": 2.0,
        "backbone.name": "tiny",
        "data.batch_size": 8,
        "data.image_size": 256,
    }
    assert run_name([]) == "defaults"
    assert run_name(["a=" + "x" * 200], max_len=10) == "a=xxxxx..."


def test_images_tab_holds_detections_anchors_and_pr_curves(finished: Path) -> None:
    images: set[str] = set()
    for acc in _accumulators(finished):
        images |= set(acc.Tags()["images"])
    assert {"val/detections", "val/pr_curves", "val/anchors/0", "val/negatives/0"} <= images
