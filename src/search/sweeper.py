"""A Hydra sweeper on Optuna's ask-and-tell API (Optuna >= 4).

Selected with ``hydra/sweeper=optuna`` (``conf/hydra/sweeper/optuna.yaml``), as
``hparams_search=banana_optuna`` does. For every trial the sweeper asks the study for parameters,
launches one Hydra job through the configured launcher (``n_jobs`` at a time: the basic launcher
runs them one after another, ``hydra/launcher=submitit_local`` or ``submitit_slurm`` in parallel)
and tells the study how the job ended:

* the job returned a finite number (``src.train.main`` returns ``cfg.optimized_metric``):
  COMPLETE with that value;
* the job raised ``optuna.TrialPruned`` (the pruning callback,
  :class:`src.callbacks.pruning.OptunaPruningCallback`): PRUNED;
* the job raised anything else, or returned a non-finite value or no number: FAIL, with the
  reason in the trial's ``fail_reason`` user attribute; the search goes on;
* the job ran with ``trainer.fast_dev_run`` (``debug=fdr``): FAIL whatever it returned, with the
  reason: one training and one validation batch is a smoke test, not a result (its ``val/mAP_50``
  is typically 0.0 and would rank as a real value). ``debug=limit`` runs a short real search.

The study is persistent: with ``storage: null`` it is the SQLite file
``<hydra.sweep.dir>/optuna.db``. Running the same command again with
``hydra.sweep.dir=<that dir>`` loads the study and runs only the missing trials: finished
trials (COMPLETE, PRUNED, FAIL) count towards ``n_trials``, and trials left RUNNING by an
interrupted sweep are run again with their parameters under their own number. Only one sweeper
process should work on a study at a time.

Every trial runs in ``<hydra.sweep.dir>/<trial number>`` and gets the overrides
``++optuna_trial.storage``, ``++optuna_trial.study_name`` and ``++optuna_trial.number``, which
the pruning callback reads to reach its trial from any process. After every batch the sweeper
writes ``optimization_results.yaml`` (best parameters and value, and every trial's state), which
``src.report`` reads to mark pruned and failed runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from src.search import DEFAULT_DB, RESULTS_FILE, TRIAL_NODE

if TYPE_CHECKING:
    import optuna
    from hydra.core.utils import JobReturn

log = logging.getLogger(__name__)

__all__ = ["OptunaSweeper", "trial_overrides", "quote", "smoke_test_reason"]


def quote(text: str) -> str:
    """``text`` as a single-quoted Hydra override value (backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def trial_overrides(
    number: int,
    params: Mapping[str, Any],
    fixed: Sequence[str],
    storage: str,
    study_name: str,
) -> list[str]:
    """The Hydra overrides of one trial's job.

    Args:
        number: the trial's number in its study (also its job dir, ``hydra.sweep.subdir``).
        params: ``{override key: sampled value}``.
        fixed: overrides passed to every trial (the command line's non-sweep overrides).
        storage: the study's storage URL.
        study_name: the study's name.

    Returns:
        ``[*fixed, "key=value", ..., "++optuna_trial.storage=...", ..., "hydra.sweep.subdir=N"]``.
    """
    from src.search.space import override_value

    return [
        *fixed,
        *(f"{key}={override_value(value)}" for key, value in params.items()),
        f"++{TRIAL_NODE}.storage={quote(storage)}",
        f"++{TRIAL_NODE}.study_name={quote(study_name)}",
        f"++{TRIAL_NODE}.number={number}",
        f"hydra.sweep.subdir={number}",
    ]


def smoke_test_reason(cfg: Any) -> str | None:
    """Why a job's result is no trial value (``trainer.fast_dev_run`` set), or ``None``.

    Args:
        cfg: the job's composed config (``JobReturn.cfg``), or ``None``.

    Returns:
        One sentence naming the setting and what to do, or ``None`` for a real run.
    """
    if cfg is None:
        return None
    fast = OmegaConf.select(cfg, "trainer.fast_dev_run", default=False)
    if not fast:
        return None
    return (
        f"trainer.fast_dev_run={fast} (debug=fdr) runs one training and one validation batch "
        "without loggers: a smoke test, not a trial value; drop debug=fdr, or use debug=limit "
        "for a short real search"
    )


class OptunaSweeper(Sweeper):
    """Hydra sweeper: ask Optuna, launch a job per trial, tell Optuna its result.

    Args:
        study_name: the study's name in the storage.
        storage: an Optuna storage URL (``sqlite:///abs/path.db``, ``postgresql://...``); null
            for ``sqlite:///<hydra.sweep.dir>/optuna.db``.
        direction: ``maximize`` or ``minimize`` the value the task returns.
        n_trials: trials the study should hold when the sweep ends (finished ones from an
            earlier, interrupted run of the same study count).
        n_jobs: trials launched together as one batch (run in parallel by parallel launchers).
        sampler: an Optuna sampler, or its config (``{_target_: optuna.samplers.TPESampler}``);
            null for Optuna's default.
        params: ``{override key: sweep}`` in Hydra's syntax (see :mod:`src.search.space`).
    """

    def __init__(
        self,
        study_name: str = "sweep",
        storage: str | None = None,
        direction: str = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        sampler: Any = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if direction not in ("maximize", "minimize"):
            raise ValueError(f"hydra.sweeper.direction={direction!r}: use 'maximize' or 'minimize'")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(
                f"hydra.sweeper.n_trials={n_trials} and hydra.sweeper.n_jobs={n_jobs} must be >= 1"
            )
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.sampler_config = sampler
        if isinstance(params, DictConfig):
            params = OmegaConf.to_container(params, resolve=True)  # type: ignore[assignment]
        self.params: dict[str, Any] = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None
        self.sweep_dir = Path(".")

    def setup(
        self,
        *,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
    ) -> None:
        """Keep the config and build the launcher (Hydra calls this before :meth:`sweep`)."""
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            config=config, hydra_context=hydra_context, task_function=task_function
        )
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        # Hydra hands __init__ the sampler already built; its config lets _sampler reseed it
        sampler = OmegaConf.select(config, "hydra.sweeper.sampler")
        if isinstance(sampler, DictConfig):
            self.sampler_config = sampler

    # ------------------------------------------------------------------------------ helpers
    def storage_url(self) -> str:
        """The study's storage URL (the default SQLite file in the sweep dir when unset)."""
        if self.storage:
            return str(self.storage)
        return f"sqlite:///{(self.sweep_dir / DEFAULT_DB).resolve()}"

    def _sampler(self, trials_so_far: int = 0) -> Any:
        """The configured sampler; its ``seed`` offset by the trials the study already holds.

        A resumed search (``hydra.sweep.dir=<dir>``) builds its sampler again: with the
        configured seed it would draw the first trials' parameters once more. Seeded with
        ``seed + trials_so_far`` it draws new ones, and a search interrupted after ``n`` trials
        is resumed the same way every time.
        """
        if isinstance(self.sampler_config, DictConfig | dict):
            seed = self.sampler_config.get("seed")
            if seed is not None and trials_so_far:
                return instantiate(self.sampler_config, seed=int(seed) + trials_so_far)
            return instantiate(self.sampler_config)
        return self.sampler_config

    def _trial(self, study: optuna.Study, number: int) -> optuna.trial.Trial:
        """A live handle on the RUNNING trial ``number`` of ``study`` (for user attributes)."""
        import optuna

        storage = optuna.storages.get_storage(self.storage_url())
        study_id = storage.get_study_id_from_name(study.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        return optuna.trial.Trial(study, trial_id)

    def _fail(self, study: optuna.Study, number: int, reason: str) -> None:
        import optuna

        log.warning("Trial %d failed: %s", number, reason)
        self._trial(study, number).set_user_attr("fail_reason", reason[:2000])
        study.tell(number, state=optuna.trial.TrialState.FAIL)

    def _tell(self, study: optuna.Study, number: int, ret: JobReturn) -> None:
        """Record how trial ``number``'s job ended (COMPLETE, PRUNED or FAIL)."""
        import optuna

        try:
            value = ret.return_value  # re-raises the exception of a failed job
        except optuna.TrialPruned as err:
            log.info("Trial %d pruned: %s", number, err)
            self._trial(study, number).set_user_attr("pruned_reason", str(err))
            study.tell(number, state=optuna.trial.TrialState.PRUNED)
            return
        except Exception as err:  # noqa: BLE001 - any failure of a trial is recorded, not raised
            root: BaseException = err
            while root.__cause__ is not None:  # the user's error under Hydra's wrappers
                root = root.__cause__
            self._fail(study, number, f"{type(root).__name__}: {root}")
            return
        smoke = smoke_test_reason(getattr(ret, "cfg", None))
        if smoke is not None:
            self._fail(study, number, smoke)
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            self._fail(
                study,
                number,
                f"the job returned {value!r}, not a number: set optimized_metric to a metric the "
                "run logs",
            )
            return
        if not math.isfinite(value):
            self._fail(study, number, f"the job returned {value} (diverged)")
            return
        log.info("Trial %d finished: %s", number, value)
        study.tell(number, value)

    def write_results(self, study: optuna.Study) -> Path:
        """Write ``optimization_results.yaml`` into the sweep dir; return its path."""
        import optuna

        trials = []
        for trial in study.get_trials(deepcopy=False):
            row: dict[str, Any] = {"number": trial.number, "state": trial.state.name}
            if trial.value is not None:
                row["value"] = float(trial.value)
            if trial.intermediate_values:
                row["last_step"] = int(max(trial.intermediate_values))
            for attr in ("fail_reason", "pruned_reason"):
                if attr in trial.user_attrs:
                    row["reason"] = trial.user_attrs[attr]
            row["params"] = dict(trial.params)
            trials.append(row)
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        results: dict[str, Any] = {
            "name": study.study_name,
            "storage": self.storage_url(),
            "direction": self.direction,
            "best_params": dict(study.best_params) if complete else None,
            "best_value": float(study.best_value) if complete else None,
            "trials": trials,
        }
        path = self.sweep_dir / RESULTS_FILE
        path.write_text(yaml.safe_dump(results, sort_keys=False))
        return path

    # ------------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        """Run the search; return the jobs' results (one per trial launched by this call)."""
        import optuna

        from src.search.space import search_space

        space, fixed = search_space(self.params, arguments)
        if not space:
            raise ValueError(
                "nothing to search: give hydra.sweeper.params (e.g. "
                "'hydra.sweeper.params={lr: tag(log, interval(1e-4, 1e-1))}') or a sweep override"
            )
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        url = self.storage_url()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=url,
            sampler=self._sampler(),
            direction=self.direction,
            load_if_exists=True,
        )
        trials = study.get_trials(deepcopy=False)
        if trials:  # a resumed search: a sampler that does not repeat the first trials
            study.sampler = self._sampler(len(trials))
        # the sweep's config, as Hydra's basic sweeper writes it: the resume command printed
        # when a trial is interrupted reads the command line's overrides from it
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        finished = [t for t in trials if t.state.is_finished()]
        stale = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
        remaining = self.n_trials - len(finished)
        log.info(
            "Study %r in %s: %d finished trials, %d interrupted, %d to run (n_trials=%d); "
            "search space: %s",
            self.study_name,
            url,
            len(finished),
            len(stale),
            max(remaining, 0),
            self.n_trials,
            {k: repr(v) for k, v in space.items()},
        )
        returns: list[JobReturn] = []
        while remaining > 0:
            batch: list[tuple[int, dict[str, Any]]] = []
            for _ in range(min(self.n_jobs, remaining)):
                if stale:
                    frozen = stale.pop(0)
                    log.info("Running interrupted trial %d again", frozen.number)
                    batch.append((frozen.number, dict(frozen.params)))
                else:
                    trial = study.ask(space)
                    batch.append((trial.number, dict(trial.params)))
            overrides = [
                trial_overrides(number, params, fixed, url, self.study_name)
                for number, params in batch
            ]
            try:
                self.validate_batch_is_legal(overrides)
                results = self.launcher.launch(overrides, initial_job_idx=batch[0][0])
            except Exception as err:
                for number, _ in batch:
                    self._fail(study, number, f"could not launch: {type(err).__name__}: {err}")
                self.write_results(study)
                raise
            for (number, _), ret in zip(batch, results, strict=True):
                self._tell(study, number, ret)
            returns.extend(results)
            remaining -= len(batch)
            self.write_results(study)
        path = self.write_results(study)
        counts: dict[str, int] = {}
        for trial in study.get_trials(deepcopy=False):
            counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        complete = counts.get("COMPLETE", 0)
        log.info(
            "Study %r: %s; best value %s with %s (%s)",
            self.study_name,
            counts,
            study.best_value if complete else None,
            study.best_params if complete else None,
            path,
        )
        return returns
