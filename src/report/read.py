"""Reading a sweep: run dirs, overrides, TensorBoard scalars, ``status.json``, the Optuna study.

Nothing here writes a file or draws. Every function returns plain Python values:

* :func:`find_runs`, :func:`read_overrides`, :func:`read_last_scalars`: one run's dir, its
  command-line overrides and the last value of each scalar it logged;
* :func:`run_status`, :func:`job_error`: how a run ended (``<run>/status.json`` written by
  ``src.train``, else the last error line of the job's log);
* :func:`trial_status`, :func:`read_results`: the Optuna sweeper's ``optimization_results.yaml``;
* :func:`read_study`: the Optuna study in ``<sweep>/optuna.db`` as a :class:`StudyInfo` (trials,
  log-scale parameters, parameter importances when they are defined).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "RunResult",
    "TrialInfo",
    "StudyInfo",
    "TRIAL_PREFIX",
    "find_runs",
    "read_overrides",
    "read_last_scalars",
    "metric_values",
    "parse_value",
    "swept_keys",
    "run_status",
    "job_error",
    "trial_status",
    "read_results",
    "read_study",
]

#: per-trial overrides of the Optuna sweeper (``src.search.TRIAL_NODE``), never swept keys.
TRIAL_PREFIX = "optuna_trial."


@dataclass
class RunResult:
    """One run of a sweep.

    Attributes:
        name: the run's dir relative to the sweep dir (the Hydra job number, e.g. ``"3"``).
        path: the run's dir.
        overrides: ``{key: value}`` of the run's command-line overrides (values as written).
        metrics: ``{metric: last logged value}``; metrics never logged are absent.
        status: ``"ok"``, ``"no events"`` (no TensorBoard events under ``tensorboard/``),
            ``"unreadable events: ..."`` or ``"incomplete"`` (some metrics never logged);
            ``"diverged at step N"``, ``"interrupted (SIGTERM)"`` or ``"failed: <reason>"`` from
            ``status.json``; for Optuna trials ``"pruned at epoch N"``, ``"failed: <reason>"``
            or ``"running"`` (interrupted, or still running).
    """

    name: str
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float]
    status: str = "ok"


@dataclass
class TrialInfo:
    """One trial of an Optuna study.

    Attributes:
        number: the trial's number (also its job dir in the sweep).
        state: ``COMPLETE``, ``PRUNED``, ``FAIL``, ``RUNNING`` or ``WAITING``.
        value: the objective of a COMPLETE trial, else ``None``.
        params: ``{override key: sampled value}``.
    """

    number: int
    state: str
    value: float | None
    params: dict[str, Any]


@dataclass
class StudyInfo:
    """What a report needs from an Optuna study (plain values, no live study).

    Attributes:
        name: the study's name.
        direction: ``"maximize"`` or ``"minimize"``.
        trials: every trial, in number order.
        log_keys: parameters searched on a log scale.
        importances: ``{param: importance}`` (Optuna's PED-ANOVA, normalised to sum to 1,
            largest first), or ``None``
            when they are not defined for this study (see ``importance_note``).
        importance_note: one line saying why there are no importances (``None`` when there are).
    """

    name: str
    direction: str
    trials: list[TrialInfo]
    log_keys: set[str] = field(default_factory=set)
    importances: dict[str, float] | None = None
    importance_note: str | None = None

    @property
    def complete(self) -> list[TrialInfo]:
        """The COMPLETE trials (those with a value)."""
        return [t for t in self.trials if t.state == "COMPLETE" and t.value is not None]


# ------------------------------------------------------------------------------- run dirs
def _natural_key(text: str) -> list[Any]:
    """Sort key putting ``"10"`` after ``"9"`` (job numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", text) if t]


def parse_value(value: str | None) -> Any:
    """An override value as an int, a float, or the string itself (``None`` stays ``None``)."""
    if value is None:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def find_runs(sweep_dir: str | Path) -> list[Path]:
    """The run dirs under ``sweep_dir`` (those with ``.hydra/config.yaml``), in job order.

    ``sweep_dir`` may itself be a single run.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or holds no run.
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep dir {root} does not exist; pass the dir a multirun wrote, such as "
            "outputs/multirun/<date_time>"
        )
    if (root / ".hydra" / "config.yaml").is_file():
        return [root]
    runs = sorted(
        {p.parent.parent for p in root.rglob(".hydra/config.yaml")},
        key=lambda p: _natural_key(p.relative_to(root).as_posix()),
    )
    if not runs:
        raise FileNotFoundError(
            f"no runs found under {root}: expected job dirs holding .hydra/config.yaml, as "
            "written by `python -m src.train -m key=v1,v2` (outputs/multirun/<date_time>/<job>)"
        )
    return runs


def read_overrides(run_dir: str | Path) -> dict[str, str]:
    """``{key: value}`` from a run's ``.hydra/overrides.yaml`` (``+``/``++``/``~`` stripped).

    ``hydra.*`` overrides are left out. A missing file gives ``{}`` (with a warning).

    Raises:
        ValueError: the file does not hold a list (names the file).
    """
    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        log.warning("%s is missing; the run's swept values are unknown", path)
        return {}
    items = yaml.safe_load(path.read_text()) or []
    if not isinstance(items, list):
        raise ValueError(f"{path} must hold a list of 'key=value' strings, got {type(items)}")
    overrides: dict[str, str] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not sep or key.startswith("hydra.") or key == "hydra":
            continue
        overrides[key] = value
    return overrides


def read_last_scalars(log_dir: str | Path) -> dict[str, float] | None:
    """The last logged value of every scalar under ``log_dir`` (searched recursively).

    Args:
        log_dir: a dir with TensorBoard event files (``events.out.tfevents.*``), possibly in
            version sub-dirs.

    Returns:
        ``{tag: value}`` (the event with the largest step, ties broken by wall time, across all
        event files), or ``None`` when there is no event file.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    root = Path(log_dir)
    if not root.is_dir():
        return None
    dirs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not dirs:
        return None
    guidance = {
        ea.SCALARS: 0,
        ea.IMAGES: 1,
        ea.HISTOGRAMS: 1,
        ea.TENSORS: 1,
        ea.AUDIO: 1,
        ea.COMPRESSED_HISTOGRAMS: 1,
    }
    last: dict[str, tuple[int, float, float]] = {}
    for directory in dirs:
        acc = ea.EventAccumulator(str(directory), size_guidance=guidance)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                key = (event.step, event.wall_time)
                if tag not in last or key >= last[tag][:2]:
                    last[tag] = (event.step, event.wall_time, float(event.value))
    return {tag: value for tag, (_, _, value) in last.items()}


def metric_values(scalars: dict[str, float], metrics: Sequence[str]) -> dict[str, float]:
    """The requested metrics among a run's TensorBoard scalars.

    A metric is found under its own key (``val/mAP_50``) or under a tag with one chart group in
    front of it (``mAP/val/mAP_50``, as ``src.callbacks.hparams.RunTensorBoardLogger`` writes the
    headline curves so that TensorBoard shows them first).

    Args:
        scalars: ``{tag: last value}`` from :func:`read_last_scalars`.
        metrics: metric keys.

    Returns:
        ``{metric: value}`` for the metrics found.
    """
    grouped = {tag.split("/", 1)[1]: v for tag, v in scalars.items() if tag.count("/") >= 2}
    found = {}
    for metric in metrics:
        if metric in scalars:
            found[metric] = scalars[metric]
        elif metric in grouped:
            found[metric] = grouped[metric]
    return found


def swept_keys(overrides: Sequence[dict[str, str]]) -> list[str]:
    """Override keys whose values differ across runs (absent counts as a value), in order."""
    keys: list[str] = []
    for item in overrides:
        keys.extend(k for k in item if k not in keys)
    return [k for k in keys if len({item.get(k) for item in overrides}) > 1]


# --------------------------------------------------------------------------- how runs ended
def _one_line(text: Any, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


def run_status(run_dir: Path) -> str | None:
    """The outcome ``src.train`` wrote to ``<run>/status.json`` when it was not ``ok``.

    Returns:
        ``"diverged at step N"``, ``"interrupted (SIGTERM)"``, ``"failed: <reason>"``, or
        ``None`` for a run that ended normally or wrote no status.
    """
    path = run_dir / "status.json"
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable status.json: {err}"
    state = status.get("status")
    if state == "diverged":
        step = status.get("step")
        return "diverged" if step is None else f"diverged at step {step}"
    if state == "interrupted":
        return f"interrupted ({status.get('signal', 'signal')})"
    if state == "failed":
        return f"failed: {_one_line(status.get('message') or 'unknown reason')}"
    return None


#: the last line of a Python traceback: ``SomeError: message`` (``module.SomeError`` too).
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")


def job_error(run_dir: Path) -> str | None:
    """Why a job failed, for runs whose ``status.json`` says nothing.

    Looks at the job's own log files (``<run>/*.log``, written by Hydra's job logging) and
    returns the last line that reads like an exception (``ValueError: ...``) or an ``ERROR``
    record.

    Returns:
        That line (whitespace collapsed, at most 200 characters), or ``None``.
    """
    found: str | None = None
    for path in sorted(Path(run_dir).glob("*.log")):
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            text = line.strip()
            message = re.sub(r"^\[[^]]*\]\[ERROR\]\s*", "", text)
            if message != text or _ERROR_LINE.match(text):
                found = _one_line(message)
    return found


# ---------------------------------------------------------------------------------- Optuna
def trial_status(trial: dict[str, Any]) -> str | None:
    """A run status for an Optuna trial of ``optimization_results.yaml`` (``None``: COMPLETE).

    Args:
        trial: one entry of its ``trials`` list (``number``, ``state``, optional ``last_step``
            and ``reason``).
    """
    state = str(trial.get("state", "")).upper()
    if state == "PRUNED":
        step = trial.get("last_step")
        return "pruned" if step is None else f"pruned at epoch {step}"
    if state == "FAIL":
        return f"failed: {_one_line(trial.get('reason') or 'unknown reason')}"
    if state in ("RUNNING", "WAITING"):
        return "running"
    return None


def read_results(sweep_dir: Path) -> dict[str, Any] | None:
    """The Optuna sweeper's ``<sweep>/optimization_results.yaml``, or ``None`` if absent.

    Raises:
        ValueError: the file is not a YAML mapping (names the file).
    """
    path = sweep_dir / "optimization_results.yaml"
    if not path.is_file():
        return None
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a mapping (written by the Optuna sweeper)")
    return content


def _load_study(sweep_dir: Path) -> Any | None:
    """The Optuna study in ``<sweep_dir>/optuna.db``, or None (no file, or Optuna missing)."""
    db = sweep_dir / "optuna.db"
    if not db.is_file():
        return None
    try:
        import optuna
    except ImportError:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db}"
    names = optuna.get_all_study_names(storage=storage)
    if not names:
        return None
    return optuna.load_study(study_name=names[0], storage=storage)


def _importances(study: Any, complete: list[TrialInfo]) -> tuple[dict[str, float] | None, str]:
    """Parameter importances of ``study`` when they are defined, else ``(None, why)``."""
    if len(complete) < 2:
        return None, f"{len(complete)} completed trial(s): importances need at least 2"
    values = [float(t.value) for t in complete if t.value is not None]
    if max(values) == min(values):
        return None, (
            f"all {len(values)} completed trials have the same value ({values[0]:.4g}): "
            "no parameter explains a difference"
        )
    varied = [p for p in complete[0].params if len({repr(t.params.get(p)) for t in complete}) > 1]
    if not varied:
        return None, "every completed trial used the same parameters"
    import optuna

    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), params=varied
        )
    except Exception as err:  # noqa: BLE001 - a study Optuna cannot analyse must not stop the report
        return None, f"Optuna could not compute importances: {type(err).__name__}: {err}"
    importances = {str(k): float(v) for k, v in found.items()}
    if not importances or not all(math.isfinite(v) for v in importances.values()):
        return None, "Optuna's importances are not finite for this study"
    return importances, ""


def read_study(sweep_dir: str | Path) -> StudyInfo | None:
    """The Optuna study of a sweep (``<sweep>/optuna.db``) as plain values.

    Returns:
        A :class:`StudyInfo`, or ``None`` without a study (no file, no study in it, or Optuna
        not installed). A study that cannot be read gives ``None`` with a warning.
    """
    root = Path(sweep_dir)
    try:
        study = _load_study(root)
    except Exception as err:  # noqa: BLE001 - a broken study must not stop the report
        log.warning("cannot read %s: %s", root / "optuna.db", err)
        return None
    if study is None:
        return None
    trials: list[TrialInfo] = []
    log_keys: set[str] = set()
    for trial in study.get_trials(deepcopy=False):
        log_keys |= {k for k, d in trial.distributions.items() if getattr(d, "log", False)}
        value = float(trial.value) if trial.value is not None else None
        trials.append(TrialInfo(trial.number, trial.state.name, value, dict(trial.params)))
    direction = "maximize" if study.direction.name == "MAXIMIZE" else "minimize"
    info = StudyInfo(study.study_name, direction, trials, log_keys)
    info.importances, note = _importances(study, info.complete)
    info.importance_note = note or None
    return info
