"""Hydra plugin entry of :mod:`src.search`: Hydra instantiates sweepers from ``hydra_plugins`` only.

``pyproject.toml`` installs ``src/search/hydra_plugins`` as (part of) the ``hydra_plugins``
namespace package; the class below is what ``hydra.sweeper._target_`` names. Its module imports
no Optuna, so Hydra's plugin scan stays cheap and works without the ``search`` extra.
"""

from src.search import sweeper as _sweeper


class OptunaSweeper(_sweeper.OptunaSweeper):
    """:class:`src.search.sweeper.OptunaSweeper`, under the name Hydra accepts."""


__all__ = ["OptunaSweeper"]
