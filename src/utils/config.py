"""Config helpers shared by the entry points."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

__all__ = [
    "check_group_keys",
    "check_optimizer",
    "check_value",
    "config_to_container",
    "register_resolvers",
    "set_project_root",
]

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def set_project_root() -> None:
    """Set ``PROJECT_ROOT`` (used by ``conf/paths``) to the current directory unless already set.

    Also registers the project's OmegaConf resolvers (:func:`register_resolvers`), which Hydra
    needs before it composes the config of an entry point.
    """
    os.environ.setdefault("PROJECT_ROOT", str(Path.cwd()))
    register_resolvers()


def _on_gpu(accelerator: str) -> bool:
    """Whether ``accelerator`` runs on a GPU (``gpu``, ``cuda``, or ``auto`` with CUDA)."""
    name = str(accelerator).lower()
    return name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available())


def _gpu_only(value: Any, accelerator: str) -> Any:
    """``value`` where ``accelerator`` runs on a GPU (:func:`_on_gpu`), else ``False``."""
    return value if _on_gpu(accelerator) else False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16)."""
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None:
            try:
                if check():
                    return True
            except RuntimeError:  # pragma: no cover - probe not available on this build
                continue
    return False


def auto_precision(accelerator: str = "auto") -> str:
    """``bf16-mixed`` where the device computes bfloat16 natively, else ``32-true``.

    GPUs: CUDA devices with bfloat16 support (Ampere and later). CPUs: AMX-BF16 or
    AVX512-BF16 (there bf16 autocast runs the convolutions 2-4x faster; without them it is
    emulated and slower than float32).

    Args:
        accelerator: ``trainer.accelerator`` (``auto``, ``cpu``, ``gpu``/``cuda``).
    """
    if _on_gpu(accelerator):
        ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16-mixed" if ok else "32-true"
    if str(accelerator).lower() in ("cpu", "auto"):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"


def auto_channels_last(accelerator: str = "auto", precision: Any = "32-true") -> bool:
    """Whether wide convolution stacks (VGG16) should run in ``channels_last`` here.

    ``True`` on GPUs, on CPUs with AVX512 (where oneDNN's channels-last kernels are the fast
    ones) and at 16-bit precisions; ``False`` for float32 on other CPUs. Measured on a 2-core
    AMD EPYC with AVX2 only (SSD300 net, batch 4, forward + backward): float32 7.3 s in
    ``channels_last`` and 5.4 s in the default layout; under bf16 autocast (emulated there) the
    default layout is much slower (a one-batch bf16 SSD300 test run took 222 s instead of
    70 s). TinySSD was faster in ``channels_last`` in float32 too (2.0 s vs 2.4 s), so the
    ``tiny`` backbone keeps it everywhere.

    Args:
        accelerator: ``trainer.accelerator`` (``auto``, ``cpu``, ``gpu``/``cuda``).
        precision: ``trainer.precision`` (``32-true``, ``bf16-mixed``, ``16-mixed``, ...).
    """
    if _on_gpu(accelerator) or "16" in str(precision):
        return True
    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")


def cpu_workers(wanted: int | str) -> int:
    """``wanted`` DataLoader workers, at most the CPU cores this process may use.

    More workers than cores only adds processes fighting for them (PyTorch warns about it).

    Args:
        wanted: the number of workers asked for.

    Returns:
        ``min(wanted, usable cores)``, at least 0.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(wanted), cores))


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers once.

    * ``${pid:}``: this process id; makes run folders unique (``conf/hydra/default.yaml``).
    * ``${gpu_only:VALUE,ACCELERATOR}``: turns ``sync_batchnorm`` off where there is no GPU
      (``conf/trainer/ddp.yaml``).
    * ``${auto_precision:ACCELERATOR}``: ``bf16-mixed`` where the device computes bfloat16
      natively, else ``32-true`` (``conf/trainer/default.yaml``).
    * ``${auto_channels_last:ACCELERATOR,PRECISION}``: the memory format of the VGG16 backbones
      (:func:`auto_channels_last`, ``conf/backbone/vgg16.yaml``).
    * ``${cpu_workers:N}``: N DataLoader workers, at most the usable CPU cores
      (:func:`cpu_workers`, ``conf/data/_loader.yaml``).
    * ``${run_name:RUN_DIR}``: a TensorBoard run name built from the run's overrides
      (``conf/logger/tensorboard.yaml``, :func:`src.utils.hparams.run_dir_name`).
    """
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)
    if not OmegaConf.has_resolver("gpu_only"):
        OmegaConf.register_new_resolver("gpu_only", _gpu_only)
    if not OmegaConf.has_resolver("auto_precision"):
        OmegaConf.register_new_resolver("auto_precision", auto_precision)
    if not OmegaConf.has_resolver("auto_channels_last"):
        OmegaConf.register_new_resolver("auto_channels_last", auto_channels_last)
    if not OmegaConf.has_resolver("cpu_workers"):
        OmegaConf.register_new_resolver("cpu_workers", cpu_workers)
    # ${run_name:} (TensorBoard run names from the overrides) is registered when
    # src.utils.hparams is imported
    import src.utils.hparams  # noqa: F401


def config_to_container(cfg: DictConfig) -> dict[str, Any]:
    """Resolve a run config into a plain dict (stored in checkpoints)."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(container, dict)
    return container


_REF = re.compile(r"\$\{(\w+)\.(\w+)")


def _group_options_with_key(group: str, key: str) -> list[str]:
    """The options of ``conf/<group>/`` whose file defines ``key``."""
    options = []
    for file in sorted((CONF_DIR / group).glob("*.yaml")):
        node = OmegaConf.load(file)
        if isinstance(node, DictConfig) and key in node:
            options.append(file.stem)
    return options


def check_group_keys(cfg: DictConfig, groups: tuple[str, ...] = ("loss", "mining")) -> None:
    """Fail when a setting is given that the chosen option of a group ignores.

    A group node (``loss``, ``mining``) holds its settings next to ``module``, the object that
    reads them through interpolations such as ``${loss.sigma}``. A setting with a value that no
    interpolation of the chosen ``module`` reads (``mining.neg_pos_ratio=3`` with
    ``mining=none``, ``+loss.sigma=5`` with ``loss=l1``) would silently do nothing.

    Args:
        cfg: the composed (unresolved) config.
        groups: the group nodes to check.

    Raises:
        ValueError: naming the key, the chosen option and the options that use the key.
    """
    for group in groups:
        node = cfg.get(group)
        if not isinstance(node, DictConfig) or "module" not in node:
            continue
        module = OmegaConf.to_container(node, resolve=False).get("module")
        used = {key for g, key in _REF.findall(str(module)) if g == group}
        for key, value in OmegaConf.to_container(node, resolve=False).items():
            if key in ("name", "module") or key in used or value is None:
                continue
            chosen = node.get("name", "?")
            options = [o for o in _group_options_with_key(group, key) if o != chosen]
            hint = (
                f"choose {' or '.join(f'{group}={o}' for o in options)} to use it"
                if options
                else f"no {group} option uses it"
            )
            raise ValueError(
                f"{group}.{key}={value} is ignored by {group}={chosen}: {hint}, or drop the "
                "override"
            )


#: bounds of the optimiser and scheduler settings checked before training: key -> (low, low
#: included, high, high included); None: unbounded on that side. Only keys present are checked.
OPTIMIZER_BOUNDS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "lr": (0.0, False, None, False),
    "momentum": (0.0, True, 1.0, False),
    "weight_decay": (0.0, True, None, False),
    "dampening": (0.0, True, 1.0, True),
    "eps": (0.0, True, None, False),
}
SCHEDULER_BOUNDS: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "warmup_steps": (0.0, True, None, False),
    "warmup_iters": (0.0, True, None, False),
    "warmup_factor": (0.0, False, 1.0, True),
    "min_factor": (0.0, True, 1.0, False),
    "gamma": (0.0, False, None, False),
}


def _range_text(low: float | None, low_in: bool, high: float | None, high_in: bool) -> str:
    """``> 0``, ``>= 0``, ``in [0, 1)``, ... for messages."""
    if low is not None and high is not None:
        return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
    if low is not None:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"{'<=' if high_in else '<'} {high:g}"


def check_value(
    value: Any, key: str, bounds: tuple[float | None, bool, float | None, bool]
) -> float:
    """Check that the config value ``key`` is a finite number within ``bounds``.

    Args:
        value: the value (resolved).
        key: its full config key, for the message (``model.optimizer.lr``).
        bounds: ``(low, low included, high, high included)``; None: no bound on that side.

    Returns:
        The value as a float.

    Raises:
        ValueError: ``"<key> must be <range> (got <value>)"``; a non-number says so.
    """
    low, low_in, high, high_in = bounds
    allowed = _range_text(low, low_in, high, high_in)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number {allowed} (got {value!r})")
    ok = (low is None or value > low or (low_in and value == low)) and (
        high is None or value < high or (high_in and value == high)
    )
    if not ok:
        raise ValueError(f"{key} must be {allowed} (got {value!r})")
    return float(value)


def check_optimizer(cfg: DictConfig) -> None:
    """Check the optimiser and scheduler settings before anything is built or trained.

    ``model.optimizer.lr > 0``, ``momentum`` in ``[0, 1)``, ``weight_decay >= 0`` (also
    ``dampening`` in ``[0, 1]``, ``eps >= 0`` and each of ``betas`` in ``[0, 1)``, where the
    optimiser has them); ``model.scheduler.warmup_steps`` / ``warmup_iters >= 0``,
    ``warmup_factor`` in ``(0, 1]``, ``min_factor`` in ``[0, 1)``, ``gamma > 0``. Only the keys
    present (and not null) are checked, so any ``torch.optim`` optimiser can be chosen.

    Args:
        cfg: the composed config (``model.optimizer``, ``model.scheduler``).

    Raises:
        ValueError: naming the key, its allowed range and the value given
            (``model.optimizer.lr must be > 0 (got -1.0)``).
    """
    for node_key, bounds in (
        ("model.optimizer", OPTIMIZER_BOUNDS),
        ("model.scheduler", SCHEDULER_BOUNDS),
    ):
        node = OmegaConf.select(cfg, node_key, default=None)
        if not isinstance(node, DictConfig):
            continue
        for key, limits in bounds.items():
            value = node.get(key)
            if value is not None:
                check_value(value, f"{node_key}.{key}", limits)
        betas = node.get("betas") if node_key == "model.optimizer" else None
        if betas is not None:
            for i, beta in enumerate(betas):
                check_value(beta, f"{node_key}.betas[{i}]", (0.0, True, 1.0, False))


def data_config(cfg: DictConfig, run_config: DictConfig) -> DictConfig:
    """The ``data`` node to evaluate on: the selected group, else the training run's.

    A selected group replaces the training run's ``data`` node whole; its interpolations
    (``${backbone.image_size}``, ``${paths.data_dir}``) resolve against the checkpoint's run
    config with this command's ``paths``.
    """
    if cfg.get("data") is None:
        return run_config.data
    merged = OmegaConf.merge(run_config, {"paths": OmegaConf.to_container(cfg.paths, resolve=True)})
    with open_dict(merged):
        merged.data = OmegaConf.to_container(cfg.data, resolve=False)
    return merged.data
