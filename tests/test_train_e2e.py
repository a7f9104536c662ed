"""End-to-end `train` runs: tiny random models on generated rows, and the real AQuA files and tokenizer."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from hdkd.cli import main
from tests.conftest import set_args, shared_data_or_skip


def _only_run(experiment: str):
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    assert len(runs) == 1
    return runs[0]


def test_train_tiny_run_contents(mlflow_store, tiny_config, tmp_path):
    assert main(["train", *set_args(tiny_config)]) == 0

    run = _only_run("hdkd-test")
    client = MlflowClient()
    assert run.info.status == "FINISHED"

    # 24 rows, batch 4, 2 epochs: 12 optimizer steps, each logged once.
    for key in ("train/ce_loss", "train/hidden_mse", "train/loss", "train/learning_rate"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, 13)), key
    for key in ("eval/student_accuracy", "eval/teacher_accuracy", "eval/agreement", "eval/student_unparsed",
                "eval/teacher_unparsed", "eval/loss"):
        assert key in run.data.metrics, key
        assert 0 <= run.data.metrics[key] or key == "eval/loss"
    assert run.data.metrics["teacher/generations"] == 24 + 16

    # train/loss is the weighted mix of its two parts at every step.
    ce = client.get_metric_history(run.info.run_id, "train/ce_loss")
    mse = client.get_metric_history(run.info.run_id, "train/hidden_mse")
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    for c, m, total in zip(ce, mse, loss):
        assert total.value == pytest.approx(0.5 * c.value + 0.5 * m.value, rel=1e-4)

    # Params use dotted config keys; the data actually used is named.
    params = run.data.params
    assert params["training.learning_rate"] == "0.0003"
    assert params["distill.hidden_weight"] == "0.5"
    assert params["data.train_examples"] == "24"
    assert params["data.validation_examples"] == "16"
    assert params["data.train_source"] == tiny_config["data.train_file"]
    assert run.data.tags["hdkd.random_weights"] == "true"

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.json", "predictions.json", "config.yaml", "plots", "projection"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/losses.png", "plots/accuracy.png"}

    report = json.loads(open(client.download_artifacts(run.info.run_id, "report.json")).read())
    assert report["data"]["train"]["examples"] == 24
    assert report["scores"]["student_accuracy"] == pytest.approx(run.data.metrics["eval/student_accuracy"])
    assert report["random_weights"] is True
    markdown = open(client.download_artifacts(run.info.run_id, "report.md")).read()
    assert "RANDOM" in markdown

    table = json.loads(open(client.download_artifacts(run.info.run_id, "predictions.json")).read())
    assert table["columns"] == ["id", "gold", "teacher_answer", "teacher_letter", "student_answer",
                                "student_letter"]
    assert len(table["data"]) == 16

    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert [m.name for m in models] == ["student"]
    assert models[0].source_run_id == run.info.run_id
    loaded = mlflow.pyfunc.load_model(models[0].model_uri)
    answers = loaded.predict(["Question: How many pens?\nOptions:\nA)1\nB)2\nC)3\nD)4\nE)5"])
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_train_gold_labels_and_accumulation(mlflow_store, tiny_config):
    values = {**tiny_config, "distill.label_source": "gold", "training.gradient_accumulation_steps": 2,
              "training.num_train_epochs": 1, "tracking.log_model": False}
    assert main(["train", *set_args(values)]) == 0
    run = _only_run("hdkd-test")
    history = MlflowClient().get_metric_history(run.info.run_id, "train/ce_loss")
    # 24 rows, micro-batch 4, 2 micro-batches per step: 3 steps.
    assert [m.step for m in history] == [1, 2, 3]
    # Gold labels: the teacher generates only for validation answers.
    assert run.data.metrics["teacher/generations"] == 16


@pytest.mark.slow
def test_train_real_aqua_files(mlflow_store, tiny_models, tmp_path):
    """The real AQuA-RAT files and Flan-T5 tokenizer, with tiny models that share that tokenizer."""
    shared = shared_data_or_skip()
    from transformers import AutoTokenizer

    from tests.conftest import build_tiny_t5

    tokenizer = AutoTokenizer.from_pretrained(shared / "flan-t5" / "tokenizer")
    teacher = build_tiny_t5(tmp_path / "teacher", tokenizer, 16, 2, 0)
    student = build_tiny_t5(tmp_path / "student", tokenizer, 8, 2, 1)
    values = {
        "teacher": teacher, "student": student,
        "data.train_file": shared / "aqua_rat" / "test.json",
        "data.validation_file": shared / "aqua_rat" / "dev.json",
        "data.portion": 0.05, "generation.max_new_tokens": 4, "training.num_train_epochs": 1,
        "training.logging_steps": 1, "training.bf16": False, "tracking.experiment_name": "hdkd-test",
        "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache", "tracking.log_model": False,
    }
    assert main(["train", *set_args(values)]) == 0
    run = _only_run("hdkd-test")
    # 254 rows: round(0.05 * 254) = 13 for training; validation takes its minimum of 32.
    assert run.data.params["data.train_examples"] == "13"
    assert run.data.params["data.validation_examples"] == "32"
    assert run.data.params["data.train_source"].endswith("test.json")
    assert run.data.params["data.validation_source"].endswith("dev.json")
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train/hidden_mse")) == 2


def test_accumulation_matches_large_batch(mlflow_store, tiny_config):
    """4 x 2 accumulated micro-batches log the same step-1 losses as one batch of 8 (token means per step)."""
    common = {**tiny_config, "training.num_train_epochs": 1, "training.group_by_length": False,
              "tracking.log_model": False, "training.max_grad_norm": 0.0}
    assert main(["train", *set_args({**common, "training.per_device_train_batch_size": 8,
                                       "tracking.run_name": "large"})]) == 0
    assert main(["train", *set_args({**common, "training.per_device_train_batch_size": 4,
                                       "training.gradient_accumulation_steps": 2,
                                       "output_dir": common["output_dir"] + "-accumulated",
                                       "tracking.run_name": "accumulated"})]) == 0
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["hdkd-test"], output_format="list")}
    client = MlflowClient()
    for key in ("train/ce_loss", "train/hidden_mse", "train/loss"):
        large = client.get_metric_history(runs["large"].info.run_id, key)
        accumulated = client.get_metric_history(runs["accumulated"].info.run_id, key)
        assert [m.step for m in large] == [m.step for m in accumulated] == [1, 2, 3]
        assert accumulated[0].value == pytest.approx(large[0].value, rel=1e-4), key
