"""One tracked distillation run: MLflow run lifecycle, resume after a crash, artifacts, report and model."""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdkd import caching, tracking
from hdkd.config import Config, render_yaml
from hdkd.pipeline import STATE_FILE, Checked, Prepared, TrainResult, check_inputs, latest_checkpoint, prepare, \
    train_and_evaluate

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}; a checkpoint was written and the same command "
                         "resumes from it")


class RunStopped(Exception):
    """Raised by a training callback to stop the run on purpose (an Optuna pruner); the run ends KILLED."""


@dataclass
class RunOutcome:
    """The finished run and what it produced."""

    run_id: str
    result: TrainResult
    summary: dict[str, Any]


def _resume_key(cfg: Config) -> str:
    flat = {k: v for k, v in cfg.flat().items() if not k.startswith(("tracking.", "search.", "registry."))}
    return caching.fingerprint(flat)


def _resumable_run(output_dir: Path, key: str) -> str | None:
    """Return the id of an unfinished run of the same config that output_dir belongs to, to continue it.

    The run is continued even without a checkpoint (killed before the first save): it then trains from step 0
    but stays one run, instead of leaving a RUNNING run behind.
    """
    state_path = output_dir / STATE_FILE
    if not state_path.is_file():
        return None
    import json

    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != key or not state.get("run_id"):
        return None
    status = tracking.run_status(state["run_id"])
    if status in ("RUNNING", "KILLED", "FAILED"):
        return state["run_id"]
    return None


def _clear_checkpoints(output_dir: Path) -> None:
    for checkpoint in output_dir.glob("checkpoint-*"):
        if checkpoint.is_dir():
            shutil.rmtree(checkpoint)


def run_training(cfg: Config, *, checked: Checked | None = None, prepared: Prepared | None = None,
                 nested: bool = False, output_dir: Path | None = None, tags: dict[str, str] | None = None,
                 callbacks: list | None = None, log_model: bool | None = None,
                 parent_run_id: str | None = None, allow_resume: bool = True) -> RunOutcome:
    """Run one distillation and track it; the MLflow run ends FINISHED, FAILED (exception) or KILLED (signal)."""
    started = time.perf_counter()
    checked = checked or check_inputs(cfg)
    tracking.open_store()
    output_dir = Path(output_dir or cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    key = _resume_key(cfg)
    resume_run = _resumable_run(output_dir, key) if allow_resume and not nested else None
    if resume_run is None:
        _clear_checkpoints(output_dir)
    run = tracking.start_run(cfg.tracking.experiment_name, cfg.tracking.run_name, run_id=resume_run, nested=nested,
                             tags=tags, system_metrics=cfg.tracking.system_metrics)
    run_id = run.info.run_id
    logged_steps = tracking.last_logged_steps(run_id) if resume_run else {}
    if resume_run:
        logger.info("continuing MLflow run %s from %s (steps up to %d already logged)", run_id,
                    latest_checkpoint(output_dir) or "step 0", max(logged_steps.values(), default=0))
        tracking.mark_project_run_continued(resume_run)
    caching.write_json_atomic(output_dir / STATE_FILE, {"run_id": run_id, "fingerprint": key})

    try:
        tracking.log_config(cfg.flat())
        # A run given a Prepared (a study trial) reuses teacher work done before it, so it reports none.
        teacher_work_here = prepared is None
        prepared = prepared or prepare(checked)
        _log_lineage(cfg, checked, prepared)
        metrics_callback = tracking.MlflowMetricsCallback(run_id, logged_steps=logged_steps)
        result = train_and_evaluate(prepared, cfg, output_dir, resume=resume_run is not None,
                                    callbacks=[metrics_callback, *(callbacks or [])])
        if result.interrupted is not None:
            raise Interrupted(result.interrupted)
        summary = _finish(cfg, checked, prepared, result, run_id, output_dir, started, parent_run_id,
                          cfg.tracking.log_model if log_model is None else log_model, teacher_work_here)
    except Interrupted as err:
        tracking.end_run("KILLED", err)
        raise
    except RunStopped:
        tracking.end_run("KILLED")
        raise
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracking.end_run(status, err)
        raise
    tracking.end_run("FINISHED")
    return RunOutcome(run_id, result, summary)


def _log_lineage(cfg: Config, checked: Checked, prepared: Prepared) -> None:
    import mlflow

    tags = tracking.base_tags(cfg.teacher, cfg.student, prepared.random_weights)
    tags["hdkd.teacher_hidden"] = cfg.distill.teacher_hidden
    mlflow.set_tags(tags)
    if prepared.random_weights:
        logger.warning("this run uses random-weight stand-ins: its accuracy numbers mean nothing")
    for split, data, dataset in (("train", checked.train, prepared.train_set),
                                 ("validation", checked.validation, prepared.validation_set)):
        digest = caching.fingerprint({"ids": dataset["id"], "input_ids": dataset["input_ids"]})[:16]
        tracking.log_dataset(split, data.source, list(dataset["id"]), digest, cfg.data.portion)
    mlflow.log_params({
        "data.train_examples": len(checked.train.examples),
        "data.validation_examples": len(checked.validation.examples),
        "data.train_source": checked.train.source,
        "data.validation_source": checked.validation.source,
        "data.train_skipped_rows": checked.train.skipped_rows,
        "data.validation_skipped_rows": checked.validation.skipped_rows,
    } if "data.train_examples" not in mlflow.get_run(mlflow.active_run().info.run_id).data.params else {})


def _finish(cfg: Config, checked: Checked, prepared: Prepared, result: TrainResult, run_id: str, output_dir: Path,
            started: float, parent_run_id: str | None, log_model: bool, teacher_work_here: bool = True) -> dict[str, Any]:
    from hdkd.report import write_plots, write_report

    generations = prepared.generations if teacher_work_here else 0
    tracking.log_metrics({"teacher/seconds": prepared.teacher_seconds if teacher_work_here else 0.0,
                          "teacher/generations": generations,
                          "train/seconds": result.train_seconds}, step=result.steps)
    tracking.log_table(result.predictions, "predictions.json")
    summary = {
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "teacher": cfg.teacher,
        "student": cfg.student,
        "random_weights": prepared.random_weights,
        "label_source": cfg.distill.label_source,
        "hidden_weight": cfg.distill.hidden_weight,
        "projection": cfg.distill.projection,
        "teacher_hidden": cfg.distill.teacher_hidden,
        "learning_rate": cfg.training.learning_rate,
        "portion": cfg.data.portion,
        "seed": cfg.seed,
        "epochs": cfg.training.num_train_epochs,
        "steps": result.steps,
        "data": {
            split: {"source": data.source, "examples": len(data.examples), "valid_rows": data.valid_rows,
                    "skipped_rows": data.skipped_rows, "truncated": int(sum(dataset["truncated"]))}
            for split, data, dataset in (("train", checked.train, prepared.train_set),
                                         ("validation", checked.validation, prepared.validation_set))
        },
        "scores": result.scores,
        "final": result.final,
        "train_seconds": result.train_seconds,
        "teacher_seconds": prepared.teacher_seconds,
        # teacher_train, teacher_validation, training (the optimizer loop alone), evaluation, checkpoints,
        # save_student
        "phase_seconds": {**prepared.teacher_split_seconds, **result.phase_seconds},
        "teacher_generations": generations,
        "total_seconds": time.perf_counter() - started,
        "student_dir": str(result.student_dir),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        md_path, json_path = write_report(summary, folder)
        plots = write_plots(result.history, result.scores, folder / "plots", prepared.random_weights)
        # Masked like the params: search.storage may carry a database password.
        (folder / "config.yaml").write_text(tracking.mask_secrets(render_yaml(cfg)), encoding="utf-8")
        for path in (md_path, json_path, folder / "config.yaml"):
            tracking.log_artifact(path)
        for path in plots:
            tracking.log_artifact(path, "plots")
        for path in (md_path, json_path):
            shutil.copy(path, output_dir / path.name)
    tracking.log_artifact(result.student_dir.parent / "projection")
    if log_model:
        tracking.log_student_model(result.student_dir, [_example_prompt(checked)])
    return summary


def _example_prompt(checked: Checked) -> str:
    from hdkd.data import build_prompt

    example = checked.validation.examples[0]
    return build_prompt(example.question, example.options)
