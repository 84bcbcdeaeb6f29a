"""Bad inputs give one sentence: files that are not checkpoints, out-of-range optimiser values,
training sets without objects, and the project's errors on the console without a traceback."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from src.data.base import DataFormatError
from src.utils.checkpoint import NotACheckpointError, load_module, load_run_config
from src.utils.config import config_to_container, register_resolvers
from src.utils.errors import format_user_error, report_errors, user_error
from tests.conftest import ROOT, compose_config, train_overrides

register_resolvers()  # ${auto_precision:} and the others, for configs resolved here

QUIET = [
    "callbacks=none",
    "logger=csv",
]

KINDS = ("png", "text", "random", "truncated", "torchvision", "lightning")


# ------------------------------------------------------------------ the files
def _save_with_lightning(module: torch.nn.Module, path: Path) -> None:
    """Write ``module``'s checkpoint as Lightning does (``Trainer.save_checkpoint``)."""
    import lightning as L

    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)


class _OtherModule:
    """A Lightning module of another project (built lazily: Lightning is imported late)."""

    @staticmethod
    def build() -> torch.nn.Module:
        import lightning as L

        class Other(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.layer = torch.nn.Linear(3, 2)

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Other()


@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the default model written by Lightning, as src.train's are (no fit)."""
    from hydra.utils import instantiate

    out = tmp_path_factory.mktemp("real")
    cfg = compose_config(
        "train", [f"paths.output_dir={out}", "model.net.num_classes=1", "+model.class_names=[x]"]
    )
    model = instantiate(cfg.model)
    model.run_config = config_to_container(cfg)
    path = out / "real.ckpt"
    _save_with_lightning(model, path)
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, real_ckpt: Path) -> dict[str, Path]:
    """One file of each kind that is not a checkpoint written by src.train."""
    import torchvision

    root = tmp_path_factory.mktemp("bad_files")
    files = {kind: root / f"{kind}.ckpt" for kind in KINDS}
    Image.new("RGB", (32, 24), (200, 40, 40)).save(files["png"], format="PNG")
    files["text"].write_text("epoch: 3\nthis is a note, not weights\n")
    files["random"].write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                              generator=torch.Generator().manual_seed(0))
                                .numpy().tobytes())  # fmt: skip
    blob = real_ckpt.read_bytes()
    files["truncated"].write_bytes(blob[: len(blob) // 2])
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(),
               files["torchvision"])  # fmt: skip
    _save_with_lightning(_OtherModule.build(), files["lightning"])
    return files


WHY = {
    "png": "it is a PNG image",
    "text": "it is a text file starting 'epoch: 3'",
    "random": "it is not a torch file",
    "truncated": "it is a truncated or damaged torch file",
    "torchvision": "it is a plain state dict of ",
    "lightning": "it is a Lightning checkpoint (Lightning ",
}


def test_real_checkpoint_loads_so_truncation_is_the_fault(real_ckpt: Path) -> None:
    run_config, checkpoint = load_run_config(real_ckpt)
    assert run_config.backbone.name == "tiny" and "pytorch-lightning_version" in checkpoint
    module, _ = load_module(real_ckpt, checkpoint=checkpoint)
    assert module.net.num_classes == 1


# ------------------------------------------------------------------ each file, each entry point
def _resume(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import src.train

    def nothing_built(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("something was built before the checkpoint was checked")

    monkeypatch.setattr(src.train, "instantiate", nothing_built)
    src.train.train(compose_config("train", train_overrides(tmp_path, data_dir, "logger=csv",
                                                            f"ckpt_path={path}")))  # fmt: skip


def _init_from(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch import Trainer

    from src.train import train

    def no_fit(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("training started with a bad model.init_from")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    train(compose_config("train", train_overrides(tmp_path, data_dir, "logger=csv",
                                                  f"model.init_from={path}")))  # fmt: skip


def _eval(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.eval import evaluate

    evaluate(compose_config("eval", [f"ckpt_path={path}", f"paths.output_dir={tmp_path}"]))


def _predict(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.predict import predict

    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 30)).save(image)
    predict(compose_config("predict", [f"ckpt_path={path}", f"image={image}",
                                       f"paths.output_dir={tmp_path}"]))  # fmt: skip


def _visualize(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.visualize import visualize

    visualize(compose_config("visualize", [f"ckpt_path={path}", f"output_dir={tmp_path}",
                                           f"paths.output_dir={tmp_path}"]))  # fmt: skip


def _export(path: Path, tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from src.export import export

    export(compose_config("export", [f"ckpt_path={path}", f"paths.output_dir={tmp_path}",
                                     "verify=false"]))  # fmt: skip


ENTRY_POINTS: dict[str, tuple[Callable[..., None], str]] = {
    "train_resume": (_resume, "ckpt_path"),
    "train_init_from": (_init_from, "model.init_from"),
    "eval": (_eval, "ckpt_path"),
    "predict": (_predict, "ckpt_path"),
    "visualize": (_visualize, "ckpt_path"),
    "export": (_export, "ckpt_path"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_file_that_is_not_a_checkpoint_is_one_sentence_in_every_entry_point(
    entry: str,
    kind: str,
    bad_files: dict[str, Path],
    tmp_path: Path,
    banana_data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    call, key = ENTRY_POINTS[entry]
    path = bad_files[kind]
    with pytest.raises(Exception) as info:
        call(path, tmp_path, banana_data_dir, monkeypatch)
    found = user_error(info.value)  # what the console shows (under Hydra's InstantiationException)
    assert isinstance(found, NotACheckpointError), repr(info.value)
    message = format_user_error(found)
    assert message.startswith(f"{key}={path} is not a checkpoint written by src.train ({WHY[kind]}")
    assert "\n" not in message
    assert not (tmp_path / "checkpoints").exists()


def test_init_from_still_takes_ssd_pytorch_and_train_checkpoints(
    tmp_path: Path, real_ckpt: Path
) -> None:
    """The legitimate init_from files still load: an ssd.pytorch-style state dict (vgg.*,
    L2Norm.weight, ...) whose keys fit, and a checkpoint of src.train."""
    from hydra.utils import instantiate

    from src.models.convert import load_initial_weights

    cfg = compose_config(
        "train",
        [f"paths.output_dir={tmp_path}", "model.net.num_classes=1", "+model.class_names=[x]"],
    )
    net = instantiate(cfg.model).net
    load_initial_weights(net, real_ckpt)
    saved = torch.load(real_ckpt, weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, saved[f"net.{key}"]), key
    # ssd.pytorch's layout is recognised by its keys: a foreign vgg.* dict reaches its converter
    ssd_pytorch = tmp_path / "ssd300.pth"
    torch.save({"vgg.0.weight": torch.zeros(64, 3, 3, 3), "vgg.0.bias": torch.zeros(64)},
               ssd_pytorch)  # fmt: skip
    with pytest.raises(ValueError, match="cannot load the ssd.pytorch state dict") as info:
        load_initial_weights(net, ssd_pytorch)
    assert not isinstance(info.value, NotACheckpointError)


def test_missing_folder_and_pickled_code_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing.ckpt does not exist"):
        load_run_config(tmp_path / "missing.ckpt")
    with pytest.raises(NotACheckpointError, match=r"is not a checkpoint .*\(it is a folder\)"):
        load_run_config(tmp_path)
    pickled = tmp_path / "code.ckpt"
    torch.save({"state_dict": {}, "obj": Path("x")}, pickled)
    with pytest.raises(NotACheckpointError, match=r"pickled Python objects such as pathlib"):
        load_run_config(pickled)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(NotACheckpointError, match=r"\(it is an empty file\)"):
        load_run_config(empty)


# ------------------------------------------------------------------ optimiser and scheduler values
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.optimizer.lr=-1", "model.optimizer.lr must be > 0 (got -1)"),
        ("model.optimizer.lr=0", "model.optimizer.lr must be > 0 (got 0)"),
        ("optimizer=sgd model.optimizer.momentum=1",
         "model.optimizer.momentum must be in [0, 1) (got 1)"),
        ("optimizer=sgd model.optimizer.momentum=-0.5",
         "model.optimizer.momentum must be in [0, 1)"),
        ("model.optimizer.weight_decay=-1e-4", "model.optimizer.weight_decay must be >= 0"),
        ("model.optimizer.lr=fast", "model.optimizer.lr must be a finite number > 0 (got 'fast')"),
        ("model.optimizer.lr=nan", "model.optimizer.lr must be a finite number > 0"),
        ("experiment=banana model.scheduler.warmup_steps=-5",
         "model.scheduler.warmup_steps must be >= 0 (got -5)"),
        ("experiment=voc_ssd300 model.scheduler.warmup_iters=-1",
         "model.scheduler.warmup_iters must be >= 0 (got -1)"),
        ("experiment=banana model.scheduler.warmup_factor=0",
         "model.scheduler.warmup_factor must be in (0, 1] (got 0)"),
    ],
)  # fmt: skip
def test_optimizer_values_are_checked_before_anything_is_built(
    override: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import src.train

    def nothing_built(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("something was built before the values were checked")

    monkeypatch.setattr(src.train, "instantiate", nothing_built)
    cfg = compose_config("train", [f"paths.output_dir={tmp_path}", *override.split()])
    with pytest.raises(ValueError) as info:
        src.train.train(cfg)
    assert str(info.value) == message or str(info.value).startswith(message), str(info.value)
    assert format_user_error(user_error(info.value)) == str(info.value)


def test_good_optimizer_values_pass_and_adam_betas_are_checked(tmp_path: Path) -> None:
    from src.utils.config import check_optimizer

    for overrides in (
        [],
        ["experiment=banana"],
        ["experiment=voc_ssd300"],
        ["optimizer=sgd"],
        ["optimizer=adamw"],
    ):
        check_optimizer(compose_config("train", [f"paths.output_dir={tmp_path}", *overrides]))
    adam = compose_config(
        "train",
        [f"paths.output_dir={tmp_path}", "model.optimizer._target_=torch.optim.Adam",
         "model.optimizer.betas=[0.9,1.5]"],
    )  # fmt: skip
    with pytest.raises(
        ValueError, match=r"model.optimizer.betas\[1\] must be in \[0, 1\) \(got 1.5\)"
    ):
        check_optimizer(adam)


# ------------------------------------------------------------------ training sets without objects
def _coco_dir(root: Path, objects: bool) -> Path:
    """Four 48x40 images and a COCO JSON with one category: one box each, or none at all."""
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for i in range(4):
        Image.new("RGB", (48, 40), (30 * i, 90, 160)).save(images / f"im{i}.png")
        entries.append({"id": i + 1, "file_name": f"im{i}.png", "width": 48, "height": 40})
    annotations = (
        [{"id": i + 1, "image_id": i + 1, "category_id": 3, "bbox": [8, 6, 20, 18], "iscrowd": 0,
          "area": 360} for i in range(4)]
        if objects else []
    )  # fmt: skip
    (root / "train.json").write_text(json.dumps(
        {"images": entries, "annotations": annotations, "categories": [{"id": 3, "name": "cup"}]}
    ))  # fmt: skip
    return root


def coco_overrides(output_dir: Path, root: Path, *extra: str) -> list[str]:
    json_path, images = root / "train.json", root / "images"
    return [
        f"paths.output_dir={output_dir}", "data=coco", f"data.train_json={json_path}",
        f"data.train_images={images}", f"data.val_json={json_path}", f"data.val_images={images}",
        "data.batch_size=2", "data.num_workers=0", "trainer.accelerator=cpu", *QUIET, *extra,
    ]  # fmt: skip


def test_training_set_without_objects_stops_and_allow_empty_trains(tmp_path: Path) -> None:
    from src.train import train

    root = _coco_dir(tmp_path / "coco", objects=False)
    cfg = compose_config("train", coco_overrides(tmp_path / "run", root))
    with pytest.raises(DataFormatError) as info:
        train(cfg)
    message = str(info.value)
    assert message.startswith("the train split of CocoDataset (data.train_json=")
    assert str(root / "train.json") in message and "4 images) holds no object" in message
    assert message.endswith("or set data.allow_empty=true to train anyway")
    assert not (tmp_path / "run" / "checkpoints").exists()

    cfg = compose_config(
        "train", coco_overrides(tmp_path / "run2", root, "data.allow_empty=true", "debug=fdr")
    )
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1  # one optimiser step on background only
    assert math.isfinite(metrics["train/loss_step"]) and math.isfinite(metrics["val/loss"])
    for value in objects["model"].state_dict().values():
        assert torch.isfinite(value.float()).all()


def test_training_set_with_objects_is_not_stopped(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    root = _coco_dir(tmp_path / "coco", objects=True)
    datamodule = instantiate(compose_config("train", coco_overrides(tmp_path, root)).data)
    datamodule.setup("fit")
    assert datamodule.train_dataset.num_objects == 4 and datamodule.allow_empty is False


@pytest.mark.parametrize("mining", [False, True])
def test_positives_normalised_loss_is_finite_without_positives(mining: bool) -> None:
    """No positive in the batch: the positives count is clamped to 1, the box term is 0 and the
    classification term is the sum over the kept anchors (hand-computed: log 2 each)."""
    from src.detection.losses import MultiBoxLoss
    from src.detection.mining import HardNegativeMiner

    miner = HardNegativeMiner(neg_pos_ratio=3, min_negatives=2) if mining else None
    loss_fn = MultiBoxLoss(normalize="positives", mining=miner)
    logits = torch.zeros(1, 5, 2, requires_grad=True)  # p(background) = 1/2 everywhere
    deltas = torch.zeros(1, 5, 4, requires_grad=True)
    targets = SimpleNamespace(
        cls_labels=torch.zeros(1, 5, dtype=torch.int64),
        box_offsets=torch.zeros(1, 5, 4),
        pos_mask=torch.zeros(1, 5, dtype=torch.bool),
    )
    out = loss_fn(logits, deltas, targets)
    kept = 2 if mining else 5
    assert out.box_loss.item() == 0.0
    assert out.cls_loss.item() == pytest.approx(kept * math.log(2))
    out.loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(deltas.grad).all()
    assert int((logits.grad != 0).any(-1).sum()) == kept


def test_box_space_loss_without_positives_is_zero_and_finite() -> None:
    from src.detection.coder import BoxCoder
    from src.detection.losses import IoUBoxLoss, MultiBoxLoss

    loss_fn = MultiBoxLoss(box_loss=IoUBoxLoss("ciou"), normalize="positives")
    anchors = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.5, 0.5, 0.9, 0.8]])
    deltas = torch.zeros(1, 2, 4, requires_grad=True)
    targets = SimpleNamespace(
        cls_labels=torch.zeros(1, 2, dtype=torch.int64),
        box_offsets=torch.zeros(1, 2, 4),
        pos_mask=torch.zeros(1, 2, dtype=torch.bool),
        matched_boxes=torch.zeros(1, 2, 4),
    )
    out = loss_fn(torch.zeros(1, 2, 3), deltas, targets, anchors=anchors, coder=BoxCoder())
    assert out.box_loss.item() == 0.0 and math.isfinite(out.loss.item())
    out.box_loss.backward()
    assert torch.equal(deltas.grad, torch.zeros_like(deltas))


# ------------------------------------------------------------------ which errors are the user's
def _raise_config_error() -> None:
    """A config check of the project (its raise statement is in src/)."""
    from src.utils.config import check_value

    check_value(-1, "loss.sigma", (0.0, False, None, False))


def test_a_raise_in_the_tests_is_not_the_projects() -> None:
    try:
        raise ValueError("loss.sigma must be > 0 (got -1)")  # raised here, not in src/
    except ValueError as err:
        assert user_error(err) is None


def test_user_errors_and_bugs_are_told_apart() -> None:
    from hydra.errors import InstantiationException

    def caught(fn: Callable[[], object]) -> BaseException:
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            return err
        raise AssertionError("no exception")

    # the project's raise statement: a user error, also under Hydra's wrapper
    own = caught(_raise_config_error)
    assert user_error(own) is own
    try:
        raise InstantiationException("Error in call to target 'x'") from own
    except InstantiationException as wrapped:
        assert user_error(wrapped) is own
    # Python's own ValueError in the project's code, and one raised by a library: bugs
    assert user_error(caught(lambda: int("x"))) is None
    assert user_error(caught(lambda: torch.optim.SGD([torch.zeros(1)], lr=-1))) is None
    assert user_error(caught(lambda: [][1])) is None
    # every exception class the project defines is the user's, wherever it is raised
    assert isinstance(user_error(DataFormatError("bad row")), DataFormatError)


def test_unset_mandatory_value_names_the_key(tmp_path: Path) -> None:
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_config("eval", [f"paths.output_dir={tmp_path}"])  # ckpt_path: ???
    with pytest.raises(MissingMandatoryValue) as info:
        str(cfg.ckpt_path)
    assert user_error(info.value) is info.value
    assert format_user_error(info.value) == (
        "ckpt_path must be set (it is ??? in the config): pass ckpt_path=..."
    )


def test_worker_errors_show_the_original_message() -> None:
    from torch._utils import ExceptionWrapper

    try:
        raise DataFormatError("labels.csv row 3: xmax < xmin")
    except DataFormatError:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except DataFormatError as err:
        assert "Original Traceback" in str(err)
        assert format_user_error(user_error(err)) == "labels.csv row 3: xmax < xmin"


def test_report_errors_exits_1_with_one_line_and_lets_bugs_through(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    @report_errors
    def main(kind: str) -> str:
        if kind == "user":
            _raise_config_error()
        if kind == "bug":
            return str(1 / 0)
        return "ok"

    assert main("fine") == "ok" and main.__name__ == "main"
    with pytest.raises(SystemExit) as info:
        main("user")
    assert info.value.code == 1
    assert capsys.readouterr().err == "Error: loss.sigma must be > 0 (got -1)\n"
    with pytest.raises(ZeroDivisionError):
        main("bug")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ValueError, match="loss.sigma"):
        main("user")


def test_multirun_jobs_raise_for_the_sweeper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In a sweep the exception goes on to Hydra's launcher, which records the job as failed
    (the Optuna sweeper reads it from the job's return value); a single run exits with 1."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from tests.conftest import CONF_DIR

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train", [f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    try:
        for mode in (RunMode.MULTIRUN, RunMode.RUN):
            job = copy.deepcopy(cfg)  # set_config makes the hydra node read-only
            with open_dict(job):
                job.hydra.mode = mode
            HydraConfig.instance().set_config(job)
            expected = ValueError if mode == RunMode.MULTIRUN else SystemExit
            with pytest.raises(expected):
                report_errors(_raise_config_error)()
    finally:
        HydraConfig.instance().cfg = None
    assert capsys.readouterr().err == "Error: loss.sigma must be > 0 (got -1)\n"  # the run only


# ------------------------------------------------------------------ the console, for real
def _coco_without_categories(root: Path) -> Path:
    root.mkdir(parents=True)
    path = root / "broken.json"
    path.write_text(json.dumps({"images": [], "annotations": []}))
    return path


@pytest.fixture(scope="module")
def console_runs(
    tmp_path_factory: pytest.TempPathFactory, bad_files: dict[str, Path]
) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Four real command lines, run side by side: a PNG as ckpt_path (src.export, the entry
    point with the fewest imports), a bad learning rate (src.train), a COCO JSON without
    categories (src.train), and the PNG again with HYDRA_FULL_ERROR=1."""
    root = tmp_path_factory.mktemp("console")
    broken = _coco_without_categories(root / "coco")
    commands = {
        "checkpoint": ("src.export", [f"ckpt_path={bad_files['png']}"], {}),
        "config": ("src.train", ["model.optimizer.lr=-1"], {}),
        "data": ("src.train", ["data=coco", f"data.train_json={broken}",
                               f"data.train_images={root}", f"data.val_json={broken}",
                               f"data.val_images={root}"], {}),
        "full_error": ("src.export", [f"ckpt_path={bad_files['png']}"], {"HYDRA_FULL_ERROR": "1"}),
    }  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PROJECT_ROOT=str(ROOT))
    procs = {}
    for name, (module, overrides, extra_env) in commands.items():
        run_dir = root / name
        procs[name] = (
            subprocess.Popen(
                [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"],
                cwd=ROOT, env={**env, **extra_env}, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            ),
            run_dir,
        )  # fmt: skip
    results = {}
    for name, (proc, run_dir) in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir)
    return results


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "Error executing job" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    return lines[0][len("Error: ") :]


@pytest.mark.parametrize(
    ("name", "task", "expected"),
    [
        ("checkpoint", "export", "ckpt_path={png} is not a checkpoint written by src.train "
                                 "(it is a PNG image); pass best.ckpt or last.ckpt"),
        ("config", "train", "model.optimizer.lr must be > 0 (got -1)"),
        ("data", "train", "{json}: not a COCO detection file: missing 'categories'"),
    ],
)  # fmt: skip
def test_console_shows_one_line_and_the_log_file_the_traceback(
    name: str,
    task: str,
    expected: str,
    console_runs: dict[str, tuple[subprocess.CompletedProcess, Path]],
    bad_files: dict[str, Path],
) -> None:
    proc, run_dir = console_runs[name]
    line = _one_error_line(proc)
    broken = run_dir.parent / "coco" / "broken.json"
    assert line.startswith(expected.format(png=bad_files["png"], json=broken)), line
    log = (run_dir / f"{task}.log").read_text()
    assert line in log and "Traceback (most recent call last)" in log
    if task == "train":  # src.report reads why the run failed
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and line in status["message"], status


def test_hydra_full_error_shows_the_traceback(
    console_runs: dict[str, tuple[subprocess.CompletedProcess, Path]],
    bad_files: dict[str, Path],
) -> None:
    proc, run_dir = console_runs["full_error"]
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"NotACheckpointError: ckpt_path={bad_files['png']} is not a checkpoint" in proc.stderr
    assert "Traceback (most recent call last)" in (run_dir / "export.log").read_text()
