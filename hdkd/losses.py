"""Distillation losses as pure functions of tensors and masks.

Each function returns a *sum* and a *count* so the caller can normalise by the number of label tokens in the
whole optimizer step (all micro-batches of a gradient-accumulation window), not by each micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies over label positions that are not IGNORE_INDEX.

    logits: (batch, tgt_len, vocab); labels: (batch, tgt_len). Returns a scalar in float32.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def hidden_mse_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor,
                   projection: torch.nn.Module, direction: str = "student_to_teacher") -> torch.Tensor:
    """Sum over unmasked positions of the mean squared error between projected hidden states.

    student_hidden: (batch, tgt_len, d_student); teacher_hidden: (batch, tgt_len, d_teacher);
    mask: (batch, tgt_len), true at label positions. With ``student_to_teacher`` the projection maps
    d_student -> d_teacher and the error is taken in the teacher's width; with ``teacher_to_student`` it maps
    d_teacher -> d_student. For each kept position t the contribution is mean_k (a_tk - b_tk)^2, so

        hidden_mse_sum = sum_{t in mask} (1/d) * ||a_t - b_t||^2,   d = width of the compared states.

    Padded positions contribute nothing, so adding padding leaves the sum unchanged.
    """
    if direction == "student_to_teacher":
        a, b = projection(student_hidden), teacher_hidden
    else:
        a, b = student_hidden, projection(teacher_hidden)
    per_position = (a.float() - b.float()).pow(2).mean(dim=-1)  # (batch, tgt_len)
    return (per_position * mask.to(per_position.dtype)).sum()


def distillation_loss(ce_loss: torch.Tensor, hidden_mse: torch.Tensor, hidden_weight: float) -> torch.Tensor:
    """loss = (1 - hidden_weight) * ce_loss + hidden_weight * hidden_mse."""
    return (1.0 - hidden_weight) * ce_loss + hidden_weight * hidden_mse
