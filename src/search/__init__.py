"""Hyper-parameter search on Optuna's ask-and-tell API (the optional ``search`` extra).

* :mod:`src.search.sweeper`: :class:`~src.search.sweeper.OptunaSweeper`, a Hydra sweeper that
  asks Optuna for parameters, launches one Hydra job per trial through the configured launcher
  (basic, ``submitit_local``, ``submitit_slurm``) and tells Optuna the job's result (COMPLETE,
  PRUNED or FAIL). Studies live in a SQLite file in the sweep dir by default, so a search resumes.
* :mod:`src.search.space`: Hydra's sweep syntax (``interval``, ``tag(log, ...)``, ``choice``,
  ``range``) as Optuna distributions.
* :mod:`src.callbacks.pruning`: a Lightning callback that reports the monitored metric of each
  validation epoch to the trial's study and stops the run when the pruner says so.

Hydra only instantiates sweepers found in its ``hydra_plugins`` namespace package; the installed
package ``hydra_plugins.ssd_search`` (``src/search/hydra_plugins``, mapped in pyproject.toml)
re-exports the sweeper there. Nothing here imports Optuna at module import time.
"""

#: top-level config node the sweeper fills in for every trial (``storage``, ``study_name``,
#: ``number``) so that the trial's pruning callback reaches its study from any process.
TRIAL_NODE = "optuna_trial"

#: name of the SQLite file created in the sweep dir when ``hydra.sweeper.storage`` is null.
DEFAULT_DB = "optuna.db"

#: file the sweeper writes into the sweep dir after every batch of trials.
RESULTS_FILE = "optimization_results.yaml"

__all__ = ["TRIAL_NODE", "DEFAULT_DB", "RESULTS_FILE"]
