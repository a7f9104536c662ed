"""The run report (``report.md``, ``report.json``) and its plots (``plots/losses.png``, ``plots/accuracy.png``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hdkd.models import RANDOM_WEIGHTS_WARNING


def write_plots(history: list[dict[str, Any]], scores: dict[str, float], out_dir: Path, random_weights: bool) -> list[Path]:
    """Plot the train/ce_loss and train/hidden_mse curves, and teacher vs student accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    note = " (random weights)" if random_weights else ""
    train = [h for h in history if "ce_loss" in h]

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in (("ce_loss", "train/ce_loss"), ("hidden_mse", "train/hidden_mse"), ("loss", "train/loss")):
        ax.plot([h["step"] for h in train], [h[key] for h in train], marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(f"Distillation losses{note}")
    ax.legend()
    fig.tight_layout()
    losses = out_dir / "losses.png"
    fig.savefig(losses, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    names = ["teacher", "student", "agreement"]
    values = [scores["teacher_accuracy"], scores["student_accuracy"], scores["agreement"]]
    bars = ax.bar(names, values, color=["#4c72b0", "#dd8452", "#8c8c8c"])
    ax.bar_label(bars, labels=[f"{v:.1%}" for v in values])
    ax.set_ylim(0, 1)
    ax.axhline(0.2, linestyle=":", color="black", linewidth=1)
    ax.set_ylabel("share of validation questions")
    ax.set_title(f"Validation accuracy{note}\n(dotted line: chance with 5 options)", fontsize=10)
    fig.tight_layout()
    accuracy = out_dir / "accuracy.png"
    fig.savefig(accuracy, dpi=110)
    plt.close(fig)
    return [losses, accuracy]


def write_report(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write the run summary as JSON and as a short Markdown page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")

    s = summary
    scores = s["scores"]
    lines = ["# hdkd distillation run", ""]
    if s.get("random_weights"):
        lines += [f"> **Warning:** {RANDOM_WEIGHTS_WARNING}.", ""]
    lines += [
        f"- MLflow run: `{s.get('run_id')}`" + (f" (study parent run `{s['parent_run_id']}`)"
                                                if s.get("parent_run_id") else ""),
        f"- Teacher: `{s['teacher']}`; student: `{s['student']}`",
        f"- Labels: {s['label_source']}; hidden_weight {s['hidden_weight']}; projection {s['projection']}; "
        f"teacher hidden states {s['teacher_hidden']}",
        "",
        "## Data",
        "",
        "| split | source | examples used | valid rows | skipped rows | truncated prompts |",
        "|---|---|---|---|---|---|",
    ]
    for split in ("train", "validation"):
        d = s["data"][split]
        lines.append(f"| {split} | `{d['source']}` | {d['examples']} | {d['valid_rows']} | {d['skipped_rows']} | "
                     f"{d['truncated']} |")
    lines += [
        "",
        f"Portion {s['portion']} of each split (seed {s['seed']}).",
        "",
        "## Results",
        "",
        "| metric | value |",
        "|---|---|",
        f"| eval/teacher_accuracy | {scores['teacher_accuracy']:.4f} |",
        f"| eval/student_accuracy | {scores['student_accuracy']:.4f} |",
        f"| eval/agreement | {scores['agreement']:.4f} |",
        f"| eval/teacher_unparsed | {scores['teacher_unparsed']:.4f} |",
        f"| eval/student_unparsed | {scores['student_unparsed']:.4f} |",
        f"| eval/loss | {s['final'].get('eval_loss', float('nan')):.4f} |",
        f"| final train/ce_loss | {s['final'].get('ce_loss', float('nan')):.4f} |",
        f"| final train/hidden_mse | {s['final'].get('hidden_mse', float('nan')):.4f} |",
        f"| final train/loss | {s['final'].get('loss', float('nan')):.4f} |",
        "",
        f"Epochs {s['epochs']}, {s['steps']} optimizer steps, training time {s['train_seconds']:.1f} s (evaluations included), "
        f"total time {s['total_seconds']:.1f} s.",
        "",
        "Plots: `plots/losses.png`, `plots/accuracy.png`. Per-question answers: `predictions.json`.",
        "",
    ]
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return md_path, json_path
