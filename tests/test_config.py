"""Configuration: defaults file, overrides, paths and the single message that lists every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hdkd.config import DEFAULT_CONFIG_PATH, Config, ConfigError, all_keys, load_config, render_yaml


def test_defaults_file_matches_dataclasses():
    assert DEFAULT_CONFIG_PATH.read_text(encoding="utf-8") == render_yaml(Config())


def test_defaults_file_comments_every_key():
    lines = DEFAULT_CONFIG_PATH.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            assert lines[index - 1].strip().startswith("#"), f"no comment above {stripped!r}"


def test_defaults_file_loads_to_defaults():
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.teacher == "google/flan-t5-base"
    assert cfg.student == "google/flan-t5-small"
    assert cfg.distill.hidden_weight == 0.5
    assert cfg.distill.label_source == "teacher"
    assert cfg.training.per_device_train_batch_size == 8
    assert cfg.training.num_train_epochs == 3
    assert cfg.generation.num_beams == 1
    assert cfg.training.bf16 == "auto"
    assert cfg.data.min_train_examples == 8
    assert cfg.data.min_validation_examples == 32
    assert cfg.seed == 42
    assert cfg.tracking.experiment_name == "hdkd"


def test_required_keys_exist():
    keys = set(all_keys())
    for key in ("teacher", "student", "data.dataset", "data.train_file", "data.validation_file", "data.portion",
                "generation.max_new_tokens", "generation.num_beams", "distill.hidden_weight",
                "distill.label_source", "training.learning_rate", "training.num_train_epochs",
                "training.per_device_train_batch_size", "training.gradient_accumulation_steps",
                "training.logging_steps", "training.eval_steps", "training.save_steps", "training.bf16",
                "training.fp16", "training.device", "data.max_source_length", "data.max_target_length",
                "data.min_train_examples", "data.min_validation_examples", "data.bad_rows", "seed", "output_dir",
                "cache_dir", "tracking.experiment_name"):
        assert key in keys, key


def test_partial_file_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "small").mkdir(parents=True)
    path = tmp_path / "run.yaml"
    path.write_text("student: models/small\ndata.portion: 0.1\ntraining:\n  learning_rate: 1e-4\n")
    cfg = load_config(path, ["distill.hidden_weight=0.25", "data.train_file=data/train.json"])
    assert cfg.student == str(tmp_path / "models" / "small")
    assert cfg.teacher == "google/flan-t5-base"  # no such directory: stays a hub id
    assert cfg.data.portion == 0.1
    assert cfg.training.learning_rate == 1e-4
    assert cfg.distill.hidden_weight == 0.25
    assert cfg.data.train_file == str(tmp_path / "data" / "train.json")
    assert Path(cfg.output_dir).is_absolute()


def test_all_problems_in_one_message():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["training.lerning_rate=1e-3", "distill.hidden_weight=1.5", "data.portion=0",
                           "training.num_train_epochs=zero", "training.fp16=true"])
    message = str(caught.value)
    assert "unknown key 'training.lerning_rate' (did you mean 'training.learning_rate'?)" in message
    assert "distill.hidden_weight=1.5 is invalid; expected a number in [0, 1]" in message
    assert "data.portion=0.0 is invalid; expected a number in (0, 1]" in message
    assert "training.num_train_epochs='zero' has the wrong type; expected int" in message
    assert "training.bf16" in message  # fp16 is rejected with bf16 suggested
    assert "\n" not in message


@pytest.mark.parametrize("override, fragment", [
    ("data.portion=.nan", "data.portion"),
    ("data.portion=1.5", "data.portion"),
    ("training.learning_rate=0", "training.learning_rate"),
    ("training.per_device_train_batch_size=0", "training.per_device_train_batch_size"),
    ("generation.max_new_tokens=0", "generation.max_new_tokens"),
    ("distill.label_source=silver", "expected one of teacher, gold"),
    ("data.bad_rows=ignore", "expected one of skip, error"),
])
def test_bad_values(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, [override])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: [1e-4\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listing)


def test_render_round_trip():
    cfg = load_config(None, ["distill.hidden_weight=0.3", "training.eval_steps=5"])
    tree = yaml.safe_load(render_yaml(cfg))
    assert tree["distill"]["hidden_weight"] == 0.3
    assert tree["training"]["eval_steps"] == 5


def test_config_command_merged_header(capsys):
    from hdkd.cli import main

    assert main(["config", "--set", "training.learning_rate=1e-4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "# hdkd configuration: the defaults with the given config file and --set values " \
        "merged in."
    assert yaml.safe_load(out)["training"]["learning_rate"] == 1e-4

    assert main(["config"]) == 0
    assert capsys.readouterr().out == render_yaml()


def test_config_markdown_rejects_overrides(capsys):
    from hdkd.cli import main

    assert main(["config", "--markdown", "--set", "training.learning_rate=1e-4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "hdkd: error: --markdown documents the defaults, so it takes no --config or --set\n"
