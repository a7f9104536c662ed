"""Bad input through `hdkd train` (and `search` for its storage): one error line on stderr, exit code 2,
no traceback, and nothing written: no MLflow store, run, cache entry or output folder."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hdkd.cli import main
from hdkd.config import ConfigError, DataConfig
from hdkd.data import Example, SplitData, load_split, take_portion
from hdkd.storage import check_optuna_storage
from tests.conftest import REPO, make_rows, set_args, write_rows


@pytest.fixture()
def workdir(mlflow_store, tmp_path) -> Path:
    """The test's working directory (the MLflow store's folder); bad input files go under inputs/."""
    (tmp_path / "inputs").mkdir()
    return tmp_path


def _assert_nothing_written(workdir: Path) -> None:
    # The store (mlflow.db, mlruns/), the cache and the output folder would all appear here.
    assert sorted(p.name for p in workdir.iterdir()) == ["inputs"]


def _train_error(capsys, caplog, workdir: Path, values: dict, *args: str) -> str:
    """Run `train` on bad input and return its one error line after checking the rules every case shares."""
    caplog.set_level(logging.WARNING)
    code = main(["train", *args, *set_args(values)])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2
    assert out == ""
    assert len(lines) == 1, err
    assert lines[0].startswith("hdkd: error: ")
    assert "Traceback" not in err
    # Under pytest, log records go to caplog instead of stderr; any warning would be a second line.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    _assert_nothing_written(workdir)
    return lines[0]


# --- Config ---------------------------------------------------------------------------------------------


def test_yaml_that_does_not_parse(capsys, caplog, workdir, tiny_config):
    path = workdir / "inputs" / "run.yaml"
    path.write_text("training:\n  learning_rate: [1e-4,\n", encoding="utf-8")
    line = _train_error(capsys, caplog, workdir, tiny_config, "--config", str(path))
    assert "is not valid YAML at line 3" in line
    assert str(path) in line


def test_unknown_key_suggests_closest(capsys, caplog, workdir, tiny_config):
    path = workdir / "inputs" / "run.yaml"
    path.write_text("training:\n  lerning_rate: 1e-4\ndistill:\n  hiden_weight: 0.3\n", encoding="utf-8")
    line = _train_error(capsys, caplog, workdir, tiny_config, "--config", str(path))
    assert "unknown key 'training.lerning_rate' (did you mean 'training.learning_rate'?)" in line
    assert "unknown key 'distill.hiden_weight' (did you mean 'distill.hidden_weight'?)" in line


def test_wrong_type(capsys, caplog, workdir, tiny_config):
    values = {**tiny_config, "training.num_train_epochs": "three", "training.group_by_length": "maybe"}
    line = _train_error(capsys, caplog, workdir, values)
    assert "training.num_train_epochs='three' has the wrong type; expected int" in line
    assert "training.group_by_length='maybe' has the wrong type; expected bool" in line


@pytest.mark.parametrize("portion", ["0", "-0.5", "1.5", ".nan"])
def test_portion_out_of_range(capsys, caplog, workdir, tiny_config, portion):
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.portion": portion})
    assert "data.portion=" in line
    assert "expected a number in (0, 1]" in line


def test_all_range_problems_in_one_line(capsys, caplog, workdir, tiny_config):
    values = {**tiny_config, "distill.hidden_weight": 1.5, "training.learning_rate": 0,
              "training.num_train_epochs": 0, "training.per_device_train_batch_size": 0,
              "generation.max_new_tokens": 0, "data.portion": 2}
    line = _train_error(capsys, caplog, workdir, values)
    for fragment in ("distill.hidden_weight=1.5 is invalid; expected a number in [0, 1]",
                     "training.learning_rate=0.0 is invalid; expected a number > 0",
                     "training.num_train_epochs=0 is invalid; expected an integer >= 1",
                     "training.per_device_train_batch_size=0 is invalid; expected an integer >= 1",
                     "generation.max_new_tokens=0 is invalid; expected an integer >= 1",
                     "data.portion=2.0 is invalid; expected a number in (0, 1]"):
        assert fragment in line


def test_negative_hidden_weight_and_learning_rate(capsys, caplog, workdir, tiny_config):
    values = {**tiny_config, "distill.hidden_weight": -0.1, "training.learning_rate": -1e-4}
    line = _train_error(capsys, caplog, workdir, values)
    assert "distill.hidden_weight=-0.1 is invalid" in line
    assert "training.learning_rate=-0.0001 is invalid" in line


def test_fp16_rejected_for_t5_with_bf16_suggested(capsys, caplog, workdir, tiny_config):
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "training.fp16": True})
    assert "training.fp16=True is invalid" in line
    assert "overflow in fp16" in line
    assert "training.bf16=true" in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_cuda(capsys, caplog, workdir, tiny_config, device):
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "training.device": device})
    assert f"training.device={device!r} is invalid; no CUDA device is available here (use auto or cpu)" in line


# --- Data -----------------------------------------------------------------------------------------------


def test_missing_data_file(capsys, caplog, workdir, tiny_config):
    missing = workdir / "inputs" / "missing.json"
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.train_file": missing})
    assert line == f"hdkd: error: data file {str(missing)!r} not found"


def test_empty_data_file(capsys, caplog, workdir, tiny_config):
    empty = workdir / "inputs" / "empty.json"
    empty.write_text("\n  \n", encoding="utf-8")
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.validation_file": empty})
    assert line == f"hdkd: error: data file {str(empty)!r} is empty"


def test_non_utf8_data_file(capsys, caplog, workdir, tiny_config):
    latin = workdir / "inputs" / "latin1.json"
    text = json.dumps({"question": "Combien coûte-t-il ?", "options": ["A)1", "B)2"], "correct": "A"}) + "\n"
    latin.write_bytes(text.replace("\\u00fb", "\u00fb").encode("latin-1"))
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.train_file": latin})
    assert f"data file {str(latin)!r} is not UTF-8 text (invalid byte at offset" in line


def _bad_row(kind: str) -> dict:
    row = make_rows(1, 5)[0]
    if kind == "question":
        del row["question"]
    elif kind == "options":
        del row["options"]
    elif kind == "correct":
        del row["correct"]
    elif kind == "letter":
        row["correct"] = "F"
    elif kind == "labels":
        row["options"] = [option[2:] for option in row["options"]]
    return row


BAD_ROWS = {
    "question": "missing 'question'",
    "options": "missing 'options'",
    "correct": "missing 'correct'",
    "letter": "'correct' is not one of the options' letters",
    "labels": "options not labelled A) to E) in order",
}


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
def test_bad_row_stops_when_configured(capsys, caplog, workdir, tiny_config, kind):
    path = write_rows(workdir / "inputs" / "train.json", make_rows(3, 1) + [_bad_row(kind)] + make_rows(3, 2))
    values = {**tiny_config, "data.train_file": path, "data.bad_rows": "error"}
    line = _train_error(capsys, caplog, workdir, values)
    assert line == (f"hdkd: error: {path}: row 4: {BAD_ROWS[kind]} (set data.bad_rows=skip to skip such rows)")


def test_file_of_only_bad_rows(capsys, caplog, workdir, tiny_config):
    rows = [_bad_row(kind) for kind in sorted(BAD_ROWS)]
    path = write_rows(workdir / "inputs" / "validation.json", rows)
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.validation_file": path})
    assert f"{path}: no valid rows out of 5 (" in line
    for reason in BAD_ROWS.values():
        assert f"1 {reason}" in line


def test_bad_rows_skipped_are_counted(caplog, tmp_path):
    rows = make_rows(6, 1)
    rows[2] = _bad_row("letter")
    rows[4] = _bad_row("labels")
    path = write_rows(tmp_path / "train.json", rows)
    caplog.set_level(logging.WARNING, logger="hdkd.data")
    data = load_split(DataConfig(train_file=str(path), bad_rows="skip"), "train")
    assert (data.total_rows, data.valid_rows, data.skipped_rows) == (6, 4, 2)
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: skipped 2 of 6 rows (1 'correct' is not one of the options' letters, "
        "1 options not labelled A) to E) in order)"]


def test_portion_leaving_no_example():
    # The config keeps data.min_train_examples >= 1, so the CLI cannot get here (next test); the function refuses.
    examples = [Example(f"train-{i}", r["question"], r["options"], r["correct"]) for i, r in enumerate(make_rows(4, 1))]
    split = SplitData("train", "rows", examples, 4, 4, 0)
    with pytest.raises(ConfigError, match=r"data.portion=0.01 leaves no train example"):
        take_portion(split, 0.01, 0, seed=1)


def test_min_examples_zero_rejected(capsys, caplog, workdir, tiny_config):
    values = {**tiny_config, "data.portion": 0.01, "data.min_train_examples": 0, "data.min_validation_examples": 0}
    line = _train_error(capsys, caplog, workdir, values)
    assert "data.min_train_examples=0 is invalid; expected an integer >= 1" in line
    assert "data.min_validation_examples=0 is invalid; expected an integer >= 1" in line


# --- Models ---------------------------------------------------------------------------------------------


def test_teacher_path_missing(capsys, caplog, workdir, tiny_config):
    missing = workdir / "inputs" / "no-such-teacher"
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "teacher": missing})
    assert line == f"hdkd: error: teacher directory {str(missing)!r} not found"


def test_student_not_seq2seq(capsys, caplog, workdir, tiny_config):
    from transformers import GPT2Config

    folder = workdir / "inputs" / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=300).save_pretrained(folder)
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "student": folder})
    assert line == (f"hdkd: error: student {str(folder)!r} is a 'gpt2' model, not an encoder-decoder (seq2seq) "
                    "model such as T5")


def test_student_folder_without_model(capsys, caplog, workdir, tiny_config):
    folder = workdir / "inputs" / "empty-model"
    folder.mkdir()
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "student": folder})
    assert f"student {str(folder)!r} is not a loadable transformers model" in line


def test_different_tokenizers(capsys, caplog, workdir, tiny_config, tiny_models):
    from transformers import AutoTokenizer

    student = workdir / "inputs" / "student"
    shutil.copytree(tiny_models["student"], student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["<extra_token>"])
    tokenizer.save_pretrained(student)
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "student": student})
    assert f"teacher {tiny_config['teacher']!r} and student {str(student)!r} use different tokenizers" in line


def test_hub_model_offline(capsys, caplog, workdir, tiny_config):
    started = time.perf_counter()
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "teacher": "google/flan-t5-base"})
    assert time.perf_counter() - started < 30
    assert (f"teacher 'google/flan-t5-base' is neither an existing local directory (looked for "
            f"{str(workdir / 'google' / 'flan-t5-base')!r}) nor a reachable hub model") in line
    assert "set teacher to a local model directory" in line


def test_hub_dataset_offline(capsys, caplog, workdir, tiny_config):
    line = _train_error(capsys, caplog, workdir, {**tiny_config, "data.train_file": "null"})
    assert "hub dataset 'deepmind/aqua_rat' cannot be downloaded (HF_HUB_OFFLINE is set)" in line
    assert "set data.train_file and data.validation_file to local JSON-lines files" in line


# --- Stores ---------------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tracking_uri_under_a_file(capsys, caplog, workdir, tiny_config, monkeypatch):
    blocker = workdir / "inputs" / "file"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    line = _train_error(capsys, caplog, workdir, tiny_config)
    assert f"MLflow tracking URI 'sqlite:///{blocker}/mlflow.db' cannot be opened" in line


def test_tracking_server_unreachable_fails_fast(capsys, caplog, workdir, tiny_config, monkeypatch):
    uri = f"http://user:hunter2secret@127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.perf_counter()
    line = _train_error(capsys, caplog, workdir, tiny_config)
    assert time.perf_counter() - started < 60
    assert "MLflow tracking URI 'http://user:***@127.0.0.1:" in line
    assert "hunter2secret" not in line


def test_existing_store_gets_no_new_run(capsys, workdir, tiny_config, mlflow_store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("hdkd-test")
    done = client.create_run(experiment)
    client.set_terminated(done.info.run_id, "FINISHED")
    assert main(["train", *set_args({**tiny_config, "distill.hidden_weight": 7})]) == 2
    assert "distill.hidden_weight=7.0 is invalid" in capsys.readouterr().err
    runs = client.search_runs([experiment])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(done.info.run_id, "FINISHED")]
    assert not (workdir / "outputs").exists()
    assert not (workdir / "cache").exists()


@pytest.mark.parametrize("command", ["train", "search"])
def test_mlflow_run_gets_error_tag(capsys, workdir, tiny_config, mlflow_store, monkeypatch, command):
    # Under `mlflow run`, MLflow creates the run and passes its id, and bad input still prints one line.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("projects")
    created = client.create_run(experiment)
    monkeypatch.setenv("MLFLOW_RUN_ID", created.info.run_id)
    capsys.readouterr()
    assert main([command, *set_args({**tiny_config, "data.portion": 2})]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["hdkd: error: invalid configuration: data.portion=2.0 is invalid; expected a number in (0, 1]"]
    run = client.get_run(created.info.run_id)
    assert run.data.tags["hdkd.error"] == "ConfigError: " + lines[0].removeprefix("hdkd: error: ")
    assert run.info.status == "RUNNING"  # `mlflow run` ends it FAILED when hdkd exits
    assert not (workdir / "outputs").exists()


def test_unknown_run_id_one_line(capsys, workdir, tiny_config, mlflow_store, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    # No store yet: none is created just to tag a run.
    assert main(["train", *set_args({**tiny_config, "data.portion": 2})]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    _assert_nothing_written(workdir)

    # A store without that run: the tag cannot be set, and the output stays one line.
    MlflowClient(mlflow_store).create_experiment("projects")
    capsys.readouterr()
    assert main(["train", *set_args({**tiny_config, "data.portion": 2})]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_search_storage_cannot_be_opened(capsys, workdir, tiny_config):
    blocker = workdir / "inputs" / "file"
    blocker.write_text("", encoding="utf-8")
    storage = f"sqlite:///{blocker}/optuna.db"
    code = main(["search", "--storage", storage, *set_args({**tiny_config, "search.n_trials": 1})])
    out, err = capsys.readouterr()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"hdkd: error: invalid configuration: Optuna storage {storage!r} cannot be opened")
    _assert_nothing_written(workdir)


# --- Optuna storage check -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, fragment", [
    ("", "search.storage is empty"),
    ("optuna.txt", "search.storage='optuna.txt' is invalid: neither a database URL nor a journal file path"),
    ("://nowhere", "is not a valid database URL"),
    ("nosuchdb://user:pw1234secret@127.0.0.1/db", "unknown database scheme 'nosuchdb'"),
])
def test_optuna_storage_invalid_values(value, fragment):
    with pytest.raises(ConfigError) as info:
        check_optuna_storage(value)
    assert fragment in str(info.value)
    assert "pw1234secret" not in str(info.value)


def test_optuna_storage_local_files(tmp_path):
    not_a_database = tmp_path / "notes.db"
    not_a_database.write_text("these are notes, not a database\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        check_optuna_storage(f"sqlite:///{not_a_database}")
    with pytest.raises(ConfigError, match="is a file, so .* cannot be created"):
        check_optuna_storage(f"sqlite:///{not_a_database}/optuna.db")
    with pytest.raises(ConfigError, match="is a file, so .* cannot be created"):
        check_optuna_storage(str(not_a_database / "journal.log"))

    # Storages that do not exist yet pass when they can be created, and the check creates nothing.
    check_optuna_storage(f"sqlite:///{tmp_path}/new/folder/optuna.db")
    check_optuna_storage(str(tmp_path / "journal.log"))
    check_optuna_storage("sqlite:///:memory:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_optuna_storage_existing_sqlite_passes(tmp_path):
    import sqlite3

    path = tmp_path / "optuna.db"
    with sqlite3.connect(path) as connection:
        connection.execute("create table t (x integer)")
    connection.close()
    check_optuna_storage(f"sqlite:///{path}")


def test_optuna_storage_server_password_masked():
    # No PostgreSQL driver is installed here, so the check fails on the driver; with one it tries to connect.
    url = "postgresql://hdkd:pw1234secret@127.0.0.1:1/optuna"
    with pytest.raises(ConfigError) as info:
        check_optuna_storage(url)
    message = str(info.value)
    assert "Optuna storage 'postgresql://hdkd:***@127.0.0.1:1/optuna' cannot be opened" in message
    assert "pw1234secret" not in message


# --- Real processes: exactly one stderr line, no traceback ----------------------------------------------


def _hdkd(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "hdkd", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["config", "hub", "tracking"])
def test_subprocess_one_stderr_line(workdir, tiny_config, case):
    values = dict(tiny_config)
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    if case == "config":
        path = workdir / "inputs" / "run.yaml"
        path.write_text("training:\n  lerning_rate: 1e-4\n  warmup_steps: ten\n", encoding="utf-8")
        args = ["train", "--config", str(path), *set_args(values)]
        expected = ["unknown key 'training.lerning_rate' (did you mean 'training.learning_rate'?)",
                    "training.warmup_steps='ten' has the wrong type; expected int"]
    elif case == "hub":
        args = ["train", *set_args({**values, "student": "google/flan-t5-small"})]
        expected = ["student 'google/flan-t5-small' is neither an existing local directory (looked for ",
                    "nor a reachable hub model"]
    else:
        env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{_closed_port()}"
        args = ["train", *set_args(values)]
        expected = ["MLflow tracking URI 'http://127.0.0.1:", "cannot be opened"]
    result = _hdkd(args, workdir, env)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("hdkd: error: ")
    for fragment in expected:
        assert fragment in result.stderr
    _assert_nothing_written(workdir)


def test_debug_shows_the_exception(workdir, tiny_config):
    with pytest.raises(ConfigError, match="distill.hidden_weight=-1.0 is invalid"):
        main(["--debug", "train", *set_args({**tiny_config, "distill.hidden_weight": -1})])
    _assert_nothing_written(workdir)
