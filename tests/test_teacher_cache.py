"""Speed-related behaviour: cached teacher hidden states, batching, padding, beam search and phase times."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hdkd.config import load_config
from hdkd.generation import cut_at_eos, encoder_groups, generate, round_up
from hdkd.trainer import DistillationCollator, _EpochSeededLengthSampler


def _prepare(values: dict):
    from hdkd import teacher
    from hdkd.pipeline import check_inputs, prepare

    before = teacher.counter.generations
    prepared = prepare(check_inputs(load_config(None, values)))
    return prepared, teacher.counter.generations - before


def _train_history(values: dict, output_dir: Path) -> list[dict]:
    from hdkd.pipeline import train_and_evaluate

    prepared, _ = _prepare(values)
    cfg = prepared.cfg
    result = train_and_evaluate(prepared, cfg, output_dir)
    return [entry for entry in result.history if "hidden_mse" in entry and "eval_loss" not in entry]


# --- Cached and online teacher --------------------------------------------------------------------------


def test_cached_hidden_mse_equals_online(tiny_config, tmp_path):
    values = {**tiny_config, "training.num_train_epochs": 1, "training.bf16": False}
    cached = _train_history({**values, "distill.teacher_hidden": "cached"}, tmp_path / "cached")
    online = _train_history({**values, "distill.teacher_hidden": "online", "cache_dir": str(tmp_path / "cache2")},
                            tmp_path / "online")

    # 24 rows in micro-batches of 4: 6 steps, each logged once, in the same order in both runs.
    assert [entry["step"] for entry in cached] == list(range(1, 7))
    assert [entry["step"] for entry in online] == list(range(1, 7))
    for a, b in zip(cached, online):
        assert a["hidden_mse"] == pytest.approx(b["hidden_mse"], abs=1e-5), a["step"]
        assert a["ce_loss"] == pytest.approx(b["ce_loss"], abs=1e-5), a["step"]
        assert a["hidden_mse"] > 0


def test_second_prepare_generates_nothing(tiny_config):
    first, first_generations = _prepare(tiny_config)
    second, second_generations = _prepare(tiny_config)

    # 24 training and 16 validation answers the first time; the second run reads them all from the cache.
    assert first_generations == 24 + 16
    assert second_generations == 0
    assert second.teacher_train.from_cache and second.teacher_validation.from_cache
    assert second.teacher_train.labels == first.teacher_train.labels
    for a, b in zip(first.teacher_train.hidden, second.teacher_train.hidden):
        assert torch.equal(a, b)


def test_other_beam_count_builds_new_entry(tiny_config):
    _prepare(tiny_config)
    _, generations = _prepare({**tiny_config, "generation.num_beams": 2})
    assert generations == 24 + 16


# --- Padding and batching -------------------------------------------------------------------------------


def test_collator_pads_to_multiple_of_8():
    items = [
        {"input_ids": [5, 6, 7, 8, 1], "labels": [9, 1], "teacher_hidden": torch.ones(2, 4)},
        {"input_ids": list(range(2, 12)) + [1], "labels": [3, 4, 1], "teacher_hidden": torch.full((3, 4), 2.0)},
    ]
    batch = DistillationCollator(pad_id=0)(items)

    # The longest prompt has 11 tokens: both rows are padded to 16.
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 11]
    assert batch["input_ids"][0, 5:].eq(0).all()
    # Labels pad to the longest label with -100; teacher states pad with zeros at the same positions.
    assert batch["labels"].tolist() == [[9, 1, -100], [3, 4, 1]]
    assert batch["teacher_hidden"].shape == (2, 3, 4)
    assert batch["teacher_hidden"][0, 2].eq(0).all()
    assert batch["teacher_hidden"][1].eq(2.0).all()


def test_encoder_groups_limit_padding():
    lengths = [40, 39, 38, 20, 19, 5]
    groups = encoder_groups(lengths, max_padding=0.1)
    assert groups == [slice(0, 3), slice(3, 4), slice(4, 5), slice(5, 6)]

    # Every group of more than one prompt pads to at most 10% of its tokens.
    lengths = sorted((random.Random(0).randint(20, 190) for _ in range(64)), reverse=True)
    groups = encoder_groups(lengths, max_padding=0.1)
    assert [i for g in groups for i in range(g.start, g.stop)] == list(range(64))
    for group in groups:
        members = lengths[group]
        if len(members) > 1:
            assert round_up(members[0]) * len(members) <= 1.1 * sum(members)


def test_sampler_batches_sorted_lengths():
    lengths = random.Random(1).sample(range(10, 200), 40)
    sampler = _EpochSeededLengthSampler(4, lengths, seed=3)
    sampler.set_epoch(0)
    order = list(sampler)
    batches = [order[i: i + 4] for i in range(0, 40, 4)]

    # 40 prompts are one megabatch: each batch contains 4 neighbours in length order, the longest batch first.
    by_length = sorted(range(40), key=lambda i: -lengths[i])
    expected = [set(by_length[i: i + 4]) for i in range(0, 40, 4)]
    assert sorted(order) == list(range(40))
    assert sorted(map(sorted, map(set, batches))) == sorted(map(sorted, expected))
    assert set(batches[0]) == expected[0]

    # The order is a function of seed and epoch only, and changes between epochs.
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order


# --- Generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_generation_matches_single(tiny_models, num_beams, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM

    from hdkd import generation

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the hidden states should come from the decoding steps")

    monkeypatch.setattr(generation, "decoder_hidden_for_labels", no_second_pass)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_models["teacher"]).eval()
    rng = random.Random(num_beams)
    # Prompt lengths far apart, so the batch is encoded in several groups of different widths.
    prompts = [[rng.randint(3, 250) for _ in range(n)] + [1] for n in (3, 9, 17, 30, 31, 40)]
    result = generate(model, prompts, pad_id=0, eos_id=1, max_new_tokens=5, num_beams=num_beams, batch_size=6,
                      device=torch.device("cpu"), bf16=False, max_label_length=32, with_hidden=True)

    # One prompt at a time with transformers' own cache gives the same answers, and a teacher-forced forward
    # pass over each answer gives the same last decoder hidden states.
    with torch.no_grad():
        for prompt, answer, hidden in zip(prompts, result.token_ids, result.hidden):
            single = model.generate(input_ids=torch.tensor([prompt]), num_beams=num_beams, max_new_tokens=5,
                                    do_sample=False, pad_token_id=0, eos_token_id=1)
            assert answer == cut_at_eos(single[0, 1:].tolist(), 1)
            out = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer]), output_hidden_states=True)
            assert hidden.shape == (len(answer), model.config.d_model)
            assert torch.allclose(out.decoder_hidden_states[-1][0], hidden, atol=1e-5)


# --- Phase times ----------------------------------------------------------------------------------------


def test_report_has_phase_times(mlflow_store, tiny_config):
    from hdkd.runner import run_training

    cfg = load_config(None, {**tiny_config, "training.num_train_epochs": 1, "training.save_steps": 4,
                             "tracking.log_model": False})
    outcome = run_training(cfg)
    report = json.loads((Path(cfg.output_dir) / "report.json").read_text(encoding="utf-8"))
    phases = report["phase_seconds"]

    assert set(phases) == {"teacher_train", "teacher_validation", "training", "evaluation", "checkpoints",
                           "save_student"}
    assert all(value > 0 for value in phases.values())
    assert phases["teacher_train"] + phases["teacher_validation"] == pytest.approx(report["teacher_seconds"])
    # The training phase excludes the evaluation and the checkpoint written inside Trainer.train (at the end).
    inside = phases["training"] + phases["evaluation"] + phases["checkpoints"]
    assert inside == pytest.approx(outcome.result.train_seconds)
    assert phases["training"] < outcome.result.train_seconds

    # 6 steps, a checkpoint every 4: the one of the last step has no optimizer state, since nothing resumes
    # training from it.
    output_dir = Path(cfg.output_dir)
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (output_dir / "checkpoint-4" / "optimizer.pt").is_file()
    assert not (output_dir / "checkpoint-6" / "optimizer.pt").exists()
    assert (output_dir / "checkpoint-6" / "model.safetensors").is_file()
    assert (output_dir / "checkpoint-6" / "trainer_state.json").is_file()
