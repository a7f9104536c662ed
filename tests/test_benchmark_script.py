"""The side-by-side benchmark's parts: row selection, hdkd settings, FLOP counting and the untracked driver."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace

import pytest

from tests.conftest import REPO

BENCHMARKS = REPO / "experiments" / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compare_reference", BENCHMARKS / "compare_reference.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _args(tiny_models, aqua_files, **values) -> Namespace:
    settings = dict(teacher=str(tiny_models["teacher"]), student=str(tiny_models["student"]),
                    train_file=str(aqua_files["train"]), validation_file=str(aqua_files["validation"]),
                    n_train=10, n_val=6, epochs=1, batch_size=4, beams=2, max_new_tokens=3)
    return Namespace(**{**settings, **values})


def test_first_rows_copies_prefix(bench, aqua_files, tmp_path):
    target = bench.first_rows(str(aqua_files["train"]), 5, tmp_path / "train.json")
    source = aqua_files["train"].read_text(encoding="utf-8").splitlines(keepends=True)
    assert target.read_text(encoding="utf-8") == "".join(source[:5])

    with pytest.raises(SystemExit, match="only 24 rows"):
        bench.first_rows(str(aqua_files["train"]), 25, tmp_path / "more.json")


def test_hdkd_takes_exactly_first_rows(bench, tiny_models, aqua_files, tmp_path):
    from hdkd.cli import _overrides, build_parser
    from hdkd.config import load_config
    from hdkd.data import load_data

    args = _args(tiny_models, aqua_files)
    train = bench.first_rows(args.train_file, args.n_train, tmp_path / "train.json")
    validation = bench.first_rows(args.validation_file, args.n_val, tmp_path / "validation.json")
    cli = build_parser().parse_args(["train", *bench.hdkd_overrides(args, train, validation, tmp_path)])
    cfg = load_config(None, _overrides(cli, ()))

    # Every copied row, in file order, with the benchmark's generation and training settings.
    rows = [json.loads(line) for line in aqua_files["train"].read_text(encoding="utf-8").splitlines()]
    train_split, validation_split = load_data(cfg.data, cfg.seed)
    assert [e.question for e in train_split.examples] == [r["question"] for r in rows[:10]]
    assert len(validation_split.examples) == 6
    assert (cfg.generation.num_beams, cfg.generation.max_new_tokens) == (2, 3)
    assert (cfg.training.num_train_epochs, cfg.training.per_device_train_batch_size) == (1, 4)
    assert cfg.cache_dir == str(tmp_path / "cache")


def test_flop_counter_backward_is_twice_forward(bench, tiny_models):
    counter = bench.FlopCounter(str(tiny_models["student"]))
    forward = counter.count(4, 16, 3, backward=False)
    both = counter.count(4, 16, 3, backward=True)

    # Every counted product has two products of the same size in its backward pass.
    assert forward > 0
    assert both == 3 * forward
    # Every product grows linearly with the batch, so doubling the batch doubles the FLOPs.
    assert counter.count(8, 16, 3, backward=False) == 2 * forward


def test_ratios_divide_the_right_way(bench):
    summary = {
        "reference": {"labels": 60.0, "training": 80.0, "evaluation": 40.0, "end_to_end": 180.0,
                      "train_examples_per_second": 0.4, "max_rss_bytes": 8 << 30},
        "hdkd": {"labels": 4.0, "training": 5.0, "evaluation": 4.0, "end_to_end": 30.0,
                 "train_examples_per_second": 6.4, "max_rss_bytes": 2 << 30},
        "hdkd_untracked": {"end_to_end": 20.0},
    }
    speedups = bench.ratios(summary)
    assert speedups["labels"] == 15.0
    assert speedups["end_to_end"] == 6.0
    assert speedups["end_to_end_untracked"] == 9.0
    assert speedups["train_examples_per_second"] == 16.0
    assert speedups["max_rss"] == 4.0


def test_untracked_run_reports_phases(tiny_config, tmp_path):
    overrides = []
    for key, value in {**tiny_config, "training.num_train_epochs": 1}.items():
        overrides += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "untracked_run.py"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert set(result["phase_seconds"]) == {"teacher_train", "teacher_validation", "training", "evaluation",
                                            "checkpoints", "save_student"}
    assert all(value > 0 for value in result["phase_seconds"].values())
    # 24 rows in micro-batches of 4: 6 training steps, prompts padded to a multiple of 8.
    assert result["steps"] == 6
    assert len(result["train_batch_shapes"]) == 6
    assert all(batch == 4 and source % 8 == 0 for batch, source, _ in result["train_batch_shapes"])
    # Without MLflow no store is created.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()
