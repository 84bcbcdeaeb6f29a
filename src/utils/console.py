"""Console helpers that know nothing of Lightning (the callbacks are in src/callbacks/console.py).

* :class:`DropMessages`: a logging filter for library chatter on the console.
* :func:`task_overrides`: the run's command-line overrides.
* :func:`data_line`: one line describing a datamodule.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

__all__ = [
    "DropMessages",
    "task_overrides",
    "data_line",
    "SUMMARY_METRICS",
    "QUIET_LOGGERS",
    "quiet_library_loggers",
]

#: final metrics listed by the end-of-run summary (those that were logged).
SUMMARY_METRICS = (
    "val/mAP_50",
    "val/mAP",
    "val/voc_mAP_50",
    "val/loss",
    "train/loss_epoch",
    "test/mAP_50",
    "test/mAP",
)


#: library loggers held at WARNING: at INFO/DEBUG they describe their own work, not the run's
#: (fontTools logs a dozen lines for every font it subsets into a PDF). The Hydra entry points
#: set the same levels in conf/hydra/default.yaml (job_logging.loggers).
QUIET_LOGGERS = ("fontTools", "matplotlib", "PIL", "tensorboard")


def quiet_library_loggers(level: int = logging.WARNING) -> None:
    """Set the :data:`QUIET_LOGGERS` to ``level`` (for entry points that are not Hydra apps)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains one of ``patterns``.

    Used on the console handler (``conf/hydra/default.yaml``) for Lightning's notes that say
    nothing about the run (tips, accelerators that exist, settings echoed back); the log file
    keeps them. Each pattern names one message: this is not a level-wide filter.

    Args:
        patterns: substrings of the messages to drop.
    """

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        super().__init__()
        self.patterns = tuple(str(p) for p in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) when the message contains a pattern."""
        message = record.getMessage()
        return not any(p in message for p in self.patterns)


def task_overrides(run_dir: str | os.PathLike | None = None) -> list[str]:
    """The run's command-line overrides (``hydra.*`` left out).

    From Hydra's runtime config when Hydra runs the job, else from ``<run_dir>/.hydra/
    overrides.yaml`` when it exists (configs built by ``hydra.compose`` in tests), else ``[]``.
    """
    items: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        items = [str(o) for o in HydraConfig.get().overrides.task]
    except (ValueError, ImportError):
        path = Path(run_dir) / ".hydra" / "overrides.yaml" if run_dir is not None else None
        if path is not None and path.is_file():
            items = [str(o) for o in (yaml.safe_load(path.read_text()) or [])]
    return [o for o in items if not o.lstrip("+~").startswith("hydra.")]


def data_line(datamodule: Any) -> str:
    """``BananaDataset, source=synthetic, 1 class (banana), 1000 train / 100 val images, batch 32``.

    The first word is the data format (``datamodule.format_name``, the dataset class), else
    the datamodule's class.
    """
    parts = [getattr(datamodule, "format_name", None) or type(datamodule).__name__]
    hparams = getattr(datamodule, "hparams", {}) or {}
    source = hparams.get("resolved_source") or hparams.get("source")
    if source is not None:
        parts.append(f"source={source}")
    for key in ("root", "dataset_yaml", "train_json"):
        if hparams.get(key):
            parts.append(f"{key}={hparams[key]}")
    names = list(getattr(datamodule, "classes", []) or [])
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        parts.append(f"{len(names)} class{'' if len(names) == 1 else 'es'} ({shown})")
    sizes = []
    for split in ("train", "val"):
        dataset = getattr(datamodule, f"{split}_dataset", None)
        if dataset is not None:
            sizes.append(f"{len(dataset)} {split}")
    if sizes:
        parts.append(" / ".join(sizes) + " images")
    batch = hparams.get("batch_size")
    if batch is not None:
        parts.append(f"batch {batch}")
    return ", ".join(parts)


def quote_path(path: str | os.PathLike) -> str:
    text = str(path)
    cwd = str(Path.cwd())
    if text.startswith(cwd + os.sep):
        text = text[len(cwd) + 1 :]
    return shlex.quote(text)
