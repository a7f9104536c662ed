"""Crash and signal handling of `python -m hdkd train`.

A run killed with SIGKILL continues from its last checkpoint in the same MLflow run and ends as an uninterrupted
run would. SIGTERM writes a checkpoint, ends the run KILLED and exits with 128 + 15. An exception or a
non-finite loss ends the run FAILED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from hdkd.cli import main
from hdkd.pipeline import latest_checkpoint
from tests.conftest import REPO, set_args

# Final metrics of a resumed run must match an uninterrupted run this closely. On a CPU the tiny models give
# bit-identical results; the margin covers a different summation order, not a different training.
TOLERANCE = 1e-5


@pytest.fixture()
def resume_config(tiny_config) -> dict:
    """24 rows in micro-batches of 4 for 2 epochs: 12 steps, a checkpoint every 4, evaluation after each epoch."""
    return {**tiny_config, "training.num_train_epochs": 2, "training.save_steps": 4,
            "training.save_total_limit": 2, "tracking.log_model": False}


def _start(values: dict, cwd: Path) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(cwd / f"train-{time.monotonic_ns()}.log", "w", encoding="utf-8")
    return subprocess.Popen([sys.executable, "-m", "hdkd", "train", *set_args(values)], cwd=cwd, env=environment,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_for_checkpoint(process: subprocess.Popen, output_dir: Path, step: int, timeout: float = 300) -> None:
    """Return once checkpoint-<step> is complete (latest_checkpoint accepts it) while the process still runs."""
    deadline = time.monotonic() + timeout
    while latest_checkpoint(output_dir) is None or int(latest_checkpoint(output_dir).name.split("-")[1]) < step:
        assert process.poll() is None, f"train exited with {process.returncode} before checkpoint-{step}"
        assert time.monotonic() < deadline, f"no checkpoint-{step} after {timeout} s"
        time.sleep(0.01)


def _only_run(experiment: str):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def _history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key)]


def _checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


def test_sigkill_then_same_command_resumes(mlflow_store, resume_config, tmp_path):
    # The same training without interruption, for the final values.
    reference = {**resume_config, "output_dir": tmp_path / "reference", "tracking.experiment_name": "reference"}
    assert main(["train", *set_args(reference)]) == 0
    expected = _only_run("reference")

    # Kill -9 after the second checkpoint, in the second epoch: no handler runs, the MLflow run is left RUNNING.
    output_dir = Path(resume_config["output_dir"])
    process = _start(resume_config, tmp_path)
    _wait_for_checkpoint(process, output_dir, 8)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed = _only_run("hdkd-test")
    assert killed.info.status == "RUNNING"
    logged_before = [step for step, _ in _history(killed.info.run_id, "train/loss")]
    assert logged_before[:8] == list(range(1, 9))

    # The same command again continues that run from checkpoint-8.
    process = _start(resume_config, tmp_path)
    assert process.wait(timeout=600) == 0
    run = _only_run("hdkd-test")
    assert run.info.run_id == killed.info.run_id
    assert run.info.status == "FINISHED"
    assert "hdkd.error" not in run.data.tags

    # Every step logged once, in order, with the values of the uninterrupted run.
    for key in ("train/loss", "train/ce_loss", "train/hidden_mse", "train/learning_rate"):
        resumed = _history(run.info.run_id, key)
        reference_history = _history(expected.info.run_id, key)
        assert [step for step, _ in resumed] == list(range(1, 13)), key
        for (step, value), (_, reference_value) in zip(resumed, reference_history):
            assert value == pytest.approx(reference_value, abs=TOLERANCE), (key, step)
    assert [step for step, _ in _history(run.info.run_id, "eval/student_accuracy")] == [6, 12]
    for key in ("eval/loss", "eval/student_accuracy", "eval/teacher_accuracy", "eval/agreement", "train/loss"):
        assert run.data.metrics[key] == pytest.approx(expected.data.metrics[key], abs=TOLERANCE), key

    # save_total_limit=2 keeps the last two checkpoints.
    assert _checkpoint_steps(output_dir) == [8, 12]
    state = json.loads((output_dir / "run_state.json").read_text(encoding="utf-8"))
    assert state["run_id"] == run.info.run_id


def test_sigterm_checkpoints_and_ends_killed(mlflow_store, resume_config, tmp_path):
    output_dir = Path(resume_config["output_dir"])
    process = _start(resume_config, tmp_path)
    _wait_for_checkpoint(process, output_dir, 4)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM

    run = _only_run("hdkd-test")
    assert run.info.status == "KILLED"
    assert run.data.tags["hdkd.error"].startswith("Interrupted: stopped by SIGTERM")
    # The checkpoint is of the step training stopped at, the last one logged.
    last_step = _history(run.info.run_id, "train/loss")[-1][0]
    assert latest_checkpoint(output_dir).name == f"checkpoint-{last_step}"
    assert 4 <= last_step < 12

    # Started again, the KILLED run continues and finishes, its error tag gone.
    assert main(["train", *set_args(resume_config)]) == 0
    resumed = _only_run("hdkd-test")
    assert resumed.info.run_id == run.info.run_id
    assert resumed.info.status == "FINISHED"
    assert "hdkd.error" not in resumed.data.tags
    assert [step for step, _ in _history(run.info.run_id, "train/loss")] == list(range(1, 13))
    # Stopping mid-epoch adds no evaluation: the run evaluates after each epoch only.
    assert [step for step, _ in _history(run.info.run_id, "eval/loss")] == [6, 12]


def test_resumable_run_needs_same_config_unfinished(mlflow_store, tiny_config, tmp_path):
    from hdkd import tracking
    from hdkd.config import load_config
    from hdkd.runner import _resumable_run, _resume_key

    tracking.open_store()
    client = MlflowClient()
    run = client.create_run(client.create_experiment("hdkd-test"))
    key = _resume_key(load_config(None, tiny_config))
    other_key = _resume_key(load_config(None, {**tiny_config, "distill.hidden_weight": 0.25}))
    tracking_only = _resume_key(load_config(None, {**tiny_config, "tracking.run_name": "renamed"}))
    output_dir = tmp_path / "outputs"
    output_dir.mkdir()
    assert _resumable_run(output_dir, key) is None

    (output_dir / "run_state.json").write_text(json.dumps({"run_id": run.info.run_id, "fingerprint": key}))
    assert _resumable_run(output_dir, key) == run.info.run_id
    assert _resumable_run(output_dir, tracking_only) == run.info.run_id
    assert _resumable_run(output_dir, other_key) is None
    for status in ("KILLED", "FAILED"):
        client.set_terminated(run.info.run_id, status)
        assert _resumable_run(output_dir, key) == run.info.run_id
    client.set_terminated(run.info.run_id, "FINISHED")
    assert _resumable_run(output_dir, key) is None

    (output_dir / "run_state.json").write_text("{not json")
    assert _resumable_run(output_dir, key) is None


def test_checkpoint_cut_short_passed_over(tmp_path):
    for step, state in ((4, '{"global_step": 4}'), (8, '{"global_st'), (12, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_non_finite_loss_fails_run(mlflow_store, tiny_config, capsys):
    # A learning rate of 1e30 sends the weights to infinity after the first update.
    values = {**tiny_config, "training.learning_rate": 1e30, "training.max_grad_norm": 0,
              "tracking.log_model": False}
    assert main(["train", *set_args(values)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # Progress output comes first; the error is the last line.
    last_line = err.splitlines()[-1]
    assert last_line.startswith("hdkd: error: non-finite loss at step 2: ")
    assert "lower training.learning_rate" in last_line

    run = _only_run("hdkd-test")
    assert run.info.status == "FAILED"
    assert run.data.tags["hdkd.error"].startswith("NonFiniteLossError: non-finite loss at step 2: ")
    # Step 1 trained normally and was logged; nothing was logged for the failed step.
    assert [step for step, _ in _history(run.info.run_id, "train/loss")] == [1]


def test_exception_fails_run_with_tag(mlflow_store, tiny_config, monkeypatch):
    from hdkd import runner

    def broken_prepare(checked):
        raise RuntimeError("teacher cache folder is read-only")

    monkeypatch.setattr(runner, "prepare", broken_prepare)
    with pytest.raises(RuntimeError, match="teacher cache folder is read-only"):
        main(["train", *set_args(tiny_config)])
    run = _only_run("hdkd-test")
    assert run.info.status == "FAILED"
    assert run.data.tags["hdkd.error"] == "RuntimeError: teacher cache folder is read-only"


def test_empty_project_run_names_continued(mlflow_store, tiny_config, monkeypatch):
    from hdkd import runner

    real_prepare = runner.prepare

    def broken_prepare(checked):
        raise RuntimeError("teacher cache folder is read-only")

    values = {**tiny_config, "training.num_train_epochs": 1}
    monkeypatch.setattr(runner, "prepare", broken_prepare)
    with pytest.raises(RuntimeError):
        main(["train", *set_args(values)])
    failed = _only_run("hdkd-test")
    monkeypatch.setattr(runner, "prepare", real_prepare)

    # `mlflow run` creates a new run and passes its id, but hdkd continues the FAILED run of the same config.
    client = MlflowClient()
    project_run = client.create_run(client.create_experiment("projects"))
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    assert main(["train", *set_args(values)]) == 0

    continued = _only_run("hdkd-test")
    assert continued.info.run_id == failed.info.run_id
    assert continued.info.status == "FINISHED"
    left_empty = client.get_run(project_run.info.run_id)
    assert left_empty.data.tags["hdkd.continued_in"] == failed.info.run_id
    assert failed.info.run_id in left_empty.data.tags["mlflow.note.content"]
    assert left_empty.data.metrics == {}


def test_sigterm_before_training_ends_killed(mlflow_store, tiny_config, monkeypatch, capsys):
    from hdkd import runner

    def prepare_then_terminated(checked):
        # SIGTERM arrives during the teacher's work, before the training loop installs its own handler.
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(runner, "prepare", prepare_then_terminated)
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["train", *set_args(tiny_config)]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == "hdkd: interrupted by SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    run = _only_run("hdkd-test")
    assert run.info.status == "KILLED"
    assert run.data.tags["hdkd.error"] == "Terminated: stopped by SIGTERM"


def test_crash_after_epoch_end_checkpoint_keeps_evaluation(mlflow_store, tiny_config):
    from transformers import TrainerCallback

    from hdkd.config import load_config
    from hdkd.runner import run_training

    class CrashAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 6:
                raise RuntimeError("simulated crash after checkpoint-6")

    # 6 steps per epoch and a checkpoint every 6: checkpoint-6 falls on the first epoch's end.
    cfg = load_config(None, {**tiny_config, "training.save_steps": 6, "tracking.log_model": False})
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, callbacks=[CrashAfterSave()])
    crashed = _only_run("hdkd-test")
    assert crashed.info.status == "FAILED"
    # The checkpoint was written after the epoch's evaluation, so the evaluation is in the run.
    assert [step for step, _ in _history(crashed.info.run_id, "eval/student_accuracy")] == [6]

    outcome = run_training(cfg)
    assert outcome.run_id == crashed.info.run_id
    run = _only_run("hdkd-test")
    assert run.info.status == "FINISHED"
    assert [step for step, _ in _history(run.info.run_id, "eval/student_accuracy")] == [6, 12]
    assert [step for step, _ in _history(run.info.run_id, "train/loss")] == list(range(1, 13))
