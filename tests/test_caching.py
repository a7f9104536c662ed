"""Cache entries on disk: a damaged entry is reported in one log line and rebuilt, and processes building the
same entry at once neither corrupt it nor build it twice."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hdkd import caching
from hdkd.config import DataConfig, load_config
from tests.conftest import REPO, make_rows, write_rows


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _damage_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hdkd.caching" and r.levelno >= logging.WARNING]


def _replace_bytes(path: Path, data: bytes) -> None:
    # A new file renamed over the old one: a Dataset of this process may still memory-map the old file, and
    # shrinking a memory-mapped file in place would kill the process with SIGBUS.
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    _replace_bytes(path, data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    _replace_bytes(path, bytes(data))


# --- Tokenized data (Arrow) -----------------------------------------------------------------------------


@pytest.fixture()
def tokenized(tmp_path, tiny_models):
    """Tokenize 12 generated rows once into a fresh cache; return a function that tokenizes them again."""
    from transformers import AutoTokenizer

    from hdkd.data import load_data, tokenize_split

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    path = write_rows(tmp_path / "rows.json", make_rows(12, 1))
    cfg = DataConfig(train_file=str(path), validation_file=str(path), min_train_examples=1, min_validation_examples=1)
    train, _ = load_data(cfg, seed=1)

    def run():
        return tokenize_split(train, tokenizer, cfg, tmp_path / "cache", "digest")

    return run


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_manifest"])
def test_tokenized_cache_damage_rebuilt(tokenized, tmp_path, caplog, damage):
    first = tokenized()
    [entry] = _entries(tmp_path / "cache" / "tokenized")
    arrow = entry / "data.arrow"
    if damage == "truncate":
        _truncate(arrow)
    elif damage == "flip_byte":
        _flip_byte(arrow)
    else:
        (entry / caching.MANIFEST).unlink()

    caplog.set_level(logging.INFO, logger="hdkd.caching")
    second = tokenized()
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"cache entry {entry} is damaged (")
    assert warnings[0].endswith("); rebuilding it")
    if damage != "delete_manifest":
        assert "checksum mismatch in data.arrow" in warnings[0]

    # The rebuilt entry has the same rows, passes its checks, and the next read is silent.
    assert second["input_ids"] == first["input_ids"]
    assert second["id"] == first["id"]
    assert _entries(tmp_path / "cache" / "tokenized") == [entry]
    assert caching.verify(entry, entry.name)
    caplog.clear()
    assert tokenized()["input_ids"] == first["input_ids"]
    assert _damage_warnings(caplog) == []


def test_entry_with_other_fingerprint_rebuilt(tokenized, tmp_path, caplog):
    tokenized()
    [entry] = _entries(tmp_path / "cache" / "tokenized")
    manifest = json.loads((entry / caching.MANIFEST).read_text(encoding="utf-8"))
    manifest["fingerprint"] = "0" * 20
    (entry / caching.MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    caplog.set_level(logging.INFO, logger="hdkd.caching")
    tokenized()
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1
    assert f"fingerprint '{'0' * 20}' != '{entry.name}'" in warnings[0]
    assert caching.verify(entry, entry.name)


def test_stale_temporary_folder_removed(tokenized, tmp_path):
    tokenized()
    [entry] = _entries(tmp_path / "cache" / "tokenized")
    # A build killed before its rename leaves a temporary folder beside the entry.
    stale = entry.parent / f".{entry.name}.killed"
    stale.mkdir()
    (stale / "data.arrow").write_bytes(b"half")
    _truncate(entry / "data.arrow")
    tokenized()
    assert not stale.exists()
    assert caching.verify(entry, entry.name)


def test_threads_writing_one_entry(tmp_path):
    folder = tmp_path / "cache" / "tokenized" / "entry"
    columns = {"id": [f"row-{i}" for i in range(2000)], "input_ids": [[i, i + 1, i + 2] for i in range(2000)]}
    results, errors = [], []

    def build():
        try:
            results.append(caching.save_arrow(folder, "entry", columns)["input_ids"])
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(results) == 4
    assert all(result == columns["input_ids"] for result in results)
    assert caching.verify(folder, "entry")
    # Only the entry and its lock file remain: no temporary folder.
    assert sorted(p.name for p in folder.parent.iterdir()) == [".entry.lock", "entry"]


# --- Teacher outputs (safetensors) ----------------------------------------------------------------------


def _prepare(values: dict):
    from hdkd import teacher
    from hdkd.pipeline import check_inputs, prepare

    before = teacher.counter.generations
    prepared = prepare(check_inputs(load_config(None, values)))
    return prepared, teacher.counter.generations - before


def _teacher_entry(cache: Path, split: str) -> Path:
    entries = [e for e in _entries(cache / "teacher") if caching.read_meta(e)["split"] == split]
    assert len(entries) == 1
    return entries[0]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte"])
def test_teacher_cache_damage_rebuilt(tiny_config, tmp_path, caplog, damage):
    cache = Path(tiny_config["cache_dir"])
    first, generated = _prepare(tiny_config)
    # 24 training and 16 validation rows: the teacher generates for each once.
    assert generated == 40

    entry = _teacher_entry(cache, "train")
    if damage == "truncate":
        _truncate(entry / "teacher.safetensors")
    else:
        _flip_byte(entry / "teacher.safetensors")
    caplog.set_level(logging.INFO, logger="hdkd.caching")
    second, generated = _prepare(tiny_config)

    # Only the damaged training entry is rebuilt, with the same labels and hidden states.
    assert generated == 24
    warnings = _damage_warnings(caplog)
    assert warnings == [f"cache entry {entry} is damaged (checksum mismatch in teacher.safetensors); rebuilding it"]
    assert second.teacher_train.labels == first.teacher_train.labels
    for before, after in zip(first.teacher_train.hidden, second.teacher_train.hidden):
        assert after.shape == before.shape
        assert (after - before).abs().max().item() < 1e-6
    assert caching.verify(entry, entry.name)
    assert len(_entries(cache / "teacher")) == 2

    caplog.clear()
    third, generated = _prepare(tiny_config)
    assert generated == 0
    assert _damage_warnings(caplog) == []
    assert third.teacher_train.from_cache


# --- Two processes ---------------------------------------------------------------------------------------

_WORKER = """
import json, sys, time
from pathlib import Path

from hdkd import teacher
from hdkd.config import load_config
from hdkd.pipeline import check_inputs, prepare

values, ready, go = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
checked = check_inputs(load_config(None, values))
ready.touch()
while not go.exists():
    time.sleep(0.01)
prepared = prepare(checked)
print(json.dumps({
    "generations": teacher.counter.generations,
    "train_labels": prepared.teacher_train.labels,
    "validation_answers": prepared.teacher_validation.answers,
    "hidden_sum": sum(float(h.double().sum()) for h in prepared.teacher_train.hidden),
    "input_ids": [list(ids) for ids in prepared.train_set["input_ids"]],
}))
"""


def test_two_processes_build_one_cache(tiny_config, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    go = tmp_path / "go"
    workers = []
    for number in range(2):
        ready = tmp_path / f"ready-{number}"
        workers.append((ready, subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(tiny_config), str(ready), str(go)], cwd=tmp_path,
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))

    # Both processes have imported everything and checked their inputs: start the cache builds together.
    deadline = time.monotonic() + 240
    while not all(ready.exists() for ready, _ in workers):
        assert all(process.poll() is None for _, process in workers), [p.communicate() for _, p in workers]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    go.touch()
    outputs = []
    for _, process in workers:
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == 0, stderr
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))

    # Each entry was built once: 24 training and 16 validation generations in all, split between the two.
    assert sum(output["generations"] for output in outputs) == 40
    assert sorted(output["generations"] for output in outputs) in ([0, 40], [16, 24])
    first, second = outputs
    for key in ("train_labels", "validation_answers", "input_ids"):
        assert first[key] == second[key], key
    assert first["hidden_sum"] == pytest.approx(second["hidden_sum"], rel=1e-6)

    cache = Path(tiny_config["cache_dir"])
    for kind in ("tokenized", "teacher"):
        entries = _entries(cache / kind)
        assert len(entries) == 2, kind
        for entry in entries:
            assert caching.verify(entry, entry.name)
        hidden = [p.name for p in (cache / kind).iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        assert hidden == [], kind
