"""Lineage of a run: logged datasets, hdkd tags, the parent study run in report.md, and system metrics."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from hdkd import __version__
from hdkd.config import load_config
from hdkd.runner import run_training


def test_run_lineage_and_system_metrics(mlflow_store, tiny_config, aqua_files, tiny_models, monkeypatch):
    # Sample every second and log each sample, so a run of a few seconds gets system metrics.
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    cfg = load_config(None, {**tiny_config, "training.num_train_epochs": 1, "tracking.log_model": False,
                             "tracking.system_metrics": True, "data.portion": 0.5})

    mlflow.set_experiment("hdkd-test")
    with mlflow.start_run(run_name="study", tags={"hdkd.role": "study"}) as parent:
        outcome = run_training(cfg, nested=True, parent_run_id=parent.info.run_id)
    run = MlflowClient().get_run(outcome.run_id)

    # Datasets: one input per split, with its source file, split, portion and a content digest.
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["aqua_rat-train", "aqua_rat-validation"]
    for split, path in (("train", aqua_files["train"]), ("validation", aqua_files["validation"])):
        dataset_input = inputs[f"aqua_rat-{split}"]
        tags = {tag.key: tag.value for tag in dataset_input.tags}
        assert tags["split"] == split
        assert tags["portion"] == "0.5"
        assert tags["mlflow.data.context"] == split
        assert str(path) in dataset_input.dataset.source
        assert re.fullmatch(r"[0-9a-f]{16}", dataset_input.dataset.digest)
    assert inputs["aqua_rat-train"].dataset.digest != inputs["aqua_rat-validation"].dataset.digest

    # Tags: models, version, commit, and the parent study run.
    tags = run.data.tags
    assert tags["hdkd.teacher"] == str(tiny_models["teacher"])
    assert tags["hdkd.student"] == str(tiny_models["student"])
    assert tags["hdkd.version"] == __version__
    assert re.fullmatch(r"[0-9a-f]{40}", tags["hdkd.git_commit"])
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    report = Path(MlflowClient().download_artifacts(outcome.run_id, "report.md")).read_text(encoding="utf-8")
    assert parent.info.run_id in report

    # System metrics, sampled by MLflow with psutil while the run was active.
    metrics = run.data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100
    assert metrics["system/system_memory_usage_megabytes"] > 0

