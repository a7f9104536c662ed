"""Optuna study over ``distill.hidden_weight`` and ``training.learning_rate``, tracked in MLflow.

Each ``python -m hdkd search`` process has its own parent run, and each trial is a nested child run made by
``runner.run_training``. Processes share one Optuna storage. A lock per study makes trial claims atomic, so
``search.n_trials`` is the total for the study. The same lock lets the last process to finish a trial register
the study's best student in the MLflow Model Registry, once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import re
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState
from transformers import TrainerCallback

from hdkd import caching, runner, tracking
from hdkd.config import Config, ConfigError
from hdkd.pipeline import Checked, Prepared, check_inputs, prepare
from hdkd.storage import check_optuna_storage

logger = logging.getLogger(__name__)

# Optuna parameter name -> the config key it sets in each trial.
SEARCHED = {"hidden_weight": "distill.hidden_weight", "learning_rate": "training.learning_rate"}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# MLflow metric name -> the key the Trainer logs it under, for reporting evaluations to the pruner.
LOG_KEYS = {name: key for key, name in tracking.METRIC_NAMES.items()}
RANDOM_NOTE = "random-weight models: accuracy means nothing"
MIN_TRIALS_FOR_IMPORTANCE = 3
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")


def run_search(cfg: Config, force: bool = False) -> int:
    """Run or continue the study ``search.study_name`` until it has ``search.n_trials`` trials; return the exit code.

    ``force`` moves the registry alias to the study's best model even when it does not beat the current holder.
    """
    s = cfg.search
    _check_search_config(cfg)
    checked = check_inputs(cfg)
    check_optuna_storage(s.storage)
    storage = _open_storage(s.storage)
    lock = StudyLock(s.storage, storage, s.study_name)
    study = _load_study(cfg, storage, lock)
    client = _open_mlflow_store(cfg)
    parent_id = _start_parent_run(cfg)

    try:
        _log_parent_params(cfg)
        logger.info("study %r in %s: %d of %d trials claimed; parent run %s", s.study_name,
                    tracking.mask_secrets(s.storage), _claimed_count(study), s.n_trials, parent_id)
        prepared, signum = _run_trials(study, cfg, checked, lock, parent_id)
        random_weights = prepared.random_weights if prepared else _random_weights(cfg)
        best = _summarise(study, cfg, client, random_weights)
        exit_code = 0
        if signum is not None:
            exit_code = 128 + signum
        elif best is None and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            logger.error("study %r has no completed trial with a finite %s; the hdkd.error tags of the trial runs "
                         "say why they failed", s.study_name, s.metric)
            exit_code = 1
        elif best is None:
            logger.info("study %r has no completed trial yet; other processes are still running trials",
                        s.study_name)
        else:
            exit_code = _register_best(study, cfg, checked, client, lock, force)
    except BaseException as err:
        tracking.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", err)
        raise
    tracking.end_run("KILLED" if signum is not None else "FINISHED")
    return exit_code


# --- Checks and stores ----------------------------------------------------------------------------------


def _check_search_config(cfg: Config) -> None:
    s = cfg.search
    problems = []
    if s.metric not in LOG_KEYS:
        problems.append(f"search.metric={s.metric!r} is invalid; expected one of {', '.join(sorted(LOG_KEYS))}")
    elif s.pruner != "none" and not s.metric.startswith("eval/"):
        problems.append(f"search.metric={s.metric!r} cannot drive the pruner, which needs an eval/* metric "
                        "reported at each evaluation; choose an eval/* metric or set search.pruner=none")
    try:
        _storage_kind(s.storage)
    except ConfigError as err:
        problems += err.problems
    if problems:
        raise ConfigError(problems)


def _storage_kind(url: str) -> str:
    """Return ``journal``, ``sqlite`` or ``server`` for a ``search.storage`` value."""
    if "://" not in url:
        if url.endswith(JOURNAL_SUFFIXES):
            return "journal"
        raise ConfigError([f"search.storage={tracking.mask_secrets(url)!r} is invalid; expected an RDB URL "
                           "(sqlite:///FILE, postgresql://HOST/DB, mysql://HOST/DB) or a journal file path ending in "
                           f"{', '.join(JOURNAL_SUFFIXES)}"])
    scheme = url.split("://", 1)[0].split("+", 1)[0].lower()
    return "sqlite" if scheme == "sqlite" else "server"


def _storage_file(url: str) -> Path | None:
    """Return the local file of an Optuna storage (SQLite or journal), or None for a database server."""
    kind = _storage_kind(url)
    if kind == "journal":
        return Path(url).expanduser().resolve()
    return tracking.sqlite_file(url) if kind == "sqlite" else None


def _open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open an Optuna storage, or raise ConfigError naming it (password masked) when it cannot be opened."""
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    kind = _storage_kind(url)
    path = _storage_file(url)
    try:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "journal":
            return JournalStorage(JournalFileBackend(str(path)))
        # SQLite waits up to a minute for another process's write lock instead of failing with "database is locked".
        engine_kwargs = {"connect_args": {"timeout": 60}} if kind == "sqlite" else {"pool_pre_ping": True}
        if path is None:
            # Several processes creating the schema in a new database at once collide, as with a SQLite file.
            from sqlalchemy import create_engine

            engine = create_engine(url, **engine_kwargs)
            try:
                with database_lock(engine, "hdkd-optuna-schema"):
                    return RDBStorage(url, engine_kwargs=engine_kwargs)
            finally:
                engine.dispose()
        # Several processes creating the schema of a new SQLite file at once collide; one creates it first.
        with caching.locked(path):
            return RDBStorage(url, engine_kwargs=engine_kwargs)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy, drivers and Optuna raise many types for a bad storage
        detail = tracking.mask_secrets(str(err).splitlines()[0] if str(err) else "")
        raise ConfigError([f"Optuna storage {tracking.mask_secrets(url)!r} cannot be opened "
                           f"({type(err).__name__}: {detail}); set search.storage to a reachable database URL or a "
                           "journal file path"]) from None


def _open_mlflow_store(cfg: Config) -> MlflowClient:
    """Open the tracking store and create the experiment, under a file lock when the store is a local SQLite file.

    The first process to get the lock creates and migrates a fresh MLflow SQLite file. The same migration run by
    several processes at once fails.
    """
    path = tracking.sqlite_file(tracking.tracking_uri())
    with caching.locked(path) if path is not None else contextlib.nullcontext():
        client = tracking.open_store()
        under_mlflow_run = any(os.environ.get(name) for name in
                               ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"))
        if not under_mlflow_run:
            mlflow.set_experiment(cfg.tracking.experiment_name)
    return client


# --- The study lock -------------------------------------------------------------------------------------


class StudyLock:
    """An exclusive lock per study, shared by every process on the storage, that guards trial claims and registration.

    A storage in a local file (SQLite or journal) locks a file beside it, which covers the processes of one host.
    A PostgreSQL or MySQL storage takes an advisory lock in the database, which covers every machine using it.
    """

    def __init__(self, url: str, storage: optuna.storages.BaseStorage, study_name: str):
        self.study_name = study_name
        self.file = _storage_file(url)
        engine = getattr(storage, "engine", None)
        self.engine = engine if self.file is None else None
        if self.file is None and (engine is None or engine.dialect.name not in ("postgresql", "mysql")):
            # An in-memory database lives in this process only; a lock file in the temp folder is enough for it.
            digest = hashlib.sha256(f"{url}\n{study_name}".encode()).hexdigest()[:20]
            self.file = Path(tempfile.gettempdir()) / f"hdkd-study-{digest}"
            self.engine = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        if self.engine is None:
            with caching.locked(self.file):
                yield
            return
        with database_lock(self.engine, f"hdkd-study:{self.study_name}"):
            yield


@contextlib.contextmanager
def database_lock(engine, name: str) -> Iterator[None]:
    """Hold a PostgreSQL or MySQL advisory lock named ``name`` for the block. Other databases get no lock."""
    from sqlalchemy import text

    # NOTE: the MySQL branch has not run against a server. The PostgreSQL branch is tested in tests/test_search.py.
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "mysql"):
        yield
        return
    key = hashlib.sha256(name.encode()).digest()
    with engine.connect() as connection:
        if dialect == "postgresql":
            number = int.from_bytes(key[:8], "big", signed=True)
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": number})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": number})
        else:
            lock_name = "hdkd-" + key.hex()[:40]
            connection.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": lock_name})
            try:
                yield
            finally:
                connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock_name})


# --- The study ------------------------------------------------------------------------------------------


def _load_study(cfg: Config, storage: optuna.storages.BaseStorage, lock: StudyLock) -> optuna.Study:
    """Create or load the study with a sampler seed per process, so parallel workers sample different points."""
    s = cfg.search
    with lock.hold():
        study = optuna.create_study(study_name=s.study_name, storage=storage, direction=s.direction,
                                    load_if_exists=True)
        worker = int(study.user_attrs.get("hdkd.workers", 0))
        study.set_user_attr("hdkd.workers", worker + 1)
    if study.direction.name.lower() != s.direction:
        raise ConfigError([f"search.direction={s.direction!r} does not match study {s.study_name!r}, which was "
                           f"created to {study.direction.name.lower()}; use that direction or another study name"])
    if s.pruner == "none":
        pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    else:
        pruner = optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials,
                                             n_warmup_steps=s.pruner_warmup_steps)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed + worker)
    return optuna.load_study(study_name=s.study_name, storage=storage, sampler=sampler, pruner=pruner)


def _claimed_count(study: optuna.Study) -> int:
    """Count the trials that use up the study's total: finished ones and those running now."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def _process_alive(pid: Any, started: Any) -> bool:
    import psutil

    try:
        process = psutil.Process(int(pid))
        return (abs(process.create_time() - float(started)) < 1e-3
                and process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError, ValueError):
        return False


def _fail_abandoned_trials(study: optuna.Study) -> None:
    """Mark FAIL the RUNNING trials of this host whose process has ended (killed, out of memory)."""
    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        # NOTE: a trial of another host, or one whose process died between claiming it and recording its pid,
        # stays RUNNING and keeps counting toward search.n_trials.
        if attrs.get("hdkd.host") != host or _process_alive(attrs.get("hdkd.pid"), attrs.get("hdkd.pid_started")):
            continue
        logger.warning("trial %d: its process %s ended without finishing it; marking it FAIL", trial.number,
                       attrs.get("hdkd.pid"))
        study.tell(trial.number, state=TrialState.FAIL)
        run_id = attrs.get("mlflow_run_id")
        if run_id and tracking.run_status(run_id) == "RUNNING":
            client = MlflowClient()
            client.set_tag(run_id, "hdkd.error", "the process running this trial ended without finishing it")
            client.set_terminated(run_id, "FAILED")


def _claim_trial(study: optuna.Study, n_trials: int, lock: StudyLock) -> optuna.Trial | None:
    """Create the next trial, or return None once the study has ``n_trials`` finished or running trials."""
    import psutil

    with lock.hold():
        _fail_abandoned_trials(study)
        if _claimed_count(study) >= n_trials:
            return None
        trial = study.ask()
        trial.set_user_attr("hdkd.host", socket.gethostname())
        trial.set_user_attr("hdkd.pid", os.getpid())
        trial.set_user_attr("hdkd.pid_started", psutil.Process().create_time())
    return trial


# --- Runs -----------------------------------------------------------------------------------------------


def _random_weights(cfg: Config) -> bool:
    from hdkd.models import is_random_stand_in

    return is_random_stand_in(cfg.teacher) or is_random_stand_in(cfg.student)


def _start_parent_run(cfg: Config) -> str:
    s = cfg.search
    run = tracking.start_run(cfg.tracking.experiment_name, cfg.tracking.run_name or f"study-{s.study_name}",
                             tags={"hdkd.study": s.study_name, "hdkd.role": "study"},
                             system_metrics=cfg.tracking.system_metrics)
    # Under `mlflow run`, tracking.start_run passes MLFLOW_RUN_ID to MLflow as an explicit run id, so MLflow leaves
    # the variable set. A nested start_run would then read it again and log the trial into this parent run.
    os.environ.pop("MLFLOW_RUN_ID", None)
    return run.info.run_id


def _log_parent_params(cfg: Config) -> None:
    s = cfg.search
    flat = {key: value for key, value in cfg.flat().items()
            if key not in SEARCHED.values() and key != "tracking.run_name"}
    tracking.log_config(flat)
    space = {"search.space.hidden_weight": f"uniform({s.hidden_weight_low}, {s.hidden_weight_high})",
             "search.space.learning_rate": f"log-uniform({s.learning_rate_low}, {s.learning_rate_high})"}
    tracking.log_config(space)


def _trial_dir(cfg: Config, number: int) -> Path:
    study = re.sub(r"[^\w.-]", "_", cfg.search.study_name)
    return Path(cfg.output_dir) / "search" / study / f"trial-{number}"


class _TrialPruned(runner.RunStopped, optuna.TrialPruned):
    """A trial stopped by the pruner: Optuna records it PRUNED and its MLflow run ends KILLED."""


class TrialCallback(TrainerCallback):
    """Link the trial to its MLflow run, report the objective at each evaluation, and stop the trial if it is pruned.

    The last evaluation is reported but never pruned, because the trial has done all its training by then.
    """

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.metric = metric
        self.log_key = LOG_KEYS[metric]

    def on_train_begin(self, args, state, control, **kwargs):
        self.trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or self.log_key not in logs:
            return
        step = state.global_step
        value = float(logs[self.log_key])
        self.trial.report(value, step)
        if step >= state.max_steps or not self.trial.should_prune():
            return
        mlflow.set_tag("hdkd.pruned", "true")
        raise _TrialPruned(f"trial {self.trial.number} pruned at step {step} with {self.metric}={value:.4g}")


def _run_trials(study: optuna.Study, cfg: Config, checked: Checked, lock: StudyLock,
                parent_id: str) -> tuple[Prepared | None, int | None]:
    """Claim and run trials until the study is full. Return the prepared data and the signal that stopped the study."""
    prepared = None
    if _claimed_count(study) < cfg.search.n_trials:
        # The teacher's labels, validation answers and hidden states are computed once per process and cached on
        # disk, so later processes on the same data load them.
        prepared = prepare(checked)
        tracking.log_metrics({"teacher/generations": prepared.generations,
                              "teacher/seconds": prepared.teacher_seconds}, step=0)
    else:
        tracking.log_metrics({"teacher/generations": 0}, step=0)

    while prepared is not None and (trial := _claim_trial(study, cfg.search.n_trials, lock)) is not None:
        try:
            _run_trial(study, trial, cfg, checked, prepared, parent_id)
        except runner.Interrupted as err:
            logger.warning("study %r stopped: %s", cfg.search.study_name, err)
            return prepared, err.signum
    return prepared, None


def _run_trial(study: optuna.Study, trial: optuna.Trial, cfg: Config, checked: Checked, prepared: Prepared,
               parent_id: str) -> None:
    """Train one trial in a nested run and tell Optuna how it ended (COMPLETE, PRUNED or FAIL)."""
    s = cfg.search
    params = {
        "hidden_weight": trial.suggest_float("hidden_weight", s.hidden_weight_low, s.hidden_weight_high),
        "learning_rate": trial.suggest_float("learning_rate", s.learning_rate_low, s.learning_rate_high, log=True),
    }
    trial_cfg = copy.deepcopy(cfg)
    for name, value in params.items():
        trial_cfg.set(SEARCHED[name], value)
    trial_cfg.tracking.run_name = f"trial-{trial.number}"
    output_dir = _trial_dir(cfg, trial.number)
    trial.set_user_attr("student_dir", str(output_dir / "student"))
    tags = {"hdkd.study": s.study_name, "hdkd.trial": str(trial.number), "hdkd.role": "trial"}
    logger.info("trial %d: hidden_weight=%.4g, learning_rate=%.3g", trial.number, params["hidden_weight"],
                params["learning_rate"])

    try:
        outcome = runner.run_training(trial_cfg, checked=checked, prepared=prepared, nested=True,
                                      output_dir=output_dir, tags=tags, callbacks=[TrialCallback(trial, s.metric)],
                                      log_model=s.log_all_models, parent_run_id=parent_id, allow_resume=False)
    except optuna.TrialPruned as err:
        logger.info("%s", err)
        study.tell(trial, state=TrialState.PRUNED)
        return
    except runner.Interrupted:
        _tell_failed(study, trial, "interrupted by a signal")
        raise
    except Exception as err:  # noqa: BLE001 - any error fails this trial only; the study goes on
        message = tracking.mask_secrets(f"{type(err).__name__}: {err}")
        logger.error("trial %d failed: %s", trial.number, message)
        _link_run(trial, parent_id)
        _tell_failed(study, trial, message)
        return
    except BaseException:
        _tell_failed(study, trial, "interrupted")
        raise

    # The objective is the run's final value of the metric, read back from MLflow.
    metrics = MlflowClient().get_run(outcome.run_id).data.metrics
    value = metrics.get(s.metric)
    trial.set_user_attr("mlflow_run_id", outcome.run_id)
    if "eval/loss" in metrics:
        trial.set_user_attr("eval_loss", metrics["eval/loss"])
    if value is None or not math.isfinite(value):
        message = f"run {outcome.run_id} has no finite final {s.metric} (got {value})"
        logger.error("trial %d failed: %s", trial.number, message)
        MlflowClient().set_tag(outcome.run_id, "hdkd.error", message)
        _tell_failed(study, trial, message)
        return
    study.tell(trial, value)
    note = f" ({RANDOM_NOTE})" if prepared.random_weights else ""
    logger.info("trial %d: %s=%.4g%s", trial.number, s.metric, value, note)


def _link_run(trial: optuna.Trial, parent_id: str) -> None:
    """Record the trial's run id when the trial failed before its training started (and before TrialCallback ran)."""
    if "mlflow_run_id" in trial.user_attrs:
        return
    experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    runs = MlflowClient().search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`hdkd.trial` = '{trial.number}'"))
    if runs:
        trial.set_user_attr("mlflow_run_id", runs[0].info.run_id)


def _tell_failed(study: optuna.Study, trial: optuna.Trial, message: str) -> None:
    trial.set_user_attr("error", message[:2000])
    study.tell(trial, state=TrialState.FAIL)


# --- The best trial, parent-run summary and plots ------------------------------------------------------


@dataclass
class BestTrial:
    """The study's best trial as recorded in Optuna and MLflow."""

    trial: FrozenTrial
    run_id: str
    value: float
    eval_loss: float


def best_trial(study: optuna.Study, metric: str, direction: str, client: MlflowClient) -> BestTrial | None:
    """Return the best COMPLETE trial: best final objective, then lowest final eval/loss, then lowest number.

    Each trial's final metrics are read from its MLflow run, so every process computes the same best trial.
    """
    candidates = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        metrics = client.get_run(run_id).data.metrics
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            continue
        candidates.append(BestTrial(trial, run_id, value, metrics.get("eval/loss", math.inf)))
    if not candidates:
        return None
    sign = -1.0 if direction == "maximize" else 1.0
    return min(candidates, key=lambda c: (sign * c.value, c.eval_loss, c.trial.number))


def _summarise(study: optuna.Study, cfg: Config, client: MlflowClient, random_weights: bool) -> BestTrial | None:
    """Log the study's state, its best trial, plots and a CSV of all trials on the parent run."""
    s = cfg.search
    mlflow.set_tags(tracking.base_tags(cfg.teacher, cfg.student, random_weights))
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in (*FINISHED, TrialState.RUNNING)}
    tracking.log_metrics({f"study/{state.name.lower()}": float(n) for state, n in counts.items()}, step=0)
    best = best_trial(study, s.metric, s.direction, client)
    if best is not None:
        best_metrics = {f"best/{key}": value for key, value in client.get_run(best.run_id).data.metrics.items()
                        if key.startswith("eval/")}
        best_metrics.update({f"best/{name}": value for name, value in best.trial.params.items()})
        best_metrics["best/trial"] = float(best.trial.number)
        tracking.log_metrics(best_metrics, step=0)
        mlflow.set_tags({"hdkd.best_trial": str(best.trial.number), "hdkd.best_run_id": best.run_id})
        note = f" ({RANDOM_NOTE})" if random_weights else ""
        logger.info("best trial so far: %d (run %s) with %s=%.4g%s", best.trial.number, best.run_id, s.metric,
                    best.value, note)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = folder / "trials.csv"
        frame = study.trials_dataframe()
        frame["random_weights"] = random_weights
        frame.to_csv(csv_path, index=False)
        tracking.log_artifact(csv_path)
        for path in write_study_plots(study, s.metric, folder / "plots", random_weights, cfg.seed):
            tracking.log_artifact(path, "plots")
        comparison = _write_study_comparison(s.study_name, folder / "plots" / "comparison.png")
        if comparison is not None:
            tracking.log_artifact(comparison, "plots")
    return best


def _write_study_comparison(study_name: str, path: Path) -> Path | None:
    """Plot teacher vs student accuracy for the study's trial runs (the `compare` command's figure)."""
    from hdkd.compare import write_comparison_plot

    experiment_id = mlflow.active_run().info.experiment_id
    escaped = study_name.replace("'", "\\'")
    runs = mlflow.search_runs(experiment_ids=[experiment_id],
                              filter_string=f"tags.`hdkd.study` = '{escaped}' and tags.`hdkd.role` = 'trial'")
    try:
        return write_comparison_plot(runs, path)
    except ValueError as err:
        logger.info("comparison plot not written: %s", err)
        return None


def write_study_plots(study: optuna.Study, metric: str, out_dir: Path, random_weights: bool, seed: int) -> list[Path]:
    """Write the optimisation history, parameter importances (with enough trials) and a parameter scatter as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    note = f"\n({RANDOM_NOTE})" if random_weights else ""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    written = []
    # Optuna's plot functions switch the global matplotlib style; rc_context restores it afterwards.
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if complete:
            ax = optuna_plots.plot_optimization_history(study, target_name=metric)
            ax.set_title(f"Optimisation history: {metric}{note}", fontsize=10)
            written.append(_save_figure(ax.figure, out_dir / "optimization_history.png"))

        reason = _importance_skip_reason(complete)
        if reason is None:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
            try:
                ax = optuna_plots.plot_param_importances(study, evaluator=evaluator, target_name=metric)
                ax.set_title(f"Parameter importances for {metric}{note}", fontsize=10, loc="left")
                written.append(_save_figure(ax.figure, out_dir / "param_importances.png"))
            except RuntimeError as err:  # fANOVA raises RuntimeError when its trees explain no variance
                reason = str(err)
        if reason is not None:
            logger.info("parameter importances not plotted: %s", reason)
        plt.close("all")

    written.append(_plot_parameters(study, metric, out_dir / "hidden_weight_learning_rate.png", note))
    return written


def _importance_skip_reason(complete: list[FrozenTrial]) -> str | None:
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"{len(complete)} completed trials, fewer than {MIN_TRIALS_FOR_IMPORTANCE}"
    if len({t.value for t in complete}) < 2:
        return "every completed trial has the same objective value"
    return None


def _save_figure(figure, path: Path) -> Path:
    figure.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _plot_parameters(study: optuna.Study, metric: str, path: Path, note: str) -> Path:
    """Scatter hidden_weight against learning_rate; completed trials are coloured by the objective."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if set(SEARCHED) <= set(t.params)]
    others = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED, TrialState.FAIL))
              if set(SEARCHED) <= set(t.params)]
    if complete:
        points = ax.scatter([t.params["learning_rate"] for t in complete],
                            [t.params["hidden_weight"] for t in complete],
                            c=[t.value for t in complete], cmap="viridis", s=60, edgecolors="black", zorder=3)
        fig.colorbar(points, ax=ax, label=metric)
    if others:
        ax.scatter([t.params["learning_rate"] for t in others], [t.params["hidden_weight"] for t in others],
                   marker="x", color="grey", label="pruned or failed", zorder=2)
        ax.legend(loc="best", fontsize=8)
    for t in complete + others:
        ax.annotate(str(t.number), (t.params["learning_rate"], t.params["hidden_weight"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("training.learning_rate")
    ax.set_ylabel("distill.hidden_weight")
    ax.set_title(f"Trials by parameters, coloured by {metric}{note}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- Model Registry -------------------------------------------------------------------------------------


class RegistryError(RuntimeError):
    """The best student cannot be registered."""


def _register_best(study: optuna.Study, cfg: Config, checked: Checked, client: MlflowClient, lock: StudyLock,
                   force: bool) -> int:
    """Register the best student and move the alias if it wins, unless other processes still run trials."""
    s, r = cfg.search, cfg.registry
    with lock.hold():
        _fail_abandoned_trials(study)
        running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if running:
            logger.info("trials %s are still running in other processes; the process that finishes the last of them "
                        "registers the best student", running)
            mlflow.set_tag("hdkd.registration", "left to another process")
            return 0
        best = best_trial(study, s.metric, s.direction, client)
        try:
            version = _registered_version(client, r.model_name, best.run_id)
            if version is None:
                model_uri = _log_best_model(client, best, checked)
                version = _create_version(client, cfg, best, model_uri)
            else:
                logger.info("trial %d is already registered as %s version %s", best.trial.number, r.model_name,
                            version.version)
        except RegistryError as err:
            logger.error("%s", err)
            mlflow.set_tag("hdkd.registration", f"failed: {err}"[:5000])
            return 1
        moved = move_alias_if_better(client, r.model_name, r.alias, version, best.value, s.metric, s.direction,
                                     force)
    mlflow.set_tags({"hdkd.registration": "done", "hdkd.registered_model": r.model_name,
                     "hdkd.registered_version": str(version.version), "hdkd.alias_moved": str(moved).lower()})
    return 0


def _registered_version(client: MlflowClient, name: str, run_id: str):
    quoted = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name = '{quoted}' and tags.source_run = '{run_id}'")
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _log_best_model(client: MlflowClient, best: BestTrial, checked: Checked) -> str:
    """Return the URI of the best run's `student` model, and log that model into the finished run if it has none."""
    from hdkd.data import build_prompt

    run = client.get_run(best.run_id)
    logged = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{best.run_id}' AND name = 'student'")
    if logged:
        return logged[0].model_uri

    student_dir = Path(best.trial.user_attrs.get("student_dir", ""))
    if not (student_dir / "config.json").is_file():
        raise RegistryError(f"the student of trial {best.trial.number} is not at {student_dir}; run the study with "
                            "an output_dir that every worker shares, or with search.log_all_models=true")
    example = checked.validation.examples[0]
    mlflow.start_run(run_id=best.run_id, nested=True)
    try:
        info = tracking.log_student_model(student_dir, [build_prompt(example.question, example.options)])
    finally:
        # The trial's training finished; a failure to log its model is reported, not recorded on the trial run.
        mlflow.end_run("FINISHED")
    return info.model_uri


def _create_version(client: MlflowClient, cfg: Config, best: BestTrial, model_uri: str):
    run = client.get_run(best.run_id)
    metrics, run_tags = run.data.metrics, run.data.tags
    digests = sorted(f"{d.dataset.name}:{d.dataset.digest}" for d in run.inputs.dataset_inputs)
    random_weights = run_tags.get("hdkd.random_weights", "false")
    tags = {
        "teacher": run_tags.get("hdkd.teacher", cfg.teacher),
        "student": run_tags.get("hdkd.student", cfg.student),
        "hidden_weight": repr(best.trial.params["hidden_weight"]),
        "learning_rate": repr(best.trial.params["learning_rate"]),
        "study": cfg.search.study_name,
        "trial": str(best.trial.number),
        "metric": cfg.search.metric,
        "objective": repr(best.value),
        "student_accuracy": repr(metrics.get("eval/student_accuracy")),
        "teacher_accuracy": repr(metrics.get("eval/teacher_accuracy")),
        "data_fingerprint": ",".join(digests),
        "source_run": best.run_id,
        "random_weights": random_weights,
    }
    version = mlflow.register_model(model_uri, cfg.registry.model_name, tags=tags)
    params = best.trial.params
    description = (f"Student {tags['student']} distilled from {tags['teacher']} with hidden_weight="
                   f"{params['hidden_weight']:.4g} and learning_rate={params['learning_rate']:.3g}. "
                   f"Trial {best.trial.number} of study {cfg.search.study_name!r}: {cfg.search.metric}="
                   f"{best.value:.4g}.")
    if random_weights == "true":
        description = f"RANDOM-WEIGHT stand-in models: accuracy numbers mean nothing. {description}"
    client.update_model_version(cfg.registry.model_name, version.version, description=description)
    logger.info("registered %s version %s from run %s", cfg.registry.model_name, version.version, best.run_id)
    return version


def _holder_value(client: MlflowClient, holder, metric: str) -> float | None:
    """Return the alias holder's value of ``metric``: its run's final metric, else its ``objective`` tag."""
    try:
        value = client.get_run(holder.run_id).data.metrics.get(metric) if holder.run_id else None
    except MlflowException:
        value = None
    if value is None and holder.tags.get("metric") == metric and "objective" in holder.tags:
        value = float(holder.tags["objective"])
    return value


def move_alias_if_better(client: MlflowClient, name: str, alias: str, version, value: float, metric: str,
                         direction: str, force: bool = False) -> bool:
    """Point ``alias`` at ``version`` if ``value`` beats the current holder's value or ``force`` is set.

    Return whether the alias moved. A tie keeps the current holder, and so does a holder without a value of
    ``metric``, which cannot be compared.
    """
    aliases = client.get_registered_model(name).aliases
    holder_version = aliases.get(alias)
    if holder_version is not None and str(holder_version) == str(version.version):
        logger.info("%s@%s is already version %s", name, alias, version.version)
        return False
    if holder_version is not None and not force:
        holder = client.get_model_version(name, str(holder_version))
        holder_value = _holder_value(client, holder, metric)
        if holder_value is None:
            logger.warning("%s@%s (version %s) has no %s to compare with; the alias stays (use --force to move it)",
                           name, alias, holder_version, metric)
            return False
        better = value > holder_value if direction == "maximize" else value < holder_value
        if not better:
            logger.info("%s@%s stays on version %s: its %s=%.4g is not beaten by version %s's %.4g", name, alias,
                        holder_version, metric, holder_value, version.version, value)
            return False
    client.set_registered_model_alias(name, alias, str(version.version))
    logger.info("%s@%s now points to version %s (%s=%.4g)%s", name, alias, version.version, metric, value,
                " (forced)" if force else "")
    return True
