"""AQuA-RAT loading, row checks, seeded subsets, prompts and tokenization with an Arrow cache."""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdkd import caching
from hdkd.config import ConfigError, DataConfig

logger = logging.getLogger(__name__)

LETTERS = "ABCDE"
PROMPT_VERSION = "v1"
_OPTION_LABEL = re.compile(r"^\s*\(?([A-Ea-e])\s*\)")


class DataError(ValueError):
    """A data file or dataset that cannot be used; the message names the file and the problem."""


@dataclass
class Example:
    """One checked AQuA-RAT problem."""

    id: str
    question: str
    options: list[str]
    correct: str

    def option_texts(self) -> dict[str, str]:
        """Return each option's letter mapped to its text without the "A)" label."""
        texts = {}
        for option in self.options:
            match = _OPTION_LABEL.match(option)
            if match:
                texts[match.group(1).upper()] = option[match.end():].strip()
        return texts


@dataclass
class SplitData:
    """The examples used from one split, and where they came from."""

    split: str
    source: str
    examples: list[Example]
    total_rows: int
    valid_rows: int
    skipped_rows: int
    skipped_reasons: dict[str, int] = field(default_factory=dict)


def build_prompt(question: str, options: list[str]) -> str:
    """Build the instruction prompt shared by teacher, student and the served model."""
    lines = [f"Question: {question.strip()}", "Options:"]
    lines += [option.strip() for option in options]
    lines += ["", "Answer with the letter (A, B, C, D or E) of the correct option."]
    return "\n".join(lines)


# --- Reading and checking rows --------------------------------------------------------------------------


def check_row(row: Any) -> str | None:
    """Return why a row cannot be used, or None when it is valid."""
    if not isinstance(row, dict):
        return "row is not a JSON object"
    for key in ("question", "options", "correct"):
        if key not in row or row[key] in (None, ""):
            return f"missing {key!r}"
    if not isinstance(row["question"], str):
        return "'question' is not a string"
    options = row["options"]
    if not isinstance(options, list) or not 2 <= len(options) <= 5 or not all(isinstance(o, str) for o in options):
        return "'options' is not a list of 2 to 5 strings"
    labels = []
    for option in options:
        match = _OPTION_LABEL.match(option)
        labels.append(match.group(1).upper() if match else None)
    if labels != list(LETTERS[: len(options)]):
        return "options not labelled A) to E) in order"
    if not isinstance(row["correct"], str) or row["correct"].strip().upper() not in labels:
        return "'correct' is not one of the options' letters"
    return None


def _read_json_lines(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (invalid byte at offset {err.start})") from None
    stripped = text.strip()
    if not stripped:
        raise DataError(f"data file {str(path)!r} is empty")

    # A JSON array is accepted as well as JSON lines.
    if stripped.startswith("["):
        try:
            rows = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise DataError(f"data file {str(path)!r} is not valid JSON: {err}") from None
        return rows if isinstance(rows, list) else [rows]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(_Unparsed(number))
    return rows


class _Unparsed:
    def __init__(self, line: int):
        self.line = line


def _read_hub_split(dataset: str, config_name: str, split: str) -> list[dict]:
    from hdkd import hub

    hub.require_dataset(dataset, config_name)
    import datasets

    try:
        data = datasets.load_dataset(dataset, config_name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types for an unreachable or unknown dataset
        raise DataError(
            f"could not load split {split!r} of hub dataset {dataset!r} ({type(err).__name__}: {err}); "
            "set data.train_file and data.validation_file to local JSON-lines files instead"
        ) from None
    return [dict(row) for row in data]


def load_split(cfg: DataConfig, split: str) -> SplitData:
    """Read and check all rows of the ``train`` or ``validation`` split (from its local file or the hub)."""
    local = cfg.train_file if split == "train" else cfg.validation_file
    if local:
        source = str(Path(local))
        rows = _read_json_lines(Path(local))
    else:
        hub_split = cfg.train_split if split == "train" else cfg.validation_split
        source = f"hub:{cfg.dataset}/{cfg.dataset_config}/{hub_split}"
        rows = _read_hub_split(cfg.dataset, cfg.dataset_config, hub_split)

    examples, reasons = [], {}
    for index, row in enumerate(rows):
        reason = f"line {row.line} is not valid JSON" if isinstance(row, _Unparsed) else check_row(row)
        if reason is None:
            examples.append(Example(f"{split}-{index}", row["question"], list(row["options"]),
                                    row["correct"].strip().upper()))
            continue
        if cfg.bad_rows == "error":
            raise DataError(f"{source}: row {index + 1}: {reason} (set data.bad_rows=skip to skip such rows)")
        key = "invalid JSON" if isinstance(row, _Unparsed) else reason
        reasons[key] = reasons.get(key, 0) + 1

    skipped = len(rows) - len(examples)
    counts = ", ".join(f"{n} {r}" for r, n in reasons.items()) or "the file has no rows"
    if not examples:
        # The error carries the counts itself, so bad input stays one line of output.
        raise DataError(f"{source}: no valid rows out of {len(rows)} ({counts}); rows need a question, options "
                        "labelled A) to E) and a correct letter among them")
    if skipped:
        logger.warning("%s: skipped %d of %d rows (%s)", source, skipped, len(rows), counts)
    return SplitData(split, source, examples, len(rows), len(examples), skipped, reasons)


def subset_size(total: int, portion: float, minimum: int) -> int:
    """n = min(N, max(minimum, round(portion * N)))."""
    return min(total, max(minimum, round(portion * total)))


def take_portion(data: SplitData, portion: float, minimum: int, seed: int) -> SplitData:
    """Keep a seeded random subset of the split, in source order."""
    n = subset_size(len(data.examples), portion, minimum)
    if n < 1:
        raise ConfigError([f"data.portion={portion} leaves no {data.split} example"])
    rng = random.Random(f"{seed}-{data.split}")
    chosen = sorted(rng.sample(range(len(data.examples)), n))
    return SplitData(data.split, data.source, [data.examples[i] for i in chosen], data.total_rows,
                     data.valid_rows, data.skipped_rows, data.skipped_reasons)


def load_data(cfg: DataConfig, seed: int) -> tuple[SplitData, SplitData]:
    """Load, check and subset both splits; this touches no model, so bad input fails fast."""
    train = take_portion(load_split(cfg, "train"), cfg.portion, cfg.min_train_examples, seed)
    validation = take_portion(load_split(cfg, "validation"), cfg.portion, cfg.min_validation_examples, seed)
    return train, validation


# --- Tokenization ---------------------------------------------------------------------------------------


def tokenize_split(data: SplitData, tokenizer, cfg: DataConfig, cache_dir: str | Path,
                   tokenizer_digest: str):
    """Tokenize prompts and gold labels into a datasets.Dataset, cached as Arrow under a fingerprint.

    Columns: id, input_ids, gold_labels, length, truncated. The fingerprint covers the chosen rows, the
    tokenizer, the prompt version and the length limits.
    """
    rows = [dict(id=e.id, question=e.question, options=e.options, correct=e.correct) for e in data.examples]
    key = caching.fingerprint({
        "kind": "tokenized", "rows": rows, "tokenizer": tokenizer_digest, "prompt": PROMPT_VERSION,
        "max_source_length": cfg.max_source_length, "max_target_length": cfg.max_target_length,
    })
    folder = Path(cache_dir) / "tokenized" / key
    cached = caching.load_arrow(folder, key)
    if cached is not None:
        return cached

    prompts = [build_prompt(e.question, e.options) for e in data.examples]
    full = tokenizer(prompts, truncation=False)["input_ids"]
    limit = cfg.max_source_length
    input_ids, truncated = [], []
    for ids in full:
        if len(ids) > limit:
            # Keep the start of the prompt and its final EOS token.
            input_ids.append(ids[: limit - 1] + ids[-1:])
            truncated.append(True)
        else:
            input_ids.append(ids)
            truncated.append(False)
    gold = tokenizer([e.correct for e in data.examples], max_length=cfg.max_target_length,
                     truncation=True)["input_ids"]
    columns = {
        "id": [e.id for e in data.examples],
        "input_ids": input_ids,
        "gold_labels": gold,
        "length": [len(ids) for ids in input_ids],
        "truncated": truncated,
    }
    n_truncated = sum(truncated)
    if n_truncated:
        logger.warning("%s: %d of %d prompts are longer than data.max_source_length=%d tokens and were truncated",
                       data.split, n_truncated, len(prompts), limit)
    return caching.save_arrow(folder, key, columns)
