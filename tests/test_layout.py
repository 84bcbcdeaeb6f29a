"""Layers point down: callbacks in one package, utils free of Lightning, old checkpoints load."""

from __future__ import annotations

import ast
import inspect
import pkgutil
from importlib import import_module
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class
from lightning.pytorch import Callback

import src
from src.utils.checkpoint import LEGACY_TARGETS, load_run_config, upgrade_targets
from tests.conftest import ROOT

SRC = ROOT / "src"
#: entry points: the modules under src/ and the packages that run as ``python -m src.<name>``
ENTRY_POINTS = sorted(
    {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    | {p.parent.name for p in SRC.glob("*/__main__.py")}
)
#: layers, highest first: a module may import its own layer and the layers below it
LAYERS = {
    **{name: 3 for name in ENTRY_POINTS},
    "models": 2,
    "callbacks": 2,
    "viz": 2,
    "search": 2,
    "data": 1,
    "detection": 1,
    "metrics": 1,
    "utils": 0,
}


def _files(name: str) -> list[Path]:
    """The source files of ``src.<name>`` (a module or a package)."""
    return (
        [SRC / f"{name}.py"]
        if (SRC / f"{name}.py").is_file()
        else sorted((SRC / name).rglob("*.py"))
    )


def _imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names), at any depth of the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((SRC / "utils").glob("*.py")), ids=lambda p: p.name)
def test_utils_know_nothing_of_lightning_or_models(path: Path) -> None:
    bad = {
        name
        for name in _imports(path)
        if name.split(".")[0] in ("lightning", "pytorch_lightning")
        or name.startswith(("src.models", "src.callbacks", "src.viz", "src.data"))
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((SRC / "detection").glob("*.py")), ids=lambda p: p.name)
def test_detection_is_pure_tensor_code(path: Path) -> None:
    bad = {
        name
        for name in _imports(path)
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "hydra", "omegaconf")
        or (name.startswith("src.") and not name.startswith("src.detection"))
    }
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_every_source_file_has_a_layer() -> None:
    tops = {p.stem if p.suffix == ".py" else p.name for p in SRC.iterdir()}
    tops -= {"__init__", "__pycache__"}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down(name: str) -> None:
    """No module imports a higher layer, and no entry point imports another entry point."""
    bad = []
    for path in _files(name):
        for imported in _imports(path):
            parts = imported.split(".")
            if parts[0] != "src" or len(parts) < 2 or parts[1] == name:
                continue
            other = parts[1]
            if LAYERS.get(other, 0) > LAYERS[name] or (
                name in ENTRY_POINTS and other in ENTRY_POINTS
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert bad == []


@pytest.mark.parametrize("path", sorted((SRC / "viz").glob("*.py")), ids=lambda p: p.name)
def test_viz_draws_without_lightning(path: Path) -> None:
    bad = {n for n in _imports(path) if n.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_every_callback_lives_in_src_callbacks() -> None:
    outside = []
    for info in pkgutil.walk_packages(src.__path__, "src."):
        if (
            info.name.startswith(("src.search.hydra_plugins",))
            or info.name in {f"src.{e}" for e in ENTRY_POINTS}
            or info.name.startswith("src.report")
        ):
            continue
        module = import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(obj, Callback)
                and obj.__module__ == module.__name__
                and not module.__name__.startswith("src.callbacks")
            ):
                outside.append(f"{module.__name__}.{obj.__name__}")
    assert outside == []


def test_legacy_targets_point_at_existing_classes() -> None:
    for old, new in LEGACY_TARGETS.items():
        assert old != new
        get_class(new)  # raises when the new path does not exist


def test_upgrade_targets_renames_nested_entries_only() -> None:
    stored = {
        "callbacks": {
            "resume": {"_target_": "src.utils.faults.ResumeCallback"},
            "grid": {"_target_": "src.viz.callbacks.DetectionGridCallback", "num_images": 8},
        },
        "logger": [{"_target_": "src.utils.hparams.RunTensorBoardLogger", "name": "x"}],
        "model": {"_target_": "src.models.ssd_module.SSDLitModule", "note": "src.utils.faults"},
    }
    up = upgrade_targets(stored)
    assert up["callbacks"]["resume"]["_target_"] == "src.callbacks.faults.ResumeCallback"
    assert up["callbacks"]["grid"] == {
        "_target_": "src.callbacks.pictures.DetectionGridCallback",
        "num_images": 8,
    }
    assert up["logger"][0]["_target_"] == "src.callbacks.hparams.RunTensorBoardLogger"
    assert up["model"] == stored["model"]
    assert stored["callbacks"]["resume"]["_target_"] == "src.utils.faults.ResumeCallback"


def test_checkpoint_with_old_targets_loads(tmp_path: Path) -> None:
    """A checkpoint written before the move names the old paths; they build the new classes."""
    from hydra.utils import instantiate

    ckpt = tmp_path / "old.ckpt"
    old = {
        "callbacks": {
            "resume": {"_target_": "src.utils.faults.ResumeCallback"},
            "panels": {"_target_": "src.viz.callbacks.AnchorPanelsCallback", "num_images": 1},
        }
    }
    torch.save({"epoch": 0, "state_dict": {}, "run_config": old}, ckpt)
    run_config, _ = load_run_config(ckpt)
    built = {name: instantiate(conf) for name, conf in run_config.callbacks.items()}
    assert type(built["resume"]).__module__ == "src.callbacks.faults"
    assert type(built["panels"]).__name__ == "AnchorPanelsCallback"
