"""Run one hdkd distillation without MLflow and print its phase times and training batch shapes as JSON.

This is the "without tracking" side of ``compare_reference.py``: the same ``check_inputs -> prepare ->
train_and_evaluate`` calls that ``python -m hdkd train`` makes, minus the MLflow run, the report and the
logged model. It takes the same ``--set KEY=VALUE`` overrides as ``hdkd train``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

STARTED = time.perf_counter()

from transformers import TrainerCallback  # noqa: E402 - the import time above is part of what is measured

from hdkd.cli import freeze_at_exit, keep_freed_memory  # noqa: E402
from hdkd.config import load_config  # noqa: E402
from hdkd.pipeline import check_inputs, prepare, train_and_evaluate  # noqa: E402


class BatchShapes(TrainerCallback):
    """Record (batch, source length, target length) of every training micro-batch the student runs on.

    The shapes give the training phase's FLOPs; the forward pre-hook takes microseconds per call.
    """

    def __init__(self):
        self.shapes: list[tuple[int, int, int]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        if module.training and "input_ids" in kwargs and "decoder_input_ids" in kwargs:
            batch, source_length = kwargs["input_ids"].shape
            self.shapes.append((batch, source_length, kwargs["decoder_input_ids"].shape[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    keep_freed_memory()  # the process settings of python -m hdkd train

    cfg = load_config(None, args.overrides)
    checked = check_inputs(cfg)
    gc.freeze()
    prepared = prepare(checked)
    shapes = BatchShapes()
    result = train_and_evaluate(prepared, cfg, Path(cfg.output_dir), callbacks=[shapes])
    print(json.dumps({
        "phase_seconds": {**prepared.teacher_split_seconds, **result.phase_seconds},
        "bf16": prepared.bf16,
        "train_examples": len(checked.train.examples),
        "validation_examples": len(checked.validation.examples),
        "steps": result.steps,
        "train_batch_shapes": shapes.shapes,
        "total_seconds": time.perf_counter() - STARTED,
    }))
    freeze_at_exit()


if __name__ == "__main__":
    main()
