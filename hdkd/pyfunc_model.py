"""The student as an MLflow pyfunc model, defined from code: MLflow logs this file with the model and runs it on load.

Two input forms are accepted, by ``load_model(...).predict`` and by ``POST /invocations`` of ``mlflow models serve``:

- a list of prompt strings (``["Question: ...\\nOptions:\\n..."]``, or ``{"inputs": [...]}`` over HTTP): the
  result is a list of answer strings;
- a table with ``question`` and ``options`` columns (a pandas DataFrame, a list of records, or
  ``{"dataframe_records": [...]}`` / ``{"dataframe_split": ...}`` over HTTP): the training prompt is built here and
  the result is a table with ``answer`` and ``letter`` columns. A ``prompt`` column may stand in for the two.

Why the signature has no input schema: MLflow's column-based schema enforcement turns a list into a one-column
table and then keeps only the columns the schema names. An unnamed string column therefore cuts a
question/options table down to its first column, and named columns drop a plain list entirely (checked with
MLflow 3.17). So the signature states the outputs and the generation params, and ``predict`` checks its input
itself and raises an ``MlflowException`` (HTTP 400 when served) that names what is wrong.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.type_hints import TypeFromExample

# MLflow loads this file under a generated module name, so the logger is named explicitly.
logger = logging.getLogger("hdkd.pyfunc_model")

GENERATION_FILE = "hdkd_generation.json"
DEFAULT_SETTINGS = {"max_new_tokens": 32, "num_beams": 1, "batch_size": 32, "max_source_length": 256}


def read_settings(student_dir: str | Path) -> dict[str, Any]:
    """Read the generation settings saved beside the student weights, filling in defaults for missing keys."""
    path = Path(student_dir) / GENERATION_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {**DEFAULT_SETTINGS, **saved}


def student_signature(student_dir: str | Path) -> ModelSignature:
    """Build the logged signature: outputs ``answer`` and ``letter``, params with the training-time defaults."""
    settings = read_settings(student_dir)
    outputs = Schema([ColSpec("string", "answer"), ColSpec("string", "letter", required=False)])
    params = ParamSchema([
        ParamSpec("max_new_tokens", "long", int(settings["max_new_tokens"])),
        ParamSpec("num_beams", "long", int(settings["num_beams"])),
    ])
    return ModelSignature(inputs=None, outputs=outputs, params=params)


def _invalid_input(message: str) -> MlflowException:
    # An MlflowException keeps its message in the scoring server's HTTP 400 reply; other errors become a
    # generic "unexpected error" 500.
    return MlflowException.invalid_parameter_value(message)


def _plain(value: Any) -> Any:
    """Convert numpy arrays and scalars (what the scoring server parses JSON into) to Python lists and strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _is_option_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(option, str) for option in value)


def _missing(value: Any) -> bool:
    """Return True for None and NaN, which pandas puts in a column a row does not fill."""
    return value is None or (isinstance(value, float) and value != value)


def _records(model_input: Any) -> list[str | dict[str, Any]]:
    """Normalise every accepted input form to a list whose items are prompt strings or row mappings."""
    import pandas as pd

    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if len(model_input.columns) == 1 and "options" not in model_input.columns:
            return [str(v) for v in model_input.iloc[:, 0]]
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        columns = {key: _plain(value) for key, value in model_input.items()}
        # Column-oriented ({"question": [...], "options": [[...], ...]}) or a single row.
        if all(isinstance(value, list) for value in columns.values()) and not _is_option_list(columns.get("options")):
            return pd.DataFrame(columns).to_dict(orient="records")
        return [columns]
    model_input = _plain(model_input)
    if isinstance(model_input, list):
        return model_input
    raise _invalid_input(f"unsupported input type {type(model_input).__name__}: pass a list of prompt strings or "
                         "a table with `question` and `options` columns")


def _prompt_of(item: str | dict[str, Any], position: int) -> tuple[str, dict[str, str] | None]:
    """Return the prompt for one input item and its option texts by letter (None for a bare prompt)."""
    from hdkd.data import Example, build_prompt

    if isinstance(item, str):
        return item, None
    if not isinstance(item, Mapping):
        raise _invalid_input(f"input item {position} has type {type(item).__name__}; expected a prompt string or a "
                             "row with `question` and `options`")
    row = {key: _plain(value) for key, value in item.items() if not _missing(value)}
    if "question" in row and "options" in row:
        options = row["options"]
        if not _is_option_list(options):
            raise _invalid_input(f"row {position}: `options` must be a list of strings such as ['A)12', 'B)15'], "
                                 f"got {options!r}")
        example = Example(str(position), str(row["question"]), list(options), "")
        return build_prompt(example.question, example.options), example.option_texts()
    if "prompt" in row:
        return str(row["prompt"]), None
    raise _invalid_input(f"row {position} has columns {sorted(row)}; expected `question` and `options`, or `prompt`")


class StudentModel(PythonModel):
    """Generates answers with the distilled student, greedily unless the ``num_beams`` param says otherwise."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = Path(context.artifacts["student"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # transformers 5 warns that an untied lm_head (as in Flan-T5) differs from the embeddings; that is expected.
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            self.model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        finally:
            transformers_logging.set_verbosity(verbosity)
        self.settings = read_settings(folder)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        if self.settings.get("random_weights"):
            logger.warning("this student was distilled from random-weight stand-ins: its answers mean nothing")

    def _answers(self, prompts: list[str], max_new_tokens: int, num_beams: int) -> list[str]:
        from hdkd.generation import generate

        ids = self.tokenizer(prompts, truncation=True, max_length=int(self.settings["max_source_length"]))
        result = generate(self.model, ids["input_ids"], pad_id=self.tokenizer.pad_token_id,
                          eos_id=self.tokenizer.eos_token_id, max_new_tokens=max_new_tokens, num_beams=num_beams,
                          batch_size=int(self.settings["batch_size"]), device=self.device, bf16=False,
                          description="student answers", progress=sys.stderr.isatty())
        return self.tokenizer.batch_decode(result.token_ids, skip_special_tokens=True)

    # With TypeFromExample, MLflow converts a DataFrame to the input example's form before calling predict: a
    # list of strings for a one-column table, a list of records otherwise. It also skips type-hint validation,
    # which would reject one of the two input forms, so _records() and _prompt_of() check the input instead.
    def predict(self, context, model_input: TypeFromExample, params: dict[str, Any] | None = None):
        import pandas as pd

        from hdkd.evaluation import extract_letter

        params = params or {}
        max_new_tokens = int(params.get("max_new_tokens") or self.settings["max_new_tokens"])
        num_beams = int(params.get("num_beams") or self.settings["num_beams"])
        if max_new_tokens < 1 or num_beams < 1:
            raise _invalid_input(f"max_new_tokens={max_new_tokens} and num_beams={num_beams} must both be >= 1")

        items = _records(model_input)
        prompts, option_texts = [], []
        for position, item in enumerate(items):
            prompt, options = _prompt_of(item, position)
            prompts.append(prompt)
            option_texts.append(options)
        answers = self._answers(prompts, max_new_tokens, num_beams) if prompts else []

        # A list of prompt strings gets a list of answers back; any table row makes the result a table.
        if all(isinstance(item, str) for item in items):
            return answers
        letters = [extract_letter(answer, options) for answer, options in zip(answers, option_texts)]
        return pd.DataFrame({"answer": answers, "letter": letters})


mlflow.models.set_model(StudentModel())
