"""Everything that talks to MLflow for a single run: the store, the run, params, metrics, artifacts, the model.

The trainer reports through ``MlflowMetricsCallback``; nothing else in the training loop imports mlflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from hdkd import __version__
from hdkd.config import ConfigError

logger = logging.getLogger(__name__)

# Trainer log keys -> MLflow metric names; the x-axis is the optimizer step.
METRIC_NAMES = {
    "loss": "train/loss",
    "ce_loss": "train/ce_loss",
    "hidden_mse": "train/hidden_mse",
    "learning_rate": "train/learning_rate",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "eval_loss": "eval/loss",
    "eval_ce_loss": "eval/ce_loss",
    "eval_hidden_mse": "eval/hidden_mse",
    "eval_student_accuracy": "eval/student_accuracy",
    "eval_teacher_accuracy": "eval/teacher_accuracy",
    "eval_agreement": "eval/agreement",
    "eval_student_unparsed": "eval/student_unparsed",
    "eval_teacher_unparsed": "eval/teacher_unparsed",
}
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
              "DATABASE_URL", "AWS_SECRET_ACCESS_KEY")
_URL_PASSWORD = re.compile(r"(?P<scheme>[a-zA-Z][\w+.-]*://[^:/@\s]+):(?P<password>[^@\s]+)@")


def mask_secrets(text: str) -> str:
    """Replace the password of any ``scheme://user:password@host`` URL, and known secret values, with ***."""
    text = _URL_PASSWORD.sub(lambda m: f"{m.group('scheme')}:***@", str(text))
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


# --- Store and run --------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else ``sqlite:///mlflow.db`` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


# MLflow retries an unreachable server for minutes by default, so the store check makes one short attempt.
_STORE_CHECK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def _environment(values: dict[str, str], keep: tuple[str, ...] = ()):
    """Set ``values`` in os.environ for the block, then restore those names and the ``keep`` names as they were."""
    saved = {name: os.environ.get(name) for name in (*values, *keep)}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def open_store() -> MlflowClient:
    """Point MLflow at the store and check it opens; a bad URI raises ConfigError naming it."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        with _environment(_STORE_CHECK_ENV):
            client.search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store
        raise ConfigError([f"MLflow tracking URI {mask_secrets(uri)!r} cannot be opened "
                           f"({type(err).__name__}: {mask_secrets(str(err).splitlines()[0] if str(err) else '')}); "
                           "set MLFLOW_TRACKING_URI to a reachable server or a sqlite:/// path"]) from None
    return client


def start_run(experiment_name: str, run_name: str | None = None, run_id: str | None = None,
              nested: bool = False, tags: dict[str, str] | None = None, system_metrics: bool = False):
    """Start (or continue) a run. Under ``mlflow run`` MLFLOW_RUN_ID names the run and its experiment is kept."""
    if run_id is None and not nested and os.environ.get("MLFLOW_RUN_ID"):
        run_id = os.environ["MLFLOW_RUN_ID"]
    if run_id is None and not os.environ.get("MLFLOW_EXPERIMENT_ID") and not os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        # set_experiment also exports MLFLOW_EXPERIMENT_ID. Left set, it would read as `mlflow run`'s choice: the
        # next run of this process (another experiment_name) and child processes would log to this experiment.
        with _environment({}, keep=("MLFLOW_EXPERIMENT_ID",)):
            mlflow.set_experiment(experiment_name)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=tags,
                           log_system_metrics=system_metrics or None)
    if run_id is not None and "hdkd.error" in run.data.tags:
        # A continued run is running again, so the error of its earlier attempt no longer describes it.
        MlflowClient().delete_tag(run_id, "hdkd.error")
    return run


def end_run(status: str, error: BaseException | None = None) -> None:
    """End the active run as FINISHED, FAILED or KILLED; a failure keeps its message as the hdkd.error tag."""
    if mlflow.active_run() is None:
        return
    if error is not None:
        message = mask_secrets(f"{type(error).__name__}: {error}")[:4900]
        mlflow.set_tag("hdkd.error", message)
    mlflow.end_run(status=status)


def mark_project_run_continued(continued_run_id: str) -> None:
    """Tag the run that ``mlflow run`` created when hdkd continues an earlier run instead of logging into it.

    MLflow ends that new run FINISHED with nothing in it, so the tag ``hdkd.continued_in`` and its description
    name the run that contains the results.
    """
    project_run_id = os.environ.get("MLFLOW_RUN_ID")
    if not project_run_id or project_run_id == continued_run_id:
        return
    client = MlflowClient()
    client.set_tag(project_run_id, "hdkd.continued_in", continued_run_id)
    client.set_tag(project_run_id, "mlflow.note.content",
                   f"hdkd continued the unfinished run {continued_run_id} of the same config, which contains "
                   "the metrics, artifacts and model. This run stays empty.")


def sqlite_file(url: str) -> Path | None:
    """Return the database file of a ``sqlite:///`` URL, or None for an in-memory database or another scheme."""
    if not url.startswith("sqlite:///"):
        return None
    name = url.removeprefix("sqlite:///").split("?", 1)[0]
    if name in ("", ":memory:"):
        return None
    return Path(name).expanduser().resolve()


def _store_exists(uri: str) -> bool:
    """Return whether a local store (a sqlite file or a folder) exists. A server store counts as existing."""
    if uri.startswith("sqlite:"):
        path = sqlite_file(uri)
        return path is not None and path.exists()
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path).exists()
    return True


def tag_project_run(message: str) -> bool:
    """Set the hdkd.error tag on the run that ``mlflow run`` created (MLFLOW_RUN_ID) before hdkd started.

    Bad input stops hdkd before it opens a run, so without the tag that run would end FAILED with no reason in
    MLflow. Returns whether the tag was set. A store or run that cannot take it is logged at debug level only,
    because the error line is all that bad input prints.
    """
    run_id = os.environ.get("MLFLOW_RUN_ID")
    uri = tracking_uri()
    if not run_id or not _store_exists(uri):
        return False
    try:
        with _environment(_STORE_CHECK_ENV):
            MlflowClient(uri).set_tag(run_id, "hdkd.error", mask_secrets(message)[:4900])
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store or run
        logger.debug("failed to tag MLflow run %s with the error: %s: %s", run_id, type(err).__name__,
                     mask_secrets(str(err))[:300])
        return False
    return True


def run_status(run_id: str) -> str | None:
    try:
        return MlflowClient().get_run(run_id).info.status
    except Exception:  # noqa: BLE001 - a deleted or unknown run
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def log_config(flat: dict[str, Any]) -> None:
    """Log every config value under its dotted key (never the MLproject parameter names), secrets masked."""
    params = {key: mask_secrets("null" if value is None else str(value))[:6000] for key, value in flat.items()}
    client = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    existing = client.get_run(run_id).data.params
    # On resume the same values are already there; MLflow rejects changing a param, so log only new keys.
    params = {k: v for k, v in params.items() if k not in existing}
    items = list(params.items())
    for start in range(0, len(items), 90):
        mlflow.log_params(dict(items[start: start + 90]))


def base_tags(teacher: str, student: str, random_weights: bool) -> dict[str, str]:
    tags = {"hdkd.teacher": teacher, "hdkd.student": student, "hdkd.version": __version__,
            "hdkd.random_weights": str(random_weights).lower()}
    commit = git_commit()
    if commit:
        tags["hdkd.git_commit"] = commit
    return tags


# --- Metrics --------------------------------------------------------------------------------------------


def last_logged_steps(run_id: str) -> dict[str, int]:
    """Return the highest step of each train/* and eval/* metric already in the run."""
    client = MlflowClient()
    last = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith(("train/", "eval/")):
            history = client.get_metric_history(run_id, key)
            if history:
                last[key] = max(m.step for m in history)
    return last


class MlflowMetricsCallback(TrainerCallback):
    """Send Trainer logs to MLflow as train/* and eval/* metrics at the optimizer step.

    After a resume, ``logged_steps`` (from ``last_logged_steps``) holds what the run had before the crash. A
    metric is sent only for steps after its own last one, so each step appears once. An evaluation the crash
    cut short is still sent when the resumed run repeats it.
    """

    def __init__(self, run_id: str, logged_steps: dict[str, int] | None = None):
        self.run_id = run_id
        self.logged_steps = dict(logged_steps or {})
        self.client = MlflowClient()

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if not logs:
            return
        stamp = int(time.time() * 1000)
        metrics = [Metric(METRIC_NAMES[k], float(v), stamp, step) for k, v in logs.items()
                   if k in METRIC_NAMES and isinstance(v, (int, float))
                   and step > self.logged_steps.get(METRIC_NAMES[k], -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


def log_metrics(values: dict[str, float], step: int) -> None:
    mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)


# --- Artifacts and the model ----------------------------------------------------------------------------


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table(rows: dict[str, list], artifact_file: str) -> None:
    mlflow.log_table(data=rows, artifact_file=artifact_file)


def log_dataset(split: str, source: str, ids: list[str], digest: str, portion: float) -> None:
    """Record the examples a run used with mlflow.log_input (source, split, portion and digest)."""
    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas

    frame = pd.DataFrame({"id": ids})
    dataset = from_pandas(frame, source=source, name=f"aqua_rat-{split}", digest=digest)
    mlflow.log_input(dataset, context=split, tags={"portion": str(portion), "split": split})


def log_student_model(student_dir: str | Path, input_example: list[str], name: str = "student"):
    """Log the student as a pyfunc model defined from code (hdkd/pyfunc_model.py).

    The model bundles the hdkd package through ``code_paths``, so its requirements list only hdkd's runtime
    dependencies, which an environment manager can install from a package index.
    """
    from hdkd.pyfunc_model import student_signature

    package_dir = Path(__file__).resolve().parent
    signature = student_signature(student_dir)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(package_dir / "pyfunc_model.py"),
        artifacts={"student": str(student_dir)},
        code_paths=[str(package_dir)],
        pip_requirements=_runtime_requirements(),
        signature=signature,
        input_example=input_example,
    )


def _runtime_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    requirements = []
    for package in ("torch", "transformers", "sentencepiece", "safetensors", "mlflow", "pandas", "PyYAML"):
        try:
            requirements.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return requirements


def active_run_id() -> str:
    return mlflow.active_run().info.run_id


def finished(status: str) -> bool:
    return status in (RunStatus.to_string(RunStatus.FINISHED),)


# --- Queries --------------------------------------------------------------------------------------------


def experiment_names() -> list[str]:
    """Return the names of the active experiments in the store."""
    return sorted(experiment.name for experiment in mlflow.search_experiments())


def search_runs(experiment_name: str, filter_string: str = ""):
    """Return an experiment's runs as the DataFrame ``mlflow.search_runs`` builds (``metrics.*``, ``params.*`` and
    ``tags.*`` columns), or None when no active experiment has that name."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None or experiment.lifecycle_stage != "active":
        return None
    return mlflow.search_runs(experiment_ids=[experiment.experiment_id], filter_string=filter_string)


def has_runs(experiment_name: str) -> bool:
    """Return whether the experiment exists and contains at least one run."""
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is None:
        return False
    return bool(MlflowClient().search_runs([experiment.experiment_id], max_results=1))


def experiments_with_runs(filter_string: str) -> list[str]:
    """Return the names of the active experiments that contain runs matching ``filter_string``."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=filter_string, output_format="list")
    ids = {run.info.experiment_id for run in runs}
    return sorted(mlflow.get_experiment(experiment_id).name for experiment_id in ids)


def artifact_uri(run_id: str) -> str:
    """Return where the run's artifacts are stored (a local path for the default sqlite store)."""
    return MlflowClient().get_run(run_id).info.artifact_uri
