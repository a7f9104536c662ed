"""``python -m hdkd compare``: a table of tracked runs sorted by student accuracy, and ``comparison.png``.

The plot function, ``write_comparison_plot``, takes the DataFrame that ``mlflow.search_runs`` returns, so a study
can log the same figure to its parent run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from hdkd import tracking

DEFAULT_EXPERIMENT = "hdkd"
MLFLOW_DEFAULT_EXPERIMENT = "Default"
EXIT_BAD_INPUT = 2
CHANCE_ACCURACY = 0.2  # five options per AQuA-RAT question

# Columns of the summary frame, taken from mlflow.search_runs output.
SOURCE_COLUMNS = {
    "run_id": "run_id",
    "run_name": "tags.mlflow.runName",
    "status": "status",
    "hidden_weight": "params.distill.hidden_weight",
    "learning_rate": "params.training.learning_rate",
    "teacher_accuracy": "metrics.eval/teacher_accuracy",
    "student_accuracy": "metrics.eval/student_accuracy",
    "agreement": "metrics.eval/agreement",
    "train_seconds": "metrics.train/seconds",
    "random_weights": "tags.hdkd.random_weights",
    "study": "tags.hdkd.study",
    "role": "tags.hdkd.role",
    "experiment": "experiment",  # Set by run_compare, which may search more than one experiment.
}
NUMERIC_COLUMNS = ("hidden_weight", "learning_rate", "teacher_accuracy", "student_accuracy", "agreement",
                   "train_seconds")
STUDY_ROLE = "study"


def summarise_runs(runs_frame: pd.DataFrame) -> pd.DataFrame:
    """Reduce an ``mlflow.search_runs`` DataFrame to one row per distillation run, best student first.

    Study parent runs (tag ``hdkd.role`` = ``study``) and runs without ``eval/student_accuracy`` (failed, killed
    or still running) are left out. Missing columns become NaN, so a store from an older hdkd still works.
    """
    columns = [name for name in SOURCE_COLUMNS if name != "role"]
    if runs_frame.empty:
        return pd.DataFrame(columns=columns)
    summary = pd.DataFrame(index=runs_frame.index)
    for name, source in SOURCE_COLUMNS.items():
        summary[name] = runs_frame[source] if source in runs_frame.columns else None
    for name in NUMERIC_COLUMNS:
        summary[name] = pd.to_numeric(summary[name], errors="coerce")
    summary["random_weights"] = summary["random_weights"].astype(str).str.lower() == "true"
    summary["run_name"] = summary["run_name"].fillna(summary["run_id"].astype(str).str[:8])

    summary = summary[(summary["role"] != STUDY_ROLE) & summary["student_accuracy"].notna()]
    summary = summary.sort_values(["student_accuracy", "teacher_accuracy"], ascending=False, kind="stable")
    return summary[columns].reset_index(drop=True)


# --- Table ----------------------------------------------------------------------------------------------


def _number(value: float, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(summary: pd.DataFrame, show_experiment: bool = False) -> str:
    """Render the summary as a fixed-width text table, with ``*`` after each run that used random weights."""
    headers = ["run", "hidden_weight", "learning_rate", "teacher_acc", "student_acc", "agreement", "train_time",
               "status"]
    if show_experiment:
        headers.append("experiment")
    rows = []
    for run in summary.itertuples(index=False):
        row = [
            f"{run.run_name}{' *' if run.random_weights else ''}",
            _number(run.hidden_weight, ".3f"),
            _number(run.learning_rate, ".2e"),
            _number(run.teacher_accuracy, ".3f"),
            _number(run.student_accuracy, ".3f"),
            _number(run.agreement, ".3f"),
            _number(run.train_seconds, ".1f") + (" s" if not math.isnan(run.train_seconds) else ""),
            str(run.status),
        ]
        if show_experiment:
            row.append(str(run.experiment))
        rows.append(row)
    widths = [max(len(headers[i]), *(len(row[i]) for row in rows)) for i in range(len(headers))]
    lines = []
    for cells in [headers, ["-" * width for width in widths], *rows]:
        # The run name is left-aligned and the numbers right-aligned, so decimal points line up.
        parts = [cells[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# --- Plot -----------------------------------------------------------------------------------------------


def write_comparison_plot(runs_frame: pd.DataFrame, path: str | Path) -> Path:
    """Plot teacher vs student accuracy per run and accuracy vs hidden_weight, and save the figure as a PNG.

    ``runs_frame`` is the DataFrame ``mlflow.search_runs`` returns (a summary from ``summarise_runs`` also
    works). Raises ValueError when no run in it has ``eval/student_accuracy``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = runs_frame if "student_accuracy" in runs_frame.columns else summarise_runs(runs_frame)
    if summary.empty:
        raise ValueError("no run with eval/student_accuracy to plot")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    count = len(summary)
    # NOTE: past about 40 runs the per-run labels crowd, because the width stops growing at 20 inches.
    width = min(20.0, max(11.0, 5.5 + 0.35 * count))
    fig, (per_run, by_weight) = plt.subplots(1, 2, figsize=(width, 4.8), gridspec_kw={"width_ratios": [2, 1]})

    # Per run: teacher and student bars side by side, best student on the left.
    positions = list(range(count))
    bar = 0.4
    teacher_bars = per_run.bar([p - bar / 2 for p in positions], summary["teacher_accuracy"].fillna(0), bar,
                               label="teacher", color="#4c72b0")
    student_bars = per_run.bar([p + bar / 2 for p in positions], summary["student_accuracy"], bar, label="student",
                               color="#dd8452")
    if count <= 20:
        # Value labels keep a zero-height bar readable.
        for bars in (teacher_bars, student_bars):
            per_run.bar_label(bars, labels=[f"{bar_.get_height():.0%}" for bar_ in bars], fontsize=7, padding=2)
    labels = [f"{name}{' *' if random else ''}" for name, random in zip(summary["run_name"], summary["random_weights"])]
    per_run.set_xticks(positions, labels, rotation=35 if count > 3 else 0, ha="right" if count > 3 else "center",
                       fontsize=8)
    per_run.set_ylabel("validation accuracy")
    per_run.set_title("Teacher vs student accuracy per run")

    # Accuracy against the loss weighting. The teacher does not depend on hidden_weight, so its points form a line.
    by_weight.scatter(summary["hidden_weight"], summary["teacher_accuracy"], label="teacher", color="#4c72b0",
                      marker="s", s=50, clip_on=False, zorder=3)
    by_weight.scatter(summary["hidden_weight"], summary["student_accuracy"], label="student", color="#dd8452",
                      s=25, clip_on=False, zorder=4)
    by_weight.set_xlim(-0.05, 1.05)
    by_weight.set_xlabel("hidden_weight (weight of the hidden-state MSE)")
    by_weight.set_title("Accuracy vs hidden_weight")

    for axes in (per_run, by_weight):
        axes.set_ylim(0, 1.05)
        axes.axhline(CHANCE_ACCURACY, linestyle=":", color="black", linewidth=1, label="chance (5 options)")
        axes.legend(fontsize=8, loc="upper left")
    if summary["random_weights"].any():
        fig.suptitle("* random-weight stand-ins: these accuracies mean nothing", color="#b00020", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- Command --------------------------------------------------------------------------------------------


def _study_filter(study: str) -> str:
    escaped = study.replace("'", "\\'")
    return f"tags.`hdkd.study` = '{escaped}'"


def _count(number: int, noun: str = "run") -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _scope(experiments: list[str], study: str | None) -> str:
    names = " and ".join(repr(name) for name in experiments)
    where = f"experiment {names}" if len(experiments) == 1 else f"experiments {names}"
    return f"study {study!r} in {where}" if study else where


def run_compare(experiment: str | None, study: str | None, output: str | Path) -> int:
    """Print the run table for an experiment (optionally one study) and write the comparison PNG.

    Without ``experiment`` the table covers both ``hdkd``, where ``python -m hdkd`` logs, and MLflow's
    ``Default``, where ``mlflow run`` logs unless given ``--experiment-name``. Returns 0, also when there is
    nothing to compare, and 2 for an experiment name the store does not contain.
    """
    tracking.open_store()
    known = tracking.experiment_names()
    if experiment is None:
        experiments = [name for name in (DEFAULT_EXPERIMENT, MLFLOW_DEFAULT_EXPERIMENT) if name in known]
        experiments = experiments or [DEFAULT_EXPERIMENT]
    else:
        experiments = [experiment]

    frames = {}
    for name in experiments:
        runs = tracking.search_runs(name, _study_filter(study) if study else "")
        if runs is None:
            print(f"hdkd: error: experiment {name!r} not found in {tracking.mask_secrets(tracking.tracking_uri())}"
                  f" (experiments: {', '.join(known) or 'none'}); pass --experiment NAME", file=sys.stderr)
            return EXIT_BAD_INPUT
        frames[name] = runs.assign(experiment=name)
    if len(frames) > 1 and not tracking.has_runs(MLFLOW_DEFAULT_EXPERIMENT):
        del frames[MLFLOW_DEFAULT_EXPERIMENT]  # MLflow creates "Default" in every store, so an empty one is left out.
    experiments = list(frames)
    runs = pd.concat(frames.values(), ignore_index=True)

    scope = _scope(experiments, study)
    summary = summarise_runs(runs)
    if summary.empty:
        print(f"no runs found in {scope}" + (f" ({len(runs)} without eval/student_accuracy)" if len(runs) else ""))
        if study:
            found = tracking.experiments_with_runs(_study_filter(study))
            elsewhere = [name for name in found if name not in experiments]
            if elsewhere:
                print(f"study {study!r} has runs in experiment {' and '.join(map(repr, elsewhere))}; pass "
                      f"--experiment {elsewhere[0]}")
        return 0

    print(f"{_count(len(summary))} in {scope}, best student first:")
    print(format_table(summary, show_experiment=len(experiments) > 1))
    continued = int(runs["tags.hdkd.continued_in"].notna().sum()) if "tags.hdkd.continued_in" in runs else 0
    left_out = len(runs) - len(summary) - continued
    if left_out:
        print(f"{_count(left_out)} without eval/student_accuracy (study parents, failed, killed or running) not "
              "listed")
    if continued:
        print(f"{_count(continued)} left empty by `mlflow run` because hdkd continued an earlier run (tag "
              "hdkd.continued_in) not listed")
    random_runs = int(summary["random_weights"].sum())
    if random_runs:
        print(f"* {random_runs} of {_count(len(summary))} used random-weight stand-ins (tag hdkd.random_weights): "
              "their accuracies mean nothing")
    path = write_comparison_plot(summary, output)
    print(f"plot written to {path}")
    return 0
