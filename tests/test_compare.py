"""`python -m hdkd compare`: run selection, sorting, the random-weights note, exit codes and the PNG."""

from __future__ import annotations

import mlflow
import pytest
from matplotlib.image import imread

from hdkd.cli import main
from hdkd.compare import format_table, summarise_runs, write_comparison_plot


def _log_run(name: str, hidden_weight: float, learning_rate: float, student: float | None, teacher: float = 0.6,
             random_weights: bool = False, tags: dict | None = None) -> str:
    """Log a run with the params, metrics and tags a distillation run writes."""
    with mlflow.start_run(run_name=name, tags={"hdkd.random_weights": str(random_weights).lower(), **(tags or {})}) \
            as run:
        mlflow.log_params({"distill.hidden_weight": hidden_weight, "training.learning_rate": learning_rate})
        if student is not None:
            mlflow.log_metrics({"eval/student_accuracy": student, "eval/teacher_accuracy": teacher,
                                "eval/agreement": student / 2, "train/seconds": 12.5})
    return run.info.run_id


@pytest.fixture()
def runs_store(mlflow_store):
    mlflow.set_experiment("hdkd")
    _log_run("low", 0.1, 1e-4, 0.30)
    _log_run("best", 0.5, 3e-4, 0.45)
    _log_run("crashed", 0.9, 1e-3, None)
    mlflow.set_experiment("studies")
    _log_run("parent", 0.0, 1e-4, 0.99, tags={"hdkd.role": "study", "hdkd.study": "s1"})
    _log_run("trial-0", 0.2, 1e-4, 0.25, random_weights=True, tags={"hdkd.study": "s1"})
    _log_run("trial-1", 0.7, 5e-4, 0.35, random_weights=True, tags={"hdkd.study": "s1"})
    _log_run("other-study", 0.4, 1e-4, 0.50, tags={"hdkd.study": "s2"})
    return mlflow_store


def test_compare_table_sorted_by_student(runs_store, capsys, tmp_path):
    output = tmp_path / "out" / "comparison.png"
    assert main(["compare", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()

    assert lines[0] == "2 runs in experiment 'hdkd', best student first:"
    assert lines[1].split() == ["run", "hidden_weight", "learning_rate", "teacher_acc", "student_acc", "agreement",
                                "train_time", "status"]
    assert lines[3].split() == ["best", "0.500", "3.00e-04", "0.600", "0.450", "0.225", "12.5", "s", "FINISHED"]
    assert lines[4].split() == ["low", "0.100", "1.00e-04", "0.600", "0.300", "0.150", "12.5", "s", "FINISHED"]
    assert "1 run without eval/student_accuracy" in out
    assert "random-weight" not in out
    assert f"plot written to {output}" in out

    image = imread(output)
    assert image.shape[0] > 300
    assert image.shape[1] > 900


def test_compare_study_marks_random_weights(runs_store, capsys, tmp_path):
    output = tmp_path / "study.png"
    assert main(["compare", "--experiment", "studies", "--study", "s1", "--output", str(output)]) == 0
    out = capsys.readouterr().out

    assert "2 runs in study 's1' in experiment 'studies'" in out
    names = [line.split()[0] for line in out.splitlines()[3:5]]
    assert names == ["trial-1", "trial-0"]
    assert "trial-1 *" in out
    # The study's parent run is not a row: the two trials are followed by the note about left-out runs.
    assert out.splitlines()[5] == "1 run without eval/student_accuracy (study parents, failed, killed or running) " \
        "not listed"
    assert "other-study" not in out
    assert "* 2 of 2 runs used random-weight stand-ins" in out
    assert output.is_file()


def test_compare_empty_and_unknown_experiment(runs_store, capsys, tmp_path):
    mlflow.set_experiment("empty")
    output = tmp_path / "none.png"
    assert main(["compare", "--experiment", "empty", "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == "no runs found in experiment 'empty'"
    assert not output.exists()

    assert main(["compare", "--experiment", "studies", "--study", "missing", "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == "no runs found in study 'missing' in experiment 'studies'"

    assert main(["compare", "--experiment", "nope", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1
    assert error_lines[0].startswith("hdkd: error: experiment 'nope' not found in sqlite:///")
    assert "empty, hdkd, studies" in error_lines[0]


def test_summarise_runs_and_plot_from_search_frame(runs_store, tmp_path):
    frame = mlflow.search_runs(experiment_names=["studies"])
    summary = summarise_runs(frame)
    assert summary["run_name"].tolist() == ["other-study", "trial-1", "trial-0"]
    assert summary["random_weights"].tolist() == [False, True, True]
    assert summary["student_accuracy"].tolist() == [0.50, 0.35, 0.25]

    table = format_table(summary).splitlines()
    assert table[2].startswith("other-study ")
    assert table[3].startswith("trial-1 *")

    # The raw search_runs frame is accepted as is, which is how a study logs the plot to its parent run.
    path = write_comparison_plot(frame, tmp_path / "raw.png")
    assert imread(path).shape[2] in (3, 4)
    with pytest.raises(ValueError, match="no run with eval/student_accuracy"):
        write_comparison_plot(frame.iloc[0:0], tmp_path / "empty.png")


def test_compare_after_tiny_training_run(mlflow_store, tiny_config, capsys, tmp_path):
    values = {**tiny_config, "training.num_train_epochs": 1, "tracking.log_model": False,
              "tracking.experiment_name": "hdkd", "tracking.run_name": "tiny"}
    args = ["train"]
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    run = mlflow.search_runs(experiment_names=["hdkd"], output_format="list")[0]
    capsys.readouterr()

    assert main(["compare", "--output", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    row = out.splitlines()[3].split()
    metrics = run.data.metrics
    assert row[:2] == ["tiny", "*"]
    assert row[2] == "0.500"
    assert row[3] == "3.00e-04"
    assert row[4] == f"{metrics['eval/teacher_accuracy']:.3f}"
    assert row[5] == f"{metrics['eval/student_accuracy']:.3f}"
    assert row[6] == f"{metrics['eval/agreement']:.3f}"
    assert row[7] == f"{metrics['train/seconds']:.1f}"
    assert "* 1 of 1 run used random-weight stand-ins" in out


def test_compare_default_experiment_only(mlflow_store, capsys, tmp_path):
    # `mlflow run` without --experiment-name logs to "Default"; no experiment is named "hdkd" here.
    mlflow.set_experiment("Default")
    _log_run("from-mlflow-run", 0.5, 3e-4, 0.40)
    output = tmp_path / "comparison.png"
    assert main(["compare", "--output", str(output)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "1 run in experiment 'Default', best student first:"
    assert "experiment" not in lines[1].split()
    assert lines[3].split()[0] == "from-mlflow-run"
    assert output.is_file()


def test_compare_covers_hdkd_and_default(mlflow_store, capsys, tmp_path):
    mlflow.set_experiment("Default")
    _log_run("from-mlflow-run", 0.5, 3e-4, 0.40)
    mlflow.set_experiment("hdkd")
    _log_run("from-hdkd-train", 0.3, 1e-4, 0.55)
    assert main(["compare", "--output", str(tmp_path / "both.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 runs in experiments 'hdkd' and 'Default', best student first:"
    assert lines[1].split()[-1] == "experiment"
    assert lines[3].split()[0] == "from-hdkd-train"
    assert lines[3].split()[-1] == "hdkd"
    assert lines[4].split()[0] == "from-mlflow-run"
    assert lines[4].split()[-1] == "Default"

    # A run that `mlflow run` left empty because hdkd continued an earlier run is counted on its own line.
    _log_run("left-empty", 0.5, 3e-4, None, tags={"hdkd.continued_in": "0123abcd"})
    assert main(["compare", "--output", str(tmp_path / "both.png")]) == 0
    out = capsys.readouterr().out
    assert "1 run left empty by `mlflow run` because hdkd continued an earlier run (tag hdkd.continued_in) not " \
        "listed" in out
    assert "without eval/student_accuracy" not in out

    # A study searched in both experiments is reported as searched in both.
    assert main(["compare", "--study", "nosuch", "--output", str(tmp_path / "none.png")]) == 0
    assert capsys.readouterr().out.strip() == "no runs found in study 'nosuch' in experiments 'hdkd' and 'Default'"

    # An explicit --experiment keeps to that one experiment.
    assert main(["compare", "--experiment", "Default", "--output", str(tmp_path / "one.png")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "1 run in experiment 'Default', best student first:"


def test_compare_names_experiment_of_study(runs_store, capsys, tmp_path):
    output = tmp_path / "study.png"
    assert main(["compare", "--study", "s1", "--output", str(output)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["no runs found in study 's1' in experiment 'hdkd'",
                     "study 's1' has runs in experiment 'studies'; pass --experiment studies"]
    assert not output.exists()
