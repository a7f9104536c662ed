"""Loss functions against hand-computed values, identities, padding and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from hdkd.losses import IGNORE_INDEX, distillation_loss, hidden_mse_sum, token_cross_entropy_sum


def _identity(width: int) -> torch.nn.Linear:
    projection = torch.nn.Linear(width, width, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(width))
    return projection


def test_hidden_mse_zero_for_identical_states():
    states = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert hidden_mse_sum(states, states.clone(), mask, _identity(4)).item() == 0.0


def test_hidden_mse_hand_computed():
    student = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # (1, 2, 2)
    teacher = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    mask = torch.tensor([[True, True]])
    # Position 0: (1 + 4) / 2 = 2.5; position 1: (9 + 16) / 2 = 12.5.
    assert hidden_mse_sum(student, teacher, mask, _identity(2)).item() == pytest.approx(15.0)
    # Masking position 1 leaves only 2.5.
    assert hidden_mse_sum(student, teacher, torch.tensor([[True, False]]), _identity(2)).item() == pytest.approx(2.5)


def test_hidden_mse_projection_directions():
    student = torch.tensor([[[1.0, 1.0]]])  # width 2
    teacher = torch.tensor([[[2.0, 2.0, 2.0]]])  # width 3
    mask = torch.tensor([[True]])
    up = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        up.weight.fill_(1.0)  # each output = 1 + 1 = 2
    assert hidden_mse_sum(student, teacher, mask, up, "student_to_teacher").item() == pytest.approx(0.0)
    down = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        down.weight.fill_(0.5)  # each output = 3 * 2 * 0.5 = 3, error (1 - 3)^2 = 4
    assert hidden_mse_sum(student, teacher, mask, down, "teacher_to_student").item() == pytest.approx(4.0)


def test_hidden_mse_unchanged_by_padding():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    projection = torch.nn.Linear(4, 4, bias=False)
    before = hidden_mse_sum(student, teacher, mask, projection)
    padded_student = torch.cat([student, torch.randn(2, 5, 4) * 100], dim=1)
    padded_teacher = torch.cat([teacher, torch.randn(2, 5, 4) * 100], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)], dim=1)
    after = hidden_mse_sum(padded_student, padded_teacher, padded_mask, projection)
    assert after.item() == pytest.approx(before.item(), rel=1e-6)


def test_hidden_mse_gradient_reaches_projection():
    student = torch.randn(1, 2, 3, requires_grad=True)
    teacher = torch.randn(1, 2, 5)
    projection = torch.nn.Linear(3, 5, bias=False)
    hidden_mse_sum(student, teacher, torch.ones(1, 2, dtype=torch.bool), projection).backward()
    assert projection.weight.grad is not None
    assert projection.weight.grad.abs().sum().item() > 0
    assert student.grad.abs().sum().item() > 0


def test_cross_entropy_hand_computed_and_ignores_padding():
    # Uniform logits over 4 classes: each token costs ln 4.
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[1, 2, IGNORE_INDEX]])
    assert token_cross_entropy_sum(logits, labels).item() == pytest.approx(2 * math.log(4))


def test_cross_entropy_zero_for_certain_prediction():
    logits = torch.full((1, 1, 3), -1e4)
    logits[0, 0, 2] = 1e4
    assert token_cross_entropy_sum(logits, torch.tensor([[2]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("weight, expected", [(0.0, 2.0), (1.0, 6.0), (0.5, 4.0), (0.25, 3.0)])
def test_distillation_loss_weighting(weight, expected):
    assert distillation_loss(torch.tensor(2.0), torch.tensor(6.0), weight).item() == pytest.approx(expected)


def test_one_third_weight_matches_research_loss_scaled():
    # CE + 0.5 * MSE equals (3/2) * [(2/3) * CE + (1/3) * MSE].
    ce, mse = torch.tensor(1.7), torch.tensor(0.9)
    assert (ce + 0.5 * mse).item() == pytest.approx(1.5 * distillation_loss(ce, mse, 1 / 3).item())
