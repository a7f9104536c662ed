"""Shared fixtures: generated AQuA-format rows, a tokenizer trained on them, tiny random T5 teacher and student,
and a temporary MLflow store. Nothing here needs the network or ../shared/data."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def make_rows(n: int, seed: int) -> list[dict]:
    """Generate AQuA-RAT-schema rows: simple arithmetic questions with five labelled options."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        answer = a + b
        values = {answer}
        while len(values) < 5:
            values.add(answer + rng.randint(-9, 9))
        values = sorted(values)
        rng.shuffle(values)
        letters = "ABCDE"
        rows.append({
            "question": f"A shop sells {a} pens in the morning and {b} pens in the evening. How many pens in all?",
            "options": [f"{letter}){value}" for letter, value in zip(letters, values)],
            "rationale": f"{a} + {b} = {answer}",
            "correct": letters[values.index(answer)],
        })
    return rows


def set_args(values: dict) -> list[str]:
    """Turn dotted config values into ``--set key=value`` command-line arguments."""
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def aqua_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("aqua")
    return {"train": write_rows(folder / "train.json", make_rows(24, 1)),
            "validation": write_rows(folder / "validation.json", make_rows(16, 2))}


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from hdkd.data import build_prompt

    texts = [build_prompt(r["question"], r["options"]) for r in make_rows(200, 3)]
    texts += ["A", "B", "C", "D", "E", "The answer is C", "(C)"]
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    tokenizer.decoder = decoders.Metaspace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                      unk_token="<unk>")
    wrapped.save_pretrained(folder)
    return wrapped


def build_tiny_t5(folder: Path, tokenizer, d_model: int, layers: int, seed: int) -> Path:
    """Save a tiny random T5 (untied lm_head) with the tokenizer, marked as random weights."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from hdkd.models import RANDOM_WEIGHTS_MARKER

    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=4, num_heads=2,
                      num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
                      dropout_rate=0.0)
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved[RANDOM_WEIGHTS_MARKER] = True
    config_path.write_text(json.dumps(saved))
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer width-16 teacher and a 2-layer width-8 student sharing one tokenizer."""
    folder = tmp_path_factory.mktemp("models")
    tokenizer = _train_tokenizer(folder / "tokenizer")
    return {"teacher": build_tiny_t5(folder / "teacher", tokenizer, 16, 2, 0),
            "student": build_tiny_t5(folder / "student", tokenizer, 8, 2, 1),
            "tokenizer": folder / "tokenizer"}


@pytest.fixture()
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store in a temporary working directory."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture()
def tiny_config(tiny_models, aqua_files, tmp_path) -> dict:
    """Dotted config values for a fast run on the tiny models and generated rows."""
    return {
        "teacher": str(tiny_models["teacher"]),
        "student": str(tiny_models["student"]),
        "data.train_file": str(aqua_files["train"]),
        "data.validation_file": str(aqua_files["validation"]),
        "data.min_validation_examples": 8,
        "generation.max_new_tokens": 4,
        "generation.batch_size": 8,
        "training.num_train_epochs": 2,
        "training.per_device_train_batch_size": 4,
        "training.logging_steps": 1,
        "training.bf16": False,
        "output_dir": str(tmp_path / "outputs"),
        "cache_dir": str(tmp_path / "cache"),
        "tracking.experiment_name": "hdkd-test",
    }


def shared_data_or_skip() -> Path:
    if not (SHARED_DATA / "aqua_rat" / "dev.json").is_file():
        pytest.skip(f"real AQuA-RAT files and Flan-T5 tokenizer not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _quiet_hub(monkeypatch):
    # Tests never reach the hub; offline mode makes a hub id fail at once instead of after retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MPLBACKEND", "Agg")
