"""The project's own errors as one line on the console; bugs keep their tracebacks.

An entry point's Hydra ``main`` is wrapped by :func:`report_errors`::

    @hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
    @report_errors
    def main(cfg: DictConfig) -> None: ...

A *user error* (:func:`user_error`) is something the user fixes: a bad config value, bad data,
a missing file, a file that is not a checkpoint, a failed download. It is

* an instance of an exception class the project defines (any module under ``src/``:
  ``DataFormatError``, ``ImageReadError``, ``CheckpointMismatchError``, ``NotACheckpointError``,
  ``DownloadError``, ``PretrainedWeightsError``, ``DivergedError``, ...); or
* a ``ValueError``, ``LookupError`` or file error (``FileNotFoundError``, ``NotADirectoryError``,
  ``IsADirectoryError``, ``PermissionError``) raised by a ``raise`` statement of the project's
  code (the config checks such as ``loss.sigma must be > 0``); or
* a mandatory config value left unset (``???``, OmegaConf's ``MissingMandatoryValue``).

Hydra's ``instantiate`` wraps errors in ``InstantiationException``: the chain of causes is
searched. Anything else (a ``TypeError``, an ``AttributeError``, a ``ValueError`` raised inside
torch, ...) is a bug and keeps its traceback. So the project's exception classes are for the
user; code that detects its own bug raises ``AssertionError``, ``RuntimeError`` or
``TypeError``.

For a user error :func:`report_errors` writes the message and the traceback to the run's log
file (Hydra's job log, ``<run>/<task>.log``), prints ``Error: <message>`` to stderr and exits
with status 1. With ``HYDRA_FULL_ERROR=1``, and in multirun jobs (the sweeper records the
failed job from the exception), the exception is raised on after being logged.

Nothing here knows of Lightning or the models.
"""

from __future__ import annotations

import contextlib
import functools
import linecache
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from omegaconf.errors import MissingMandatoryValue

log = logging.getLogger(__name__)

__all__ = ["format_user_error", "report_errors", "user_error"]

#: the project's code (``src/``): exceptions raised there, or defined there, are the project's.
SRC_DIR = Path(__file__).resolve().parents[1]

#: built-in exception types that a ``raise`` statement of the project uses for user errors.
RAISED_TYPES: tuple[type[BaseException], ...] = (
    ValueError,
    LookupError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

#: what a DataLoader worker's re-raised exception carries before the original message.
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"

F = TypeVar("F", bound=Callable[..., Any])


def _in_project(filename: str | None) -> bool:
    """Whether ``filename`` is a file of the project's code (under ``src/``)."""
    if not filename:
        return False
    try:
        return Path(filename).resolve().is_relative_to(SRC_DIR)
    except (OSError, ValueError):
        return False


def _defined_in_project(cls: type) -> bool:
    """Whether exception class ``cls`` is defined in a module under ``src/``."""
    module = sys.modules.get(cls.__module__)
    return _in_project(getattr(module, "__file__", None))


def _raised_by_project(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is a ``raise`` statement in ``src/``.

    A ``ValueError`` that Python itself raises in the project's code (``int("x")``) has its
    innermost frame on another statement and is not counted: that is a bug.
    """
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not _in_project(filename):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, MissingMandatoryValue):
        return True
    if not isinstance(err, Exception):
        return False
    if _defined_in_project(type(err)):
        return True
    return type(err) in RAISED_TYPES and _raised_by_project(err)


def user_error(err: BaseException) -> BaseException | None:
    """The user error in ``err``'s chain of causes (``err`` first), or None for a bug.

    Args:
        err: an exception that stopped an entry point.

    Returns:
        The first exception of ``err``, ``err.__cause__``, ... that is a user error (see the
        module docstring); None when there is none.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _is_user_error(current):
            return current
        current = current.__cause__
    return None


def format_user_error(err: BaseException) -> str:
    """The message of a user error, as shown on the console.

    ``KeyError`` messages lose their quotes; a mandatory value left unset names its key; an
    error re-raised from a DataLoader worker shows the original message, not the worker's
    traceback.

    Args:
        err: a user error (:func:`user_error`).
    """
    if isinstance(err, MissingMandatoryValue):
        key = getattr(err, "full_key", None) or "a config value"
        return f"{key} must be set (it is ??? in the config): pass {key}=..."
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    else:
        text = str(err)
    if _WORKER_TRACEBACK in text:  # torch's ExceptionWrapper: "...Type: message" last
        last = text.rstrip().splitlines()[-1]
        prefix = f"{type(err).__module__}.{type(err).__name__}: "
        text = last[len(prefix) :] if last.startswith(prefix) else last
    return text or type(err).__name__


def _file_handlers() -> list[logging.FileHandler]:
    """The file handlers of the root logger (Hydra's job log) and of this module's loggers."""
    handlers: list[logging.FileHandler] = []
    logger: logging.Logger | None = log
    while logger is not None:
        handlers += [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        logger = logger.parent if logger.propagate else None
    return list(dict.fromkeys(handlers))


def _log_to_files(message: str, err: BaseException) -> None:
    """Write ``message`` and ``err``'s traceback to the log files only (not the console)."""
    record = log.makeRecord(
        log.name,
        logging.ERROR,
        __file__,
        0,
        "%s",
        (message,),
        (type(err), err, err.__traceback__),
    )
    for handler in _file_handlers():
        handler.handle(record)


def _multirun() -> bool:
    """Whether this job is one of a Hydra multirun (a sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:  # noqa: BLE001 - no Hydra run: not a multirun
        return False


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """Route Python warnings to the ``py.warnings`` logger while the block runs.

    Libraries' warnings (deprecations between versions, DataLoader and logging-interval advice)
    are chatter for the person at the console; ``conf/hydra/default.yaml`` sends the
    ``py.warnings`` logger to the run's log file only, so they are kept there. The project's own
    messages go through ``logging`` and reach the console as before.
    """
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)


def report_errors(main: F) -> F:
    """Wrap an entry point's ``main``: a user error becomes one line on stderr and exit 1.

    Put it under ``@hydra.main`` so that it runs inside Hydra's job (its log file is open and
    Hydra's own error printing, a traceback, is not reached). See the module docstring.

    Args:
        main: the task function.

    Returns:
        The wrapped function (same name and docstring).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings_to_log():
                return main(*args, **kwargs)
        except Exception as err:
            found = user_error(err)
            if found is None:
                raise  # a bug: Hydra prints its traceback
            message = format_user_error(found)
            _log_to_files(message, err)
            if os.environ.get("HYDRA_FULL_ERROR") == "1" or _multirun():
                raise
            sys.stderr.write(f"Error: {message}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None

    return wrapper  # type: ignore[return-value]
