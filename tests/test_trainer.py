"""DistillationTrainer details that the end-to-end runs cannot pin down: gradient clipping and its norm."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration, TrainingArguments

from hdkd.trainer import DistillationTrainer


def _trainer(tmp_path, max_grad_norm: float) -> DistillationTrainer:
    torch.manual_seed(0)
    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=max_grad_norm, report_to="none",
                             use_cpu=True)
    return DistillationTrainer(model=T5ForConditionalGeneration(config), args=args,
                               projection=torch.nn.Linear(8, 12, bias=False), hidden_weight=0.5,
                               projection_direction="student_to_teacher")


def _fill_gradients(trainer: DistillationTrainer, model_value: float, projection_value: float) -> int:
    """Give every parameter a constant gradient and return the number of student parameters."""
    for p in trainer.model.parameters():
        p.grad = torch.full_like(p, model_value)
    for p in trainer.projection.parameters():
        p.grad = torch.full_like(p, projection_value)
    return sum(p.numel() for p in trainer.model.parameters())


def _combined_norm(trainer: DistillationTrainer) -> float:
    grads = [p.grad for p in [*trainer.model.parameters(), *trainer.projection.parameters()]]
    return math.sqrt(sum(float(g.pow(2).sum()) for g in grads))


def test_clipping_includes_projection(tmp_path):
    trainer = _trainer(tmp_path, max_grad_norm=0.5)
    n_model = _fill_gradients(trainer, 0.0, 1.0)  # only the projection has a gradient
    norm = trainer._clip_grad_norm(trainer.model)
    assert float(norm) == pytest.approx(math.sqrt(8 * 12))  # the pre-clip norm, all from the projection
    assert _combined_norm(trainer) == pytest.approx(0.5, rel=1e-4)
    assert float(trainer.projection.weight.grad[0, 0]) == pytest.approx(0.5 / math.sqrt(96), rel=1e-4)

    _fill_gradients(trainer, 1.0, 1.0)
    norm = trainer._clip_grad_norm(trainer.model)
    assert float(norm) == pytest.approx(math.sqrt(n_model + 96), rel=1e-5)
    # One scale for both: the student's and the projection's gradients stay equal.
    assert float(trainer.projection.weight.grad[0, 0]) == pytest.approx(
        float(next(trainer.model.parameters()).grad.flatten()[0]))
    assert _combined_norm(trainer) == pytest.approx(0.5, rel=1e-4)


def test_unclipped_norm_includes_projection(tmp_path):
    trainer = _trainer(tmp_path, max_grad_norm=0.0)
    n_model = _fill_gradients(trainer, 2.0, 3.0)
    norm = trainer._get_grad_norm(trainer.model)
    assert float(norm) == pytest.approx(math.sqrt(4 * n_model + 9 * 96), rel=1e-5)
    # Measuring does not change the gradients.
    assert float(trainer.projection.weight.grad[0, 0]) == 3.0
    assert float(next(trainer.model.parameters()).grad.flatten()[0]) == 2.0
