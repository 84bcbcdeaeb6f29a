"""Runs that fail loudly and resume exactly: divergence, signals, RNG state, run status.

* :class:`DivergedError`: raised by the Lightning module when the loss is not finite (before the
  optimiser step, so the weights stay finite), when a checkpoint would hold non-finite
  weights (before the file is written), and when the outputs, losses or metrics of a validation
  (the sanity check before training included) are not finite (:func:`check_finite_values`).
* :func:`rng_states` / :func:`set_rng_states`: the Python, NumPy and torch random states that
  :class:`src.callbacks.faults.ResumeCallback` keeps in checkpoints.
* :class:`RunInterruptedError`: raised after SIGTERM or SIGINT by
  :class:`src.callbacks.faults.InterruptCallback`; ``src.train`` then exits non-zero.
* :func:`write_status`: ``<run>/status.json`` (``ok``, ``diverged``, ``interrupted``, ``failed``),
  read by ``src.report``; :func:`read_status` reads it back.
* :func:`resume_command` / :func:`sweep_resume_command`: the command that resumes a run from its
  ``last.ckpt``, or a whole multirun or Optuna search from its sweep dir.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "DivergedError",
    "RunInterruptedError",
    "check_finite_grads",
    "check_finite_loss",
    "check_finite_state",
    "check_finite_values",
    "current_sweep_dir",
    "read_status",
    "resume_command",
    "sweep_resume_command",
    "write_status",
]

#: exit status of a run stopped by SIGTERM / SIGINT (the shell's 128 + signal number).
EXIT_SIGTERM = 143
EXIT_SIGINT = 130


class DivergedError(RuntimeError):
    """The loss or the weights became non-finite; the run stops without saving them.

    Attributes:
        step: the global step at which it happened (``None`` when unknown).
        terms: the loss terms at that step (name -> value).
        seen_in: where the non-finite values were first seen: ``training`` (loss, gradients,
            weights), ``validation`` or ``sanity check`` (the validation before training).
    """

    def __init__(
        self,
        message: str,
        step: int | None = None,
        terms: Mapping[str, float] | None = None,
        seen_in: str = "training",
    ):
        super().__init__(message)
        self.step = step
        self.terms = dict(terms or {})
        self.seen_in = seen_in


class RunInterruptedError(RuntimeError):
    """Training was stopped by a signal; ``last.ckpt`` holds the state to resume from.

    Attributes:
        signal_name: ``"SIGTERM"`` or ``"SIGINT"``.
        ckpt_path: the checkpoint written, or ``None`` when it could not be written.
        exit_code: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, signal_name: str, ckpt_path: str | None) -> None:
        super().__init__(f"training stopped by {signal_name}; resumable checkpoint: {ckpt_path}")
        self.signal_name = signal_name
        self.ckpt_path = ckpt_path
        self.exit_code = EXIT_SIGINT if signal_name == "SIGINT" else EXIT_SIGTERM


_ADVICE = (
    "try a lower model.optimizer.lr, smaller loss weights (loss.box_weight, loss.cls_weight), "
    "trainer.gradient_clip_val=1.0, or a warm-up (see conf/experiment/voc_ssd300.yaml)"
)


_SANITY_ADVICE = (
    "check the weights training starts from (ckpt_path, model.init_from) and the input data; "
    "if they come from a run that was about to diverge, resume from an earlier checkpoint or "
    + _ADVICE
)


def check_finite_loss(terms: Mapping[str, torch.Tensor], step: int) -> None:
    """Raise :class:`DivergedError` if any loss term is NaN or infinite.

    Args:
        terms: name -> scalar tensor (``loss``, ``cls_loss``, ``box_loss``).
        step: the global step, for the message.

    Raises:
        DivergedError: naming the step, every term's value and what to try.
    """
    values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
    if bool(torch.isfinite(values).all()):
        return
    floats = {k: float(v) for k, v in zip(terms, values.tolist(), strict=True)}
    shown = ", ".join(f"{k}={v}" for k, v in floats.items())
    raise DivergedError(
        f"training diverged at global step {step}: {shown}. No checkpoint was written from this "
        f"state. To continue: {_ADVICE}.",
        step=step,
        terms=floats,
    )


def check_finite_state(
    state_dict: Mapping[str, Any], step: int | None = None, saving: bool = False
) -> None:
    """Raise :class:`DivergedError` if a floating tensor of ``state_dict`` is not finite.

    Args:
        state_dict: parameter and buffer name -> tensor.
        step: the global step, for the message.
        saving: the state is about to be saved (the message says the file was not written).

    Raises:
        DivergedError: naming the first non-finite tensors.
    """
    bad = [
        name
        for name, value in state_dict.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not bool(torch.isfinite(value).all())
    ]
    if bad:
        raise DivergedError(
            f"training diverged at global step {step}: the weights are not finite "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''})"
            f"{'; the checkpoint was not written' if saving else ''}. To continue: {_ADVICE}.",
            step=step,
        )


def check_finite_grads(named_grads: Mapping[str, torch.Tensor], step: int) -> None:
    """Raise :class:`DivergedError` if a gradient is NaN or infinite (one fused pass).

    Args:
        named_grads: parameter name -> gradient.
        step: the global step, for the message.

    Raises:
        DivergedError: naming the step and the first parameters with non-finite gradients.
    """
    if not named_grads:
        return
    norms = torch.stack(torch._foreach_norm(list(named_grads.values())))
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return
    bad = [name for name, ok in zip(named_grads, finite.tolist(), strict=True) if not ok]
    raise DivergedError(
        f"training diverged at global step {step}: non-finite gradients "
        f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the step was not applied and "
        f"no checkpoint was written from it. To continue: {_ADVICE}.",
        step=step,
    )


def check_finite_values(
    values: Mapping[str, torch.Tensor | float],
    step: int,
    where: str,
    seen_in: str = "validation",
) -> None:
    """Raise :class:`DivergedError` if a value is NaN or infinite (one fused check, one sync).

    For what the net computes outside training steps: the outputs, losses and metrics of a
    validation. Tensors of any shape (an empty one is finite) and Python floats mix freely.

    Args:
        values: name -> ``Tensor[...]`` float (e.g. ``cls_logits: Tensor[B, A, C + 1]``,
            ``box_deltas: Tensor[B, A, 4]``, ``boxes: Tensor[N, 4]`` normalised xyxy,
            ``scores: Tensor[N]``) or a scalar (a loss or metric value).
        step: the global step, for the message.
        where: where the values were seen, for the message (e.g. ``the validation of epoch 1,
            batch 0``).
        seen_in: :attr:`DivergedError.seen_in`: ``validation`` (the message ends with
            training's advice) or ``sanity check`` (the weights training starts from give
            non-finite outputs: the message says to check them first).

    Raises:
        DivergedError: naming the step, where, each non-finite tensor with its count of NaN
            and infinite values, every scalar's value (also in ``terms``) and what to try.
    """
    tensors = {k: torch.as_tensor(v).detach() for k, v in values.items()}
    if not tensors:
        return
    device = next(iter(tensors.values())).device
    ok = torch.stack([torch.isfinite(t).all().to(device) for t in tensors.values()])
    if bool(ok.all()):
        return
    terms = {k: float(t) for k, t in tensors.items() if t.numel() == 1}
    bad = []
    for name, t in tensors.items():  # loop over the few named values only
        if t.numel() == 1:
            if not math.isfinite(terms[name]):
                bad.append(f"{name}={terms[name]}")
            continue
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        if nan or inf:
            kinds = ", ".join(f"{n:,} {k}" for n, k in ((nan, "nan"), (inf, "inf")) if n)
            bad.append(f"{name} ({kinds} of {t.numel():,} values)")
    raise DivergedError(
        f"training diverged at global step {step}: non-finite values in {where}: "
        f"{', '.join(bad)}. No checkpoint was written from this state. To continue: "
        f"{_SANITY_ADVICE if seen_in == 'sanity check' else _ADVICE}.",
        step=step,
        terms=terms,
        seen_in=seen_in,
    )


def resume_command(ckpt_path: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command that resumes this run from ``ckpt_path``: same overrides, new ``ckpt_path``."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("ckpt_path=")]
    return shlex.join(["python", "-m", "src.train", *args, f"ckpt_path={ckpt_path}"])


def current_sweep_dir() -> Path | None:
    """The sweep dir of the Hydra multirun this process runs a job of, else ``None``.

    Read from Hydra's job config (``hydra.mode`` MULTIRUN, ``hydra.sweep.dir``); ``None`` for a
    single run and outside Hydra (a config composed by a test).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(str(hydra_cfg.sweep.dir)).resolve()


#: Hydra overrides that the resume command of a sweep sets itself (or that ``-m`` implies)
_SWEEP_OWN = ("hydra.sweep.dir=", "hydra.mode=")


def sweep_resume_command(
    sweep_dir: str | Path, argv: Sequence[str] | None = None, module: str = "src.train"
) -> str:
    """The command that resumes a whole multirun or Optuna search.

    It is ``python -m src.train -m``, the sweep's own overrides (no job's values, no
    ``ckpt_path``) and ``hydra.sweep.dir=<sweep_dir>``. The overrides come from
    ``<sweep_dir>/multirun.yaml`` (written by Hydra's basic sweeper and by
    :class:`src.search.sweeper.OptunaSweeper` before the first job: the command line's Hydra
    overrides, e.g. ``hydra/launcher=submitit_local``, then its task overrides, e.g.
    ``seed=1,2``), else from ``argv`` (default ``sys.argv[1:]``, the sweep's own command line
    when the job runs in the sweeper's process).

    Args:
        sweep_dir: the sweep's folder (``hydra.sweep.dir``).
        argv: the command line's overrides when ``multirun.yaml`` is missing.
        module: the entry point.

    Returns:
        A shell-quoted command line. Run again, it skips the finished jobs, resumes the
        interrupted ones from their ``checkpoints/last.ckpt`` and runs the others.
    """
    sweep_dir = Path(sweep_dir)
    saved = sweep_dir / "multirun.yaml"
    args: list[str]
    if saved.is_file():
        import yaml

        overrides = (yaml.safe_load(saved.read_text()) or {}).get("hydra", {}).get("overrides", {})
        args = [*(overrides.get("hydra") or []), *(overrides.get("task") or [])]
    else:
        args = list(sys.argv[1:] if argv is None else argv)
    args = [
        a
        for a in args
        if a not in ("-m", "--multirun")
        and not a.startswith(_SWEEP_OWN)
        and not a.startswith("ckpt_path=")
    ]
    return shlex.join(["python", "-m", module, "-m", *args, f"hydra.sweep.dir={sweep_dir}"])


def rng_states() -> dict[str, Any]:
    """The Python, NumPy and torch random states, as plain values and tensors."""
    np_state = np.random.get_state()
    states: dict[str, Any] = {
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def read_status(run_dir: str | Path) -> dict[str, Any] | None:
    """``<run_dir>/status.json`` as written by :func:`write_status`, or ``None`` without one.

    Raises:
        ValueError: the file is not JSON (its path is named; delete it to run the job again).
    """
    path = Path(run_dir) / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON ({err}); delete it to run this job again") from err
    return status if isinstance(status, dict) else None


def write_status(run_dir: str | Path, status: str, **details: Any) -> Path:
    """Write ``<run_dir>/status.json``: ``{"status": ..., **details}`` (plain JSON values).

    Args:
        run_dir: the run's folder.
        status: ``ok``, ``diverged``, ``interrupted`` or ``failed``.
        **details: extra fields (message, step, checkpoint, metrics).

    Returns:
        The path written.
    """
    path = Path(run_dir) / "status.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def plain(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, str | int | float | bool) or value is None:
            return value
        return str(value)

    path.write_text(json.dumps(plain({"status": status, **details}), indent=2))
    return path
