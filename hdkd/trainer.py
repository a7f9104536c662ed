"""A transformers Trainer that adds the hidden-state MSE through a learned projection.

loss = (1 - hidden_weight) * ce_loss + hidden_weight * hidden_mse, where both terms are token means over the
label positions of the whole optimizer step. The projection is trained with the student, saved in every
checkpoint as ``projection.safetensors`` and restored on resume.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from hdkd.generation import pad_batch
from hdkd.losses import IGNORE_INDEX, distillation_loss, hidden_mse_sum, token_cross_entropy_sum

logger = logging.getLogger(__name__)

PROJECTION_FILE = "projection.safetensors"


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


class DistillationDataset(torch.utils.data.Dataset):
    """Training or validation examples: prompt ids, labels and (cached mode) the teacher's hidden states."""

    def __init__(self, input_ids: list[list[int]], labels: list[list[int]], teacher_hidden: list[torch.Tensor] | None):
        self.input_ids, self.labels, self.teacher_hidden = input_ids, labels, teacher_hidden

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"input_ids": self.input_ids[index], "labels": self.labels[index]}
        if self.teacher_hidden is not None:
            item["teacher_hidden"] = self.teacher_hidden[index]
        return item

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


class DistillationCollator:
    """Pad prompts to the batch's longest (a multiple of 8), labels with -100 and teacher states with zeros."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_batch([item["input_ids"] for item in items], self.pad_id)
        labels, label_mask = pad_batch([item["labels"] for item in items], self.pad_id, multiple=1)
        labels[label_mask == 0] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if "teacher_hidden" in items[0]:
            width = items[0]["teacher_hidden"].size(-1)
            hidden = torch.zeros(len(items), labels.size(1), width)
            for row, item in enumerate(items):
                hidden[row, : item["teacher_hidden"].size(0)] = item["teacher_hidden"]
            batch["teacher_hidden"] = hidden
        return batch


class _WindowStart(TrainerCallback):
    """Start the loss window at the step training begins from (not 0 after a resume); clear projection gradients."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._window.zero_()
        self.trainer._window_start_step = state.global_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Trainer zeroes only the model's gradients; without this the projection's would add up over all steps.
        self.trainer.projection.zero_grad(set_to_none=True)


class _EpochSeededLengthSampler(torch.utils.data.Sampler):
    """Length-grouped order (transformers' LengthGroupedSampler) drawn from ``seed`` and the epoch only.

    LengthGroupedSampler draws from the global RNG, which a run resumed in a later epoch restores only after the
    epoch's order was drawn, so the resumed run would see other batches than an uninterrupted one.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__()
        self.batch_size = batch_size
        self.lengths = lengths
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        # Trainer calls this (through accelerate's data loader) before each epoch, resumed ones included.
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        # Megabatches of up to 50 batches are each sorted by length, so batches pad to little. transformers'
        # default makes a megabatch a quarter of the batches (a single one below 8), leaving small sets unsorted.
        order = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=50, generator=generator)
        return iter(_shuffle_batches(order, self.batch_size, generator))


def _shuffle_batches(order: list[int], batch_size: int, generator: torch.Generator) -> list[int]:
    """Shuffle whole batches of ``order``, except the first (the longest, so running out of memory happens early)
    and a final partial batch (so every other batch stays whole)."""
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    tail = [batches.pop()] if len(batches[-1]) < batch_size else []
    middle = batches[1:]
    shuffled = [middle[i] for i in torch.randperm(len(middle), generator=generator).tolist()]
    return [index for batch in batches[:1] + shuffled + tail for index in batch]


class DistillationTrainer(Trainer):
    """Trainer whose loss mixes the student's cross-entropy with a projected hidden-state MSE."""

    # compute_loss divides by the label tokens of the whole optimizer step, so Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, projection: torch.nn.Module, hidden_weight: float, projection_direction: str,
                 teacher: torch.nn.Module | None = None, train_lengths: list[int] | None = None,
                 student_evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.projection = projection.to(self.args.device)
        self.hidden_weight = hidden_weight
        self.projection_direction = projection_direction
        self.teacher = teacher
        self.train_lengths = train_lengths
        self.student_evaluator = student_evaluator
        # Trainer counts label tokens across the accumulation window only for models taking loss kwargs.
        self.model_accepts_loss_kwargs = True
        self._window = torch.zeros(2, device=self.args.device)  # ce_loss, hidden_mse summed over logged steps
        self._window_start_step = 0
        self.evaluation_seconds = 0.0  # wall time spent in evaluate(), for the run's phase times
        self.checkpoint_seconds = 0.0  # wall time spent writing checkpoints
        self.add_callback(_WindowStart(self))

    # --- Loss ---------------------------------------------------------------------------------------

    def _teacher_hidden_online(self, inputs: dict[str, torch.Tensor], decoder_input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                               decoder_input_ids=decoder_input_ids, output_hidden_states=True)
            hidden = out.decoder_hidden_states[-1]
        # Inference tensors cannot take part in autograd; a clone outside inference mode can.
        return hidden.clone()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        mask = labels.ne(IGNORE_INDEX)
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)

        # Student forward; its last decoder hidden state is compared with the teacher's at the same positions.
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        decoder_input_ids=decoder_input_ids, output_hidden_states=True)
        teacher_hidden = inputs.get("teacher_hidden")
        if teacher_hidden is None:
            teacher_hidden = self._teacher_hidden_online(inputs, decoder_input_ids)

        # Token means over the optimizer step: num_items_in_batch counts its label tokens (all micro-batches).
        tokens = num_items_in_batch if num_items_in_batch is not None else mask.sum()
        tokens = torch.as_tensor(tokens, device=labels.device).clamp(min=1)
        ce_loss = token_cross_entropy_sum(outputs.logits, labels) / tokens
        hidden_mse = hidden_mse_sum(outputs.decoder_hidden_states[-1], teacher_hidden.to(labels.device), mask,
                                    self.projection, self.projection_direction) / tokens
        loss = distillation_loss(ce_loss, hidden_mse, self.hidden_weight)
        self._check_finite(ce_loss, hidden_mse)
        if model.training:
            self._window += torch.stack([ce_loss.detach(), hidden_mse.detach()])
        return (loss, outputs) if return_outputs else loss

    def _check_finite(self, ce_loss: torch.Tensor, hidden_mse: torch.Tensor) -> None:
        # One host sync per micro-batch; on a CPU it is free and on a GPU small next to a T5 step.
        finite = torch.isfinite(torch.stack([ce_loss.detach(), hidden_mse.detach()])).tolist()
        if all(finite):
            return
        names = [name for name, ok in zip(("ce_loss", "hidden_mse"), finite) if not ok]
        values = {"ce_loss": ce_loss.item(), "hidden_mse": hidden_mse.item()}
        raise NonFiniteLossError(
            f"non-finite loss at step {self.state.global_step + 1}: "
            + ", ".join(f"{name}={values[name]}" for name in names)
            + " (lower training.learning_rate or check the teacher's hidden states)")

    # --- Optimizer, sampler, checkpoints ------------------------------------------------------------

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if not any(any(p is q for q in self.projection.parameters()) for g in optimizer.param_groups
                   for p in g["params"]):
            optimizer.add_param_group({"params": list(self.projection.parameters()), "weight_decay": 0.0})
        return optimizer

    def _trained_parameters(self, model) -> list[torch.nn.Parameter]:
        return [*model.parameters(), *self.projection.parameters()]

    # Trainer clips and measures only the model's gradients. The projection is trained with the student, so
    # clipping and the logged grad_norm cover both as one parameter set.
    def _clip_grad_norm(self, model):
        return self.accelerator.clip_grad_norm_(self._trained_parameters(model), self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # clipping is off (max_grad_norm 0), so only measure the norm
            grad_norm = self.accelerator.clip_grad_norm_(self._trained_parameters(model), float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.train_lengths is not None:
            batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return _EpochSeededLengthSampler(batch, self.train_lengths, seed)
        return super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial) -> None:
        started = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.checkpoint_seconds += time.perf_counter() - started

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Training never continues from a checkpoint of the last step (a resumed run only evaluates and logs), so
        # its optimizer state, twice the model's size for AdamW, is not written.
        if self.state.global_step >= self.state.max_steps:
            return
        super()._save_optimizer_and_scheduler(output_dir)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        state = {k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()}
        save_file(state, os.path.join(output_dir, PROJECTION_FILE), metadata={
            "direction": self.projection_direction, "in_features": str(self.projection.in_features),
            "out_features": str(self.projection.out_features)})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, PROJECTION_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {resume_from_checkpoint} has no {PROJECTION_FILE}")
        self.projection.load_state_dict(load_file(path, device=str(self.args.device)))

    # --- Logging and evaluation ---------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and "eval_loss" not in logs:
            steps = max(self.state.global_step - self._window_start_step, 1)
            ce_loss, hidden_mse = (self._window / steps).tolist()
            logs["ce_loss"], logs["hidden_mse"] = ce_loss, hidden_mse
            self._window.zero_()
            self._window_start_step = self.state.global_step
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        started = time.perf_counter()
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.student_evaluator is not None:
            scores = {f"{metric_key_prefix}_{k}": v for k, v in self.student_evaluator(self.model).items()}
            self.log(scores)
            metrics.update(scores)
        self.evaluation_seconds += time.perf_counter() - started
        return metrics
