"""Data loading: row checks, seeded portions, prompts and the tokenized Arrow cache."""

from __future__ import annotations

import json

import pytest

from hdkd.config import DataConfig
from hdkd.data import Example, build_prompt, check_row, load_data, subset_size, tokenize_split
from tests.conftest import make_rows, write_rows


@pytest.mark.parametrize("total, portion, minimum, expected", [
    (254, 0.01, 8, 8),      # round(2.54) = 3, raised to the minimum
    (254, 0.1, 8, 25),      # round(25.4)
    (254, 0.1, 32, 32),
    (254, 1.0, 8, 254),
    (5, 0.5, 8, 5),         # never more than the split holds
])
def test_subset_size(total, portion, minimum, expected):
    assert subset_size(total, portion, minimum) == expected


def test_portion_is_seeded_and_per_split(tmp_path):
    train = write_rows(tmp_path / "train.json", make_rows(40, 1))
    validation = write_rows(tmp_path / "validation.json", make_rows(40, 2))
    cfg = DataConfig(train_file=str(train), validation_file=str(validation), portion=0.25, min_train_examples=1,
                     min_validation_examples=1)
    first, _ = load_data(cfg, seed=42)
    again, _ = load_data(cfg, seed=42)
    other, _ = load_data(cfg, seed=7)
    assert [e.id for e in first.examples] == [e.id for e in again.examples]
    assert [e.id for e in first.examples] != [e.id for e in other.examples]
    assert len(first.examples) == 10
    ids = [int(e.id.split("-")[1]) for e in first.examples]
    assert ids == sorted(ids)


def test_bad_rows_are_skipped_and_counted(tmp_path):
    rows = make_rows(6, 1)
    rows[1]["correct"] = "F"
    del rows[2]["question"]
    rows[3]["options"] = ["1", "2", "3", "4", "5"]
    path = tmp_path / "train.json"
    write_rows(path, rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("{not json\n")
    cfg = DataConfig(train_file=str(path), validation_file=str(path), min_validation_examples=1)
    train, _ = load_data(cfg, seed=1)
    assert len(train.examples) == 3
    assert train.total_rows == 7
    assert train.skipped_rows == 4
    assert train.skipped_reasons == {"'correct' is not one of the options' letters": 1, "missing 'question'": 1,
                                     "options not labelled A) to E) in order": 1, "invalid JSON": 1}


def test_check_row_accepts_real_schema():
    row = {"question": "q", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "r", "correct": "C"}
    assert check_row(row) is None
    assert check_row({**row, "correct": "c"}) is None


def test_prompt_lists_question_options_and_instruction():
    prompt = build_prompt("What is 2 + 2?", ["A)3", "B)4", "C)5", "D)6", "E)7"])
    assert prompt.startswith("Question: What is 2 + 2?\nOptions:\nA)3\nB)4")
    assert "letter" in prompt.splitlines()[-1]


def test_option_texts():
    example = Example("x", "q", ["A)32400", "B) 6000", "C)600", "D)60000", "E)10"], "C")
    assert example.option_texts() == {"A": "32400", "B": "6000", "C": "600", "D": "60000", "E": "10"}


def test_tokenized_cache_reused_and_truncation_counted(tmp_path, tiny_models):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    path = write_rows(tmp_path / "rows.json", make_rows(8, 1))
    cfg = DataConfig(train_file=str(path), validation_file=str(path), max_source_length=16,
                     min_train_examples=1, min_validation_examples=1)
    train, _ = load_data(cfg, seed=1)
    first = tokenize_split(train, tokenizer, cfg, tmp_path / "cache", "digest")
    assert all(length <= 16 for length in first["length"])
    assert all(first["truncated"])
    assert all(ids[-1] == tokenizer.eos_token_id for ids in first["input_ids"])
    entries = list((tmp_path / "cache" / "tokenized").iterdir())
    entries = [e for e in entries if e.is_dir()]
    assert len(entries) == 1
    manifest = json.loads((entries[0] / "manifest.json").read_text())
    assert "data.arrow" in manifest["files"]
    second = tokenize_split(train, tokenizer, cfg, tmp_path / "cache", "digest")
    assert second["input_ids"] == first["input_ids"]
    assert len([e for e in (tmp_path / "cache" / "tokenized").iterdir() if e.is_dir()]) == 1
