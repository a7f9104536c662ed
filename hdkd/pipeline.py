"""The distillation flow: check inputs, prepare data and teacher outputs, train, evaluate, report, log.

``check_inputs`` touches no model weights and no MLflow store, so bad input fails before anything is written.
``prepare`` does the teacher's work once; ``train_and_evaluate`` can then run many times (one per trial).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hdkd import caching, teacher as teacher_mod
from hdkd.config import Config, render_yaml
from hdkd.data import SplitData, load_data

logger = logging.getLogger(__name__)

STATE_FILE = "run_state.json"


@dataclass
class Checked:
    """Inputs that passed every check, before any model is loaded."""

    cfg: Config
    train: SplitData
    validation: SplitData
    tokenizer: Any = None  # the student's tokenizer, loaded by the checks and reused by prepare()


@dataclass
class Prepared:
    """Everything trials share: tokenized data, the teacher's outputs, device settings."""

    cfg: Config
    checked: Checked
    tokenizer: Any
    teacher_model: Any  # kept only for distill.teacher_hidden=online
    teacher_info: Any
    teacher_config: Any
    student_random: bool
    train_set: Any  # datasets.Dataset
    validation_set: Any
    teacher_train: teacher_mod.TeacherOutputs
    teacher_validation: teacher_mod.TeacherOutputs
    teacher_answers: list[str]
    teacher_letters: list[str | None]
    device: torch.device
    bf16: bool
    teacher_seconds: float
    generations: int
    teacher_split_seconds: dict[str, float] = field(default_factory=dict)  # teacher_train, teacher_validation

    @property
    def random_weights(self) -> bool:
        return self.teacher_info.random_weights or self.student_random


@dataclass
class TrainResult:
    """Outputs of one training run."""

    scores: dict[str, float]
    final: dict[str, float]
    history: list[dict[str, Any]]
    steps: int
    train_seconds: float
    student_dir: Path
    predictions: dict[str, list]
    interrupted: int | None = None  # signal number when stopped by SIGINT/SIGTERM
    extra: dict[str, Any] = field(default_factory=dict)
    # training (the optimizer loop alone), evaluation (all of them), checkpoints (writing them), save_student
    phase_seconds: dict[str, float] = field(default_factory=dict)


# --- Checks ---------------------------------------------------------------------------------------------


def check_inputs(cfg: Config) -> Checked:
    """Check data files, rows and model sources (configs and tokenizers only); raise on the first bad input."""
    from hdkd import models

    train, validation = load_data(cfg.data, cfg.seed)
    device = models.resolve_device(cfg.training.device)
    models.resolve_bf16(cfg.training.bf16, device)
    for role in ("teacher", "student"):
        models.check_model_source(cfg.get(role), role, cfg.trust_remote_code)
    teacher_tokenizer = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    student_tokenizer = models.load_tokenizer(cfg.student, cfg.trust_remote_code)
    models.check_same_tokenizer(teacher_tokenizer, student_tokenizer, cfg.teacher, cfg.student)
    return Checked(cfg, train, validation, student_tokenizer)


# --- Preparation (teacher work, done once) --------------------------------------------------------------


def prepare(checked: Checked) -> Prepared:
    """Tokenize both splits and get the teacher's labels, validation answers and hidden states (cached)."""
    from hdkd import models
    from hdkd.data import tokenize_split
    from hdkd.evaluation import extract_letter

    cfg = checked.cfg
    device = models.resolve_device(cfg.training.device)
    bf16 = models.resolve_bf16(cfg.training.bf16, device)
    tokenizer = checked.tokenizer or models.load_tokenizer(cfg.student, cfg.trust_remote_code)
    digest = models.tokenizer_digest(tokenizer)
    train_set = tokenize_split(checked.train, tokenizer, cfg.data, Path(cfg.cache_dir), digest)
    validation_set = tokenize_split(checked.validation, tokenizer, cfg.data, Path(cfg.cache_dir), digest)

    teacher_model, teacher_info = models.load_seq2seq(cfg.teacher, "teacher", cfg.trust_remote_code)
    teacher_model.to(device).eval()
    use_fast_cpu_kernels(teacher_model, device)
    if bf16 and cfg.distill.teacher_hidden == "cached":
        # Here the teacher only runs inference. Under inference_mode autocast casts every weight again at every
        # call, so bf16 weights save those casts (a fifth of the teacher's time on a CPU).
        teacher_model.to(torch.bfloat16)
    student_random = models.is_random_stand_in(cfg.student)
    if student_random:
        logger.warning("student %s: %s", cfg.student, models.RANDOM_WEIGHTS_WARNING)

    started = time.perf_counter()
    before = teacher_mod.counter.generations
    common = dict(label_source=cfg.distill.label_source, generation_cfg=cfg.generation,
                  max_label_length=cfg.data.max_target_length, weights_digest=teacher_info.digest,
                  cache_dir=cfg.cache_dir, cache_dtype=cfg.distill.cache_dtype, pad_id=tokenizer.pad_token_id,
                  eos_id=tokenizer.eos_token_id, device=device, bf16=bf16)
    teacher_train = teacher_mod.teacher_outputs(
        teacher_model, train_set, split="train", with_hidden=cfg.distill.teacher_hidden == "cached", **common)
    train_done = time.perf_counter()
    teacher_validation = teacher_mod.teacher_outputs(
        teacher_model, validation_set, split="validation", with_hidden=True, **common)
    finished = time.perf_counter()
    teacher_seconds = finished - started
    split_seconds = {"teacher_train": train_done - started, "teacher_validation": finished - train_done}

    answers = tokenizer.batch_decode(teacher_validation.answers, skip_special_tokens=True)
    letters = [extract_letter(a, e.option_texts()) for a, e in zip(answers, checked.validation.examples)]
    teacher_config = teacher_model.config
    if cfg.distill.teacher_hidden == "cached":
        # Only the online path needs the teacher during training; free its memory otherwise.
        teacher_model = None
    return Prepared(cfg, checked, tokenizer, teacher_model, teacher_info, teacher_config, student_random,
                    train_set, validation_set,
                    teacher_train, teacher_validation, answers, letters, device, bf16, teacher_seconds,
                    teacher_mod.counter.generations - before, split_seconds)


def use_fast_cpu_kernels(model, device: torch.device) -> None:
    """On a CPU, switch ``model`` to eager attention and a fused tanh-GELU, which compute the same functions faster.

    torch's CPU SDPA kernel is slow for one-token decoding steps with T5's position-bias mask (eager attention took
    a quarter less time for the teacher's beam search, torch 2.13 on an AVX-512 CPU), and transformers' ``gelu_new``
    runs as six element-wise operations where ``F.gelu(approximate="tanh")`` is one.
    """
    if device.type != "cpu":
        return
    from transformers.activations import GELUTanh, NewGELUActivation

    model.set_attn_implementation("eager")
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, GELUTanh())


# --- Training -------------------------------------------------------------------------------------------


class _StopOnSignal:
    """Turn SIGINT/SIGTERM into "save a checkpoint and stop" at the end of the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: saving a checkpoint and stopping after this step",
                       signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False


def _signal_callback(stopper: _StopOnSignal):
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if stopper.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            # Stopping cuts the epoch short, and an uninterrupted run would not evaluate at this step.
            if stopper.signum is not None and not float(state.epoch).is_integer():
                control.should_evaluate = False
            return control

    return StopCallback()


def _save_after_epoch_evaluation():
    """Move a checkpoint due at an epoch's last step to after that epoch's evaluation.

    Trainer saves at the step, then evaluates at the epoch's end. A run killed in between would resume from that
    checkpoint in the next epoch, so the evaluation would be missing from the run for good.
    """
    from transformers import TrainerCallback

    class SaveAfterEvaluation(TrainerCallback):
        deferred = False

        def on_step_end(self, args, state, control, **kwargs):
            epoch_end = float(state.epoch).is_integer()
            if control.should_save and epoch_end and args.eval_strategy == "epoch":
                control.should_save = False
                self.deferred = True
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if self.deferred:
                control.should_save = True
                self.deferred = False
            return control

    return SaveAfterEvaluation()


def _student_evaluator(prepared: Prepared, batch_size: int, store: dict[str, Any]) -> Callable:
    """Return a function that generates the student's validation answers and scores them (cached teacher side)."""
    from hdkd import generation
    from hdkd.evaluation import extract_letter, score

    cfg = prepared.cfg
    examples = prepared.checked.validation.examples
    input_ids = [list(ids) for ids in prepared.validation_set["input_ids"]]

    def evaluate(model) -> dict[str, float]:
        was_training = model.training
        result = generation.generate(
            model, input_ids, pad_id=prepared.tokenizer.pad_token_id, eos_id=prepared.tokenizer.eos_token_id,
            max_new_tokens=cfg.generation.max_new_tokens, num_beams=cfg.generation.num_beams,
            batch_size=batch_size, device=prepared.device, bf16=prepared.bf16, description="student answers")
        model.train(was_training)
        answers = prepared.tokenizer.batch_decode(result.token_ids, skip_special_tokens=True)
        letters = [extract_letter(a, e.option_texts()) for a, e in zip(answers, examples)]
        scores = score([e.correct for e in examples], prepared.teacher_letters, letters)
        store["answers"], store["letters"], store["scores"] = answers, letters, asdict(scores)
        return asdict(scores)

    return evaluate


def training_arguments(cfg: Config, output_dir: Path, bf16: bool, device: torch.device):
    from transformers import TrainingArguments

    t = cfg.training
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_train_epochs,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "epoch",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=bf16,
        use_cpu=device.type == "cpu",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_num_workers,
        dataloader_pin_memory=device.type == "cuda",
        disable_tqdm=False,
        save_only_model=False,
    )


def _checkpoint_complete(checkpoint: Path) -> bool:
    # Trainer writes trainer_state.json last, so a checkpoint whose state parses was fully written.
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def latest_checkpoint(folder: Path) -> Path | None:
    """Return the newest complete ``checkpoint-N`` folder; one cut short by a kill is passed over."""
    checkpoints = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    complete = [p for p in checkpoints if _checkpoint_complete(p)]
    return max(complete, key=lambda p: int(p.name.split("-")[-1]), default=None)


def train_and_evaluate(prepared: Prepared, cfg: Config, output_dir: Path, *, resume: bool = False,
                       callbacks: list | None = None) -> TrainResult:
    """Train one student with ``cfg`` (its distill/training values may differ from the prepared ones)."""
    from transformers import set_seed

    from hdkd import models
    from hdkd.trainer import DistillationCollator, DistillationDataset, DistillationTrainer

    set_seed(cfg.seed)
    student, _ = models.load_seq2seq(cfg.student, "student", cfg.trust_remote_code)
    use_fast_cpu_kernels(student, prepared.device)
    projection = models.make_projection(student.config, prepared.teacher_config, cfg.distill.projection)

    train_input_ids = [list(ids) for ids in prepared.train_set["input_ids"]]
    validation_input_ids = [list(ids) for ids in prepared.validation_set["input_ids"]]
    train_dataset = DistillationDataset(train_input_ids, prepared.teacher_train.labels, prepared.teacher_train.hidden)
    validation_dataset = DistillationDataset(validation_input_ids, prepared.teacher_validation.labels,
                                             prepared.teacher_validation.hidden)
    store: dict[str, Any] = {}
    evaluator = _student_evaluator(prepared, cfg.generation.batch_size, store)
    teacher_model = prepared.teacher_model if cfg.distill.teacher_hidden == "online" else None
    if cfg.distill.teacher_hidden == "online" and teacher_model is None:
        raise RuntimeError("distill.teacher_hidden=online needs the teacher model kept in memory")

    stopper = _StopOnSignal()
    trainer = DistillationTrainer(
        model=student,
        args=training_arguments(cfg, output_dir, prepared.bf16, prepared.device),
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        data_collator=DistillationCollator(prepared.tokenizer.pad_token_id),
        processing_class=prepared.tokenizer,
        callbacks=[*(callbacks or []), _signal_callback(stopper), _save_after_epoch_evaluation()],
        projection=projection,
        hidden_weight=cfg.distill.hidden_weight,
        projection_direction=cfg.distill.projection,
        teacher=teacher_model,
        train_lengths=train_dataset.lengths(),
        student_evaluator=evaluator,
    )

    checkpoint = latest_checkpoint(output_dir) if resume else None
    if checkpoint:
        logger.info("resuming from %s", checkpoint)
    started = time.perf_counter()
    with stopper:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - started
    # The optimizer loop alone: evaluations and checkpoint writes inside Trainer.train are phases of their own.
    training_seconds = train_seconds - trainer.evaluation_seconds - trainer.checkpoint_seconds

    history = trainer.state.log_history
    if stopper.signum is not None:
        return TrainResult({}, {}, history, trainer.state.global_step, train_seconds, output_dir, {},
                           interrupted=stopper.signum)

    # The last evaluation normally ran at the final step (epoch end); run one more only when it did not.
    last_eval_step = max((h["step"] for h in history if "eval_student_accuracy" in h), default=-1)
    if last_eval_step != trainer.state.global_step or "scores" not in store:
        trainer.evaluate()
        history = trainer.state.log_history

    student_dir = output_dir / "student"
    save_started = time.perf_counter()
    _save_student(trainer, prepared, cfg, student_dir)
    phase_seconds = {"training": training_seconds, "evaluation": trainer.evaluation_seconds,
                     "checkpoints": trainer.checkpoint_seconds, "save_student": time.perf_counter() - save_started}
    final = _final_values(history)
    examples = prepared.checked.validation.examples
    predictions = {
        "id": [e.id for e in examples],
        "gold": [e.correct for e in examples],
        "teacher_answer": prepared.teacher_answers,
        "teacher_letter": [letter or "" for letter in prepared.teacher_letters],
        "student_answer": store["answers"],
        "student_letter": [letter or "" for letter in store["letters"]],
    }
    return TrainResult(store["scores"], final, history, trainer.state.global_step, train_seconds, student_dir,
                       predictions, phase_seconds=phase_seconds)


def _final_values(history: list[dict[str, Any]]) -> dict[str, float]:
    final: dict[str, float] = {}
    for entry in history:
        for key in ("loss", "ce_loss", "hidden_mse", "eval_loss"):
            if key in entry:
                final[key] = entry[key]
    return final


def _save_student(trainer, prepared: Prepared, cfg: Config, student_dir: Path) -> None:
    """Save the student, its tokenizer, generation settings and the projection (beside, not inside, the model)."""
    from safetensors.torch import save_file

    from hdkd.pyfunc_model import GENERATION_FILE
    from hdkd.trainer import PROJECTION_FILE

    if student_dir.exists():
        shutil.rmtree(student_dir)
    trainer.model.save_pretrained(student_dir)
    prepared.tokenizer.save_pretrained(student_dir)
    caching.write_json_atomic(student_dir / GENERATION_FILE, {
        "max_new_tokens": cfg.generation.max_new_tokens, "num_beams": cfg.generation.num_beams,
        "batch_size": cfg.generation.batch_size, "max_source_length": cfg.data.max_source_length,
        "random_weights": prepared.random_weights,
    })
    projection_dir = student_dir.parent / "projection"
    projection_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.projection.state_dict().items()}
    save_file(state, str(projection_dir / PROJECTION_FILE), metadata={"direction": cfg.distill.projection})
