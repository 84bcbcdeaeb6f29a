"""What a run writes to TensorBoard: tag groups, HParams, Text, pictures, PR curves, no NaN.

Also the F1-optimal score threshold a run stores in its checkpoints, and src.predict using it.
"""

from __future__ import annotations

import json
import logging
import math
import signal
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from src.callbacks.hparams import METRIC_COLUMNS, tensorboard_tag
from src.eval import evaluate
from src.predict import predict
from src.train import train
from src.utils.faults import RunInterruptedError
from src.utils.hparams import run_name, user_hparams
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


def _session_status(run_dir: Path) -> list[str]:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    out = []
    for acc in _accumulators(run_dir):
        for content in acc.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_end_info"):
                out.append(api_pb2.Status.Name(data.session_end_info.status))
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
    columns: list[tuple[str, str]] = []
    differs: set[str] = set()
    for acc in _accumulators(finished):
        for content in acc.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hparams.update(data.session_start_info.hparams)
            if data.HasField("experiment"):
                columns += [(m.name.tag, m.display_name) for m in data.experiment.metric_infos]
                differs |= {h.name for h in data.experiment.hparam_infos if h.differs}
    # five keys flagged: TensorBoard lists them first and shows them as columns (it shows the
    # first five flagged); the data really used and the anchor set are always among them
    assert differs == {
        "run", "datamodule.resolved_source", "backbone.anchor_set", "loss.name", "loss.sigma",
    }  # fmt: skip
    assert hparams["run"].string_value == "loss=smooth_l1 loss.sigma=0.5 trainer.max_epochs=2"
    assert hparams["loss.sigma"].number_value == 0.5
    assert hparams["loss.name"].string_value == "smooth_l1"
    assert hparams["trainer.max_epochs"].number_value == 2
    assert hparams["datamodule.resolved_source"].string_value == "synthetic"
    # the default recipe's anchors: the network is `tiny`, the anchor set is named
    assert hparams["backbone.anchor_set"].string_value == "tiny_small_anchors"
    assert hparams["backbone.name"].string_value == "tiny"
    for knob in ("mining.name", "model.optimizer.lr", "data.batch_size", "data.augment", "seed"):
        assert knob in hparams, sorted(hparams)
    # constants nobody varied (anchor geometry, pixel statistics) stay out of the table
    assert not [k for k in hparams if k.startswith(("backbone.anchors", "backbone.pixel"))]
    # the metric columns read the curves' own tags, shown under the metric keys
    assert columns == [(tensorboard_tag(m), m) for m in METRIC_COLUMNS]
    scalars = _scalars(finished)
    assert all(tag in scalars for tag, _ in columns), sorted(scalars)
    assert _session_status(finished) == ["STATUS_SUCCESS"]


def test_run_folder_is_named_by_the_overrides(finished: Path) -> None:
    dirs = {p.parent for p in (finished / "tensorboard").rglob("events.out.tfevents.*")}
    name = "loss=smooth_l1,loss.sigma=0.5,trainer.max_epochs=2"
    assert dirs == {finished / "tensorboard" / name}


def test_finished_run_writes_no_nan_and_opens_on_loss_and_map(finished: Path) -> None:
    scalars = _scalars(finished)
    assert "epoch" not in scalars and "mAP/val/mAP_50" in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for _, v in values), tag
    assert not any(tag.startswith(("hp_metric", "final/")) for tag in scalars)
    # TensorBoard sorts the groups by name and opens the first two: the loss and mAP curves,
    # one point per validation (2 epochs), no one-point chart
    groups = sorted({tag.split("/")[0] for tag in scalars})
    assert groups[:2] == ["loss", "mAP"] and set(groups) == {"loss", "mAP", "train", "val"}
    assert sorted(t for t in scalars if t.startswith(("loss/", "mAP/"))) == [
        "loss/train/loss_epoch", "loss/val/loss",
        "mAP/val/mAP", "mAP/val/mAP_50", "mAP/val/mAP_75", "mAP/val/voc_mAP_50",
    ]  # fmt: skip
    for tag in ("loss/train/loss_epoch", "loss/val/loss", "mAP/val/mAP_50"):
        assert len(scalars[tag]) == 2, tag
    assert "train/lr-AdamW" in scalars and "train/loss_step" in scalars


def test_text_tab_holds_overrides_and_per_class_table(finished: Path) -> None:
    texts = _texts(finished)
    overrides = texts["run/overrides/text_summary"]
    assert "loss=smooth_l1 loss.sigma=0.5 trainer.max_epochs=2" in overrides
    table = texts["val/per_class_AP50/text_summary"]
    assert table.splitlines()[0] == "| class | AP@0.5 |"
    assert "| banana |" in table and "**mean**" in table


def test_interrupted_run_writes_no_nan_and_a_failed_session(
    tmp_path: Path, banana_data_dir: Path
) -> None:
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
    assert "mAP/val/mAP_50" in scalars
    for tag, values in scalars.items():
        assert all(math.isfinite(v) for _, v in values), tag
    # the HParams columns show the last validation's values; the session says it failed
    assert _session_status(out) == ["STATUS_FAILURE"]


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
    curves: set[str] = set()
    for acc in _accumulators(finished):
        images |= set(acc.Tags()["images"])
        curves |= set(acc.PluginTagToContent("pr_curves"))
    # one card per detection picture (the tests draw 2), under a group of their own
    assert images == {
        "val_images/detections/0", "val_images/detections/1", "val_images/pr_curves",
        "val_images/anchors/0", "val_images/anchors/1",
        "val_images/negatives/0", "val_images/negatives/1",
    }  # fmt: skip
    assert curves == {"val/banana"}  # the PR Curves tab, one curve per class


def _validation_threshold(out: Path, data_dir: Path, ckpt: Path) -> dict:
    """Validate ``ckpt``'s weights again, as the run did, and return the module's threshold."""
    from hydra.utils import instantiate

    from src.train import fill_from_datamodule

    cfg = compose_config("train", train_overrides(out, data_dir, *USER_OVERRIDES, *SHORT))
    datamodule = instantiate(cfg.data)
    fill_from_datamodule(cfg, datamodule)
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False)
    trainer.validate(model, datamodule=datamodule, ckpt_path=str(ckpt), weights_only=True)
    return model.score_threshold


def test_checkpoints_store_the_f1_threshold_of_their_validation(
    finished: Path, banana_data_dir: Path, tmp_path: Path
) -> None:
    scalars = _scalars(finished)
    logged = [v for _, v in sorted(scalars["val/f1_threshold"])]
    best = torch.load(finished / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(finished / "checkpoints" / "last.ckpt", weights_only=True)
    for ckpt in (best, last):
        stored = ckpt["score_threshold"]
        assert stored["epoch"] == ckpt["epoch"] and stored["iou_threshold"] == 0.5
        assert 0.0 <= stored["value"] <= 1.0 and 0.0 <= stored["f1"] <= 1.0
        assert stored["value"] in [pytest.approx(v) for v in logged]
    assert last["score_threshold"]["value"] == pytest.approx(logged[-1])
    # validating best.ckpt's weights again gives the threshold it stores: the one of the
    # validation that made it best, not of a later epoch
    again = _validation_threshold(tmp_path, banana_data_dir, finished / "checkpoints" / "best.ckpt")
    assert again["value"] == pytest.approx(best["score_threshold"]["value"], abs=1e-6)
    assert again["f1"] == pytest.approx(best["score_threshold"]["f1"], abs=1e-6)


def test_predict_uses_the_checkpoint_threshold(
    finished: Path, banana_data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = finished / "checkpoints" / "best.ckpt"
    stored = torch.load(ckpt, weights_only=True)["score_threshold"]
    image = sorted(banana_data_dir.rglob("*.png"))[0]
    cfg = compose_config(
        "predict", [f"ckpt_path={ckpt}", f"image={image}", f"output_dir={tmp_path}"]
    )
    assert cfg.threshold is None  # the default: the checkpoint's
    with caplog.at_level(logging.INFO, logger="src.predict"):
        records = predict(cfg)
    said = [r.getMessage() for r in caplog.records if "Score threshold" in r.getMessage()]
    assert said == [
        f"Score threshold {stored['value']:.3g}, the F1-optimal threshold of the checkpoint's "
        f"validation (epoch {stored['epoch']}: F1 {stored['f1']:.3f}, precision "
        f"{stored['precision']:.3f}, recall {stored['recall']:.3f} at IoU 0.5, all classes)"
    ]
    written = json.loads(Path(records[0]["json"]).read_text())
    assert written["threshold"] == pytest.approx(stored["value"])
    assert all(d["score"] >= stored["value"] for d in written["detections"])
