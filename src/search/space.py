"""Hydra sweep syntax as an Optuna search space.

Each search dimension is written as a Hydra override value, in ``hydra.sweeper.params`` or on
the command line, exactly as with Hydra's own sweepers:

============================== ====================================================
``interval(0.1, 1.0)``         ``FloatDistribution(0.1, 1.0)``
``int(interval(1, 8))``        ``IntDistribution(1, 8)`` (Hydra reads ``interval`` as floats)
``tag(log, interval(a, b))``   the same with ``log=True``
``choice(a, b, c)``, ``a,b,c`` ``CategoricalDistribution([a, b, c])``
``range(0, 10, 2)``            ``IntDistribution(0, 8, step=2)`` (Python's exclusive stop)
``range(0.1, 0.5, 0.1)``       ``CategoricalDistribution`` of the float values
a plain value (``x=3``)        not searched: passed unchanged to every trial
============================== ====================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

log = logging.getLogger(__name__)

__all__ = ["distribution_for", "search_space", "override_value"]

_KNOWN_TAGS = {"log"}


def _where(override: Override, source: str) -> str:
    return f"{source} '{override.input_line}'"


def distribution_for(override: Override, source: str = "override") -> BaseDistribution:
    """The Optuna distribution of one sweep override.

    Args:
        override: a parsed override whose value is a sweep (``override.is_sweep_override()``).
        source: where it was written, for error messages (``"hydra.sweeper.params"``).

    Returns:
        A ``FloatDistribution``, ``IntDistribution`` or ``CategoricalDistribution``.

    Raises:
        ValueError: the sweep cannot be searched (empty, glob, reversed bounds, unknown values).
    """
    value = override.value()
    tags = set(getattr(value, "tags", set()) or set())
    unknown = tags - _KNOWN_TAGS
    if unknown:
        log.warning("%s: tags %s are ignored (known: log)", _where(override, source), unknown)
    log_scale = "log" in tags
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or low > high:
            raise ValueError(f"{_where(override, source)}: interval(low, high) needs low <= high")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise ValueError(f"{_where(override, source)}: the range is empty")
        if all(isinstance(v, int) for v in (value.start, value.stop, value.step)):
            step = int(value.step)
            if step < 0:
                values = sorted(values)
                step = -step
            return IntDistribution(
                int(values[0]), int(values[-1]), step=step, log=log_scale and step == 1
            )
        return CategoricalDistribution(values)
    if override.is_choice_sweep():
        if not isinstance(value, ChoiceSweep):
            raise ValueError(f"{_where(override, source)}: glob choices cannot be searched")
        choices = list(override.sweep_iterator())
        bad = [c for c in choices if not isinstance(c, None | bool | int | float | str)]
        if bad or not choices:
            raise ValueError(
                f"{_where(override, source)}: choices must be numbers, strings, booleans or "
                f"null (got {choices})"
            )
        return CategoricalDistribution(choices)
    raise ValueError(f"{_where(override, source)} is not a sweep Optuna can search")


def search_space(
    params: Mapping[str, Any] | None, arguments: Iterable[str] = ()
) -> tuple[dict[str, BaseDistribution], list[str]]:
    """Search dimensions and fixed overrides from the sweeper's ``params`` and the command line.

    Args:
        params: ``{key: sweep}`` from ``hydra.sweeper.params`` (values as Hydra override text).
        arguments: the command-line overrides of the multirun; sweeps among them are search
            dimensions too (and replace a ``params`` entry of the same key), the others are
            passed to every trial unchanged.

    Returns:
        ``(space, fixed)``: ``{key: distribution}`` and the list of fixed override strings.

    Raises:
        ValueError: a ``params`` value is not a sweep, or a sweep cannot be searched.
    """
    parser = OverridesParser.create()
    space: dict[str, BaseDistribution] = {}
    for key, text in (params or {}).items():
        (override,) = parser.parse_overrides([f"{key}={text}"])
        if not override.is_sweep_override():
            raise ValueError(
                f"hydra.sweeper.params.{key}={text!r} is not a sweep: write interval(a, b), "
                "tag(log, interval(a, b)), choice(a, b) or range(a, b, step), or move a fixed "
                "value out of hydra.sweeper.params"
            )
        space[override.get_key_element()] = distribution_for(override, "hydra.sweeper.params")
    fixed: list[str] = []
    for override in parser.parse_overrides(list(arguments)):
        if override.is_sweep_override():
            key = override.get_key_element()
            space[key] = distribution_for(override, "command-line override")
        else:
            assert override.input_line is not None
            fixed.append(override.input_line)
    return space, fixed


def override_value(value: Any) -> str:
    """A sampled value as the text after ``=`` of a Hydra override (``None`` -> ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)
