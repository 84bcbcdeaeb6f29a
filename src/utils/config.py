"""Config helpers shared by the entry points."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

__all__ = [
    "check_group_keys",
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


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers once.

    * ``${pid:}``: this process id; makes run folders unique (``conf/hydra/default.yaml``).
    * ``${gpu_only:VALUE,ACCELERATOR}``: turns ``sync_batchnorm`` off where there is no GPU
      (``conf/trainer/ddp.yaml``).
    * ``${auto_precision:ACCELERATOR}``: ``bf16-mixed`` where the device computes bfloat16
      natively, else ``32-true`` (``conf/trainer/default.yaml``).
    * ``${auto_channels_last:ACCELERATOR,PRECISION}``: the memory format of the VGG16 backbones
      (:func:`auto_channels_last`, ``conf/backbone/vgg16.yaml``).
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
