"""The student as an MLflow pyfunc model, defined from code (this file is logged with the model).

Input: a list of prompt strings, or a table with ``question`` and ``options`` columns (the training prompt is then
built here) or a ``prompt`` column. Output: for a list, the answer strings; for a table, a table with ``answer``
and ``letter`` columns.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

GENERATION_FILE = "hdkd_generation.json"


class StudentModel(PythonModel):
    """Generates answers with the distilled student (greedy unless its generation settings say otherwise)."""

    def load_context(self, context):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        folder = Path(context.artifacts["student"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(folder).eval()
        settings_path = folder / GENERATION_FILE
        self.settings = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
        self.device = torch.device("cpu")

    def _answers(self, prompts: list[str]) -> list[str]:
        from hdkd.generation import generate

        ids = self.tokenizer(prompts, truncation=True, max_length=self.settings.get("max_source_length", 512))
        result = generate(self.model, ids["input_ids"], pad_id=self.tokenizer.pad_token_id,
                          eos_id=self.tokenizer.eos_token_id,
                          max_new_tokens=self.settings.get("max_new_tokens", 32),
                          num_beams=self.settings.get("num_beams", 1), batch_size=self.settings.get("batch_size", 32),
                          device=self.device, bf16=False, description="student answers")
        return self.tokenizer.batch_decode(result.token_ids, skip_special_tokens=True)

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from hdkd.data import Example, build_prompt
        from hdkd.evaluation import extract_letter

        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, pd.DataFrame):
            if {"question", "options"} <= set(model_input.columns):
                examples = [Example(str(i), q, list(o), "") for i, (q, o) in
                            enumerate(zip(model_input["question"], model_input["options"]))]
                prompts = [build_prompt(e.question, e.options) for e in examples]
                options = [e.option_texts() for e in examples]
            elif "prompt" in model_input.columns or len(model_input.columns) == 1:
                column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
                prompts, options = [str(p) for p in model_input[column]], None
            else:
                raise ValueError("input table needs `question` and `options` columns, or a `prompt` column; "
                                 f"got {list(model_input.columns)}")
            answers = self._answers(prompts)
            letters = [extract_letter(a, options[i] if options else None) for i, a in enumerate(answers)]
            if options is None and len(model_input.columns) == 1 and "prompt" not in model_input.columns:
                # A list of strings arrives as a one-column table after signature enforcement.
                return answers
            return pd.DataFrame({"answer": answers, "letter": letters})
        prompts = [str(p) for p in model_input]
        return self._answers(prompts)


mlflow.models.set_model(StudentModel())
