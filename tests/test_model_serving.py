"""The logged student: its MLmodel, `load_model(...).predict` on both input forms, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hdkd.cli import main
from hdkd.data import build_prompt
from tests.conftest import make_rows

SERVE_START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _wait_for_ping(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVE_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not answer {url} within {SERVE_START_TIMEOUT_S} s:\n"
                f"{log_path.read_text()[-3000:]}")


def _reference_answers(student_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Generate greedy answers with transformers directly from the logged student files."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(student_dir).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=256)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
        answers.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return answers


@pytest.mark.slow
def test_student_model_predict_and_serve(mlflow_store, tiny_config, tmp_path, capfd):
    overrides = {**tiny_config, "training.num_train_epochs": 1}
    args = ["train"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0

    run = mlflow.search_runs(experiment_names=["hdkd-test"], output_format="list")[0]
    model = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")[0]
    client = MlflowClient()

    # The MLmodel: no input schema (see hdkd/pyfunc_model.py), answer/letter outputs, params with the
    # training-time generation settings as defaults, a saved input example, and the hdkd code bundled with
    # only its dependencies as requirements.
    info = mlflow.models.get_model_info(model.model_uri)
    assert info.signature.inputs is None
    assert info.signature.outputs.input_names() == ["answer", "letter"]
    params = {p.name: p.default for p in info.signature.params}
    assert params == {"max_new_tokens": 4, "num_beams": 1}
    assert info.saved_input_example_info["type"] == "json_object"
    local_model = Path(mlflow.artifacts.download_artifacts(model.model_uri, dst_path=str(tmp_path / "model")))
    requirements = (local_model / "requirements.txt").read_text().split()
    names = {line.split("==")[0] for line in requirements}
    assert {"torch", "transformers", "safetensors", "mlflow", "pandas", "PyYAML"} <= names
    assert not any(line.startswith("hdkd") for line in requirements)
    assert (local_model / "code" / "hdkd" / "pyfunc_model.py").is_file()
    example = json.loads((local_model / "input_example.json").read_text())
    assert example[0].startswith("Question: ")

    # The projection is a run artifact, not part of the served model.
    assert [a.path for a in client.list_artifacts(run.info.run_id, "projection")] == \
        ["projection/projection.safetensors"]
    assert not list(local_model.rglob("projection.safetensors"))
    student_dir = local_model / "artifacts" / "student"
    assert (student_dir / "config.json").is_file()

    # A list of prompts: a list of answers, equal to greedy generation with transformers.
    rows = make_rows(3, seed=7)
    prompts = [build_prompt(r["question"], r["options"]) for r in rows]
    loaded = mlflow.pyfunc.load_model(model.model_uri)
    capfd.readouterr()
    answers = loaded.predict(prompts)
    # A server's log is no terminal, so predict draws no progress bar there.
    assert "student answers" not in capfd.readouterr().err
    assert isinstance(answers, list)
    assert all(isinstance(a, str) for a in answers)
    assert answers == _reference_answers(student_dir, prompts, max_new_tokens=4)

    # A question/options table: the same prompts are built, and a letter column is added.
    table = pd.DataFrame({"question": [r["question"] for r in rows], "options": [r["options"] for r in rows]})
    result = loaded.predict(table)
    assert isinstance(result, pd.DataFrame)
    assert list(result.columns) == ["answer", "letter"]
    assert result["answer"].tolist() == answers
    assert all(letter is None or letter in "ABCDE" for letter in result["letter"])

    # Params override the generation settings per call.
    short = loaded.predict(prompts, params={"max_new_tokens": 1})
    assert short == _reference_answers(student_dir, prompts, max_new_tokens=1)

    # A table without the needed columns is rejected with a message naming them.
    with pytest.raises(MlflowException, match="`question` and `options`"):
        loaded.predict(pd.DataFrame({"text": ["a"], "label": ["b"]}))

    # The same model over HTTP: `mlflow models serve` on 127.0.0.1 accepts both input forms.
    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/student",
               "--host", "127.0.0.1", "--port", str(port), "--env-manager", "local", "--workers", "1"]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_ping(f"{base}/ping", process, log_path)

        status, body = _post(f"{base}/invocations", {"inputs": prompts})
        assert status == 200, body
        assert body == {"predictions": answers}

        status, body = _post(f"{base}/invocations", {"dataframe_records": table.to_dict(orient="records")})
        assert status == 200, body
        assert [p["answer"] for p in body["predictions"]] == answers
        assert [p["letter"] for p in body["predictions"]] == result["letter"].tolist()

        status, body = _post(f"{base}/invocations", {"inputs": prompts, "params": {"max_new_tokens": 1}})
        assert status == 200, body
        assert body == {"predictions": short}

        status, body = _post(f"{base}/invocations", {"dataframe_records": [{"text": "a", "label": "b"}]})
        assert status == 400
        assert "`question` and `options`" in body.get("message", "")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def test_student_model_input_forms():
    import numpy as np

    from hdkd.pyfunc_model import _prompt_of, _records

    row = {"question": "What is 2 + 3?", "options": ["A)4", "B)5", "C)6", "D)7", "E)8"]}
    prompt = build_prompt(row["question"], row["options"])

    # Every accepted form reduces to prompt strings or rows.
    assert _records("Question: x") == ["Question: x"]
    assert _records(np.array(["p1", "p2"])) == ["p1", "p2"]
    assert _records(pd.Series(["p1"])) == ["p1"]
    assert _records(pd.DataFrame({"prompt": ["p1", "p2"]})) == ["p1", "p2"]
    assert _records(pd.DataFrame([row])) == [row]
    assert _records({"question": [row["question"]], "options": [row["options"]]}) == [row]
    assert _records(row) == [row]

    # A row becomes the training prompt with its option texts; numpy values from the scoring server work too.
    assert _prompt_of(row, 0) == (prompt, {"A": "4", "B": "5", "C": "6", "D": "7", "E": "8"})
    served = {"question": np.array(row["question"]), "options": np.array(row["options"])}
    assert _prompt_of(served, 0)[0] == prompt
    assert _prompt_of({"prompt": "p", "question": float("nan")}, 0) == ("p", None)

    with pytest.raises(MlflowException, match="row 3 has columns"):
        _prompt_of({"text": "a"}, 3)
    with pytest.raises(MlflowException, match="`options` must be a list of strings"):
        _prompt_of({"question": "q", "options": "A)1 B)2"}, 0)
    with pytest.raises(MlflowException, match="input item 1 has type int"):
        _prompt_of(5, 1)
    with pytest.raises(MlflowException, match="unsupported input type int"):
        _records(5)
