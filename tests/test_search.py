"""`search`: Optuna trials as nested MLflow runs, failures, resume, parallel workers and the Model Registry.

Tiny random models on generated rows, one epoch per trial, temporary MLflow and Optuna stores.
"""

from __future__ import annotations

import csv
import math
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from hdkd import search, teacher
from hdkd.cli import main
from tests.conftest import REPO, set_args

TRIAL_TAGS = ("hdkd.study", "hdkd.trial", "mlflow.parentRunId", "mlflow.runName")


@pytest.fixture()
def search_config(tiny_config, tmp_path) -> dict:
    return {**tiny_config, "training.num_train_epochs": 1, "search.storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "search.study_name": "tiny"}


def _runs(experiment: str) -> tuple[list, list]:
    """Return (parent runs, child runs) of the experiment."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    parents = [r for r in runs if r.data.tags.get("hdkd.role") == "study"]
    children = [r for r in runs if r.data.tags.get("hdkd.role") == "trial"]
    assert len(parents) + len(children) == len(runs)
    return parents, children


def _expected_best(children: list, metric: str = "eval/student_accuracy"):
    """The best trial run by the documented order, computed here from the run metrics alone."""
    finished = [r for r in children if r.info.status == "FINISHED"]
    return min(finished, key=lambda r: (-r.data.metrics[metric], r.data.metrics["eval/loss"],
                                        int(r.data.tags["hdkd.trial"])))


def _study(values: dict) -> optuna.Study:
    return optuna.load_study(study_name=values["search.study_name"], storage=search._open_storage(
        values["search.storage"]))


def test_search_three_trials_nested_runs(mlflow_store, search_config, monkeypatch):
    # Stand in for `mlflow run`, which creates the parent run and names it in MLFLOW_RUN_ID.
    experiment_id = mlflow.create_experiment("hdkd-test")
    outer = MlflowClient().create_run(experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    generations = teacher.counter.generations

    assert main(["search", *set_args({**search_config, "search.n_trials": 3})]) == 0

    parents, children = _runs("hdkd-test")
    assert [p.info.run_id for p in parents] == [outer.info.run_id]
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    study = _study(search_config)
    trials = {t.number: t for t in study.get_trials()}
    assert sorted(trials) == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials.values())

    for child in children:
        tags = child.data.tags
        assert set(TRIAL_TAGS) <= set(tags)
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_id != parent.info.run_id
        assert tags["hdkd.study"] == "tiny"
        number = int(tags["hdkd.trial"])
        assert tags["mlflow.runName"] == f"trial-{number}"
        assert child.info.status == "FINISHED"
        for key in ("train/ce_loss", "train/hidden_mse", "eval/student_accuracy", "eval/loss"):
            assert key in child.data.metrics, key
        trial = trials[number]
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
        assert trial.value == child.data.metrics["eval/student_accuracy"]
        assert float(child.data.params["distill.hidden_weight"]) == pytest.approx(trial.params["hidden_weight"])
        assert float(child.data.params["training.learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert 1e-5 <= trial.params["learning_rate"] <= 1e-3

    # Teacher work ran once for the study: 24 training and 16 validation examples.
    assert teacher.counter.generations - generations == 40
    assert parent.data.metrics["teacher/generations"] == 40
    assert parent.data.metrics["study/complete"] == 3
    assert parent.data.params["search.study_name"] == "tiny"
    assert parent.data.params["search.space.learning_rate"] == "log-uniform(1e-05, 0.001)"
    assert "distill.hidden_weight" not in parent.data.params

    best = _expected_best(children)
    assert parent.data.tags["hdkd.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best/trial"] == int(best.data.tags["hdkd.trial"])
    assert parent.data.metrics["best/eval/student_accuracy"] == best.data.metrics["eval/student_accuracy"]

    client = MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/hidden_weight_learning_rate.png", "plots/comparison.png"} <= plots
    with open(client.download_artifacts(parent.info.run_id, "trials.csv"), newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["number"]) for row in rows) == [0, 1, 2]
    assert {row["user_attrs_mlflow_run_id"] for row in rows} == {c.info.run_id for c in children}
    assert {row["random_weights"] for row in rows} == {"True"}

    # Only the best trial's student is logged as a model, and it is the registered champion.
    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list")
    assert [m.source_run_id for m in models] == [best.info.run_id]
    version = client.get_model_version_by_alias("hdkd-student", "champion")
    assert version.run_id == best.info.run_id
    assert client.get_run(version.run_id).info.status == "FINISHED"
    number = best.data.tags["hdkd.trial"]
    assert version.tags["study"] == "tiny"
    assert version.tags["trial"] == number
    assert version.tags["source_run"] == best.info.run_id
    assert version.tags["teacher"] == search_config["teacher"]
    assert version.tags["random_weights"] == "true"
    assert float(version.tags["hidden_weight"]) == trials[int(number)].params["hidden_weight"]
    assert float(version.tags["learning_rate"]) == trials[int(number)].params["learning_rate"]
    assert float(version.tags["student_accuracy"]) == best.data.metrics["eval/student_accuracy"]
    assert float(version.tags["teacher_accuracy"]) == best.data.metrics["eval/teacher_accuracy"]
    assert "aqua_rat-train:" in version.tags["data_fingerprint"]
    assert "RANDOM" in version.description
    assert len(client.search_model_versions("name = 'hdkd-student'")) == 1

    loaded = mlflow.pyfunc.load_model("models:/hdkd-student@champion")
    answers = loaded.predict(["Question: How many pens?\nOptions:\nA)1\nB)2\nC)3\nD)4\nE)5"])
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.filterwarnings("ignore:Fixed parameter learning_rate")
def test_search_failed_trial_then_resume(mlflow_store, search_config):
    # Trial 0 gets a learning rate that drives the loss to inf/NaN; the study must go on without it.
    study = optuna.create_study(study_name="tiny", storage=search._open_storage(search_config["search.storage"]),
                                direction="maximize")
    study.enqueue_trial({"hidden_weight": 0.5, "learning_rate": 1e30})
    generations = teacher.counter.generations

    assert main(["search", *set_args({**search_config, "search.n_trials": 2})]) == 0

    study = _study(search_config)
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    assert "NonFiniteLossError" in study.trials[0].user_attrs["error"]
    parents, children = _runs("hdkd-test")
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == 1
    assert failed[0].data.tags["hdkd.trial"] == "0"
    assert failed[0].data.tags["hdkd.error"].startswith("NonFiniteLossError: non-finite loss")
    assert study.trials[0].user_attrs["mlflow_run_id"] == failed[0].info.run_id
    assert parents[0].data.metrics["study/fail"] == 1
    assert parents[0].data.metrics["teacher/generations"] == 40
    first_version = MlflowClient().get_model_version_by_alias("hdkd-student", "champion")
    assert first_version.run_id == study.trials[1].user_attrs["mlflow_run_id"]

    # Resume: n_trials is the total for the study, and the teacher's outputs come from the cache.
    assert main(["search", *set_args({**search_config, "search.n_trials": 4})]) == 0

    study = _study(search_config)
    assert [t.number for t in study.get_trials()] == [0, 1, 2, 3]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) == 3
    parents, children = _runs("hdkd-test")
    assert len(parents) == 2
    assert len(children) == 4
    second = max(parents, key=lambda p: p.info.start_time)
    assert second.data.metrics["teacher/generations"] == 0
    assert teacher.counter.generations - generations == 40
    resumed = [c for c in children if c.data.tags["mlflow.parentRunId"] == second.info.run_id]
    assert sorted(c.data.tags["hdkd.trial"] for c in resumed) == ["2", "3"]
    assert second.data.metrics["study/complete"] == 3

    # The champion moved only if the new best beats the first one.
    best = _expected_best(children)
    champion = MlflowClient().get_model_version_by_alias("hdkd-student", "champion")
    first_value = float(first_version.tags["objective"])
    if best.data.metrics["eval/student_accuracy"] > first_value:
        assert champion.run_id == best.info.run_id
    else:
        assert champion.version == first_version.version

    # A third call has nothing left to run and registers nothing new.
    versions = len(MlflowClient().search_model_versions("name = 'hdkd-student'"))
    assert main(["search", *set_args({**search_config, "search.n_trials": 4})]) == 0
    assert len(_study(search_config).get_trials()) == 4
    assert len(MlflowClient().search_model_versions("name = 'hdkd-student'")) == versions


def test_search_prunes_worse_trial(mlflow_store, search_config):
    # Minimising eval/loss with an evaluation at every step: after one step, a learning rate 100 times lower
    # leaves the loss above the first trial's, and the median pruner (active after one trial) stops it.
    values = {**search_config, "search.metric": "eval/loss", "search.direction": "minimize",
              "search.pruner_startup_trials": 1, "search.n_trials": 2, "training.eval_steps": 1,
              "training.per_device_train_batch_size": 12, "search.hidden_weight_low": 0.0,
              "search.hidden_weight_high": 0.0}
    study = optuna.create_study(study_name="tiny", storage=search._open_storage(values["search.storage"]),
                                direction="minimize")
    study.enqueue_trial({"hidden_weight": 0.0, "learning_rate": 1e-3})
    study.enqueue_trial({"hidden_weight": 0.0, "learning_rate": 1e-5})

    assert main(["search", *set_args(values)]) == 0

    trials = _study(values).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]
    assert list(trials[1].intermediate_values) == [1]
    _, children = _runs("hdkd-test")
    pruned = next(c for c in children if c.data.tags["hdkd.trial"] == "1")
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["hdkd.pruned"] == "true"
    assert "hdkd.error" not in pruned.data.tags
    assert [m.step for m in MlflowClient().get_metric_history(pruned.info.run_id, "eval/loss")] == [1]
    complete = next(c for c in children if c.data.tags["hdkd.trial"] == "0")
    assert complete.info.status == "FINISHED"
    assert "hdkd.pruned" not in complete.data.tags


def _register(client: MlflowClient, name: str, value: float):
    """Create a finished run with eval/student_accuracy=value and register a model version pointing at it."""
    with mlflow.start_run() as run:
        mlflow.log_metric("eval/student_accuracy", value)
    return client.create_model_version(name, source=f"runs:/{run.info.run_id}/student", run_id=run.info.run_id,
                                       tags={"metric": "eval/student_accuracy", "objective": repr(value)})


def test_champion_alias_moves_only_to_better(mlflow_store):
    client = MlflowClient()
    mlflow.set_experiment("hdkd-test")
    client.create_registered_model("m")

    def move(version, value, direction="maximize", force=False):
        return search.move_alias_if_better(client, "m", "champion", version, value, "eval/student_accuracy",
                                           direction, force)

    def champion():
        return client.get_registered_model("m").aliases["champion"]

    first = _register(client, "m", 0.4)
    assert move(first, 0.4) is True
    assert champion() == first.version

    worse = _register(client, "m", 0.3)
    assert move(worse, 0.3) is False
    assert champion() == first.version

    tie = _register(client, "m", 0.4)
    assert move(tie, 0.4) is False
    assert champion() == first.version

    better = _register(client, "m", 0.6)
    assert move(better, 0.6) is True
    assert champion() == better.version

    # --force moves the alias to a worse model; minimising, a lower value wins.
    assert move(worse, 0.3, force=True) is True
    assert champion() == worse.version
    assert move(first, 0.4, direction="minimize") is False
    assert move(better, 0.6, direction="minimize") is False
    assert move(tie, 0.4, direction="maximize") is True
    assert champion() == tie.version


def _start_worker(values: dict, log_path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    handle = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "hdkd", "search", *set_args(values)], stdout=handle,
                            stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())


def _run_workers(values: dict, count: int, tmp_path) -> list[str]:
    logs = [tmp_path / f"worker-{i}.log" for i in range(count)]
    workers = [_start_worker(values, path) for path in logs]
    codes = [worker.wait(timeout=600) for worker in workers]
    outputs = [path.read_text() for path in logs]
    for code, output in zip(codes, outputs):
        assert code == 0, output[-3000:]
    return outputs


def _check_shared_study(values: dict, workers: int, n_trials: int) -> None:
    study = _study(values)
    assert sorted(t.number for t in study.get_trials()) == list(range(n_trials))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials())
    parents, children = _runs("hdkd-test")
    assert len(parents) == workers
    assert sorted(int(c.data.tags["hdkd.trial"]) for c in children) == list(range(n_trials))
    assert {c.data.tags["mlflow.parentRunId"] for c in children} <= {p.info.run_id for p in parents}
    assert {t.user_attrs["mlflow_run_id"] for t in study.get_trials()} == {c.info.run_id for c in children}

    # One registration for the study, pointing at its best trial, whose run is finished.
    client = MlflowClient()
    versions = client.search_model_versions("name = 'hdkd-student'")
    assert len(versions) == 1
    best = _expected_best(children)
    assert versions[0].run_id == best.info.run_id
    assert client.get_model_version_by_alias("hdkd-student", "champion").version == versions[0].version
    assert client.get_run(best.info.run_id).info.status == "FINISHED"
    assert sum(p.data.tags.get("hdkd.registration") == "done" for p in parents) >= 1


@pytest.mark.slow
def test_two_processes_share_journal_study(mlflow_store, search_config, tmp_path):
    values = {**search_config, "search.storage": str(tmp_path / "study.log"), "search.n_trials": 3}
    _run_workers(values, 2, tmp_path)
    _check_shared_study(values, workers=2, n_trials=3)


@pytest.mark.slow
def test_four_workers_fresh_sqlite_stores(mlflow_store, search_config, tmp_path):
    # Neither the MLflow nor the Optuna SQLite file exists yet: the workers race to create both.
    assert not (tmp_path / "mlflow.db").exists()
    values = {**search_config, "search.n_trials": 4}
    outputs = _run_workers(values, 4, tmp_path)
    for output in outputs:
        assert "database is locked" not in output
    _check_shared_study(values, workers=4, n_trials=4)
    assert math.isfinite(_study(values).best_value)


# --- A PostgreSQL storage, on a throwaway server bound to 127.0.0.1 ---------------------------------------------


def _postgres_bin() -> str | None:
    found = shutil.which("initdb")
    candidates = [found] if found else sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    # Debian links only some programs into the PATH, so the folder is taken from the link's target.
    return os.path.dirname(os.path.realpath(candidates[0])) if candidates else None


@pytest.fixture()
def postgres_url():
    """Start a PostgreSQL server on a free 127.0.0.1 port in a temporary folder and yield a database URL."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver psycopg is not installed")
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server programs (initdb, pg_ctl) not found")
    # The server refuses to run as root, so under root it runs as the postgres account the package creates.
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    no_account = subprocess.run(["id", "postgres"], capture_output=True).returncode != 0
    if prefix and (shutil.which("runuser") is None or no_account):
        pytest.skip("running as root without runuser or a postgres account to run the server as")
    # pytest's folders are private to their owner, so the server's folder is one the postgres account can enter.
    folder = Path(tempfile.mkdtemp(prefix="hdkd-postgres-"))
    if prefix:
        shutil.chown(folder, "postgres")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = folder / "data"

    def run(*command: str) -> None:
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command[0]} failed: {result.stderr[-2000:]}"

    run(f"{bin_dir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust")
    run(f"{bin_dir}/pg_ctl", "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}", "start")
    try:
        run(f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "optuna")
        yield f"postgresql://postgres@127.0.0.1:{port}/optuna"
    finally:
        run(f"{bin_dir}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_processes_share_postgresql_study(mlflow_store, search_config, tmp_path, postgres_url):
    # The storage's advisory lock, not a file lock, keeps the two workers to 3 trials in all.
    values = {**search_config, "search.storage": postgres_url, "search.n_trials": 3}
    _run_workers(values, 2, tmp_path)
    _check_shared_study(values, workers=2, n_trials=3)


def test_fresh_postgresql_schema_created_once(postgres_url):
    # Processes that open a new database at the same moment would each create Optuna's tables.
    script = "import sys; from hdkd.search import _open_storage; _open_storage(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen([sys.executable, "-c", script, postgres_url], env=env, stderr=subprocess.PIPE,
                                text=True) for _ in range(4)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
    assert optuna.storages.RDBStorage(postgres_url).get_all_studies() == []
